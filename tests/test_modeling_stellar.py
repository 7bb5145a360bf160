"""
Behavioural tests of the STELLAR models (spec sections 1-3 and the issue's model contract), on tiny configs.

The shared checks (save/load, init, determinism, batching, tuple/dict outputs, gradients, gradient checkpointing,
eager vs SDPA, dtypes) run on every class through `stellar_tester`; the rest pin down one class's behaviour.
"""

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from stellar_tester import (
    ALL_CASES,
    BATCH_SIZE,
    CLASSIFICATION,
    GRID,
    HIDDEN,
    MODEL,
    NUM_PATCHES,
    NUM_SPARSE,
    PER_IMAGE_CASES,
    PRETRAINING,
    PRETRAINING_EMA,
    PRETRAINING_VQ,
    RECONSTRUCTION_PIXEL,
    RECONSTRUCTION_VQ,
    SEQUENCE_LENGTH,
    assert_gradients_close,
    assert_outputs_close,
    assert_state_dicts_equal,
    build_model,
    make_inputs,
    make_pixel_values,
    make_teacher_targets,
    output_tensors,
    parameter_gradients,
    scalar_objective,
    tiny_config,
    trainable_parameters_without_gradient,
)
from torch.utils._python_dispatch import TorchDispatchMode

from stellar_hf import (
    MaskGitVQGANConfig,
    MaskGitVQGANModel,
    StellarConfig,
    StellarForImageClassification,
    StellarForImageReconstruction,
    StellarModel,
    StellarModelOutput,
)
from stellar_hf.losses_stellar import clustering_cross_entropy
from stellar_hf.modeling_stellar import (
    STELLAR_AUTO_MAP,
    StellarForPreTraining,
    StellarMLP,
    encode_view_rows,
    last_layer_rows,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

case_parametrize = pytest.mark.parametrize("case", ALL_CASES, ids=str)
per_image_parametrize = pytest.mark.parametrize("case", PER_IMAGE_CASES, ids=str)


def run(model, case, **kwargs):
    """Forward `model` on the deterministic inputs of `case` (overridable through kwargs)."""
    inputs = {**make_inputs(case, model.config), **kwargs}
    return model(**inputs)


def unnormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * IMAGENET_STD + IMAGENET_MEAN


def config_fields(config: StellarConfig) -> dict:
    """The config as a dict, without `_name_or_path` (which records where it was loaded from) and the `auto_map`
    that only saved configs carry."""
    return {key: value for key, value in config.to_dict().items() if key not in ("_name_or_path", "auto_map")}


# ---------------------------------------------------------------------------------------------- save / load / init


@case_parametrize
def test_save_load_round_trip_keeps_every_tensor_and_output(case, tmp_path):
    model = build_model(case)
    with torch.no_grad():
        expected = run(model, case)
    model.save_pretrained(tmp_path)
    saved_keys = set(load_file(str(tmp_path / "model.safetensors")))

    reloaded = case.model_class.from_pretrained(tmp_path).eval()
    assert_state_dicts_equal(reloaded.state_dict(), model.state_dict())
    # The tensors that the generic init path could silently re-draw after a reload must all be in the file.
    prefix = "" if case.model_class is StellarModel else "stellar."
    must_be_saved = [f"{prefix}embeddings.sparse_tokens", f"{prefix}embeddings.position_embeddings"]
    if case.model_class in (StellarForImageReconstruction, StellarForPreTraining):
        must_be_saved.append("decoder.position_encoding.gaussian_matrix")
    if case.is_pretraining:
        must_be_saved += ["sparse_clustering_head.prototypes.weight", "cls_clustering_head.prototypes.weight"]
    assert set(must_be_saved) <= saved_keys, sorted(set(must_be_saved) - saved_keys)
    # The EMA teacher is training state, never part of a model's weights (see test_ema_teacher.py).
    assert not [key for key in saved_keys if key.startswith("teacher.")]
    if case.model_class in (StellarForImageReconstruction, StellarForPreTraining):
        assert "decoder.position_encoding.gaussian_matrix" in dict(reloaded.named_buffers())
    assert config_fields(reloaded.config) == config_fields(model.config)
    with torch.no_grad():
        assert_outputs_close(run(reloaded, case), expected, atol=0.0, what="outputs after reload")


def test_saved_config_names_every_head_without_changing_the_models_config(tmp_path):
    # transformers itself records `architectures` and `dtype` when saving; `auto_map` is ours to leave alone.
    model = build_model(CLASSIFICATION, perturb=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == STELLAR_AUTO_MAP
    assert not hasattr(model.config, "auto_map") and "auto_map" not in model.config.to_dict()
    model.config.auto_map = {"AutoBackbone": "elsewhere.Backbone"}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoBackbone": "elsewhere.Backbone", **STELLAR_AUTO_MAP
    }
    assert model.config.auto_map == {"AutoBackbone": "elsewhere.Backbone"}


def test_head_and_base_checkpoints_load_into_each_other(tmp_path):
    pretraining = build_model(PRETRAINING)
    pretraining.save_pretrained(tmp_path / "pretraining")
    base = StellarModel.from_pretrained(tmp_path / "pretraining")
    assert_state_dicts_equal(base.state_dict(), pretraining.stellar.state_dict())

    base.save_pretrained(tmp_path / "base")
    classifier, info = StellarForImageClassification.from_pretrained(tmp_path / "base", output_loading_info=True)
    # The probe may leave out the factorization it never uses; everything it keeps comes from the checkpoint.
    loaded, saved = classifier.stellar.state_dict(), base.state_dict()
    assert {key for key in saved if not key.startswith("factorization.")} <= set(loaded) <= set(saved)
    assert_state_dicts_equal(loaded, {key: saved[key] for key in loaded})
    assert sorted(info["missing_keys"]) == [
        "classifier.bias", "classifier.weight", "classifier_norm.bias", "classifier_norm.weight"
    ]  # fmt: skip


def moderate_config(**overrides) -> StellarConfig:
    """Big enough for init statistics: 64x256 sparse tokens, 1024x64 prototypes, a 2x256 Gaussian matrix."""
    sizes = {
        "hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 256,
        "num_sparse_tokens": 64, "decoder_hidden_size": 512, "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 8, "decoder_intermediate_size": 256, "num_prototypes": 1024,
        "prototype_dim": 64, "predictor_hidden_size": 128,
    }  # fmt: skip
    return tiny_config(**{**sizes, **overrides})


def assert_std(tensor: torch.Tensor, expected: float, relative: float, name: str) -> None:
    std, mean = tensor.float().std().item(), tensor.float().mean().item()
    assert abs(std - expected) <= relative * expected, f"{name}: std {std:.4f}, expected {expected:.4f}"
    assert abs(mean) <= 4 * expected / math.sqrt(tensor.numel()) + 1e-6, f"{name}: mean {mean:.4f} is not ~0"


def test_init_statistics():
    torch.manual_seed(0)
    config = moderate_config()
    model = StellarForPreTraining(config)
    assert_std(model.stellar.embeddings.sparse_tokens, config.hidden_size**-0.5, 0.05, "sparse_tokens")
    assert_std(model.decoder.position_encoding.gaussian_matrix, 1.0, 0.15, "gaussian_matrix")
    assert model.decoder.position_encoding.gaussian_matrix.shape == (2, config.decoder_hidden_size // 2)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weight = getattr(model.stellar.encoder.layers[0].attention, name).weight
        assert_std(weight, config.initializer_range, 0.05, name)
    assert_std(model.stellar.embeddings.position_embeddings, config.initializer_range, 0.05, "position_embeddings")
    assert torch.count_nonzero(model.stellar.encoder.layers[0].mlp.fc1.bias) == 0
    assert torch.equal(model.stellar.encoder.layernorm.weight, torch.ones(config.hidden_size))


def test_init_of_modules_missing_from_a_checkpoint(tmp_path):
    """Modules absent from a base checkpoint are initialised like a fresh model's, the loaded encoder untouched."""
    torch.manual_seed(0)
    config = moderate_config()
    base = StellarModel(config)
    base.save_pretrained(tmp_path)
    model = StellarForPreTraining.from_pretrained(tmp_path)
    assert_state_dicts_equal(model.stellar.state_dict(), base.state_dict())
    assert_std(model.decoder.position_encoding.gaussian_matrix, 1.0, 0.15, "gaussian_matrix")
    assert_std(model.decoder.decoder_proj.weight, config.initializer_range, 0.05, "decoder_proj")
    assert_std(model.sparse_clustering_head.predictor[0].weight, config.initializer_range, 0.05, "predictor")


@pytest.mark.parametrize("source", ["fresh", "missing-from-checkpoint"])
def test_prototypes_start_as_unit_gaussians(source, tmp_path):
    torch.manual_seed(0)
    config = moderate_config()
    if source == "fresh":
        model = StellarForPreTraining(config)
    else:
        StellarModel(config).save_pretrained(tmp_path)
        model = StellarForPreTraining.from_pretrained(tmp_path)
    assert_std(model.sparse_clustering_head.prototypes.weight, 1.0, 0.05, "sparse prototypes")
    assert_std(model.cls_clustering_head.prototypes.weight, 1.0, 0.05, "cls prototypes")


@case_parametrize
def test_same_seed_builds_identical_models(case):
    first = build_model(case, seed=0, perturb=False)
    second = build_model(case, seed=0, perturb=False)
    assert_state_dicts_equal(second.state_dict(), first.state_dict())
    other = build_model(case, seed=1, perturb=False)
    prefix = "" if case.model_class is StellarModel else "stellar."
    key = f"{prefix}embeddings.sparse_tokens"
    assert not torch.equal(other.state_dict()[key], first.state_dict()[key])


# ---------------------------------------------------------------------------------------------- forward contract


@case_parametrize
def test_train_and_eval_mode_give_the_same_outputs(case):
    model = build_model(case)
    with torch.no_grad():
        evaluated = run(model, case)
        trained = run(model.train(), case)
    assert_outputs_close(trained, evaluated, atol=1e-6, what="train vs eval")


@per_image_parametrize
def test_batch_independence(case):
    model = build_model(case)
    inputs = make_inputs(case, model.config, batch_size=3, labels=False)
    inputs.pop("target_codes", None)  # the loss averages over the batch; every other output is per image
    with torch.no_grad():
        batched = output_tensors(model(**inputs))
        for index in range(3):
            single = output_tensors(model(**{key: value[index : index + 1] for key, value in inputs.items()}))
            assert single.keys() == batched.keys()
            for name, tensor in single.items():
                if tensor.ndim == 0:  # a batch-mean loss
                    continue
                torch.testing.assert_close(tensor, batched[name][index : index + 1], rtol=0, atol=1e-5, msg=name)


@case_parametrize
def test_tuple_and_dict_outputs_agree(case):
    model = build_model(case)
    with torch.no_grad():
        as_dict = run(model, case, return_dict=True)
        as_tuple = run(model, case, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected) > 0
    for index, (actual, reference) in enumerate(zip(as_tuple, expected)):
        torch.testing.assert_close(actual, reference, rtol=0, atol=0, msg=f"tuple element {index}")


def test_model_output_field_order():
    assert [field.name for field in dataclasses.fields(StellarModelOutput)] == [
        "last_hidden_state", "pooler_output", "sparse_tokens", "spatial_map", "lowrank_features",
        "dense_features", "cls_embedding", "hidden_states", "attentions",
    ]  # fmt: skip
    model = build_model(MODEL)
    with torch.no_grad():
        output = model(make_pixel_values(), return_dict=False)
    # Without hidden states and attentions the tuple holds the seven tensors, last_hidden_state first.
    assert [tuple(tensor.shape) for tensor in output] == [
        (BATCH_SIZE, SEQUENCE_LENGTH, HIDDEN), (BATCH_SIZE, HIDDEN), (BATCH_SIZE, NUM_SPARSE, HIDDEN),
        (BATCH_SIZE, NUM_PATCHES, NUM_SPARSE), (BATCH_SIZE, NUM_PATCHES, HIDDEN), (BATCH_SIZE, NUM_PATCHES, HIDDEN),
        (BATCH_SIZE, HIDDEN),
    ]  # fmt: skip


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hidden_states_and_attentions(attn_implementation):
    model = build_model(MODEL, attn_implementation=attn_implementation)
    pixel_values = make_pixel_values()
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True, output_attentions=True)
        embeddings = model.embeddings(pixel_values)
    config = model.config
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    for hidden_state in output.hidden_states:
        assert hidden_state.shape == (BATCH_SIZE, SEQUENCE_LENGTH, HIDDEN)
    torch.testing.assert_close(output.hidden_states[0], embeddings)
    torch.testing.assert_close(model.encoder.layernorm(output.hidden_states[-1]), output.last_hidden_state)
    assert len(output.attentions) == config.num_hidden_layers
    for attention in output.attentions:
        assert attention.shape == (BATCH_SIZE, config.num_attention_heads, SEQUENCE_LENGTH, SEQUENCE_LENGTH)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), rtol=0, atol=1e-5)
        assert (attention >= 0).all()
    # Asking for them must not change the features.
    with torch.no_grad():
        plain = model(pixel_values)
    torch.testing.assert_close(plain.last_hidden_state, output.last_hidden_state, rtol=0, atol=1e-5)


def test_config_flags_turn_on_hidden_states_and_attentions():
    model = build_model(MODEL, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        output = model(make_pixel_values())
    assert len(output.hidden_states) == 3 and len(output.attentions) == 2


@pytest.mark.parametrize("temperature", [0.06, None], ids=["cosine", "dot-product"])
def test_factorization_outputs(temperature):
    model = build_model(MODEL, spatial_temperature=temperature)
    with torch.no_grad():
        output = model(make_pixel_values())
        cls, dense, sparse = output.last_hidden_state.split([1, NUM_PATCHES, NUM_SPARSE], dim=1)
        dense_projected = model.factorization.dense_proj(dense)
        sparse_projected = model.factorization.sparse_proj(sparse)
    torch.testing.assert_close(output.cls_embedding, cls[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(output.dense_features, dense, rtol=0, atol=0)
    torch.testing.assert_close(output.sparse_tokens, sparse, rtol=0, atol=0)
    if temperature is None:
        scores = dense_projected @ sparse_projected.transpose(1, 2) / math.sqrt(HIDDEN)
    else:
        dense_projected = F.normalize(dense_projected, dim=-1, eps=1e-7)
        sparse_projected = F.normalize(sparse_projected, dim=-1, eps=1e-7)
        scores = dense_projected @ sparse_projected.transpose(1, 2) / temperature
    torch.testing.assert_close(output.spatial_map, scores.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(output.spatial_map.sum(-1), torch.ones(BATCH_SIZE, NUM_PATCHES), rtol=0, atol=1e-5)
    torch.testing.assert_close(output.lowrank_features, output.spatial_map @ output.sparse_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.pooler_output, output.sparse_tokens.mean(1), rtol=0, atol=1e-6)
    assert torch.linalg.matrix_rank(output.lowrank_features[0]) <= NUM_SPARSE


def test_sparse_tokens_have_no_position_embedding():
    model = build_model(MODEL)
    with torch.no_grad():
        embeddings = model.embeddings(make_pixel_values())
    expected = model.embeddings.sparse_tokens.unsqueeze(0).expand(BATCH_SIZE, -1, -1)
    torch.testing.assert_close(embeddings[:, -NUM_SPARSE:], expected, rtol=0, atol=0)
    torch.testing.assert_close(
        embeddings[:, 0],
        (model.embeddings.cls_token + model.embeddings.position_embeddings[:, 0]).expand(2, 1, -1)[:, 0],
    )


# ---------------------------------------------------------------------------------------------- gradients




@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gradient_reaches_every_trainable_parameter(case):
    model = build_model(case).train()
    scalar_objective(case, run(model, case)).backward()
    assert trainable_parameters_without_gradient(model) == []
    assert sum(parameter.requires_grad for parameter in model.parameters()) > 0


@pytest.fixture
def layer_calls(monkeypatch):
    """
    Counts runs of `StellarLayer.forward`'s body: a checkpointed layer runs again during backward.

    Counted by wrapping the MLP's `forward` (module hooks do not fire during torch's non-reentrant recomputation,
    and transformers 5.x checkpoints `forward`, not `__call__`).
    """
    calls = []
    original = StellarMLP.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StellarMLP, "forward", counting)
    return calls


@case_parametrize
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(case, layer_calls):
    calls = layer_calls
    model = build_model(case).train()
    loss = scalar_objective(case, run(model, case))
    loss.backward()
    plain_calls = len(calls)
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }

    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    calls.clear()
    checkpointed_loss = scalar_objective(case, run(model, case))
    checkpointed_loss.backward()
    assert len(calls) > plain_calls, "no layer was recomputed: gradient checkpointing is not active"
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    checkpointed = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert checkpointed.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_enable_alias(layer_calls):
    calls = layer_calls
    model = build_model(MODEL).train()
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("this transformers has no activation_checkpointing_enable")
    model.activation_checkpointing_enable()
    model(make_pixel_values()).last_hidden_state.sum().backward()
    assert len(calls) == 2 * model.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------- attention backends


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@case_parametrize
def test_eager_and_sdpa_agree(case, sdpa_calls):
    eager = build_model(case, attn_implementation="eager")
    sdpa = build_model(case, attn_implementation="sdpa", perturb=False)
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        eager_output = run(eager, case)
        assert not sdpa_calls, "the eager model called scaled_dot_product_attention"
        sdpa_output = run(sdpa, case)
    assert sdpa_calls, "the sdpa model never called scaled_dot_product_attention"
    # rtol for the losses, whose magnitude exceeds 1.
    assert_outputs_close(sdpa_output, eager_output, atol=1e-5, rtol=1e-5, what="sdpa vs eager")


def test_attn_implementation_through_from_pretrained(tmp_path, sdpa_calls):
    build_model(MODEL).save_pretrained(tmp_path)
    eager = StellarModel.from_pretrained(tmp_path, attn_implementation="eager")
    sdpa = StellarModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    pixel_values = make_pixel_values()
    with torch.no_grad():
        eager_output = eager(pixel_values)
        assert not sdpa_calls
        sdpa_output = sdpa(pixel_values)
        assert sdpa_calls
        # Attentions are returned under sdpa too, and match eager's.
        sdpa_with_attentions = sdpa(pixel_values, output_attentions=True)
        eager_with_attentions = eager(pixel_values, output_attentions=True)
    assert_outputs_close(sdpa_output, eager_output, atol=1e-5)
    assert len(sdpa_with_attentions.attentions) == eager.config.num_hidden_layers
    assert_outputs_close(sdpa_with_attentions, eager_with_attentions, atol=1e-5)


# ---------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [MODEL, RECONSTRUCTION_PIXEL, CLASSIFICATION], ids=str)
def test_low_precision_forward_is_close_to_fp32(case, dtype):
    model = build_model(case)
    inputs = make_inputs(case, model.config, labels=False)
    with torch.no_grad():
        reference = output_tensors(model(**inputs))
        model.to(dtype)
        try:
            low = output_tensors(model(**{key: value.to(dtype) for key, value in inputs.items()}))
        except RuntimeError as error:  # e.g. an fp16 kernel missing on this CPU build
            pytest.skip(f"{dtype} forward unsupported here: {error}")
        from_fp32_input = output_tensors(model(**inputs))  # float32 pixels into a low-precision model are cast
    tolerance = 0.15 if dtype is torch.bfloat16 else 0.03
    for name, tensor in reference.items():
        if name != "loss":  # losses are computed in float32 on purpose
            assert low[name].dtype == dtype, f"{name} is {low[name].dtype}"
        assert torch.isfinite(low[name]).all(), name
        torch.testing.assert_close(low[name].float(), tensor, rtol=tolerance, atol=tolerance, msg=name)
        if name != "loss":  # the pixel loss compares with the input, which differs once rounded to low precision
            torch.testing.assert_close(from_fp32_input[name], low[name], rtol=0, atol=0, msg=name)


def test_low_precision_interpolated_positions():
    model = build_model(MODEL).to(torch.bfloat16)
    with torch.no_grad():
        output = model(make_pixel_values(height=48, width=32).to(torch.bfloat16))
    assert output.last_hidden_state.dtype == torch.bfloat16
    assert output.spatial_map.shape == (BATCH_SIZE, 24, NUM_SPARSE)


# ---------------------------------------------------------------------------------------------- interpolation


def expected_positions(model: StellarModel, height: int, width: int) -> torch.Tensor:
    """Spec section 1: bicubic resize of the square patch-position grid to (H/p, W/p), CLS position unchanged."""
    table = model.embeddings.position_embeddings
    grid = table[:, 1:].reshape(1, GRID, GRID, HIDDEN).permute(0, 3, 1, 2)
    patch_size = model.config.patch_size
    resized = F.interpolate(grid, size=(height // patch_size, width // patch_size), mode="bicubic", align_corners=False)
    return torch.cat((table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, HIDDEN)), dim=1)


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (48, 32), (32, 48), (64, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_interpolate_pos_encoding_other_sizes(size):
    height, width = size
    model = build_model(MODEL)
    num_patches = (height // 8) * (width // 8)
    pixel_values = make_pixel_values(height=height, width=width)
    with torch.no_grad():
        output = model(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        default = model(pixel_values)
        patches = model.embeddings.patch_embeddings(pixel_values)
        positions = expected_positions(model, height, width)
    assert output.last_hidden_state.shape == (BATCH_SIZE, 1 + num_patches + NUM_SPARSE, HIDDEN)
    assert output.spatial_map.shape == (BATCH_SIZE, num_patches, NUM_SPARSE)
    assert output.lowrank_features.shape == output.dense_features.shape == (BATCH_SIZE, num_patches, HIDDEN)
    # The patch embeddings got the resized table (64x16 has 16 patches, as many as the table: it must still resize).
    torch.testing.assert_close(
        output.hidden_states[0][:, 1 : 1 + num_patches] - patches, positions[:, 1:].expand(2, -1, -1)
    )
    if (height, width) == (64, 16):
        assert not torch.allclose(positions, model.embeddings.position_embeddings)
    torch.testing.assert_close(default.last_hidden_state, output.last_hidden_state, rtol=0, atol=0)


def test_interpolate_pos_encoding_false_refuses_other_sizes():
    model = build_model(MODEL)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(make_pixel_values(height=48, width=32), interpolate_pos_encoding=False)


def test_native_size_is_unchanged_by_interpolate_flag():
    model = build_model(MODEL)
    pixel_values = make_pixel_values()
    with torch.no_grad():
        outputs = [model(pixel_values, interpolate_pos_encoding=flag) for flag in (None, False, True)]
        embeddings = model.embeddings(pixel_values, interpolate_pos_encoding=True)
        patches = model.embeddings.patch_embeddings(pixel_values)
    for output in outputs[1:]:
        assert_outputs_close(output, outputs[0], atol=0.0)
    torch.testing.assert_close(
        embeddings[:, 1 : 1 + NUM_PATCHES] - patches, model.embeddings.position_embeddings[:, 1:].expand(2, -1, -1)
    )


# ---------------------------------------------------------------------------------------------- reconstruction


def fourier_encoding(gaussian_matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Spec section 3: patch centres ((j+0.5)/w, (i+0.5)/h) -> [-1, 1] -> @ G * 2pi -> interleaved sin, cos."""
    rows = [(i + 0.5) / height for i in range(height)]
    columns = [(j + 0.5) / width for j in range(width)]
    coordinates = torch.tensor([[x, y] for y in rows for x in columns]) * 2 - 1
    phases = 2 * math.pi * coordinates @ gaussian_matrix
    encoding = torch.empty(height * width, 2 * phases.shape[1])
    encoding[:, 0::2], encoding[:, 1::2] = phases.sin(), phases.cos()
    return encoding


@pytest.mark.parametrize("grid", [(4, 4), (6, 4), (2, 8)])
def test_decoder_position_encoding(grid):
    model = build_model(RECONSTRUCTION_PIXEL)
    module = model.decoder.position_encoding
    torch.testing.assert_close(module(*grid), fourier_encoding(module.gaussian_matrix, *grid), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (48, 32), (16, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixel_reconstruction_shape_and_loss(size):
    model = build_model(RECONSTRUCTION_PIXEL)
    pixel_values = make_pixel_values(height=size[0], width=size[1])
    with torch.no_grad():
        output = model(pixel_values)
    assert output.reconstruction.shape == (BATCH_SIZE, 3, *size)
    assert output.logits is None
    expected = F.mse_loss(output.reconstruction, unnormalize(pixel_values))
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(output.loss, F.mse_loss(output.reconstruction, pixel_values))


def test_reconstruct_from_factors_matches_forward_and_follows_edits():
    model = build_model(RECONSTRUCTION_PIXEL)
    with torch.no_grad():
        output = model(make_pixel_values())
        rebuilt = model.reconstruct(output.sparse_tokens, output.spatial_map)
        torch.testing.assert_close(rebuilt, output.reconstruction, rtol=0, atol=1e-6)
        # "Where": send every patch to token 0; "what": change token 0.
        edited_map = torch.zeros_like(output.spatial_map)
        edited_map[..., 0] = 1.0
        moved = model.reconstruct(output.sparse_tokens, edited_map)
        edited_tokens = output.sparse_tokens.clone()
        edited_tokens[:, 0] = -edited_tokens[:, 0]
        changed = model.reconstruct(edited_tokens, output.spatial_map)
    assert (moved - output.reconstruction).abs().max() > 1e-3
    assert (changed - output.reconstruction).abs().max() > 1e-3


def test_reconstruct_non_square_needs_grid_size():
    model = build_model(RECONSTRUCTION_PIXEL)
    with torch.no_grad():
        output = model(make_pixel_values(height=48, width=32))
        with pytest.raises(ValueError, match="grid_size"):
            model.reconstruct(output.sparse_tokens, output.spatial_map)
        rebuilt = model.reconstruct(output.sparse_tokens, output.spatial_map, grid_size=(6, 4))
    torch.testing.assert_close(rebuilt, output.reconstruction, rtol=0, atol=1e-6)


def test_reconstruct_from_lowrank_features_matches_forward():
    model = build_model(RECONSTRUCTION_PIXEL)
    with torch.no_grad():
        output = model(make_pixel_values(height=48, width=32))
        rebuilt = model.reconstruct(lowrank_features=output.lowrank_features, grid_size=(6, 4))
        prediction = model.decode_lowrank(output.lowrank_features, (6, 4))
    torch.testing.assert_close(rebuilt, output.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(prediction, output.reconstruction, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        model.reconstruct(output.sparse_tokens, output.spatial_map, lowrank_features=output.lowrank_features)
    with pytest.raises(ValueError, match="lowrank_features must have shape"):
        model.reconstruct(lowrank_features=output.lowrank_features[..., :-1], grid_size=(6, 4))


def test_decode_lowrank_is_decoder_then_head():
    # The decode path, step by step: decoder tokens on the grid, then the transposed convolution (pixel) or the
    # per-patch Linear (VQ).
    for case in (RECONSTRUCTION_PIXEL, RECONSTRUCTION_VQ):
        model = build_model(case)
        lowrank = torch.randn(BATCH_SIZE, 24, HIDDEN, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            tokens = model.decoder(lowrank, (6, 4))
            if case is RECONSTRUCTION_VQ:
                expected = model.reconstruction_head(tokens)
            else:
                expected = model.reconstruction_head(tokens.transpose(1, 2).reshape(BATCH_SIZE, -1, 6, 4))
            torch.testing.assert_close(model.decode_lowrank(lowrank, (6, 4)), expected, rtol=0, atol=0)


def test_vq_target_logits_and_loss():
    model = build_model(RECONSTRUCTION_VQ)
    inputs = make_inputs(RECONSTRUCTION_VQ, model.config)
    with torch.no_grad():
        output = model(**inputs)
        without_codes = model(inputs["pixel_values"])
    assert output.logits.shape == (BATCH_SIZE, NUM_PATCHES, model.config.vq_codebook_size)
    assert output.reconstruction is None
    expected = F.cross_entropy(output.logits.transpose(1, 2), inputs["labels"])
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-6)
    assert without_codes.loss is None
    torch.testing.assert_close(without_codes.logits, output.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="VQGAN|tokenizer"):
        model.reconstruct(output.sparse_tokens, output.spatial_map)
    with pytest.raises(ValueError, match="labels"):
        model(inputs["pixel_values"], labels=inputs["labels"][:, :-1])


def test_vq_codes_as_target_codes_still_work_with_a_deprecation_warning():
    model = build_model(RECONSTRUCTION_VQ)
    inputs = make_inputs(RECONSTRUCTION_VQ, model.config)
    with torch.no_grad():
        expected = model(**inputs)
        with pytest.warns(FutureWarning, match="labels"):
            old = model(inputs["pixel_values"], target_codes=inputs["labels"])
    assert_outputs_close(old, expected, atol=0.0, what="target_codes vs labels")


def tiny_vqgan() -> MaskGitVQGANModel:
    """A tokenizer with f = 8, so its 4x4 code grid on 32 px matches the encoder's patch grid."""
    torch.manual_seed(0)
    config = MaskGitVQGANConfig(
        hidden_channels=8, channel_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=8, codebook_size=16,
        codebook_dim=8, image_size=32, norm_num_groups=4,
    )  # fmt: skip
    return MaskGitVQGANModel(config).eval()


def test_vq_target_with_a_tokenizer():
    model = build_model(RECONSTRUCTION_VQ)
    tokenizer = tiny_vqgan()
    pixel_values = make_pixel_values()
    model.set_vq_tokenizer(tokenizer)
    assert model.vq_tokenizer is tokenizer
    with torch.no_grad():
        output = model(pixel_values)
        codes = tokenizer.encode(unnormalize(pixel_values))
        decoded = tokenizer.decode(output.logits.argmax(-1).view(BATCH_SIZE, GRID, GRID))
        rebuilt = model.reconstruct(output.sparse_tokens, output.spatial_map)
        with_labels = model(pixel_values, labels=codes)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits.transpose(1, 2), codes), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.vq_labels(pixel_values), codes, rtol=0, atol=0)
    assert_outputs_close(with_labels, output, atol=0.0, what="codes as labels vs codes from the tokenizer")
    assert output.reconstruction.shape == (BATCH_SIZE, 3, 32, 32)
    torch.testing.assert_close(output.reconstruction, decoded, rtol=0, atol=1e-6)
    torch.testing.assert_close(rebuilt, decoded, rtol=0, atol=1e-6)
    # Attached, but never part of the model's weights, parameters or submodules.
    assert not any("quantize" in key or "tokenizer" in key for key in model.state_dict())
    assert not any(module is tokenizer for module in model.modules())
    model.set_vq_tokenizer(None)
    assert model.vq_tokenizer is None and model(pixel_values).reconstruction is None


def test_the_deprecated_tokenizer_argument_attaches_it_and_a_path_is_refused():
    model = build_model(RECONSTRUCTION_VQ)
    tokenizer = tiny_vqgan()
    with torch.no_grad(), pytest.warns(FutureWarning, match="set_vq_tokenizer"):
        output = model(make_pixel_values(), vq_tokenizer=tokenizer)
    assert model.vq_tokenizer is tokenizer and output.reconstruction is not None
    with pytest.raises(ValueError, match="does not load tokenizers"):
        model(make_pixel_values(), vq_tokenizer="some/folder")


def test_a_tokenizer_named_by_the_config_is_loaded_only_when_asked(tmp_path, monkeypatch, caplog):
    tiny_vqgan().save_pretrained(tmp_path / "vqgan")
    model = build_model(RECONSTRUCTION_VQ, vq_tokenizer_name_or_path=str(tmp_path / "vqgan"))
    loads = []
    original = MaskGitVQGANModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MaskGitVQGANModel, "from_pretrained", classmethod(counting))
    with torch.no_grad(), caplog.at_level("WARNING", logger="stellar_hf.modeling_stellar"):
        output = model(make_pixel_values())
    assert loads == [] and output.reconstruction is None and output.loss is None
    assert "load_vq_tokenizer" in caplog.text
    tokenizer = model.load_vq_tokenizer()
    assert len(loads) == 1 and model.vq_tokenizer is tokenizer and model.load_vq_tokenizer() is tokenizer
    with torch.no_grad():
        assert model(make_pixel_values()).reconstruction.shape == (BATCH_SIZE, 3, 32, 32)
    assert len(loads) == 1


# ---------------------------------------------------------------------------------------------- classification


def test_classifier_logits_and_loss():
    model = build_model(CLASSIFICATION)
    inputs = make_inputs(CLASSIFICATION, model.config)
    with torch.no_grad():
        output = model(**inputs)
        pooled = model.stellar(inputs["pixel_values"]).pooler_output
    assert output.logits.shape == (BATCH_SIZE, model.config.num_labels)
    torch.testing.assert_close(output.logits, model.classifier(model.classifier_norm(pooled)), rtol=0, atol=1e-6)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, inputs["labels"]), rtol=0, atol=1e-6)
    assert model(inputs["pixel_values"]).loss is None


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]], ids=["too-large", "negative"])
def test_classifier_refuses_bad_labels(labels):
    model = build_model(CLASSIFICATION)
    with pytest.raises(ValueError, match="labels"):
        model(make_pixel_values(), labels=torch.tensor(labels))


def test_classifier_ignores_label_minus_100():
    model = build_model(CLASSIFICATION)
    with torch.no_grad():
        output = model(make_pixel_values(), labels=torch.tensor([-100, 2]))
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits[1:], torch.tensor([2])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_classifier_follows_the_problem_type(problem_type):
    num_labels = 1 if problem_type == "regression" else 3
    model = build_model(CLASSIFICATION, num_labels=num_labels, problem_type=problem_type)
    generator = torch.Generator().manual_seed(3)
    labels = torch.rand(BATCH_SIZE, num_labels, generator=generator).round()
    with torch.no_grad():
        output = model(make_pixel_values(), labels=labels.squeeze(-1) if num_labels == 1 else labels)
    if problem_type == "regression":
        expected = F.mse_loss(output.logits.squeeze(-1), labels.squeeze(-1))
    else:
        expected = F.binary_cross_entropy_with_logits(output.logits, labels)
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs / configs


def with_value(value, index=(0, 0, 0, 0)):
    def make():
        pixel_values = make_pixel_values()
        pixel_values[index] = value
        return pixel_values

    return make


BAD_INPUTS = {
    "one-channel": (lambda: torch.randn(2, 1, 32, 32), "channels"),
    "four-channels": (lambda: torch.randn(2, 4, 32, 32), "channels"),
    "side-not-multiple": (lambda: torch.randn(2, 3, 36, 32), "multiple"),
    "width-not-multiple": (lambda: torch.randn(2, 3, 32, 20), "multiple"),
    "smaller-than-a-patch": (lambda: torch.randn(2, 3, 4, 8), "smaller"),
    "3-d": (lambda: torch.randn(3, 32, 32), "4-D"),
    "5-d": (lambda: torch.randn(1, 2, 3, 32, 32), "4-D"),
    "nan": (with_value(float("nan")), "NaN"),
    "inf": (with_value(float("inf"), (1, 2, 3, 4)), "infinite"),
    "minus-inf": (with_value(float("-inf"), (1, 0, 31, 31)), "infinite"),
    "none": (lambda: None, "pixel_values"),
    "not-a-tensor": (lambda: make_pixel_values().numpy(), "(?i)tensor"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
@pytest.mark.parametrize("case", [MODEL, RECONSTRUCTION_PIXEL, CLASSIFICATION, PRETRAINING], ids=str)
def test_bad_pixel_values_raise_value_error(case, bad):
    make, message = BAD_INPUTS[bad]
    model = build_model(case, perturb=False)
    with pytest.raises(ValueError, match=message):
        model(make())


@pytest.mark.parametrize(
    "views",
    ["global-nan", "global-channels", "local-side"],
)
def test_bad_views_raise_value_error(views):
    model = build_model(PRETRAINING, perturb=False)
    inputs = make_inputs(PRETRAINING, model.config)
    if views == "global-nan":
        inputs["global_views"][0, 1, 0, 0, 0] = float("nan")
        message = "NaN"
    elif views == "global-channels":
        inputs["global_views"] = inputs["global_views"][:, :, :1]
        message = "channels"
    else:
        inputs["local_views"] = torch.randn(BATCH_SIZE, 2, 3, 4, 4)
        message = "smaller than one"
    with pytest.raises(ValueError, match=message):
        model(**inputs)


BAD_CONFIGS = [
    ({"hidden_size": 30}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_sparse_tokens": 0}, "num_sparse_tokens"),
    ({"num_sparse_tokens": 2.5}, "num_sparse_tokens"),
    ({"reconstruction_target": "rgb"}, "reconstruction_target"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": -0.1}, "mask_ratio"),
    ({"spatial_temperature": -0.06}, "spatial_temperature"),
    ({"spatial_temperature": 0.0}, "spatial_temperature"),
    ({"sinkhorn_temperature": 0.0}, "sinkhorn_temperature"),
    ({"prediction_temperature": -0.12}, "prediction_temperature"),
    ({"matcher_epsilon": 0.0}, "matcher_epsilon"),
    ({"decoder_hidden_size": 30}, "decoder_hidden_size"),
    ({"decoder_hidden_size": 33, "decoder_num_attention_heads": 3}, "decoder_hidden_size"),
    ({"image_size": 36}, "image_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"attention_probs_dropout_prob": -0.1}, "attention_probs_dropout_prob"),
    ({"num_masked_views": -1}, "num_masked_views"),
    ({"num_prototypes": 0}, "num_prototypes"),
    ({"predictor_num_layers": 0}, "predictor_num_layers"),
    ({"image_mean": (0.5, 0.5)}, "image_mean"),
    ({"image_std": (0.2, 0.0, 0.2)}, "image_std"),
    ({"focal_sigma_range": (0.5, 0.1)}, "focal_sigma_range"),
    ({"focal_masking_probability": 2.0}, "focal_masking_probability"),
    ({"ema_momentum": 1.5}, "ema_momentum"),
    ({"koleo_weight": -1.0}, "koleo_weight"),
    ({"reconstruction_weight": -1.0}, "reconstruction_weight"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
]


@pytest.mark.parametrize(
    "overrides, field", BAD_CONFIGS, ids=[f"{field}={next(iter(o.values()))}" for o, field in BAD_CONFIGS]
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_local_views_drop_the_remainder_of_the_patch_grid():
    # 12-px local views with 8-px patches: the original's strided convolution sees only the top-left 8x8.
    model = build_model(PRETRAINING).eval()
    inputs = make_inputs(PRETRAINING, model.config)
    generator = torch.Generator().manual_seed(1)
    inputs["local_views"] = torch.randn(BATCH_SIZE, 2, 3, 12, 12, generator=generator)
    cropped = {**inputs, "local_views": inputs["local_views"][..., :8, :8]}
    torch.testing.assert_close(model(**inputs).cls_loss, model(**cropped).cls_loss, rtol=0, atol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "rows",
    [slice(0, 1), torch.tensor([0, 13, 14, 15, 16]), torch.tensor([16, 2, 0])],
    ids=["cls-slice", "cls-and-sparse", "unordered"],
)
def test_encode_view_rows_equal_the_full_sequence_rows(rows, attn_implementation):
    # The last layer computes only the rows asked for (keys and values from every row): values and every parameter
    # gradient must match the full sequence (the plain encoder on the kept patches) indexed afterwards.
    model = build_model(MODEL, attn_implementation=attn_implementation)
    pixel_values = make_pixel_values()
    keep = torch.tensor([[0, 3, 5, 6, 8, 9, 10, 11, 12, 15, 1, 2], [15, 14, 1, 0, 4, 7, 2, 3, 5, 6, 8, 9]])
    full = model.encoder(model.embeddings(pixel_values, patch_keep_indices=keep))[:, rows]
    partial = encode_view_rows(model, pixel_values, rows, keep)
    torch.testing.assert_close(partial, full, rtol=0, atol=1e-5)
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(0))
    assert_gradients_close(
        parameter_gradients(model, (partial * weights).sum()), parameter_gradients(model, (full * weights).sum())
    )


def test_last_layer_rows_is_the_layer_on_those_rows():
    layer = build_model(MODEL).encoder.layers[-1]
    hidden_states = torch.randn(BATCH_SIZE, SEQUENCE_LENGTH, HIDDEN, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 17, 18, 19, 20])
    with torch.no_grad():
        torch.testing.assert_close(last_layer_rows(layer, hidden_states, rows), layer(hidden_states)[:, rows])


def test_the_deprecated_encode_still_answers():
    model = build_model(MODEL)
    pixel_values = make_pixel_values()
    keep = torch.tensor([[0, 3, 5, 6], [15, 14, 1, 0]])
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
        with pytest.warns(FutureWarning, match="encode is deprecated"):
            sequence, hidden_states, _ = model.encode(pixel_values, output_hidden_states=True)
        with pytest.warns(FutureWarning):
            rows = model.encode(pixel_values, patch_keep_indices=keep, output_rows=slice(0, 1))[0]
    torch.testing.assert_close(sequence, output.last_hidden_state, rtol=0, atol=0)
    assert len(hidden_states) == len(output.hidden_states)
    torch.testing.assert_close(rows, encode_view_rows(model, pixel_values, slice(0, 1), keep), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_rows"), pytest.warns(FutureWarning):
        model.encode(pixel_values, output_rows=slice(0, 1), output_attentions=True)


def test_kept_patch_embeddings_equal_the_full_embeddings_rows():
    # Masked views project only their kept patches (a matmul with the convolution's weight) and add their position
    # embeddings: same sequence and same gradients as embedding every patch and keeping the rows afterwards.
    model = build_model(MODEL)
    pixel_values = make_pixel_values(height=32, width=48)  # a 4 x 6 grid: interpolated positions
    keep = torch.stack([torch.randperm(24, generator=torch.Generator().manual_seed(seed))[:7] for seed in (0, 1)])
    full = model.embeddings(pixel_values)
    patches = full[:, 1:25].gather(1, keep.unsqueeze(-1).expand(-1, -1, HIDDEN))
    expected = torch.cat((full[:, :1], patches, full[:, 25:]), dim=1)
    actual = model.embeddings(pixel_values, patch_keep_indices=keep)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    assert_gradients_close(
        parameter_gradients(model.embeddings, (actual * weights).sum()),
        parameter_gradients(model.embeddings, (expected * weights).sum()),
    )


def test_kept_patch_embeddings_under_autocast():
    # Under bf16 autocast the matmul path and the convolution both run in bf16: the kept rows agree to bf16 precision.
    model = build_model(MODEL).embeddings.patch_embeddings
    pixel_values = make_pixel_values()
    keep = torch.tensor([[0, 5, 10, 15], [3, 2, 1, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model.embed_kept_patches(pixel_values, keep)
        all_patches = model(pixel_values)
    expected = all_patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, all_patches.shape[-1]))
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02, atol=0.02)


def test_view_cls_loss_is_the_sum_of_each_group_mean():
    model = build_model(PRETRAINING)
    generator = torch.Generator().manual_seed(0)
    assignments = torch.softmax(torch.randn(BATCH_SIZE, 1, model.config.num_prototypes, generator=generator), -1)
    masked_cls = torch.randn(BATCH_SIZE * 2, HIDDEN, generator=generator)
    local_cls = torch.randn(BATCH_SIZE * 3, HIDDEN, generator=generator)
    temperature = model.config.prediction_temperature
    expected = sum(
        clustering_cross_entropy(
            model.cls_clustering_head(tokens.unsqueeze(1)),
            assignments.repeat_interleave(len(tokens) // BATCH_SIZE, dim=0),
            temperature,
        )
        for tokens in (masked_cls, local_cls)
    )
    torch.testing.assert_close(model.view_cls_loss([masked_cls, local_cls], assignments), expected, rtol=0, atol=1e-6)


UNWORKABLE_CONFIGS = [
    ({"hidden_act": "not-an-activation"}, "hidden_act"),
    ({"local_image_size": 4}, "local_image_size"),
    ({"focal_sigma_range": (0.1,)}, "focal_sigma_range"),
]


@pytest.mark.parametrize("overrides, field", UNWORKABLE_CONFIGS, ids=[field for _, field in UNWORKABLE_CONFIGS])
def test_config_refuses_values_that_cannot_work(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_defaults_are_stellar_b16_and_round_trip(tmp_path):
    config = StellarConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (
        768,
        12,
        12,
        16,
    )
    assert (config.num_sparse_tokens, config.spatial_temperature, config.reconstruction_target) == (16, 0.06, "vq")
    assert config.effective_reconstruction_weight == 0.05
    assert tiny_config().effective_reconstruction_weight == 10.0
    config.save_pretrained(tmp_path)
    assert config_fields(StellarConfig.from_pretrained(tmp_path)) == config_fields(config)


# ---------------------------------------------------------------------------------------------- pretraining


def test_pretraining_loss_is_the_weighted_sum_of_its_parts():
    model = build_model(PRETRAINING)
    with torch.no_grad():
        output = run(model, PRETRAINING)
    config = model.config
    parts = ("koleo_loss", "clustering_loss", "cls_clustering_loss", "mask_loss", "cls_loss")
    expected = config.effective_reconstruction_weight * output.reconstruction_loss + sum(output[name] for name in parts)
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-5)
    for name in ("reconstruction_loss", *parts):
        assert output[name].ndim == 0 and output[name] > 0, f"{name} = {output[name]}"
    expected_reconstruction = F.mse_loss(
        output.reconstruction, unnormalize(make_inputs(PRETRAINING, config)["pixel_values"])
    )
    torch.testing.assert_close(output.reconstruction_loss, expected_reconstruction, rtol=0, atol=1e-6)
    assert output.assignments.shape == (BATCH_SIZE, NUM_SPARSE, config.num_prototypes)


def test_pretraining_without_views_has_no_view_losses():
    model = build_model(PRETRAINING)
    with torch.no_grad():
        output = model(make_pixel_values())
    assert output.mask_loss == 0 and output.cls_loss == 0
    assert output.clustering_loss > 0


def test_pretraining_is_reproducible_and_depends_on_the_noise():
    model = build_model(PRETRAINING)
    inputs = make_inputs(PRETRAINING, model.config)
    inputs.pop("mask_noise")

    def step(**kwargs):
        with torch.no_grad():
            return model(**inputs, **kwargs)

    first = step(generator=torch.Generator().manual_seed(0))
    assert_outputs_close(step(generator=torch.Generator().manual_seed(0)), first, atol=0.0, what="same generator")
    other = step(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.mask_loss, first.mask_loss)
    # The main image's losses do not depend on the masking.
    torch.testing.assert_close(other.clustering_loss, first.clustering_loss, rtol=0, atol=0)
    torch.testing.assert_close(other.reconstruction_loss, first.reconstruction_loss, rtol=0, atol=0)

    noise = torch.rand(
        BATCH_SIZE * model.config.num_masked_views, NUM_PATCHES, generator=torch.Generator().manual_seed(2)
    )
    with_noise = step(mask_noise=noise)
    assert_outputs_close(step(mask_noise=noise.clone()), with_noise, atol=0.0, what="same mask_noise")
    assert not torch.allclose(step(mask_noise=noise.flip(1)).mask_loss, with_noise.mask_loss)


def test_noise_drawn_outside_the_model_gives_the_same_step():
    # Training loops draw the masking noise with `draw_mask_noise` and pass it in: same masks as the generator path.
    model = build_model(PRETRAINING)
    inputs = make_inputs(PRETRAINING, model.config)
    inputs.pop("mask_noise")
    noise = model.draw_mask_noise(inputs["global_views"], torch.Generator().manual_seed(5))
    assert noise.shape == (BATCH_SIZE * model.config.num_masked_views, NUM_PATCHES)
    assert model.draw_mask_noise(None) is None and model.draw_mask_noise(inputs["global_views"][:, :0]) is None
    with torch.no_grad():
        from_generator = model(**inputs, generator=torch.Generator().manual_seed(5))
        from_noise = model(**inputs, mask_noise=noise)
    assert_outputs_close(from_noise, from_generator, atol=0.0, what="noise drawn outside")


def test_pretraining_step_compiles_to_one_graph():
    # With the masking noise passed in, forward holds no generator and no data-dependent Python branch: one graph
    # (fullgraph=True raises on any break) with the eager loss and gradients. aot_eager needs no C++ compiler.
    model = build_model(PRETRAINING)
    inputs = make_inputs(PRETRAINING, model.config)
    eager = model(**inputs)
    expected_gradients = parameter_gradients(model, eager.loss)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)
    assert_gradients_close(parameter_gradients(model, compiled.loss), expected_gradients)


@pytest.mark.parametrize("shape", [(BATCH_SIZE, NUM_PATCHES), (BATCH_SIZE * 2, NUM_PATCHES - 1), (BATCH_SIZE * 2,)])
def test_pretraining_refuses_mask_noise_of_the_wrong_shape(shape):
    model = build_model(PRETRAINING, perturb=False)
    inputs = make_inputs(PRETRAINING, model.config)
    inputs["mask_noise"] = torch.rand(shape)
    with pytest.raises(ValueError, match="mask_noise"):
        model(**inputs)


def test_pretraining_vq_target():
    model = build_model(PRETRAINING_VQ)
    inputs = make_inputs(PRETRAINING_VQ, model.config)
    with torch.no_grad():
        output = model(**inputs)
        codes = inputs.pop("labels")
        with pytest.raises(ValueError, match="VQ reconstruction target needs labels"):
            model(**inputs)
    assert output.logits.shape == (BATCH_SIZE, NUM_PATCHES, model.config.vq_codebook_size)
    torch.testing.assert_close(
        output.reconstruction_loss, F.cross_entropy(output.logits.transpose(1, 2), codes), rtol=0, atol=1e-6
    )
    assert model.config.effective_reconstruction_weight == 0.05


def test_pretraining_without_cls_clustering():
    model = build_model(PRETRAINING, use_cls_clustering=False).train()
    assert model.cls_clustering_head is None
    output = run(model, PRETRAINING)
    assert output.cls_clustering_loss == 0 and output.cls_loss == 0
    output.loss.backward()
    assert trainable_parameters_without_gradient(model) == []


class HostSyncs(TorchDispatchMode):
    """Counts device-to-host reads (`.item()`, `bool(tensor)`, `.tolist()`): each is a sync on an accelerator."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", [PRETRAINING, PRETRAINING_EMA], ids=str)
def test_a_pretraining_step_checks_its_inputs_with_one_host_sync(case):
    # The main image, the masked views and the local views are encoded separately, but their values are checked
    # together: one reduction each, one host sync for the whole step.
    model = build_model(case).train()
    inputs = make_inputs(case, model.config)
    with HostSyncs() as syncs:
        model(**inputs).loss.backward()
    assert syncs.count == 1
    inputs["local_views"][1, 0, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="local_views contains NaN"):
        model(**inputs)


def test_pretraining_checks_every_view_it_encodes():
    model = build_model(PRETRAINING, perturb=False)
    inputs = make_inputs(PRETRAINING, model.config)
    with pytest.raises(ValueError, match=r"global_views must be a 5-D tensor \(batch=2"):
        model(**{**inputs, "global_views": inputs["global_views"][:1]})
    inputs["global_views"][1, 1] = 1e6
    with pytest.raises(ValueError, match="global_views holds values of magnitude up to 1e\\+06"):
        model(**inputs)


# ---------------------------------------------------------------------------------------------- teacher targets


def test_teacher_targets_replace_the_models_own():
    # With targets from outside (an EMA teacher's), the main image's tokens are matched to the target tokens, as the
    # masked views' are; the model's own Sinkhorn targets are not used.
    model = build_model(PRETRAINING)
    inputs = make_inputs(PRETRAINING, model.config)
    generator = torch.Generator().manual_seed(4)
    targets = inputs["teacher_targets"] = make_teacher_targets(model.config, BATCH_SIZE, generator)
    with torch.no_grad():
        output = model(**inputs)
        own = model(**{key: value for key, value in inputs.items() if key != "teacher_targets"})
        sparse_logits = model.sparse_clustering_head(output.sparse_tokens)
        cls_logits = model.cls_clustering_head(output.cls_embedding.unsqueeze(1))
    temperature = model.config.prediction_temperature
    torch.testing.assert_close(output.assignments, targets.assignments, rtol=0, atol=0)
    torch.testing.assert_close(
        output.cls_clustering_loss, clustering_cross_entropy(cls_logits, targets.cls_assignments, temperature)
    )
    torch.testing.assert_close(
        output.clustering_loss,
        model.matched_clustering_loss(output.sparse_tokens, sparse_logits, targets.tokens, targets.assignments),
    )
    for name in ("clustering_loss", "cls_clustering_loss", "mask_loss", "cls_loss"):
        assert not torch.allclose(output[name], own[name]), name
    torch.testing.assert_close(output.reconstruction_loss, own.reconstruction_loss, rtol=0, atol=0)


def test_use_ema_teacher_without_teacher_targets_is_refused():
    model = build_model(PRETRAINING_EMA, perturb=False)
    inputs = make_inputs(PRETRAINING_EMA, model.config)
    inputs.pop("teacher_targets")
    with pytest.raises(ValueError, match="no teacher_targets.*StellarEMATeacher"):
        model(**inputs)


def test_teacher_targets_without_cls_assignments_are_refused_when_cls_is_clustered():
    model = build_model(PRETRAINING, perturb=False)
    inputs = make_inputs(PRETRAINING, model.config)
    inputs["teacher_targets"] = make_teacher_targets(model.config, BATCH_SIZE, torch.Generator().manual_seed(4))
    inputs["teacher_targets"].cls_assignments = None
    with pytest.raises(ValueError, match="cls_assignments"):
        model(**inputs)


def test_the_teacher_left_the_model_and_its_old_methods_say_where_it_went():
    model = build_model(PRETRAINING, perturb=False)
    assert not any("teacher" in name for name in model.state_dict())
    with pytest.warns(FutureWarning, match="StellarEMATeacher"):
        assert model.teacher is None
    for name, arguments in (("update_teacher", (0.99,)), ("reset_teacher", ()), ("teacher_momentum", (0, 10))):
        with pytest.raises(AttributeError, match="StellarEMATeacher"):
            getattr(model, name)(*arguments)
