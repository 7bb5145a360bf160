"""
Inputs the models cannot turn into finite outputs are refused with a `ValueError` that says what was found: an empty
batch (every model class), pixel values far beyond any normalised image (they overflow to NaN), and factors passed to
`StellarForImageReconstruction.reconstruct` of the wrong type, shape or dtype. `reconstruct` casts float64 factors
as `forward` casts float64 images. The value checks read the input once.
"""

import pytest
import torch
from stellar_tester import (
    ALL_CASES,
    HIDDEN,
    NUM_PATCHES,
    NUM_SPARSE,
    RECONSTRUCTION_PIXEL,
    build_model,
    make_inputs,
    make_pixel_values,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stellar_hf.modeling_stellar import (
    PIXEL_VALUE_LIMIT,
    check_input_values,
    check_pixel_values,
)

# ---------------------------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_empty_batch_is_refused_by_every_model_class(case):
    model = build_model(case, perturb=False)
    inputs = make_inputs(case, model.config, batch_size=0)
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 32, 32\)\)"):
        model(**inputs)


# ---------------------------------------------------------------------------------------------- magnitude bound


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
@pytest.mark.parametrize("scale", [1e20, -1e6])
def test_pixel_values_far_beyond_any_image_are_refused(case, scale):
    model = build_model(case, perturb=False)
    inputs = make_inputs(case, model.config)
    inputs["pixel_values"] = inputs["pixel_values"] * scale
    with pytest.raises(ValueError, match=r"pixel_values holds values of magnitude up to .* beyond the limit of 10000"):
        model(**inputs)


def test_huge_pixel_values_would_give_nan_without_the_check(monkeypatch):
    # Why the bound exists: 1e20 is finite, yet the encoder's LayerNorm squares the patch embeddings and overflows.
    model = build_model(RECONSTRUCTION_PIXEL)
    monkeypatch.setattr("stellar_hf.modeling_stellar.check_pixel_values", lambda *args, **kwargs: None)
    with torch.no_grad():
        output = model(make_pixel_values() * 1e20)
    assert not torch.isfinite(output.sparse_tokens).all()


def test_the_refusal_says_what_was_found_and_why():
    pixel_values = make_pixel_values()
    pixel_values[1, 2, 3, 4] = 3e7
    with pytest.raises(ValueError) as error:
        check_pixel_values(pixel_values, 3, 8)
    message = str(error.value)
    assert "3e+07" in message and "10000" in message
    assert "normalised images" in message and "NaN" in message and "StellarImageProcessor" in message


def test_the_bound_itself_and_every_plausible_image_pass():
    # A [0, 255] image normalised with the ImageNet statistics (a common mistake, still an image) stays within it.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    wrong_scale = (torch.full((1, 3, 32, 32), 255.0) - mean) / std
    for pixel_values in (wrong_scale, torch.full((1, 3, 32, 32), PIXEL_VALUE_LIMIT), -wrong_scale):
        check_pixel_values(pixel_values, 3, 8)
    with pytest.raises(ValueError, match="beyond the limit"):
        check_pixel_values(torch.full((1, 3, 32, 32), PIXEL_VALUE_LIMIT * 1.01), 3, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_bound_applies_in_every_dtype(dtype):
    pixel_values = make_pixel_values().to(dtype)
    check_pixel_values(pixel_values, 3, 8)
    pixel_values[0, 0, 0, 0] = 2e4
    with pytest.raises(ValueError, match="beyond the limit"):
        check_pixel_values(pixel_values, 3, 8)
    pixel_values[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_pixel_values(pixel_values, 3, 8)


class FullSizeReads(TorchDispatchMode):
    """Counts the aten ops that read a tensor of `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))  # fused (foreach) ops take lists of tensors
        tensors = [value for value in leaves if isinstance(value, torch.Tensor)]
        if any(tensor.numel() == self.numel for tensor in tensors):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_value_check_reads_the_input_once():
    pixel_values = make_pixel_values()
    with FullSizeReads(pixel_values.numel()) as reads:
        check_pixel_values(pixel_values, 3, 8)
    # `detach` is a view (no read); the only pass over the data is one aminmax.
    assert [op for op in reads.ops if not op.startswith("detach")] == ["aminmax.default"], reads.ops


def test_several_inputs_are_checked_with_one_reduction_and_name_the_bad_one():
    tensors = {"first": make_pixel_values(), "second": make_pixel_values(seed=1), "third": make_pixel_values(seed=2)}
    check_input_values(tensors, PIXEL_VALUE_LIMIT)
    tensors["second"][0, 1, 2, 3] = float("inf")
    tensors["third"][0, 0, 0, 0] = 2e4
    with pytest.raises(ValueError, match=r"^second contains NaN or infinite values"):
        check_input_values(tensors, PIXEL_VALUE_LIMIT)
    tensors["second"][0, 1, 2, 3] = 0.0
    with pytest.raises(ValueError, match=r"^third holds values of magnitude up to 2e\+04"):
        check_input_values(tensors, PIXEL_VALUE_LIMIT)


# ---------------------------------------------------------------------------------------------- reconstruct


@pytest.fixture(scope="module")
def factors():
    """A tiny pixel reconstruction model and the factors of two images: tokens `(2, r, d)`, map `(2, N, r)`."""
    model = build_model(RECONSTRUCTION_PIXEL)
    with torch.no_grad():
        output = model(make_pixel_values())
    return model, output.sparse_tokens, output.spatial_map, output.reconstruction


def test_reconstruct_casts_float64_like_forward(factors):
    model, tokens, spatial_map, reconstruction = factors
    with torch.no_grad():
        in_double = model.reconstruct(tokens.double(), spatial_map.double())
        from_double_images = model(make_pixel_values().double()).reconstruction
    assert in_double.dtype == reconstruction.dtype == from_double_images.dtype == torch.float32
    torch.testing.assert_close(in_double, reconstruction, rtol=0, atol=1e-6)


def test_reconstruct_accepts_another_token_count(factors):
    # Removing token 0 from both factors is a valid edit: the decoder reads only the product.
    model, tokens, spatial_map, _ = factors
    with torch.no_grad():
        images = model.reconstruct(tokens[:, 1:], spatial_map[..., 1:])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


BAD_FACTORS = {
    "tokens-not-a-tensor": (lambda t, m: (t.numpy(), m), r"sparse_tokens must be a torch.Tensor"),
    "map-not-a-tensor": (lambda t, m: (t, m.tolist()), r"spatial_map must be a torch.Tensor"),
    "tokens-integer": (lambda t, m: (t.long(), m), r"sparse_tokens must be a floating-point tensor, got torch.int64"),
    "map-boolean": (lambda t, m: (t, m > 0.5), r"spatial_map must be a floating-point tensor, got torch.bool"),
    "tokens-2-d": (lambda t, m: (t[0], m), rf"sparse_tokens must have shape \(batch, num_tokens, {HIDDEN}\)"),
    "tokens-width": (lambda t, m: (t[..., :-1], m), rf"sparse_tokens must have shape \(batch, num_tokens, {HIDDEN}\)"),
    "map-2-d": (lambda t, m: (t, m[0]), r"spatial_map must have shape \(batch, num_patches, num_tokens\)"),
    "map-transposed": (
        lambda t, m: (t, m.transpose(1, 2)),
        rf"spatial_map of shape \(2, {NUM_SPARSE}, {NUM_PATCHES}\) does not match sparse_tokens",
    ),
    "batch-mismatch": (lambda t, m: (t, m[:1]), r"expected \(batch=2, num_patches, num_tokens=4\)"),
    "token-count-mismatch": (lambda t, m: (t[:, :3], m), r"expected \(batch=2, num_patches, num_tokens=3\)"),
    "empty-batch": (lambda t, m: (t[:0], m[:0]), r"are empty; decoding needs at least one image"),
    "no-patch": (lambda t, m: (t, m[:, :0]), r"are empty; decoding needs at least one image"),
    "nan-token": (
        lambda t, m: (t.clone().index_fill_(1, torch.tensor([0]), float("nan")), m),
        r"sparse_tokens contains NaN",
    ),
    "inf-map": (lambda t, m: (t, m.clone().fill_(float("inf"))), r"spatial_map contains NaN or infinite"),
    "non-square": (lambda t, m: (t, m[:, :12]), r"12 patches are not a square grid"),
}


@pytest.mark.parametrize("bad", BAD_FACTORS, ids=str)
def test_reconstruct_refuses_bad_factors_naming_the_argument(factors, bad):
    model, tokens, spatial_map, _ = factors
    make, message = BAD_FACTORS[bad]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.reconstruct(*make(tokens, spatial_map))


@pytest.mark.parametrize("grid_size", [(4, 5), (2, 8, 1), (-4, -4), (4.0, 4.0), "44", (True, 16)])
def test_reconstruct_refuses_a_grid_that_does_not_hold_the_patches(factors, grid_size):
    model, tokens, spatial_map, _ = factors
    with pytest.raises(ValueError, match=r"grid_size must be \(height, width\).*height \* width = 16"):
        model.reconstruct(tokens, spatial_map, grid_size=grid_size)
