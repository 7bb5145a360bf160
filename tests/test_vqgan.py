"""Tests of the MaskGIT VQGAN tokenizer: parity with the original, checkpoint layout, conversion and input checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stellar_hf.configuration_maskgit_vqgan import MaskGitVQGANConfig
from stellar_hf.convert import MissingSettingError
from stellar_hf.convert_vqgan import (
    CODEBOOK_KEY,
    RELEASED_SIZES,
    config_kwargs_from_original,
    convert_vqgan_checkpoint,
    infer_vqgan_sizes,
    load_original_vqgan_state_dict,
    main,
    resolve_image_size,
)
from stellar_hf.modeling_maskgit_vqgan import MaskGitVQGANModel, MaskGitVQGANModelOutput

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_TOLERANCE = 1e-5
# The parity fixture's sizes: two levels (f = 2), one residual block per level, a 16 x 32 codebook.
TINY_CONFIG = {
    "hidden_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "z_channels": 32,
    "codebook_size": 16,
    "codebook_dim": 32,
    "image_size": 32,
}


def tiny_model(seed: int = 0) -> MaskGitVQGANModel:
    """A small tokenizer whose every weight is perturbed, so that a tensor left at its init is noticed."""
    torch.manual_seed(seed)
    model = MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_CONFIG)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def parity_config_kwargs(parity_dir: Path) -> dict:
    fixture_config = json.loads((parity_dir / "config.json").read_text())
    kwargs = config_kwargs_from_original(
        fixture_config["tokenizer_config"], fixture_config["codebook_size"], fixture_config["codebook_dim"]
    )
    kwargs["image_size"] = fixture_config["image_size"]
    return kwargs


def read_key_table(path: Path) -> dict[str, tuple[int, ...]]:
    """`key<TAB>(shape)` lines, comments skipped."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            table[key] = tuple(int(size) for size in shape.strip("()").split(",") if size.strip())
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original code and the released checkpoint layout


def test_parity_with_original(vqgan_parity_dir, tmp_path):
    kwargs = parity_config_kwargs(vqgan_parity_dir)
    model = convert_vqgan_checkpoint(vqgan_parity_dir / "vqgan.bin", tmp_path, **kwargs)
    images = load_file(vqgan_parity_dir / "inputs.safetensors")["images"]
    expected = load_file(vqgan_parity_dir / "expected.safetensors")

    with torch.no_grad():
        latents = model.encode_to_latents(images)
        codes = model.encode(images)
        decoded = model.decode(expected["codes"])
        output = model(images)

    torch.testing.assert_close(latents, expected["encoder_output"], rtol=0, atol=PARITY_TOLERANCE)
    assert codes.dtype == torch.long
    assert torch.equal(codes, expected["codes"])
    torch.testing.assert_close(decoded, expected["decoded"], rtol=0, atol=PARITY_TOLERANCE)
    # forward is the same three steps in one call.
    assert torch.equal(output.codes, codes)
    assert torch.equal(output.latents, latents)
    torch.testing.assert_close(output.reconstruction, decoded, rtol=0, atol=0)
    assert torch.equal(output.quantized_latents, model.embed_codes(codes))


def test_released_config_matches_released_checkpoint_layout(vqgan_parity_dir):
    released = read_key_table(vqgan_parity_dir / "released_tokenizer_keys.txt")
    with torch.device("meta"):
        model = MaskGitVQGANModel(MaskGitVQGANConfig())
    ours = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert ours == released


def test_parity_config_matches_fixture_layout(vqgan_parity_dir):
    fixture = read_key_table(vqgan_parity_dir / "keys.txt")
    with torch.device("meta"):
        model = MaskGitVQGANModel(MaskGitVQGANConfig(**parity_config_kwargs(vqgan_parity_dir)))
    assert {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()} == fixture


# ---------------------------------------------------------------------------------------------------------------------
# Model behaviour


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded = MaskGitVQGANModel.from_pretrained(tmp_path)
    assert not reloaded.training
    unnamed = {"_name_or_path": ""}
    assert reloaded.config.to_diff_dict() | unnamed == model.config.to_diff_dict() | unnamed
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(images), reloaded(images)
    assert torch.equal(before.codes, after.codes)
    torch.testing.assert_close(before.reconstruction, after.reconstruction, rtol=0, atol=0)


def test_shapes_rectangles_and_code_layouts():
    model = tiny_model()
    images = torch.rand(3, 3, 4, 6, generator=torch.Generator().manual_seed(2))  # f = 2: a 2 x 3 grid
    with torch.no_grad():
        output = model(images)
        codes = model.encode(images)
        square_codes = model.encode(images[..., :4])
    assert isinstance(output, MaskGitVQGANModelOutput)
    assert codes.shape == (3, 6) and output.codes.shape == (3, 6)
    assert output.latents.shape == (3, 32, 2, 3) and output.quantized_latents.shape == (3, 32, 2, 3)
    assert output.reconstruction.shape == images.shape
    assert 0 <= output.reconstruction.min() and output.reconstruction.max() <= 1
    assert 0 <= codes.min() and codes.max() < 16
    with torch.no_grad():
        # A rectangular grid needs (B, h, w) codes; a square one may be flat, row-major.
        torch.testing.assert_close(model.decode(codes.view(3, 2, 3)), output.reconstruction, rtol=0, atol=0)
        flat, grid = model.decode(square_codes), model.decode(square_codes.view(3, 2, 2))
        torch.testing.assert_close(flat, grid, rtol=0, atol=0)


def test_deterministic_and_batch_independent():
    model = tiny_model()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = model(images), model(images)
        single = torch.cat([model.encode(image[None]) for image in images])
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.reconstruction, second.reconstruction)
    assert torch.equal(single, first.codes)


def test_quantizer_picks_nearest_codebook_entry():
    model = tiny_model()
    latents = torch.randn(2, 32, 3, 3, generator=torch.Generator().manual_seed(4))
    quantized, codes = model.quantize_latents(latents)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 32)
    brute_force = torch.cdist(flat.double(), model.quantize.embedding.weight.double()).argmin(dim=1)
    assert torch.equal(codes.flatten(), brute_force)
    assert torch.equal(quantized, model.quantize.embedding.weight[codes].permute(0, 3, 1, 2))


def test_gradients_are_not_blocked():
    model = tiny_model()
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    model(images).reconstruction.square().sum().backward()
    # Codes are an argmin: gradients reach the decoder and the codebook, not the encoder.
    assert model.decoder.conv_out.weight.grad is not None and model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is not None
    model.encode_to_latents(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_low_precision_input_is_cast():
    model = tiny_model()
    images = torch.rand(1, 3, 8, 8).bfloat16()
    with torch.no_grad():
        assert torch.equal(model.encode(images), model.encode(images.float()))


def test_tuple_output():
    model = tiny_model()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 4, 4), return_dict=False)
    assert isinstance(outputs, tuple) and len(outputs) == 4
    assert outputs[0].shape == (1, 4)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.rand(3, 8, 8), "shape"),
        (torch.rand(1, 1, 8, 8), "3 channels"),
        (torch.rand(1, 3, 8, 7), "multiples of the downsampling factor 2"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN or infinite"),
        (torch.full((1, 3, 8, 8), float("inf")), "NaN or infinite"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_pixel_values_raise(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().encode(pixel_values)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(1, 6, dtype=torch.long), "perfect square"),
        (torch.full((1, 2, 2), 16), r"\[0, 16\)"),
        (torch.full((1, 2, 2), -1), r"\[0, 16\)"),
        (torch.zeros(1, 2, 2), "integer"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.long), "shape"),
    ],
)
def test_bad_codes_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().decode(codes)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"channel_mult": []}, "channel_mult"),
        ({"channel_mult": [1, 0]}, "channel_mult"),
        ({"num_res_blocks": 1.5}, "num_res_blocks"),
        ({"codebook_dim": 128}, "codebook_dim"),
        ({"hidden_channels": 48}, "norm_num_groups"),
        ({"image_size": 100}, "image_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0}, "norm_eps"),
    ],
)
def test_invalid_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        MaskGitVQGANConfig(**overrides)


def test_config_properties_and_original_mapping():
    released = MaskGitVQGANConfig()
    assert (released.downsample_factor, released.num_resolutions) == (16, 5)
    original = {"channel_mult": [1, 2], "num_resolutions": 2, "dropout": 0.0, "hidden_channels": 32,
                "num_channels": 3, "num_res_blocks": 1, "resolution": 32, "z_channels": 32}  # fmt: skip
    expected = {**TINY_CONFIG, "dropout": 0.0, "num_channels": 3}
    assert config_kwargs_from_original(original, codebook_size=16) == expected
    with pytest.raises(ValueError, match="num_resolutions"):
        config_kwargs_from_original({**original, "num_resolutions": 3})


# ---------------------------------------------------------------------------------------------------------------------
# Conversion


def test_cli_end_to_end(vqgan_parity_dir, tmp_path):
    """Only the resolution is given: every size is read from the tensors, and the config keeps the real 32 px."""
    output_dir = tmp_path / "converted"
    command = [
        sys.executable, "-m", "stellar_hf.convert_vqgan",
        "--checkpoint", str(vqgan_parity_dir / "vqgan.bin"), "--output_dir", str(output_dir), "--image_size", "32",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Converted" in result.stdout
    assert "hidden_channels 32, channel_mult 1,2 (downsampling x2), num_res_blocks 1" in result.stdout
    assert "image_size 32, a 16 x 16 code grid" in result.stdout
    assert {"config.json", "model.safetensors", "modeling_maskgit_vqgan.py", "configuration_maskgit_vqgan.py"} <= {
        path.name for path in output_dir.iterdir()
    }
    saved = json.loads((output_dir / "config.json").read_text())
    fixture = json.loads((vqgan_parity_dir / "config.json").read_text())
    assert saved["image_size"] == fixture["tokenizer_config"]["resolution"] == 32
    for name, value in parity_config_kwargs(vqgan_parity_dir).items():
        assert saved[name] == value, name

    model = MaskGitVQGANModel.from_pretrained(output_dir)
    images = load_file(vqgan_parity_dir / "inputs.safetensors")["images"]
    expected = load_file(vqgan_parity_dir / "expected.safetensors")
    with torch.no_grad():
        assert torch.equal(model.encode(images), expected["codes"])

    # The folder carries its own code: it loads through AutoModel without our package (a fresh module cache, offline).
    load_remote = (
        "import sys, torch; from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained({str(output_dir)!r}, trust_remote_code=True); "
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__; "
        "print(m.encode(torch.zeros(1, 3, 4, 4)).shape)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", load_remote], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4])" in result.stdout


def test_cli_needs_the_image_size_of_a_tokenizer_that_is_not_the_released_one(vqgan_parity_dir, tmp_path, capsys):
    # The sizes are read from the tensors, but the 32-px training resolution is not in them: no default is written.
    assert main(["--checkpoint", str(vqgan_parity_dir / "vqgan.bin"), "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("convert_vqgan: error: cannot convert without --image_size")
    assert "downsampling factor 2" in error
    assert not (tmp_path / "out").exists()


def test_cli_reports_missing_file(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "absent.bin"), "--output_dir", str(tmp_path / "out")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_exit_codes_match_the_docs(tiny_checkpoint, tmp_path, capsys):
    """0 converted; 1 conversion error (docs/conversion.md); 2 usage error, from argparse."""
    path, _ = tiny_checkpoint
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "bad"), "--image_size", "33"]) == 1
    assert "image_size (33) must be a multiple of the downsampling factor 2" in capsys.readouterr().err
    for argv in (
        ["--checkpoint", str(path)],  # no --output_dir
        ["--checkpoint", str(path), "--output_dir", str(tmp_path / "o"), "--image_size", "0"],
        ["--checkpoint", str(path), "--output_dir", str(tmp_path / "o"), "--hidden_channels", "32"],  # read, not given
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "ok"), "--image_size", "8"]) == 0
    assert MaskGitVQGANConfig.from_pretrained(tmp_path / "ok").image_size == 8


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A `torch.save`d state dict of a perturbed tiny tokenizer, as the released file is laid out."""
    state_dict = {key: tensor.clone() for key, tensor in tiny_model(seed=5).state_dict().items()}
    path = tmp_path / "tiny.bin"
    torch.save(state_dict, path)
    return path, state_dict


def test_convert_accepts_wrappers_prefixes_and_safetensors(tiny_checkpoint, tmp_path):
    path, state_dict = tiny_checkpoint
    # A Lightning checkpoint of a whole model: the tokenizer under a prefix, next to unrelated weights.
    prefixed = {f"model.tokenizer.{key}": tensor for key, tensor in state_dict.items()}
    wrapped = {"state_dict": {**prefixed, "model.encoder.w": torch.ones(2)}}
    torch.save(wrapped, tmp_path / "lightning.ckpt")
    save_file(state_dict, tmp_path / "plain.safetensors")
    for source in (path, tmp_path / "lightning.ckpt", tmp_path / "plain.safetensors"):
        loaded = load_original_vqgan_state_dict(source)
        assert loaded.keys() == state_dict.keys()
        assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)

    model = convert_vqgan_checkpoint(tmp_path / "lightning.ckpt", tmp_path / "out", **TINY_CONFIG)
    assert not model.training
    reloaded = MaskGitVQGANModel.from_pretrained(tmp_path / "out")
    for key, tensor in state_dict.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


class NotATensor:
    pass


@pytest.mark.parametrize(
    "write, error, message",
    [
        (lambda p, sd: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), ValueError, "truncated"),
        (lambda p, sd: p.write_bytes(b""), ValueError, "is empty"),
        (lambda p, sd: p.write_bytes(b"definitely not a checkpoint" * 10), ValueError, "corrupt"),
        (lambda p, sd: torch.save(NotATensor(), p), ValueError, "not a state dict"),
        (lambda p, sd: torch.save([torch.ones(1)], p), ValueError, "not a state dict"),
        (lambda p, sd: torch.save({"step": 3}, p), ValueError, "not a model state dict"),
        (lambda p, sd: torch.save({"fc.weight": torch.ones(2, 2)}, p), ValueError, "does not look like a MaskGIT"),
        (lambda p, sd: torch.save({**sd, "x.quantize.embedding.weight": sd[CODEBOOK_KEY]}, p), ValueError, "several"),
        (lambda p, sd: p.unlink(), FileNotFoundError, "not found"),
    ],
    ids=[
        "truncated", "empty", "garbage", "pickled-object", "list", "no-tensors", "foreign", "two-codebooks", "absent"
    ],  # fmt: skip
)
def test_unreadable_or_foreign_checkpoints_raise(tiny_checkpoint, tmp_path, write, error, message):
    path, state_dict = tiny_checkpoint
    write(path, state_dict)
    with pytest.raises(error, match=message):
        convert_vqgan_checkpoint(path, tmp_path / "out", **TINY_CONFIG)
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_raise(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="safetensors"):
        load_original_vqgan_state_dict(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("decoder.conv_out.bias"), "1 missing keys: decoder.conv_out.bias"),
        (lambda sd: sd.update({"encoder.extra.weight": torch.ones(1)}), "1 unexpected keys: encoder.extra.weight"),
        (
            lambda sd: sd.update({"encoder.conv_out.bias": torch.ones(7)}),
            r"encoder.conv_out.bias: checkpoint \(7,\) vs model \(32,\)",
        ),
        (lambda sd: sd["decoder.conv_in.weight"].view(-1)[0].fill_(float("nan")), "NaN or infinite"),
    ],
    ids=["missing", "unexpected", "mis-shaped", "nan"],
)
def test_checkpoints_that_do_not_fit_raise(tiny_checkpoint, tmp_path, edit, message):
    path, state_dict = tiny_checkpoint
    edit(state_dict)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=message):
        convert_vqgan_checkpoint(path, tmp_path / "out", **TINY_CONFIG)


# Tokenizers of other sizes, made in the test: (config, image size). Widths are multiples of the 32 GroupNorm groups.
OTHER_TOKENIZERS = {
    "three-levels-two-blocks": ({"hidden_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
                                 "z_channels": 16, "codebook_size": 24, "codebook_dim": 16}, 16),
    "one-level-grayscale": ({"num_channels": 1, "hidden_channels": 64, "channel_mult": [1], "num_res_blocks": 1,
                             "z_channels": 8, "codebook_size": 5, "codebook_dim": 8}, 12),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OTHER_TOKENIZERS))
def test_sizes_are_read_from_the_tensors(name, tmp_path):
    sizes, image_size = OTHER_TOKENIZERS[name]
    torch.manual_seed(1)
    source = MaskGitVQGANModel(MaskGitVQGANConfig(**sizes, image_size=image_size)).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    torch.save(source.state_dict(), tmp_path / "tokenizer.bin")
    assert infer_vqgan_sizes(source.state_dict()) == {"num_channels": 3, **sizes}

    model = convert_vqgan_checkpoint(tmp_path / "tokenizer.bin", tmp_path / "out", image_size=image_size)
    saved = MaskGitVQGANConfig.from_pretrained(tmp_path / "out")
    for field_name, value in {**sizes, "image_size": image_size}.items():
        assert getattr(saved, field_name) == value, field_name
    assert saved.grid_size == image_size // 2 ** (len(sizes["channel_mult"]) - 1)
    reloaded = MaskGitVQGANModel.from_pretrained(tmp_path / "out")
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, source.config.num_channels, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected, got = source(images), reloaded(images)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.reconstruction, expected.reconstruction)
    assert model.config.image_size == image_size


def test_released_architecture_is_recognised_without_a_flag(vqgan_parity_dir):
    with torch.device("meta"):
        released = MaskGitVQGANModel(MaskGitVQGANConfig())
    layout = read_key_table(vqgan_parity_dir / "released_tokenizer_keys.txt")
    assert infer_vqgan_sizes({key: torch.empty(shape, device="meta") for key, shape in layout.items()}) == (
        RELEASED_SIZES
    )
    assert infer_vqgan_sizes(released.state_dict()) == RELEASED_SIZES
    assert resolve_image_size(RELEASED_SIZES) == (256, "the released tokenizer's resolution "
                                                       "(maskgit-vqgan-imagenet-f16-256.bin)")  # fmt: skip
    assert resolve_image_size(RELEASED_SIZES, image_size=512)[0] == 512  # a flag wins
    # One size off the released architecture and the resolution is no longer known.
    with pytest.raises(MissingSettingError, match="--image_size") as raised:
        resolve_image_size({**RELEASED_SIZES, "codebook_size": 4096})
    assert raised.value.flags == ["--image_size"]


def test_image_size_from_the_tokenizer_config_in_hyper_parameters(tiny_checkpoint, tmp_path):
    path, state_dict = tiny_checkpoint
    tokenizer_config = {"channel_mult": [1, 2], "num_resolutions": 2, "dropout": 0.0, "hidden_channels": 32,
                        "num_channels": 3, "num_res_blocks": 1, "resolution": 64, "z_channels": 32}  # fmt: skip
    torch.save({"state_dict": state_dict, "hyper_parameters": {"model": {"vq": tokenizer_config}}}, tmp_path / "a.ckpt")
    model = convert_vqgan_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")
    assert model.config.image_size == 64
    assert MaskGitVQGANConfig.from_pretrained(tmp_path / "out").image_size == 64

    # Sizes in the hyper-parameters must agree with the tensors.
    wrong = {**tokenizer_config, "hidden_channels": 64}
    torch.save({"state_dict": state_dict, "hyper_parameters": {"vq": wrong}}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"vq\.hidden_channels=64 but its tensors give 32"):
        convert_vqgan_checkpoint(tmp_path / "b.ckpt", tmp_path / "out2")
    # A `resolution` that is not beside the tokenizer's sizes (a data setting, say) is not taken for its own.
    unrelated = {"data": {"resolution": 224}}
    torch.save({"state_dict": state_dict, "hyper_parameters": unrelated}, tmp_path / "c.ckpt")
    with pytest.raises(MissingSettingError, match="--image_size"):
        convert_vqgan_checkpoint(tmp_path / "c.ckpt", tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_given_sizes_must_match_the_tensors(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    with pytest.raises(ValueError, match=r"hidden_channels=128 \(the tensors give 32\)"):
        convert_vqgan_checkpoint(path, tmp_path / "out", hidden_channels=128, image_size=32)
    with pytest.raises(ValueError, match=r"channel_mult=\[1, 2, 2\] \(the tensors give \[1, 2\]\)"):
        convert_vqgan_checkpoint(path, tmp_path / "out", channel_mult=[1, 2, 2], image_size=32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("encoder.conv_in.weight"), "has no `encoder.conv_in.weight`"),
        (lambda sd: sd.pop("encoder.down.0.block.0.conv1.weight"), "has no `encoder.down.0.block.0.conv1.weight`"),
        (lambda sd: sd.update({"encoder.down.3.block.0.conv1.weight": torch.ones(64, 64, 3, 3)}), "not 0..n-1"),
        (lambda sd: sd.update({"encoder.down.1.block.1.conv1.weight": torch.ones(64, 64, 3, 3)}),
         r"different numbers of residual blocks \[1, 2\]"),
        (lambda sd: sd.update({"encoder.down.1.block.0.conv1.weight": torch.ones(48, 32, 3, 3)}),
         "not a multiple of the base width 32"),
    ],
    ids=["no-conv-in", "no-level-width", "gap-in-levels", "uneven-blocks", "odd-width"],
)  # fmt: skip
def test_layouts_the_sizes_cannot_be_read_from(tiny_checkpoint, tmp_path, edit, message):
    path, state_dict = tiny_checkpoint
    edit(state_dict)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=message):
        convert_vqgan_checkpoint(path, tmp_path / "out", image_size=32)
    assert not (tmp_path / "out").exists()
