"""Tests of `stellar_hf.convert`: parity with the original on its own checkpoint, checkpoints of other
configurations written in the original's format, the command line, and files that are not checkpoints."""

import argparse
import json
import os
import pathlib
import random
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from stellar_hf.configuration_stellar import StellarConfig
from stellar_hf.convert import (
    STANDARD_WIDTHS,
    CheckpointError,
    MissingSettingError,
    convert_checkpoint,
    infer_config,
    load_original_state_dict,
    main,
    model_outputs,
    released_num_attention_heads,
    rename_key,
    resolve_config,
)
from stellar_hf.losses_stellar import (
    clustering_cross_entropy,
    gather_matched_targets,
    koleo_loss,
    match_tokens,
    sinkhorn_knopp,
)
from stellar_hf.modeling_stellar import (
    StellarForImageReconstruction,
    StellarForPreTraining,
    StellarModel,
)
from stellar_hf.pretraining import StellarEMATeacher

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_TOLERANCE = 1e-5
# The parity fixture's head counts and spatial temperature (config.json of the fixture): the weights do not record
# them, its widths (64, decoder 32) are not standard, and its `.ckpt` has no hyper-parameters.
PARITY_SETTINGS = {"num_attention_heads": 4, "decoder_num_attention_heads": 4, "spatial_temperature": 0.06}
VIEWS_PER_IMAGE = 2  # masked-view copies per image in `match_predictions`


# ----------------------------------------------------------------------------------------------------------------------
# Parity with the original
# ----------------------------------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor, config: StellarConfig) -> torch.Tensor:
    """The original normalises [0, 1] images inside its model; ours takes `(images - mean) / std`."""
    mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std).view(1, -1, 1, 1)
    return (images - mean) / std


@torch.no_grad()
def parity_outputs(folder: Path, inputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
    """Every tensor of `expected.safetensors`, computed with the models reloaded from the converted folder."""
    pretraining = StellarForPreTraining.from_pretrained(folder).eval()
    reconstruction_model = StellarForImageReconstruction.from_pretrained(folder).eval()
    config = pretraining.config
    got = {}
    for prefix, images in (("", inputs["images"]), ("alt_", inputs["images_alt"])):
        outputs = pretraining.stellar(normalize(images, config))
        got[prefix + "cls"] = outputs.cls_embedding
        got[prefix + "sparse"] = outputs.sparse_tokens
        got[prefix + "dense"] = outputs.dense_features
        got[prefix + "spatial"] = outputs.spatial_map
        got[prefix + "lowrank"] = outputs.lowrank_features
    pixel_values = normalize(inputs["images"], config)
    reconstructed = reconstruction_model(pixel_values)
    got["reconstruction"] = reconstructed.reconstruction
    got["reconstruction_mse"] = reconstructed.loss

    sparse, cls = got["sparse"], got["cls"].unsqueeze(1)
    logits = pretraining.sparse_clustering_head(sparse)
    assignments = sinkhorn_knopp(logits.flatten(0, 1) / 0.06, num_iterations=3).view_as(logits)
    got["clustering_logits"] = logits
    got["clustering_assignments"] = assignments
    got["clustering_loss"] = clustering_cross_entropy(logits, assignments, temperature=0.12)
    cls_logits = pretraining.cls_clustering_head(cls)
    cls_assignments = sinkhorn_knopp(cls_logits.flatten(0, 1) / 0.06, num_iterations=3).view_as(cls_logits)
    got["cls_clustering_logits"] = cls_logits
    got["cls_clustering_assignments"] = cls_assignments
    got["cls_clustering_loss"] = clustering_cross_entropy(cls_logits, cls_assignments, temperature=0.12)

    predictions = expected["match_predictions"]  # noisy, shuffled copies of the original's sparse tokens
    index, plan = match_tokens(
        predictions, sparse.repeat_interleave(VIEWS_PER_IMAGE, dim=0), epsilon=0.1, num_iterations=5
    )
    got["match_index"], got["match_plan"] = index, plan
    masked_logits = pretraining.sparse_clustering_head(predictions)
    got["masked_view_logits"] = masked_logits
    got["masked_view_loss"] = clustering_cross_entropy(
        masked_logits, gather_matched_targets(assignments, index), temperature=0.12
    )
    # The model's own path (matching inside) must give the same loss.
    got["masked_view_loss_model"] = pretraining.matched_clustering_loss(predictions, masked_logits, sparse, assignments)
    got["koleo_loss"] = koleo_loss(sparse)
    got["sinkhorn_output"] = sinkhorn_knopp(expected["sinkhorn_input"] / 0.06, num_iterations=3)
    return got


def test_parity_with_the_original(stellar_parity_dir, tmp_path):
    """Convert the original's checkpoint, reload the folder, and reproduce every tensor the original produced."""
    model = convert_checkpoint(stellar_parity_dir / "original.ckpt", tmp_path / "hf", **PARITY_SETTINGS)
    assert isinstance(model, StellarForPreTraining)
    inputs = load_file(str(stellar_parity_dir / "inputs.safetensors"))
    expected = load_file(str(stellar_parity_dir / "expected.safetensors"))
    got = parity_outputs(tmp_path / "hf", inputs, expected)
    got_expected = {name: name.removesuffix("_model") for name in got}

    compared = set(got_expected.values()) | {"match_predictions", "sinkhorn_input"}  # the last two are inputs
    assert compared == set(expected), f"tensors not compared: {set(expected) - compared}"
    errors = {}
    for name, expected_name in got_expected.items():
        reference = expected[expected_name]
        value = got[name].reshape(reference.shape)
        if reference.dtype == torch.int64:
            errors[name] = 0.0 if torch.equal(value, reference) else float("inf")
        else:
            errors[name] = (value.double() - reference.double()).abs().max().item()
    print("\n".join(f"{name:28s} max abs error {error:.2e}" for name, error in sorted(errors.items())))
    too_large = {name: error for name, error in errors.items() if not error <= PARITY_TOLERANCE}
    assert not too_large, f"tensors off by more than {PARITY_TOLERANCE}: {too_large}"


def test_converted_folder_loads_every_class(stellar_parity_dir, tmp_path):
    """One folder serves the pretraining heads, the reconstruction model, the encoder and the Auto classes."""
    folder = tmp_path / "hf"
    converted = convert_checkpoint(stellar_parity_dir / "original.ckpt", folder, **PARITY_SETTINGS)
    converted_state = converted.state_dict()

    pretraining = StellarForPreTraining.from_pretrained(folder)
    assert pretraining.cls_clustering_head is not None
    for name, tensor in pretraining.state_dict().items():
        assert torch.equal(tensor, converted_state[name]), name

    encoder = StellarModel.from_pretrained(folder).eval()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, converted_state["stellar." + name]), name
    auto = AutoModel.from_pretrained(folder).eval()
    assert type(auto) is StellarModel
    pixel_values = torch.randn(2, 3, 32, 32)
    reference = model_outputs(converted.stellar, pixel_values)
    for model in (encoder, auto):
        for name, tensor in model_outputs(model, pixel_values).items():
            assert torch.equal(tensor, reference[name]), name

    # The folder carries its code: what `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads in a process
    # without stellar_hf (here the local registration would win, so resolve the folder's class directly).
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    for auto_class, expected_class in (("AutoModel", StellarModel), ("AutoModelForPreTraining", StellarForPreTraining)):
        remote_class = get_class_from_dynamic_module(auto_map[auto_class], str(folder))
        assert remote_class.__name__ == expected_class.__name__
        assert remote_class.__module__.startswith("transformers_modules")
        remote = remote_class.from_pretrained(folder)
        prefix = "stellar." if expected_class is StellarModel else ""
        for name, tensor in remote.state_dict().items():
            assert torch.equal(tensor, converted_state[prefix + name]), name
    assert (folder / "README.md").read_text().startswith("---")
    assert (folder / "preprocessor_config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints of other configurations, written in the original's format
# ----------------------------------------------------------------------------------------------------------------------

# Our names -> the original's (transformers 4.x `ViTModel` naming inside `encoder.` and `decoder.`).
_INVERSE_TABLE = [
    (r"^stellar\.embeddings\.sparse_tokens$", "sparse_tokens"),
    (r"^stellar\.embeddings\.", "encoder.embeddings."),
    (r"^stellar\.encoder\.layernorm\.", "encoder.layernorm."),
    (r"^stellar\.encoder\.layers\.(\d+)\.", r"encoder.encoder.layer.\1."),
    (r"^stellar\.factorization\.", ""),
    (r"^decoder\.decoder_proj\.", "decoder_proj."),
    (r"^decoder\.position_encoding\.gaussian_matrix$", "position_embedding.positional_encoding_gaussian_matrix"),
    (r"^decoder\.transformer\.layernorm\.", "decoder.layernorm."),
    (r"^decoder\.transformer\.layers\.(\d+)\.", r"decoder.encoder.layer.\1."),
    (r"^sparse_clustering_head\.prototypes\.", "clustering_head.layer."),
    (r"^sparse_clustering_head\.predictor\.", "clustering_head.predictor.layers."),
    (r"^cls_clustering_head\.prototypes\.", "cls_cluster_head.layer."),
    (r"^cls_clustering_head\.predictor\.", "cls_cluster_head.predictor.layers."),
]
_INVERSE_BLOCK_TABLE = [
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def original_name(name: str, single_linear_predictor: bool) -> str:
    for pattern, target in _INVERSE_TABLE:  # `reconstruction_head` matches nothing and keeps its name
        if re.search(pattern, name):
            name = re.sub(pattern, target, name)
            break
    if name.startswith(("encoder.encoder.layer.", "decoder.encoder.layer.")):
        for pattern, target in _INVERSE_BLOCK_TABLE:
            name = re.sub(pattern, target, name)
    if single_linear_predictor:  # the original's nn.Sequential of one Linear is saved without an index
        name = re.sub(r"predictor\.layers\.0\.", "predictor.layers.", name)
    return name


# The original's EMA teacher: each key is a student key under another prefix (and `teacher_sparse_tokens`).
_ORIGINAL_TEACHER_PREFIXES = {
    "encoder.": "teacher_encoder.",
    "clustering_head.": "teacher_head.",
    "cls_cluster_head.": "teacher_cls_head.",
}


def original_teacher_name(student_name: str) -> str:
    """The original name of the teacher's copy of the student key `student_name` (original names)."""
    if student_name == "sparse_tokens":
        return "teacher_sparse_tokens"
    for prefix, teacher_prefix in _ORIGINAL_TEACHER_PREFIXES.items():
        if student_name.startswith(prefix):
            return teacher_prefix + student_name.removeprefix(prefix)
    raise AssertionError(f"the original teacher has no copy of {student_name}")


def original_state_dict(model, extras: bool = True, teacher=None) -> dict[str, torch.Tensor]:
    """`model`'s weights (and an EMA `teacher`'s) under the original's names, plus the keys the original saves but
    never uses."""
    config = model.config
    state = model.state_dict()
    if isinstance(model, StellarModel):
        state = {"stellar." + name: tensor for name, tensor in state.items()}
    single = config.predictor_num_layers == 1
    original = {
        original_name(name, single): tensor.clone() for name, tensor in state.items() if not name.startswith("teacher.")
    }
    if teacher is not None:
        # `StellarEMATeacher` names its modules as the student does; like the original's, it has no factorization.
        original.update(
            {
                original_teacher_name(original_name(name, single)): tensor.clone()
                for name, tensor in teacher.state_dict().items()
            }
        )
    if not extras:
        return original
    d, generator = config.hidden_size, torch.Generator().manual_seed(1)
    original["encoder.pooler.dense.weight"] = torch.randn(d, d, generator=generator)
    original["encoder.pooler.dense.bias"] = torch.randn(d, generator=generator)
    if teacher is not None:
        original["teacher_encoder.pooler.dense.weight"] = torch.randn(d, d, generator=generator)
        original["teacher_encoder.pooler.dense.bias"] = torch.randn(d, generator=generator)
    if "decoder_proj.weight" in original:
        d_dec = config.decoder_hidden_size
        original["decoder.embeddings.cls_token"] = torch.randn(1, 1, d_dec, generator=generator)
        original["decoder.embeddings.position_embeddings"] = torch.randn(1, 197, d_dec, generator=generator)
        original["decoder.embeddings.patch_embeddings.projection.weight"] = torch.randn(d_dec, 3, 16, 16)
        original["decoder.embeddings.patch_embeddings.projection.bias"] = torch.randn(d_dec)
        original["decoder.pooler.dense.weight"] = torch.randn(d_dec, d_dec, generator=generator)
        original["decoder.pooler.dense.bias"] = torch.randn(d_dec, generator=generator)
    return original


def add_teacher_and_tokenizer(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a run with an EMA teacher and the VQ target also saves: the teacher copies and the frozen VQGAN."""
    extra = {}
    for name, tensor in original.items():
        if name.startswith("encoder."):
            extra["teacher_encoder." + name.removeprefix("encoder.")] = tensor.clone()
        elif name.startswith("clustering_head."):
            extra["teacher_head." + name.removeprefix("clustering_head.")] = tensor.clone()
        elif name.startswith("cls_cluster_head."):
            extra["teacher_cls_head." + name.removeprefix("cls_cluster_head.")] = tensor.clone()
    extra["teacher_sparse_tokens"] = original["sparse_tokens"].clone()
    extra["tokenizer.quantize.embedding.weight"] = torch.randn(1024, 8)
    extra["tokenizer.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)
    return {**original, **extra}


def write_checkpoint(
    original: dict[str, torch.Tensor], path: Path, prefix: str = "model.", hyper_parameters: dict | None = None
) -> Path:
    """Save in one of the original's file formats, picked by the suffix (`hyper_parameters` only in a `.ckpt`)."""
    state = {prefix + name: tensor.contiguous() for name, tensor in original.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":  # Lightning, with the non-tensor entries a real run saves
        if hyper_parameters is None:
            hyper_parameters = {
                "args": argparse.Namespace(lr=1.5e-4), "root": pathlib.PurePosixPath("/data"), "depth": 2
            }  # fmt: skip
        torch.save(
            {"state_dict": state, "epoch": 3, "global_step": 10, "hyper_parameters": hyper_parameters,
             "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}]},
            path,
        )  # fmt: skip
    else:
        torch.save(state, path)
    return path


def tiny_config(**overrides) -> StellarConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_sparse_tokens=3,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=24,
        reconstruction_target="pixel",
        num_prototypes=10,
        prototype_dim=6,
        predictor_hidden_size=20,
    )
    kwargs.update(overrides)
    return StellarConfig(**kwargs)


# `tiny_config`'s settings that the weights do not record (its widths, 32 and 16, are not standard).
TINY_SETTINGS = {"num_attention_heads": 4, "decoder_num_attention_heads": 2, "spatial_temperature": 0.06}


def random_model(model_class, config: StellarConfig, seed: int = 0):
    """A model whose every weight is perturbed, so that a tensor left at its initial value is noticed."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@dataclass
class UnseenCheckpoint:
    """A configuration the parity fixture does not cover, saved in one of the original's file formats."""

    model_class: type
    overrides: dict
    file_name: str  # the suffix picks the format
    prefix: str = "model."
    # The settings the weights do not record, as arguments (`tiny_config`'s); `{}` where none is needed.
    heads: dict = field(default_factory=lambda: dict(TINY_SETTINGS))
    teacher_and_tokenizer: bool = False  # EMA teacher copies (kept) and the frozen VQGAN (dropped)


UNSEEN_CHECKPOINTS = {
    # A standard width (ViT-S, 384: 6 heads) and the original's 512-wide decoder (8 heads): converts without
    # arguments, with the released recipe's spatial temperature.
    "vq-standard-widths-no-arguments-lightning": UnseenCheckpoint(
        StellarForPreTraining,
        {"hidden_size": 384, "num_attention_heads": 6, "decoder_hidden_size": 512, "decoder_num_attention_heads": 8,
         "reconstruction_target": "vq", "vq_codebook_size": 12},
        "run.ckpt", heads={}, teacher_and_tokenizer=True,
    ),
    "single-linear-predictor-no-cls-safetensors": UnseenCheckpoint(
        StellarForPreTraining, {"predictor_num_layers": 1, "use_cls_clustering": False}, "stellar.safetensors",
        prefix="",
    ),
    "patch14-three-layer-predictor-no-temperature-bin": UnseenCheckpoint(
        StellarForPreTraining,
        {"patch_size": 14, "image_size": 42, "predictor_num_layers": 3, "spatial_temperature": None},
        "stellar.bin",
        heads={"num_attention_heads": 4, "decoder_num_attention_heads": 2, "spatial_temperature": None},
        teacher_and_tokenizer=True,
    ),
    "reconstruction-vq-no-qkv-bias-safetensors-prefixed": UnseenCheckpoint(
        StellarForImageReconstruction,
        {"reconstruction_target": "vq", "vq_codebook_size": 7, "qkv_bias": False},
        "recon.safetensors",
    ),
    "encoder-only-ckpt": UnseenCheckpoint(
        StellarModel, {"num_sparse_tokens": 5, "image_size": 40}, "encoder.ckpt",
        heads={"num_attention_heads": 4, "spatial_temperature": 0.06},
    ),
}  # fmt: skip
INFERRED_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "qkv_bias", "image_size",
    "patch_size", "num_channels", "num_sparse_tokens", "spatial_temperature",
)  # fmt: skip
DECODER_FIELDS = (
    "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads", "decoder_intermediate_size",
    "reconstruction_target",
)  # fmt: skip
HEAD_FIELDS = ("num_prototypes", "prototype_dim", "predictor_num_layers", "use_cls_clustering")


@pytest.mark.parametrize("name", list(UNSEEN_CHECKPOINTS))
def test_unseen_checkpoints(name, tmp_path):
    case = UNSEEN_CHECKPOINTS[name]
    model_class = case.model_class
    source = random_model(model_class, tiny_config(**case.overrides))
    original = original_state_dict(source)
    if case.teacher_and_tokenizer:
        original = add_teacher_and_tokenizer(original)
    path = write_checkpoint(original, tmp_path / case.file_name, case.prefix)

    converted = convert_checkpoint(path, tmp_path / "hf", **case.heads)
    assert type(converted) is model_class
    fields = INFERRED_FIELDS
    if model_class is not StellarModel:
        fields += DECODER_FIELDS + (("vq_codebook_size",) if source.config.reconstruction_target == "vq" else ())
    if model_class is StellarForPreTraining:
        fields += HEAD_FIELDS + (("predictor_hidden_size",) if source.config.predictor_num_layers > 1 else ())
    for config_field in fields:
        assert getattr(converted.config, config_field) == getattr(source.config, config_field), config_field
    if case.teacher_and_tokenizer:  # `add_teacher_and_tokenizer` saves the teacher as a copy of the student
        assert converted.config.use_ema_teacher
        student = converted.state_dict()
        for key, tensor in StellarEMATeacher.from_pretrained(tmp_path / "hf", converted).state_dict().items():
            assert torch.equal(tensor, student[key]), key

    reloaded = model_class.from_pretrained(tmp_path / "hf").eval()
    pixel_values = torch.randn(2, 3, source.config.image_size, source.config.image_size)
    expected = model_outputs(source, pixel_values)
    got = model_outputs(reloaded, pixel_values)
    assert set(got) == set(expected)
    for output_name in expected:
        assert torch.equal(got[output_name], expected[output_name]), output_name


def test_clustering_heads_without_a_decoder_give_the_encoder(tmp_path, caplog):
    """A run with reconstruction off saves heads but no decoder; StellarForPreTraining needs both."""
    source = random_model(StellarForPreTraining, tiny_config())
    decoder_keys = re.compile(r"^(decoder|decoder_proj|position_embedding|reconstruction_head)\.")
    original = {name: tensor for name, tensor in original_state_dict(source).items() if not decoder_keys.match(name)}
    path = write_checkpoint(original, tmp_path / "no-decoder.safetensors")
    with caplog.at_level("WARNING", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", num_attention_heads=4, spatial_temperature=0.06)
    assert type(converted) is StellarModel
    assert "clustering heads but no decoder" in caplog.text
    pixel_values = torch.randn(1, 3, 32, 32)
    expected = model_outputs(source.stellar, pixel_values)
    for name, tensor in model_outputs(converted, pixel_values).items():
        assert torch.equal(tensor, expected[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# The EMA teacher of a run saved mid-training
# ----------------------------------------------------------------------------------------------------------------------

TEACHER_CONFIG = {"use_ema_teacher": True}


def random_run_with_teacher(config: StellarConfig) -> tuple[StellarForPreTraining, StellarEMATeacher]:
    """A run saved mid-training: a perturbed student and an EMA teacher that differs from it."""
    source = random_model(StellarForPreTraining, config)
    teacher = StellarEMATeacher.from_student(source)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return source, teacher


def assert_teacher_is(folder: Path, model: StellarForPreTraining, source_teacher: StellarEMATeacher) -> None:
    """The teacher saved in `folder` for `model` equals `source_teacher` exactly and differs from the student."""
    student = model.state_dict()
    teacher = StellarEMATeacher.from_pretrained(folder, model)
    expected = source_teacher.state_dict()
    assert set(teacher.state_dict()) == set(expected)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
        assert not torch.equal(tensor, student[name]), f"{name} is the student's"
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


@pytest.mark.parametrize("file_name", ["run.ckpt", "run.safetensors"])
def test_ema_teacher_is_converted(file_name, tmp_path, caplog):
    """A run saved mid-training with its EMA teacher: the teacher is converted, not re-made from the student."""
    source, source_teacher = random_run_with_teacher(tiny_config(**TEACHER_CONFIG))  # teacher and student differ
    original = original_state_dict(source, teacher=source_teacher)
    teacher_keys = [name for name in original if name.startswith("teacher_")]
    assert "teacher_sparse_tokens" in original and "teacher_cls_head.layer.weight" in original
    path = write_checkpoint(original, tmp_path / file_name)
    with caplog.at_level("INFO", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", **TINY_SETTINGS)
    assert type(converted) is StellarForPreTraining and converted.config.use_ema_teacher
    assert_teacher_is(tmp_path / "hf", converted, source_teacher)
    assert_teacher_is(tmp_path / "hf", StellarForPreTraining.from_pretrained(tmp_path / "hf"), source_teacher)
    assert StellarConfig.from_pretrained(tmp_path / "hf").use_ema_teacher
    # The teacher's pooler is dropped like the student's, by name; the rest is converted.
    assert f"converted the EMA teacher: {len(teacher_keys) - 2} tensors" in caplog.text
    dropped = {
        message.split(": ")[1]: set(message.split(": ")[2].split(", "))
        for message in (record.getMessage() for record in caplog.records)
        if message.startswith("dropped ")
    }
    assert dropped["the encoder's pooler (unused)"] == {"encoder.pooler.dense.weight", "encoder.pooler.dense.bias"}
    assert dropped["the EMA teacher encoder's pooler (unused)"] == {
        "teacher_encoder.pooler.dense.weight", "teacher_encoder.pooler.dense.bias"
    }  # fmt: skip
    assert "not converting" not in caplog.text


def test_ema_teacher_of_the_parity_checkpoint(stellar_parity_dir, tmp_path):
    """The original's own checkpoint with teacher keys made from its student keys, perturbed."""
    original = load_original_state_dict(stellar_parity_dir / "original.ckpt")
    generator = torch.Generator().manual_seed(3)
    copied = tuple(_ORIGINAL_TEACHER_PREFIXES)
    students = [name for name in original if name == "sparse_tokens" or name.startswith(copied)]
    teacher = {
        original_teacher_name(name): original[name] + 0.01 * torch.randn(original[name].shape, generator=generator)
        for name in students
    }
    assert len(teacher) == 51  # encoder (pooler included), sparse tokens, both clustering heads
    path = write_checkpoint({**original, **teacher}, tmp_path / "run.ckpt")
    converted = convert_checkpoint(path, tmp_path / "hf", **PARITY_SETTINGS)
    assert converted.config.use_ema_teacher
    state = converted.state_dict()
    teacher_state = StellarEMATeacher.from_pretrained(tmp_path / "hf", converted).state_dict()
    for student_name in students:
        if student_name.startswith("encoder.pooler."):
            continue
        tensor, ours = teacher[original_teacher_name(student_name)], rename_key(student_name)  # the student's name
        assert torch.equal(teacher_state[ours], tensor), student_name
        assert not torch.equal(state[ours], tensor), student_name
    # The student is untouched: it still reproduces the original's outputs.
    inputs = load_file(str(stellar_parity_dir / "inputs.safetensors"))
    expected = load_file(str(stellar_parity_dir / "expected.safetensors"))
    sparse = converted.stellar(normalize(inputs["images"], converted.config)).sparse_tokens
    assert (sparse - expected["sparse"]).abs().max() <= PARITY_TOLERANCE


@pytest.mark.parametrize(
    "removed, model_class",
    [
        (r"^(decoder|decoder_proj|position_embedding|reconstruction_head)\.", StellarModel),
        (r"^(clustering_head|cls_cluster_head)\.", StellarForImageReconstruction),
    ],
    ids=["no-decoder-encoder-only", "no-heads-reconstruction"],
)
def test_ema_teacher_of_a_class_without_teacher_is_counted(removed, model_class, tmp_path, caplog):
    source, source_teacher = random_run_with_teacher(tiny_config(**TEACHER_CONFIG))
    original = {
        name: tensor
        for name, tensor in original_state_dict(source, teacher=source_teacher).items()
        if not re.match(removed, name)
    }
    teacher_keys = [name for name in original if name.startswith("teacher_")]
    path = write_checkpoint(original, tmp_path / "run.safetensors")
    with caplog.at_level("INFO", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", **TINY_SETTINGS)
    assert type(converted) is model_class
    assert not any(name.startswith("teacher") for name in converted.state_dict())
    lines = [record.getMessage() for record in caplog.records if "EMA teacher" in record.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"not converting the {len(teacher_keys)} EMA teacher tensors")
    assert f"{model_class.__name__} has no EMA teacher" in lines[0]
    assert "teacher_encoder.* (" in lines[0] and "teacher_sparse_tokens" in lines[0]
    # Reported once: the teacher's pooler is not also listed as dropped.
    assert "teacher_encoder.pooler" not in caplog.text


def test_ema_teacher_keys_are_checked_strictly(tmp_path):
    source, source_teacher = random_run_with_teacher(tiny_config(**TEACHER_CONFIG))
    original = original_state_dict(source, teacher=source_teacher)

    unknown = {**original, "teacher_projector.weight": torch.ones(2), "teacher_head.extra.weight": torch.ones(2)}
    path = write_checkpoint(unknown, tmp_path / "unknown.safetensors")
    with pytest.raises(CheckpointError, match=r"(?=.*'teacher_projector\.weight')(?=.*'teacher_head\.extra\.weight')"):
        convert_checkpoint(path, tmp_path / "hf1", **TINY_SETTINGS)

    incomplete = {name: tensor for name, tensor in original.items() if not name.startswith("teacher_cls_head.")}
    path = write_checkpoint(incomplete, tmp_path / "incomplete.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: \['teacher\.cls_clustering_head\.predictor\.0\.bias'"):
        convert_checkpoint(path, tmp_path / "hf2", **TINY_SETTINGS)

    mismatched = {**original, "teacher_head.layer.weight": torch.randn(11, 6)}
    path = write_checkpoint(mismatched, tmp_path / "mismatch.safetensors")
    with pytest.raises(
        CheckpointError, match=r"teacher\.sparse_clustering_head\.prototypes\.weight: checkpoint \(11, 6\)"
    ):
        convert_checkpoint(path, tmp_path / "hf3", **TINY_SETTINGS)

    not_finite = {**original, "teacher_sparse_tokens": torch.full_like(original["teacher_sparse_tokens"], float("inf"))}
    path = write_checkpoint(not_finite, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in \['teacher_sparse_tokens'\]"):
        load_original_state_dict(path)


class ConfigNode:
    """Pickles like an OmegaConf node: a leaf keeps its value in `_val`, a container its children in `_content`, and
    each points back to its parent. Its class is not allow-listed, so the converter sees a placeholder."""

    def __init__(self, parent=None, **fields):
        self._parent = parent
        self.__dict__.update(fields)


def omegaconf_like(tree: dict, parent: ConfigNode | None = None) -> ConfigNode:
    container = ConfigNode(parent, _metadata=ConfigNode(key_type=None), _content={})
    for name, value in tree.items():
        node = omegaconf_like(value, container) if isinstance(value, dict) else ConfigNode(container, _val=value)
        container._content[name] = node
    return container


@pytest.mark.parametrize(
    "hyper_parameters, flag",
    [
        ({"cfg": omegaconf_like({"trainer": {"max_epochs": 150}, "model": {"momentum_teacher": True}})},
         "hyper_parameters.cfg.model.momentum_teacher"),
        ({"cfg": omegaconf_like({"model": {"momentum_teacher": False}})}, None),
        ({"args": argparse.Namespace(lr=1.5e-4, momentum_teacher=True, teacher_momentum=0.996)},
         "hyper_parameters.args.momentum_teacher"),
        ({"cfg": {"model": {"momentum_teacher": True, "num_sparse_tokens": 3}}},
         "hyper_parameters.cfg.model.momentum_teacher"),
        ({"model": {"momentum_teacher": False}}, None),
        ({"momentum_teacher": 0.996}, None),  # DINO's name for the momentum itself, not a switch
    ],
    ids=["omegaconf-like", "omegaconf-like-off", "namespace", "nested-dict", "teacher-off", "a-momentum-value"],
)  # fmt: skip
def test_hyper_parameters_with_a_teacher_but_no_teacher_weights(hyper_parameters, flag, tmp_path, caplog):
    source = random_model(StellarForPreTraining, tiny_config())
    path = write_checkpoint(original_state_dict(source), tmp_path / "run.ckpt", hyper_parameters=hyper_parameters)
    with caplog.at_level("INFO", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", **TINY_SETTINGS)
    assert not converted.config.use_ema_teacher
    warnings = [record.getMessage() for record in caplog.records if "holds no teacher weights" in record.getMessage()]
    if flag is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and f"{flag}=True" in warnings[0], warnings


def test_hyper_parameters_agree_with_teacher_weights(tmp_path, caplog):
    source, source_teacher = random_run_with_teacher(tiny_config(**TEACHER_CONFIG))
    hyper_parameters = {"args": argparse.Namespace(momentum_teacher=True)}
    original = original_state_dict(source, teacher=source_teacher)
    path = write_checkpoint(original, tmp_path / "run.ckpt", hyper_parameters=hyper_parameters)
    with caplog.at_level("INFO", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", **TINY_SETTINGS)
    assert_teacher_is(tmp_path / "hf", converted, source_teacher)
    assert "holds no teacher weights" not in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Settings the weights do not record: given, read from the hyper-parameters or a released model's constant, never
# guessed
# ----------------------------------------------------------------------------------------------------------------------

# The checkpoint: 64 wide with 4 encoder heads, a 32-wide decoder with 4 heads; a rule of thumb gave 1 and 8.
WIDTH_64 = {"hidden_size": 64, "num_attention_heads": 4, "decoder_hidden_size": 32, "decoder_num_attention_heads": 4}
WIDTH_64_FLAGS = ["--num_attention_heads", "4", "--decoder_num_attention_heads", "4", "--spatial_temperature", "0.06"]


def width_64_checkpoint(folder: Path, file_name: str = "run.safetensors", hyper_parameters: dict | None = None):
    """The source model (the true heads) and its weights saved in the original's format."""
    source = random_model(StellarForPreTraining, tiny_config(**WIDTH_64))
    path = write_checkpoint(original_state_dict(source), folder / file_name, hyper_parameters=hyper_parameters)
    return source, path


def meta_original_state_dict(**overrides) -> dict[str, torch.Tensor]:
    """Original names and shapes of a one-layer `StellarForPreTraining` on the meta device (no memory, any width)."""
    with torch.device("meta"):
        model = StellarForPreTraining(
            tiny_config(**{"num_hidden_layers": 1, "decoder_num_hidden_layers": 1, **overrides})
        )
    return original_state_dict(model, extras=False)


def test_head_counts_of_a_non_standard_width_are_not_guessed(tmp_path, capsys):
    """Without the flags, a 64-wide checkpoint stops with exit code 1 and names every flag it needs."""
    _, path = width_64_checkpoint(tmp_path)
    output_dir = tmp_path / "hf"
    assert main(["--checkpoint", str(path), "--output_dir", str(output_dir)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: cannot convert without --num_attention_heads and --decoder_num_attention_heads "
                            "and --spatial_temperature")  # fmt: skip
    assert "the encoder is 64 wide, not a standard width" in error
    assert "the decoder is 32 wide, not the original's 512" in error
    assert not output_dir.exists()

    with pytest.raises(MissingSettingError) as raised:  # the Python API: a ValueError naming the same arguments
        convert_checkpoint(path, output_dir)
    assert isinstance(raised.value, ValueError)
    assert raised.value.flags == ["--num_attention_heads", "--decoder_num_attention_heads", "--spatial_temperature"]
    # Only what is still unknown is asked for.
    with pytest.raises(MissingSettingError, match="decoder is 32 wide") as raised:
        convert_checkpoint(path, output_dir, num_attention_heads=4, spatial_temperature=0.06)
    assert raised.value.flags == ["--decoder_num_attention_heads"]
    assert not output_dir.exists()


def test_told_head_counts_reproduce_the_model(tmp_path, capsys):
    """With the flags, the folder has 4 and 4 heads and computes what the source model (built with them) computes."""
    source, path = width_64_checkpoint(tmp_path)
    output_dir = tmp_path / "hf"
    assert main(["--checkpoint", str(path), "--output_dir", str(output_dir), *WIDTH_64_FLAGS]) == 0
    assert "encoder: ViT width 64, 2 layers, 4 heads" in capsys.readouterr().out
    reloaded = StellarForPreTraining.from_pretrained(output_dir).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.decoder_num_attention_heads) == (4, 4)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = model_outputs(source, pixel_values)
    got = model_outputs(reloaded, pixel_values)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # The heads matter: the same weights with the counts a width rule guessed (64 / 64 = 1, and 8) compute otherwise.
    guessed_heads = {"num_attention_heads": 1, "decoder_num_attention_heads": 8}
    guessed = StellarForPreTraining(tiny_config(**{**WIDTH_64, **guessed_heads}))
    guessed.load_state_dict(source.state_dict())
    wrong = model_outputs(guessed.eval(), pixel_values)
    assert (wrong["prediction"] - expected["prediction"]).abs().max() > 1e-3
    assert (wrong["sparse_tokens"] - expected["sparse_tokens"]).abs().max() > 1e-3


def test_parity_checkpoint_needs_its_settings(stellar_parity_dir, tmp_path):
    """The original's own 64-wide checkpoint (no hyper-parameters): no head count is made up for it."""
    with pytest.raises(MissingSettingError) as raised:
        convert_checkpoint(stellar_parity_dir / "original.ckpt", tmp_path / "hf")
    assert raised.value.flags == ["--num_attention_heads", "--decoder_num_attention_heads", "--spatial_temperature"]


def test_standard_width_table():
    assert {width: heads for width, (_, heads) in STANDARD_WIDTHS.items()} == {384: 6, 768: 12, 1024: 16, 1280: 16}
    assert released_num_attention_heads(1280) == 16  # ViT-H/14 (STELLAR-H16): 16 heads of 80, not 1280 / 64
    assert released_num_attention_heads(64) is None
    assert released_num_attention_heads(512) is None


@pytest.mark.parametrize("width", list(STANDARD_WIDTHS))
def test_standard_widths_convert_without_arguments(width):
    heads = STANDARD_WIDTHS[width][1]
    original = meta_original_state_dict(
        hidden_size=width, num_attention_heads=heads, decoder_hidden_size=512, decoder_num_attention_heads=8
    )
    config, sources = resolve_config(original)
    assert (config.num_attention_heads, config.decoder_num_attention_heads) == (heads, 8)
    assert (config.spatial_temperature, config.layer_norm_eps) == (0.06, 1e-12)
    assert sources["num_attention_heads"] == f"standard {STANDARD_WIDTHS[width][0]} width {width}"
    assert "512-wide decoder has 8 heads" in sources["decoder_num_attention_heads"]
    # An argument wins over the table.
    given = infer_config(original, num_attention_heads=heads // 2, spatial_temperature=None, layer_norm_eps=1e-6)
    assert (given.num_attention_heads, given.spatial_temperature, given.layer_norm_eps) == (heads // 2, None, 1e-6)


def test_original_decoder_width_alone_is_known():
    """A 512-wide decoder has the original's 8 heads whatever the encoder; the encoder's settings are still asked."""
    original = meta_original_state_dict(hidden_size=64, decoder_hidden_size=512, decoder_num_attention_heads=8)
    with pytest.raises(MissingSettingError) as raised:
        resolve_config(original)
    assert raised.value.flags == ["--num_attention_heads", "--spatial_temperature"]
    config = infer_config(original, num_attention_heads=4, spatial_temperature=0.06)
    assert config.decoder_num_attention_heads == 8


def test_encoder_only_checkpoint_needs_no_decoder_heads():
    original = {
        name: tensor
        for name, tensor in meta_original_state_dict(hidden_size=64).items()
        if not name.startswith(("decoder", "position_embedding", "reconstruction_head", "clustering", "cls_cluster"))
    }
    with pytest.raises(MissingSettingError) as raised:
        resolve_config(original)
    assert raised.value.flags == ["--num_attention_heads", "--spatial_temperature"]


def test_settings_from_hyper_parameters():
    original = meta_original_state_dict(hidden_size=64, decoder_hidden_size=32)
    hyper_parameters = {"hyper_parameters": {"model": {
        "spatial_temp": None, "logits_temp": 0.2, "sk_temp": 0.03, "n_sk_iter": 5, "num_masks": 4,
        "masking_ratio": 0.6, "num_local_crops": 2, "teacher_momentum": 0.99, "do_koleo": False,
        "num_sparse_tokens": 3, "num_decoder_layers": 1, "num_clusters": 10, "prototype_dim": 6,
        "predictor_layers": 2,
    }}}  # fmt: skip
    config, sources = resolve_config(
        original, num_attention_heads=4, decoder_num_attention_heads=2, hyper_parameters=hyper_parameters
    )
    assert config.spatial_temperature is None  # the run's `spatial_temp: null`, not the released 0.06
    assert sources["spatial_temperature"] == "hyper-parameter hyper_parameters.model.spatial_temp"
    assert (config.prediction_temperature, config.sinkhorn_temperature, config.sinkhorn_iterations) == (0.2, 0.03, 5)
    assert (config.num_masked_views, config.mask_ratio, config.num_local_views) == (4, 0.6, 2)
    assert (config.ema_momentum, config.ema_momentum_end, config.koleo_weight) == (0.99, 0.99, 0.0)

    assert not config.do_global_align

    # Upstream's `do_global_align` carries over, except with its EMA teacher, which ignores it (and our config refuses).
    def aligned(**model):
        settings = {"hyper_parameters": {"model": {"num_masks": 2, **model}}}
        return resolve_config(original, num_attention_heads=4, decoder_num_attention_heads=2, spatial_temperature=0.06,
                              hyper_parameters=settings)  # fmt: skip

    config, sources = aligned(do_global_align=True)
    assert config.do_global_align and sources["do_global_align"].startswith("hyper-parameter")
    config, sources = aligned(do_global_align=True, momentum_teacher=True)
    assert not config.do_global_align and "ignored with the EMA teacher" in sources["do_global_align"]
    assert not aligned(do_global_align=False)[0].do_global_align

    # Hyper-parameters the tensors determine must agree with them.
    contradicting = {"hyper_parameters": {"model": {"num_sparse_tokens": 16}}}
    with pytest.raises(CheckpointError, match=r"num_sparse_tokens=16 but its tensors give num_sparse_tokens=3"):
        resolve_config(original, num_attention_heads=4, decoder_num_attention_heads=2, spatial_temperature=0.06,
                       hyper_parameters=contradicting)  # fmt: skip
    # `vit_pretrained` names the backbone: its width must be the encoder's.
    backbone = {"cfg": {"model": {"vit_pretrained": "facebook/vit-mae-base"}}}
    with pytest.raises(CheckpointError, match="768-wide backbone, but its encoder is 64 wide"):
        resolve_config(original, hyper_parameters=backbone)


def test_vit_pretrained_names_the_backbone():
    original = meta_original_state_dict(
        hidden_size=768, num_attention_heads=12, decoder_hidden_size=512, decoder_num_attention_heads=8
    )
    for backbone in ("facebook/vit-mae-base", None):  # None: the original builds `ViTConfig()`, ViT-B
        config, sources = resolve_config(original, hyper_parameters={"cfg": {"model": {"vit_pretrained": backbone}}})
        assert config.num_attention_heads == 12
        assert sources["num_attention_heads"] == f"hyper-parameter cfg.model.vit_pretrained={backbone!r}"


def test_hyper_parameters_are_read_from_a_lightning_checkpoint(tmp_path, caplog):
    """A `.ckpt` whose OmegaConf-like hyper-parameters give the spatial temperature; the heads still come as flags."""
    hyper_parameters = {"cfg": omegaconf_like({"model": {"spatial_temp": 0.1, "num_masks": 3}})}
    source, path = width_64_checkpoint(tmp_path, "run.ckpt", hyper_parameters=hyper_parameters)
    with caplog.at_level("INFO", logger="stellar_hf.convert"):
        converted = convert_checkpoint(path, tmp_path / "hf", num_attention_heads=4, decoder_num_attention_heads=4)
    assert (converted.config.spatial_temperature, converted.config.num_masked_views) == (0.1, 3)
    assert "spatial_temperature=0.1 (hyper-parameter hyper_parameters.cfg.model.spatial_temp)" in caplog.text
    # The source was built with 0.06; with 0.1 the spatial map differs, as it must.
    pixel_values = torch.randn(1, 3, 32, 32)
    assert not torch.equal(model_outputs(converted, pixel_values)["spatial_map"],
                           model_outputs(source, pixel_values)["spatial_map"])  # fmt: skip


def test_command_line_usage_errors_exit_2(tmp_path, capsys):
    _, path = width_64_checkpoint(tmp_path)
    for argv in (
        ["--output_dir", str(tmp_path / "hf")],  # no --checkpoint
        ["--checkpoint", str(path), "--output_dir", str(tmp_path / "hf"), "--num_attention_heads", "0"],
        ["--checkpoint", str(path), "--output_dir", str(tmp_path / "hf"), "--spatial_temperature", "-1"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_heads_that_do_not_divide_the_width_are_explained(tmp_path):
    path = write_checkpoint(original_state_dict(random_model(StellarModel, tiny_config())), tmp_path / "a.bin")
    with pytest.raises(CheckpointError, match=r"num_attention_heads=5 .*does not divide the encoder width 32"):
        convert_checkpoint(path, tmp_path / "hf", num_attention_heads=5, spatial_temperature=0.06)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def test_command_line_end_to_end(stellar_parity_dir, tmp_path):
    output_dir = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable, "-m", "stellar_hf.convert",
            "--checkpoint", str(stellar_parity_dir / "original.ckpt"),
            "--output_dir", str(output_dir),
            "--num_attention_heads", "4",
            "--decoder_num_attention_heads", "4",
            "--spatial_temperature", "0.06",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "saved StellarForPreTraining" in result.stdout
    # The reload check says what it compares: the folder against the converted model, not the original code.
    assert "not compared with the original code" in result.stdout
    assert "Reload check (the saved folder against the in-memory converted model, not against the original code)" in (
        result.stderr
    )
    assert "num_attention_heads=4 (--num_attention_heads)" in result.stderr
    assert "dropped 4 keys: the decoder's patch embedding" in result.stderr  # the poolers are dropped too
    config = StellarConfig.from_pretrained(output_dir)
    assert (config.hidden_size, config.num_attention_heads, config.decoder_num_attention_heads) == (64, 4, 4)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "modeling_stellar.py"):
        assert (output_dir / name).is_file(), name


def run_module(argv: list[str]) -> int:
    """`python -m stellar_hf.convert ARGS` in this process: the exit code of its `__main__` block."""
    old_argv = sys.argv
    sys.argv = ["stellar_hf.convert", *argv]
    try:
        runpy.run_module("stellar_hf.convert", run_name="__main__", alter_sys=False)
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = old_argv
    return 0


@pytest.mark.filterwarnings("ignore:'stellar_hf.convert' found in sys.modules:RuntimeWarning")
def test_command_line_exit_code_for_a_bad_file(tmp_path, capsys):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(random.Random(1).randbytes(2048))
    assert run_module(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


def test_command_line_spatial_temperature_none(tmp_path):
    model = random_model(StellarModel, tiny_config(spatial_temperature=None))
    path = write_checkpoint(original_state_dict(model), tmp_path / "e.safetensors", prefix="")
    argv = ["--checkpoint", str(path), "--output_dir", str(tmp_path / "hf"), "--num_attention_heads", "4"]
    assert main(argv + ["--spatial_temperature", "none"]) == 0
    assert StellarConfig.from_pretrained(tmp_path / "hf").spatial_temperature is None


# ----------------------------------------------------------------------------------------------------------------------
# Files that are not (complete) STELLAR checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checkpoint_bytes(tmp_path_factory) -> dict[str, bytes]:
    """A valid original checkpoint in two formats, to damage."""
    original = original_state_dict(random_model(StellarForImageReconstruction, tiny_config()))
    folder = tmp_path_factory.mktemp("real")
    return {
        suffix: write_checkpoint(original, folder / f"real{suffix}").read_bytes()
        for suffix in (".ckpt", ".safetensors")
    }


class NotATensor:
    """A non-tensor object in a pickle."""

    def __init__(self):
        self.value = 1


class RunsACommand:
    """Unpickling this with pickle would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _foreign_files(tmp_path: Path, real_checkpoint_bytes: dict[str, bytes]) -> dict[str, tuple[Path, str]]:
    """name -> (file, pattern the error message must match)."""
    files = {}

    def add(name, suffix, content, pattern):
        path = tmp_path / f"{name}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)
        files[name] = (path, pattern)

    rng = random.Random(0)
    add("random-bytes-ckpt", ".ckpt", rng.randbytes(4096), "corrupt, truncated")
    add("random-bytes-bin", ".bin", rng.randbytes(100), "corrupt, truncated")
    add("random-bytes-safetensors", ".safetensors", rng.randbytes(4096), "corrupt or truncated")
    for suffix, data in real_checkpoint_bytes.items():
        add(f"truncated{suffix.replace('.', '-')}", suffix, data[: len(data) // 2], "corrupt|truncated")
    flipped = bytearray(real_checkpoint_bytes[".ckpt"])
    flipped[len(flipped) // 2] ^= 0xFF  # inside a tensor: only the archive's checksum notices
    add("bit-flip-ckpt", ".ckpt", bytes(flipped), "fails its checksum")
    add("empty-file", ".bin", b"", "empty")
    linear = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2))
    add("other-model", ".bin", lambda path: torch.save(linear.state_dict(), path), "not a STELLAR checkpoint")
    add("other-model-safetensors", ".safetensors", lambda p: save_file(linear.state_dict(), str(p)), "not a STELLAR")
    vit_keys = {"patch_embed.proj.weight": torch.ones(4, 3, 2, 2), "cls_token": torch.ones(1, 1, 4)}
    add("vit-backbone", ".bin", lambda path: torch.save(vit_keys, path), "encoder_init")
    with_object = {"sparse_tokens": torch.ones(2, 4), "x": NotATensor()}
    add("non-tensor-object", ".bin", lambda path: torch.save(with_object, path), "not tensors")
    add("empty-dict", ".bin", lambda path: torch.save({}, path), "empty state dict")
    add("empty-lightning", ".ckpt", lambda path: torch.save({"state_dict": {}, "epoch": 1}, path), "empty state dict")
    add("a-list", ".bin", lambda path: torch.save([torch.ones(2)], path), "not a state dict")
    add("only-sparse-tokens", ".bin", lambda path: torch.save({"sparse_tokens": torch.ones(2, 4)}, path), "incomplete")
    return files


def test_foreign_corrupt_and_truncated_files(tmp_path, real_checkpoint_bytes, capsys):
    for name, (path, pattern) in _foreign_files(tmp_path, real_checkpoint_bytes).items():
        with pytest.raises(CheckpointError, match=pattern):
            load_original_state_dict(path)
        assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / name)]) == 1, name
        assert "error:" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original_state_dict(tmp_path / "missing.ckpt")


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"sparse_tokens": torch.ones(2, 4)}, "callback": RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_original_state_dict(path)
    assert not marker.exists()


def test_keys_outside_the_table_and_shape_mismatches_are_named(tmp_path):
    original = original_state_dict(random_model(StellarForPreTraining, tiny_config()))
    unknown = {**original, "extra_head.weight": torch.ones(2)}
    path = write_checkpoint(unknown, tmp_path / "unknown.safetensors")
    with pytest.raises(CheckpointError, match=r"extra_head\.weight"):
        convert_checkpoint(path, tmp_path / "hf1", **TINY_SETTINGS)

    mismatched = dict(original)
    mismatched["cls_cluster_head.layer.weight"] = torch.randn(11, 6)  # one prototype more than the sparse head
    path = write_checkpoint(mismatched, tmp_path / "mismatch.safetensors")
    with pytest.raises(CheckpointError, match=r"cls_clustering_head\.prototypes\.weight: checkpoint \(11, 6\)"):
        convert_checkpoint(path, tmp_path / "hf2", **TINY_SETTINGS)

    not_finite = dict(original)
    not_finite["dense_proj.weight"] = not_finite["dense_proj.weight"].clone().fill_(float("nan"))
    path = write_checkpoint(not_finite, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in \['dense_proj\.weight'\]"):
        load_original_state_dict(path)
