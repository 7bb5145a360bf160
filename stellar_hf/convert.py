"""Convert original STELLAR checkpoints to stellar_hf folders.

    python -m stellar_hf.convert --checkpoint stellar-b16.safetensors --output_dir stellar-b16-hf

Reads a PyTorch Lightning `.ckpt` (`{"state_dict": {"model.<name>": tensor}, ...}`) or a `.safetensors` / `.bin` /
`.pt` state dict with or without the `model.` prefix, never executing pickled code. Every size the tensors determine
is read from their shapes. The settings the weights do not record (the head counts, the spatial temperature) are
never guessed: each comes from an explicit argument, the checkpoint's hyper-parameters, or a documented constant of
the released models (`STANDARD_WIDTHS`, `ORIGINAL_DECODER_WIDTH`); when none applies the conversion stops with a
`MissingSettingError` naming the flag to pass. Names (the EMA teacher's included) are mapped with one key table,
loaded strictly, saved with `save_pretrained`, and the saved folder is reloaded and compared with the in-memory
converted model (a check of saving, not of the conversion against the original code). Every dropped key is named
in the log. Not imported by `stellar_hf/__init__.py`.
"""

import argparse
import logging
import math
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_stellar import StellarConfig
from .image_processing_stellar import StellarImageProcessor
from .modeling_stellar import (
    StellarForImageReconstruction,
    StellarForPreTraining,
    StellarModel,
    StellarPreTrainedModel,
)
from .pretraining import TEACHER_PREFIX, StellarEMATeacher

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_GIVEN",
    "CheckpointError",
    "MissingSettingError",
    "PushToHubError",
    "convert_checkpoint",
    "convert_state_dict",
    "infer_config",
    "load_original_state_dict",
    "main",
    "model_outputs",
    "push_folder_to_hub",
    "read_checkpoint",
    "read_state_dict",
    "released_num_attention_heads",
    "rename_block_key",
    "rename_key",
    "resolve_config",
]

# Keys the original saves but never reads in its forward pass, and the copies it keeps of other models. Each pattern
# comes with the reason reported to the user.
DROPPED_KEY_PATTERNS = {
    r"^encoder\.pooler\.": "the encoder's pooler (unused)",
    r"^decoder\.embeddings\.": "the decoder's patch embedding, CLS and positions (unused)",
    r"^decoder\.pooler\.": "the decoder's pooler (unused)",
    r"^teacher_encoder\.pooler\.": "the EMA teacher encoder's pooler (unused)",
    r"^tokenizer\.": "the frozen MaskGIT VQGAN (convert it with `python -m stellar_hf.convert_vqgan`)",
}

# The original's EMA teacher (`momentum_teacher=True`): its own `ViTModel` encoder, sparse tokens and clustering heads,
# saved beside the student's. Each teacher name is the student's original name under another prefix; ours is the
# student's name under `teacher.` (`StellarEMATeacher` holds `stellar`, `sparse_clustering_head`,
# `cls_clustering_head`), the layout `StellarEMATeacher.from_pretrained` reads from the saved folder. Neither teacher
# has `dense_proj` / `sparse_proj`: the targets read only the sparse and CLS tokens.
TEACHER_KEY_PREFIXES = {
    "teacher_encoder.": "encoder.",
    "teacher_head.": "clustering_head.",
    "teacher_cls_head.": "cls_cluster_head.",
}
TEACHER_KEY_NAMES = {"teacher_sparse_tokens": "sparse_tokens"}
# Where our teacher's modules sit in the student: a teacher key must map into one of these.
_TEACHER_TARGET_PREFIXES = ("stellar.", "sparse_clustering_head.", "cls_clustering_head.")
# The original's hyper-parameter that turns its EMA teacher on, and where a checkpoint keeps hyper-parameters
# (Lightning: `hyper_parameters`; older Lightning: `hparams`; other trainers: `config`, `cfg`, `args`).
TEACHER_FLAG = "momentum_teacher"
HYPER_PARAMETER_KEYS = ("hyper_parameters", "hparams", "config", "cfg", "args")

# Transformer block names inside a transformers `ViTModel` layer: 4.x names first, 5.x names second. Also used by
# `stellar_hf.encoder_init` for MAE / ViT backbones.
BLOCK_KEY_TABLE = [
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"output\.dense\.", "mlp.fc2."),
    (r"attention\.q_proj\.", "attention.q_proj."),
    (r"attention\.k_proj\.", "attention.k_proj."),
    (r"attention\.v_proj\.", "attention.v_proj."),
    (r"attention\.o_proj\.", "attention.o_proj."),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
    (r"layernorm_before\.", "layernorm_before."),
    (r"layernorm_after\.", "layernorm_after."),
]
# A layer inside a transformers `ViTModel`: `encoder.layer.{i}.` (4.x) or `layers.{i}.` (5.x).
VIT_LAYER_PATTERN = r"(?:encoder\.layer|layers)\.(\d+)\."

# (original name pattern, our name). Patterns are matched in order against the name without `model.`.
KEY_TABLE = [
    (r"^sparse_tokens$", "stellar.embeddings.sparse_tokens"),
    (r"^encoder\.embeddings\.(cls_token|position_embeddings)$", r"stellar.embeddings.\1"),
    (r"^encoder\.embeddings\.patch_embeddings\.projection\.", "stellar.embeddings.patch_embeddings.projection."),
    (r"^encoder\.layernorm\.", "stellar.encoder.layernorm."),
    (r"^dense_proj\.", "stellar.factorization.dense_proj."),
    (r"^sparse_proj\.", "stellar.factorization.sparse_proj."),
    (r"^decoder_proj\.", "decoder.decoder_proj."),
    (r"^position_embedding\.positional_encoding_gaussian_matrix$", "decoder.position_encoding.gaussian_matrix"),
    (r"^decoder\.layernorm\.", "decoder.transformer.layernorm."),
    (r"^reconstruction_head\.", "reconstruction_head."),
    (r"^clustering_head\.layer\.weight$", "sparse_clustering_head.prototypes.weight"),
    # A single-Linear predictor is saved without an index; ours is always a Sequential.
    (r"^clustering_head\.predictor\.layers\.(weight|bias)$", r"sparse_clustering_head.predictor.0.\1"),
    (r"^clustering_head\.predictor\.layers\.(\d+)\.", r"sparse_clustering_head.predictor.\1."),
    (r"^cls_cluster_head\.layer\.weight$", "cls_clustering_head.prototypes.weight"),
    (r"^cls_cluster_head\.predictor\.layers\.(weight|bias)$", r"cls_clustering_head.predictor.0.\1"),
    (r"^cls_cluster_head\.predictor\.layers\.(\d+)\.", r"cls_clustering_head.predictor.\1."),
]
# Encoder and decoder layers (the original's encoder and decoder are both transformers `ViTModel`s).
_LAYER_PREFIXES = [
    (rf"^encoder\.{VIT_LAYER_PATTERN}", "stellar.encoder.layers.{}."),
    (rf"^decoder\.{VIT_LAYER_PATTERN}", "decoder.transformer.layers.{}."),
]
# Keys every original checkpoint has; the rest is optional (decoder, heads).
REQUIRED_KEYS = (
    "sparse_tokens",
    "encoder.embeddings.cls_token",
    "encoder.embeddings.position_embeddings",
    "encoder.embeddings.patch_embeddings.projection.weight",
    "encoder.layernorm.weight",
    "dense_proj.weight",
    "sparse_proj.weight",
)
# ----------------------------------------------------------------------------------------------------------------------
# Settings the weights do not record
#
# Resolved in this order: an explicit argument (command-line flag), the checkpoint's hyper-parameters, a documented
# constant of the released models; otherwise `MissingSettingError` names the flag. Never a rule of thumb.
# ----------------------------------------------------------------------------------------------------------------------

# The standard ViT widths of the backbones the released models and the original recipe build on, with their head
# counts (q, k and v are d x d whatever the heads, so the weights cannot tell). ViT-H/14 (STELLAR-H16's backbone,
# `facebook/vit-mae-huge`) has 16 heads of 80, not 1280 / 64 = 20.
STANDARD_WIDTHS = {
    384: ("ViT-S", 6),
    768: ("ViT-B", 12),
    1024: ("ViT-L", 16),
    1280: ("ViT-H", 16),
}
# The original's decoder is a transformers `ViTConfig(hidden_size=512, num_attention_heads=8, intermediate_size=2048)`
# whatever the encoder: a 512-wide decoder has 8 heads; any other width was built by modified code.
ORIGINAL_DECODER_WIDTH, ORIGINAL_DECODER_HEADS = 512, 8
# The released recipe's spatial temperature (`spatial_temp` in the original's configs/stellar.yaml), taken for a
# checkpoint of a standard width that has no hyper-parameters saying otherwise.
RELEASED_SPATIAL_TEMPERATURE = 0.06
# transformers' `ViTConfig` default, which the original's decoder always uses and its encoder uses with `ViTConfig()`
# and with the MAE backbones (`facebook/vit-mae-*`); pass `layer_norm_eps` for a backbone configured otherwise.
VIT_LAYER_NORM_EPS = 1e-12
# Backbones the original's `vit_pretrained` hyper-parameter names: (width, heads). `None` there means `ViTConfig()`.
KNOWN_VIT_BACKBONES = {
    "facebook/vit-mae-base": (768, 12),
    "facebook/vit-mae-large": (1024, 16),
    "facebook/vit-mae-huge": (1280, 16),
}
# Hyper-parameters of the original's `STELLARModel` that the tensors determine: checked against them.
HYPER_PARAMETER_CHECKS = {
    "num_sparse_tokens": "num_sparse_tokens",
    "num_decoder_layers": "decoder_num_hidden_layers",
    "num_clusters": "num_prototypes",
    "prototype_dim": "prototype_dim",
    "predictor_layers": "predictor_num_layers",
}
# Hyper-parameters of the original's `STELLARModel` that only matter for further pretraining: our fields. Without
# them, our defaults are the released recipe's values (configs/stellar.yaml).
HYPER_PARAMETER_SETTINGS = {
    "logits_temp": ("prediction_temperature",),
    "sk_temp": ("sinkhorn_temperature",),
    "n_sk_iter": ("sinkhorn_iterations",),
    "num_masks": ("num_masked_views",),
    "masking_ratio": ("mask_ratio",),
    "num_local_crops": ("num_local_views",),
    "teacher_momentum": ("ema_momentum", "ema_momentum_end"),  # the original's momentum is constant
}
# Switches of the original that turn a training part off: our field and its "off" value.
HYPER_PARAMETER_SWITCHES = {
    "do_masking": ("num_masked_views", 0),
    "do_cropping": ("num_local_views", 0),
    "do_koleo": ("koleo_weight", 0.0),
}


class _NotGiven:
    """The default of an argument whose `None` means something (`spatial_temperature=None`: no temperature)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = _NotGiven()
# Containers that training code wraps a state dict in: Lightning / timm (`state_dict`), MAE (`model`), DDP (`module`).
WRAPPER_KEYS = ("state_dict", "model", "module")


class CheckpointError(ValueError):
    """The file is not a checkpoint we can read or convert; the message says why."""


class MissingSettingError(CheckpointError):
    """
    A setting the weights do not record could not be found in the checkpoint's hyper-parameters or the released
    models' constants. `flags` lists the command-line flags (Python: the arguments of the same names) to pass.
    """

    def __init__(self, message: str, flags: list[str]):
        super().__init__(message)
        self.flags = flags


def released_num_attention_heads(hidden_size: int) -> int | None:
    """Encoder heads of a standard ViT width (`STANDARD_WIDTHS`), or `None` for any other width."""
    entry = STANDARD_WIDTHS.get(hidden_size)
    return None if entry is None else entry[1]


# ----------------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------------


class _OpaqueObject:
    """
    Stands in for an object of a class `torch.load(weights_only=True)` may not build (hyper-parameters, OmegaConf
    configs, paths in a Lightning checkpoint). It runs no code from the file. It keeps the arguments and state the
    safe unpickler hands it, which are themselves only plain containers, numbers, strings, tensors and other
    placeholders, so that the run's hyper-parameters can be read (`_find_setting`).
    """

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance._args, instance._state = args, None
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state

    def __repr__(self) -> str:
        return "<object not unpickled>"


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_length < path.stat().st_size


def _check_zip_checksums(path: Path) -> None:
    """
    Verify the CRC of every member of a `torch.save` zip archive. `torch.load` does not, so without this a damaged
    download would be converted into wrong weights instead of being reported.
    """
    if not zipfile.is_zipfile(path):
        return  # a legacy `torch.save` file, or not a checkpoint at all: `torch.load` decides
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:
        raise CheckpointError(f"{path} is a damaged archive: corrupt or truncated ({error})") from error
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt: `{damaged}` fails its checksum (re-download the file)")


def _torch_load(path: Path) -> object:
    """
    `torch.load(weights_only=True)`. When the file also holds objects that loader refuses (a Lightning checkpoint's
    hyper-parameters, callbacks' state), they are replaced by inert placeholders, so the tensors still load without
    executing anything from the file; modules the safe loader blocks outright (`os`, `sys`) stay refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a refused object, or bytes that are no pickle at all
        first_error = error
    except Exception as error:  # damaged files raise anything from EOFError to IndexError inside the unpickler
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
    try:
        unsafe_globals = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: random bytes, a plain pickle, a legacy file with foreign objects
        unsafe_globals = []
    if not unsafe_globals:
        reason = str(first_error).strip().splitlines()[-1]
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a PyTorch checkpoint of plain tensors ({reason})"
        ) from first_error
    placeholders = [(_OpaqueObject, name) for name in unsafe_globals]
    try:
        with torch.serialization.safe_globals(placeholders):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path} holds objects that cannot be read without executing code from the file "
            f"({', '.join(unsafe_globals)}); refusing to unpickle it. If you trust the file, extract its state dict "
            "with `torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt')` and convert that."
        ) from error
    logger.info("ignored objects of these classes in %s (not tensors): %s", path, ", ".join(unsafe_globals))
    return checkpoint


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read a state dict from a `.safetensors` file or a `torch.save`d file without executing pickled code.

    Unwraps training checkpoints (`{"state_dict": ...}` from Lightning and timm, `{"model": ...}` from MAE,
    `{"module": ...}`); keeps names as they are. Raises `CheckpointError` for missing, corrupt, truncated or foreign
    files and for anything that is not a non-empty mapping of names to tensors.
    """
    return _read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """
    `read_state_dict`, and the hyper-parameters a training checkpoint keeps beside it: `{key: object}` for each of
    `HYPER_PARAMETER_KEYS` the file holds (Lightning's `hyper_parameters`, `hparams`, `config`, `cfg`, `args`), in
    that order; empty for a bare state dict. Objects the safe loader refuses (an `argparse.Namespace`, OmegaConf
    configs) are inert placeholders that `find_hyper_parameter` reads.
    """
    state_dict, checkpoint = _read_checkpoint(path)
    hyper_parameters = {}
    if isinstance(checkpoint, Mapping):
        for key in HYPER_PARAMETER_KEYS:
            if key in checkpoint and not isinstance(checkpoint[key], torch.Tensor):
                hyper_parameters[key] = checkpoint[key]
    return state_dict, hyper_parameters


def find_hyper_parameter(hyper_parameters: object, key: str) -> tuple[str, object] | None:
    """
    The first `key` in a checkpoint's hyper-parameters (as `read_checkpoint` returns them, or any nested dicts,
    lists, namespaces and OmegaConf trees), as (dotted name, value); `None` when no entry has that name (an entry set
    to `None` gives `(name, None)`).
    """
    if hyper_parameters is None:
        return None
    found = _find_setting(hyper_parameters, key, "")
    return None if found is None else (found[0].lstrip("."), found[1])


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], object]:
    """`read_state_dict`, and the whole object the file holds (for the hyper-parameters a training checkpoint keeps)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path))
        except Exception as error:  # safetensors raises several error types for damaged headers and data
            raise CheckpointError(
                f"{path} is not a readable safetensors file: corrupt or truncated ({error})"
            ) from error
    else:
        _check_zip_checksums(path)
        checkpoint = _torch_load(path)
    whole = checkpoint
    if isinstance(checkpoint, Mapping) and not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        for key in WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of named tensors")
    if not checkpoint:
        raise CheckpointError(f"{path} holds an empty state dict")
    foreign = [str(name) for name, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if foreign or not all(isinstance(name, str) for name in checkpoint):
        raise CheckpointError(
            f"{path} is not a model state dict: {len(foreign)} entries are not tensors, e.g. {foreign[:5]}"
        )
    return dict(checkpoint), whole


def _strip_prefix(name: str) -> str:
    for prefix in ("model.", "module."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _foreign_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    names = list(state_dict)
    if any(name.startswith("stellar.") for name in names):
        return " It looks like an already converted stellar_hf model: load its folder with `from_pretrained`."
    if any(re.search(r"(patch_embed\.proj|patch_embeddings\.projection)\.weight$", name) for name in names):
        return (
            " It looks like a ViT / MAE backbone: initialise a STELLAR encoder from it with "
            "`stellar_hf.encoder_init.load_encoder_weights`."
        )
    return f" Its first keys are {names[:5]}."


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read an original STELLAR checkpoint without executing pickled code; returns names without the `model.` prefix.

    Accepts a Lightning `.ckpt`, a plain `torch.save`d state dict, or `.safetensors`. Raises `CheckpointError` for
    missing, corrupt, truncated or foreign files.
    """
    return _load_original(path)[0]


def _load_original(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """`load_original_state_dict`, and the file's hyper-parameters (`read_checkpoint`)."""
    raw_state_dict, hyper_parameters = read_checkpoint(path)
    state_dict = {_strip_prefix(name): tensor for name, tensor in raw_state_dict.items()}
    if "sparse_tokens" not in state_dict:
        raise CheckpointError(
            f"{path} has no `sparse_tokens`: it is not a STELLAR checkpoint." + _foreign_hint(state_dict)
        )
    missing = [name for name in REQUIRED_KEYS if name not in state_dict]
    if missing:
        raise CheckpointError(f"{path} is an incomplete STELLAR checkpoint: missing {missing}")
    kept = {name: tensor for name, tensor in state_dict.items() if dropped_reason(name) is None}
    not_float = [name for name, tensor in kept.items() if not tensor.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{path} has non floating point tensors: {not_float[:10]}")
    not_finite = [name for name, tensor in kept.items() if not bool(tensor.isfinite().all())]
    if not_finite:
        raise CheckpointError(f"{path} has NaN or infinite values in {not_finite[:10]}")
    return state_dict, hyper_parameters


def _find_setting(
    value: object, key: str, where: str, seen: set[int] | None = None, depth: int = 0
) -> tuple[str, object] | None:
    """
    The first `key` in nested hyper-parameters (dicts, lists, and the state of placeholders for `argparse.Namespace`
    or OmegaConf objects, whose leaves keep their value in `_val`), as (dotted name, value); `None` when absent.
    """
    seen = set() if seen is None else seen
    if isinstance(value, (torch.Tensor, str, bytes, int, float, type)) or value is None or id(value) in seen:
        return None
    if depth > 64:  # hyper-parameters are shallow; this bounds the recursion on a pathological file
        return None
    seen.add(id(value))  # OmegaConf nodes point back to their parents
    if isinstance(value, _OpaqueObject):
        children = [(where, value._state), *((where, argument) for argument in value._args)]
    elif isinstance(value, Mapping):
        if key in value:
            return f"{where}.{key}", _plain_value(value[key])
        # Private names (OmegaConf's `_content`, `_metadata`) are not part of the dotted name.
        children = [(f"{where}.{name}" if isinstance(name, str) and not name.startswith("_") else where, child)
                    for name, child in value.items()]  # fmt: skip
    elif isinstance(value, (list, tuple)):
        children = [(where, child) for child in value]
    else:
        return None
    for child_where, child in children:
        found = _find_setting(child, key, child_where, seen, depth + 1)
        if found is not None:
            return found
    return None


def _plain_value(value: object) -> object:
    """A hyper-parameter's value; OmegaConf keeps a leaf's value in the `_val` of its node."""
    for _ in range(8):
        if isinstance(value, _OpaqueObject) and isinstance(value._state, Mapping) and "_val" in value._state:
            value = value._state["_val"]
    return value


def _is_true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"))


def _is_false(value: object) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "0"))


# ----------------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------------


def rename_block_key(name: str) -> str:
    """
    Our name inside a transformer layer for a transformers `ViTModel` one (4.x or 5.x), e.g.
    `attention.attention.query.weight` -> `attention.q_proj.weight`. Raises `CheckpointError` for unknown names.
    """
    for pattern, target in BLOCK_KEY_TABLE:
        match = re.match(pattern, name)
        if match:
            return target + name[match.end() :]
    raise CheckpointError(f"unknown transformer layer key {name!r}")


def dropped_reason(name: str) -> str | None:
    """Why an original key is not converted, or `None` when it is."""
    for pattern, reason in DROPPED_KEY_PATTERNS.items():
        if re.search(pattern, name):
            return reason
    return None


def teacher_student_name(name: str) -> str | None:
    """The original student name an original EMA-teacher key copies (`teacher_head.x` -> `clustering_head.x`), or
    `None` when `name` is no teacher key."""
    if name in TEACHER_KEY_NAMES:
        return TEACHER_KEY_NAMES[name]
    for prefix, student_prefix in TEACHER_KEY_PREFIXES.items():
        if name.startswith(prefix):
            return student_prefix + name[len(prefix) :]
    return None


def rename_key(name: str) -> str | None:
    """
    Our parameter name for an original one, or `None` for a key we drop. Unknown keys raise `CheckpointError`.

    An EMA-teacher key gets the name of the student key it copies under `teacher.`
    (`teacher_encoder.encoder.layer.0.…` -> `teacher.stellar.encoder.layers.0.…`).
    """
    if dropped_reason(name) is not None:
        return None
    student_name = teacher_student_name(name)
    if student_name is not None:
        try:
            target = rename_key(student_name)
        except CheckpointError:
            target = None
        if target is None or not target.startswith(_TEACHER_TARGET_PREFIXES):
            raise CheckpointError(f"unknown EMA teacher key {name!r}: not part of a STELLAR checkpoint")
        return "teacher." + target
    for prefix_pattern, target in _LAYER_PREFIXES:
        match = re.match(prefix_pattern, name)
        if match:
            try:
                return target.format(match.group(1)) + rename_block_key(name[match.end() :])
            except CheckpointError:
                raise CheckpointError(f"unknown transformer layer key {name!r}") from None
    for pattern, target in KEY_TABLE:
        if re.search(pattern, name):
            return re.sub(pattern, target, name)
    raise CheckpointError(f"unknown key {name!r}: not part of a STELLAR checkpoint")


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an original state dict to ours. Returns the converted dict and the original keys that were dropped."""
    converted, dropped, unknown = {}, [], []
    for name, tensor in state_dict.items():
        try:
            new_name = rename_key(name)
        except CheckpointError:
            unknown.append(name)
            continue
        if new_name is None:
            dropped.append(name)
        else:
            converted[new_name] = tensor.contiguous()
    if unknown:
        raise CheckpointError(f"keys that are not part of a STELLAR checkpoint: {unknown}")
    return converted, dropped


# ----------------------------------------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------------------------------------


def _layer_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.{VIT_LAYER_PATTERN}")
    return sorted({int(match.group(1)) for name in state_dict if (match := pattern.match(name))})


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = _layer_indices(state_dict, prefix)
    if indices != list(range(len(indices))):
        raise CheckpointError(f"the {prefix}'s layers are not numbered 0..n-1: found {indices}")
    return len(indices)


def _layer_tensor(state_dict: Mapping[str, torch.Tensor], prefix: str, names: tuple[str, ...]) -> torch.Tensor | None:
    for name in names:
        for layer_prefix in (f"{prefix}.encoder.layer.0.", f"{prefix}.layers.0."):
            if layer_prefix + name in state_dict:
                return state_dict[layer_prefix + name]
    return None


def _predictor_shape(state_dict: Mapping[str, torch.Tensor], head: str) -> tuple[int, int | None]:
    """Number of Linear layers in a clustering predictor and its hidden width (`None` for a single Linear)."""
    if f"{head}.predictor.layers.weight" in state_dict:
        return 1, None
    pattern = re.compile(rf"^{head}\.predictor\.layers\.(\d+)\.weight$")
    indices = sorted(int(match.group(1)) for name in state_dict if (match := pattern.match(name)))
    if not indices:
        raise CheckpointError(f"{head} has no predictor weights")
    # Linear layers sit at 0, 2, 4, ... with GELUs between them.
    if indices != list(range(0, 2 * len(indices), 2)):
        raise CheckpointError(f"{head}'s predictor Linear layers are expected at 0, 2, 4, ...; found {indices}")
    hidden_sizes = {state_dict[f"{head}.predictor.layers.{index}.weight"].shape[0] for index in indices[:-1]}
    if len(hidden_sizes) > 1:
        raise CheckpointError(f"{head}'s predictor has hidden layers of different widths {sorted(hidden_sizes)}")
    return len(indices), (hidden_sizes.pop() if hidden_sizes else None)


def _has_qkv_bias(state_dict: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return _layer_tensor(state_dict, prefix, ("attention.attention.query.bias", "attention.q_proj.bias")) is not None


def _hyper_parameter_number(
    found: tuple[str, object], integer: bool = False, optional: bool = False
) -> int | float | None:
    """A numeric hyper-parameter's value (numbers, numeric strings; `None` when `optional`), or `CheckpointError`."""
    where, value = found
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            pass
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise CheckpointError(f"the checkpoint's hyper-parameter {where}={value!r} is not {kind}")
    return value


def _encoder_heads(hidden_size: int, hyper_parameters: object) -> tuple[int, str] | None:
    """Encoder heads from the hyper-parameters' `vit_pretrained` or the standard widths, with where they came from."""
    found = find_hyper_parameter(hyper_parameters, "vit_pretrained")
    if found is not None:
        where, backbone = found
        known = None
        if backbone is None:  # the original builds `ViTModel(ViTConfig())`: ViT-B
            known = (768, 12)
        elif isinstance(backbone, str) and backbone.strip() in KNOWN_VIT_BACKBONES:
            known = KNOWN_VIT_BACKBONES[backbone.strip()]
        if known is not None:
            if known[0] != hidden_size:
                raise CheckpointError(
                    f"the checkpoint's hyper-parameters say {where}={backbone!r}, a {known[0]}-wide backbone, but its "
                    f"encoder is {hidden_size} wide"
                )
            return known[1], f"hyper-parameter {where}={backbone!r}"
    entry = STANDARD_WIDTHS.get(hidden_size)
    if entry is not None:
        return entry[1], f"standard {entry[0]} width {hidden_size}"
    return None


def _spatial_temperature(hidden_size: int, hyper_parameters: object) -> tuple[float | None, str] | None:
    found = find_hyper_parameter(hyper_parameters, "spatial_temp")
    if found is not None:
        return _hyper_parameter_number(found, optional=True), f"hyper-parameter {found[0]}"
    if hidden_size in STANDARD_WIDTHS:
        return RELEASED_SPATIAL_TEMPERATURE, f"the released recipe's value at the standard width {hidden_size}"
    return None


def _missing_settings_error(missing: list[tuple[str, str]]) -> MissingSettingError:
    """One error for every setting that could not be resolved: (flag, why) pairs."""
    flags = [flag for flag, _ in missing]
    reasons = "; ".join(f"{flag}: {why}" for flag, why in missing)
    arguments = ", ".join(f"{flag.removeprefix('--')}=" for flag in flags)
    return MissingSettingError(
        f"cannot convert without {' and '.join(flags)}: the weights do not record "
        f"{'these settings' if len(flags) > 1 else 'this setting'} and nothing else in the checkpoint gives "
        f"{'them' if len(flags) > 1 else 'it'} ({reasons}). Pass the values the model was trained with "
        f"(in Python: {arguments})",
        flags,
    )


def infer_config(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    spatial_temperature: float | None | _NotGiven = NOT_GIVEN,
    layer_norm_eps: float | None = None,
    hyper_parameters: object = None,
) -> StellarConfig:
    """The `StellarConfig` of an original state dict; `resolve_config` without the sources."""
    return resolve_config(
        state_dict, num_attention_heads, decoder_num_attention_heads, spatial_temperature, layer_norm_eps,
        hyper_parameters,
    )[0]  # fmt: skip


def resolve_config(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    spatial_temperature: float | None | _NotGiven = NOT_GIVEN,
    layer_norm_eps: float | None = None,
    hyper_parameters: object = None,
) -> tuple[StellarConfig, dict[str, str]]:
    """
    Build the `StellarConfig` of an original state dict (names without `model.`), and say where each setting that
    the tensors do not determine came from.

    Sizes (widths, depths, MLP widths, patch and image size, channels, sparse tokens, heads' prototypes and
    predictor, reconstruction target and codebook size) are read from tensor shapes. The rest, in order:

    - `num_attention_heads`: the argument; the hyper-parameters' `vit_pretrained` when it names a known backbone
      (`KNOWN_VIT_BACKBONES`, or `None` for the original's `ViTConfig()`); the standard widths (`STANDARD_WIDTHS`:
      384 → 6, 768 → 12, 1024 → 16, 1280 → 16).
    - `decoder_num_attention_heads` (when there is a decoder): the argument; 8 for a 512-wide decoder (the original
      hard-codes `ViTConfig(hidden_size=512, num_attention_heads=8)`).
    - `spatial_temperature` (`None`: scaled dot products): the argument; the hyper-parameters' `spatial_temp`; 0.06
      at a standard width (the released recipe).
    - `layer_norm_eps`: the argument; 1e-12 (transformers' `ViTConfig` default, which the original's ViTs use).
    - training-only settings (`logits_temp`, `sk_temp`, `n_sk_iter`, `num_masks`, `masking_ratio`,
      `num_local_crops`, `teacher_momentum`, `do_masking`, `do_cropping`, `do_koleo`): the hyper-parameters, else our
      defaults, which are the released recipe's. Hyper-parameters the tensors determine (`num_sparse_tokens`,
      `num_decoder_layers`, `num_clusters`, `prototype_dim`, `predictor_layers`) must agree with them.

    `use_ema_teacher` is set when the checkpoint holds EMA-teacher weights and converts to `StellarForPreTraining`.

    Raises:
        MissingSettingError: a head count or the spatial temperature is not given and cannot be looked up; the
            message names every such flag (`--num_attention_heads`, `--decoder_num_attention_heads`,
            `--spatial_temperature`) and the widths found.
        CheckpointError: the tensors do not form a STELLAR model, a given value does not fit them, or the
            hyper-parameters contradict them.
    """
    missing = [name for name in REQUIRED_KEYS if name not in state_dict]
    if missing:
        raise CheckpointError(f"incomplete STELLAR checkpoint: missing {missing}")
    num_sparse_tokens, hidden_size = state_dict["sparse_tokens"].shape
    projection = state_dict["encoder.embeddings.patch_embeddings.projection.weight"]
    patch_size, num_channels = projection.shape[-1], projection.shape[1]
    if projection.shape[0] != hidden_size or projection.shape[-2] != patch_size:
        raise CheckpointError(
            f"patch embedding of shape {tuple(projection.shape)} does not fit {hidden_size}-wide sparse tokens"
        )
    num_positions = state_dict["encoder.embeddings.position_embeddings"].shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointError(f"{num_positions} patch position embeddings do not form a square grid")
    intermediate = _layer_tensor(state_dict, "encoder", ("intermediate.dense.weight", "mlp.fc1.weight"))
    if intermediate is None:
        raise CheckpointError("the checkpoint has no encoder layers")
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=_count_layers(state_dict, "encoder"),
        intermediate_size=intermediate.shape[0],
        qkv_bias=_has_qkv_bias(state_dict, "encoder"),
        image_size=side * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_sparse_tokens=num_sparse_tokens,
    )
    if "decoder_proj.weight" in state_dict:
        decoder_hidden_size = state_dict["decoder_proj.weight"].shape[0]
        decoder_intermediate = _layer_tensor(state_dict, "decoder", ("intermediate.dense.weight", "mlp.fc1.weight"))
        if decoder_intermediate is None:
            raise CheckpointError("the checkpoint has a decoder projection but no decoder layers")
        if _has_qkv_bias(state_dict, "decoder") != kwargs["qkv_bias"]:
            raise CheckpointError(
                "the encoder and the decoder disagree on query/key/value biases; we share the setting"
            )
        kwargs.update(
            decoder_hidden_size=decoder_hidden_size,
            decoder_num_hidden_layers=_count_layers(state_dict, "decoder"),
            decoder_intermediate_size=decoder_intermediate.shape[0],
        )
        head = state_dict.get("reconstruction_head.weight")
        if head is None:
            raise CheckpointError("the checkpoint has a decoder but no `reconstruction_head`")
        if head.ndim == 4:
            if tuple(head.shape) != (decoder_hidden_size, num_channels, patch_size, patch_size):
                raise CheckpointError(
                    f"pixel head of shape {tuple(head.shape)} does not fit {num_channels} channels and "
                    f"{patch_size}-pixel patches"
                )
            kwargs["reconstruction_target"] = "pixel"
        else:
            kwargs.update(reconstruction_target="vq", vq_codebook_size=head.shape[0])
    if "clustering_head.layer.weight" in state_dict:
        num_prototypes, prototype_dim = state_dict["clustering_head.layer.weight"].shape
        predictor_num_layers, predictor_hidden_size = _predictor_shape(state_dict, "clustering_head")
        use_cls_clustering = "cls_cluster_head.layer.weight" in state_dict
        if use_cls_clustering and _predictor_shape(state_dict, "cls_cluster_head") != (
            predictor_num_layers,
            predictor_hidden_size,
        ):
            raise CheckpointError("the sparse and CLS clustering heads have different predictors; we share the shape")
        kwargs.update(
            num_prototypes=num_prototypes,
            prototype_dim=prototype_dim,
            predictor_num_layers=predictor_num_layers,
            use_cls_clustering=use_cls_clustering,
        )
        if predictor_hidden_size is not None:
            kwargs["predictor_hidden_size"] = predictor_hidden_size
        if model_class_for(state_dict) is StellarForPreTraining and teacher_keys(state_dict):
            kwargs["use_ema_teacher"] = True

    # Hyper-parameters the tensors determine must agree with them: a mismatch means the file is not what it says.
    for name, field_name in HYPER_PARAMETER_CHECKS.items():
        found = find_hyper_parameter(hyper_parameters, name)
        if found is None or field_name not in kwargs or found[1] is None:
            continue
        value = _hyper_parameter_number(found, integer=True)
        if value != kwargs[field_name]:
            raise CheckpointError(
                f"the checkpoint's hyper-parameters say {found[0]}={found[1]!r} but its tensors give "
                f"{field_name}={kwargs[field_name]}"
            )

    # The settings the weights do not record: an argument, the hyper-parameters, a released-model constant, or an
    # error that names the flag.
    sources, unresolved = {}, []
    for name, value in (
        ("num_attention_heads", num_attention_heads), ("decoder_num_attention_heads", decoder_num_attention_heads)
    ):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{name} must be a positive integer, got {value!r} (--{name})")
    if num_attention_heads is not None:
        sources["num_attention_heads"] = "--num_attention_heads"
    else:
        resolved = _encoder_heads(hidden_size, hyper_parameters)
        if resolved is None:
            standard = ", ".join(f"{width} ({name}) → {heads}" for width, (name, heads) in STANDARD_WIDTHS.items())
            unresolved.append(
                ("--num_attention_heads", f"the encoder is {hidden_size} wide, not a standard width ({standard})")
            )
        else:
            num_attention_heads, sources["num_attention_heads"] = resolved
    if num_attention_heads is not None:
        if hidden_size % num_attention_heads:
            raise CheckpointError(
                f"num_attention_heads={num_attention_heads} ({sources['num_attention_heads']}) does not divide the "
                f"encoder width {hidden_size}; pass the head count the model was trained with "
                "(--num_attention_heads)"
            )
        kwargs["num_attention_heads"] = num_attention_heads

    if "decoder_hidden_size" not in kwargs:
        if decoder_num_attention_heads is not None:
            logger.warning("ignoring decoder_num_attention_heads=%s: the checkpoint has no decoder",
                           decoder_num_attention_heads)  # fmt: skip
    else:
        decoder_hidden_size = kwargs["decoder_hidden_size"]
        if decoder_num_attention_heads is not None:
            sources["decoder_num_attention_heads"] = "--decoder_num_attention_heads"
        elif decoder_hidden_size == ORIGINAL_DECODER_WIDTH:
            decoder_num_attention_heads = ORIGINAL_DECODER_HEADS
            sources["decoder_num_attention_heads"] = (
                f"the original's {ORIGINAL_DECODER_WIDTH}-wide decoder has {ORIGINAL_DECODER_HEADS} heads"
            )
        else:
            unresolved.append(
                (
                    "--decoder_num_attention_heads",
                    f"the decoder is {decoder_hidden_size} wide, not the original's {ORIGINAL_DECODER_WIDTH} "
                    f"(with {ORIGINAL_DECODER_HEADS} heads)",
                )
            )
        if decoder_num_attention_heads is not None:
            if decoder_hidden_size % decoder_num_attention_heads:
                raise CheckpointError(
                    f"decoder_num_attention_heads={decoder_num_attention_heads} does not divide the decoder width "
                    f"{decoder_hidden_size}; pass the head count the model was trained with "
                    "(--decoder_num_attention_heads)"
                )
            kwargs["decoder_num_attention_heads"] = decoder_num_attention_heads

    if not isinstance(spatial_temperature, _NotGiven):
        sources["spatial_temperature"] = "--spatial_temperature"
    else:
        resolved = _spatial_temperature(hidden_size, hyper_parameters)
        if resolved is None:
            unresolved.append(
                (
                    "--spatial_temperature",
                    f"no `spatial_temp` in the checkpoint's hyper-parameters, and {hidden_size} is not a standard "
                    f"width, where the released recipe's {RELEASED_SPATIAL_TEMPERATURE} applies (a number, or "
                    "'none' for scaled dot products)",
                )
            )
        else:
            spatial_temperature, sources["spatial_temperature"] = resolved
    if not isinstance(spatial_temperature, _NotGiven):
        kwargs["spatial_temperature"] = spatial_temperature
    if unresolved:
        raise _missing_settings_error(unresolved)

    if layer_norm_eps is not None:
        kwargs["layer_norm_eps"], sources["layer_norm_eps"] = layer_norm_eps, "--layer_norm_eps"
    else:
        kwargs["layer_norm_eps"] = VIT_LAYER_NORM_EPS
        sources["layer_norm_eps"] = "transformers' ViTConfig default, which the original's ViTs use"

    for name, field_names in HYPER_PARAMETER_SETTINGS.items():
        found = find_hyper_parameter(hyper_parameters, name)
        if found is not None and found[1] is not None:
            integer = field_names[0] in ("sinkhorn_iterations", "num_masked_views", "num_local_views")
            value = _hyper_parameter_number(found, integer=integer)
            for field_name in field_names:
                kwargs[field_name], sources[field_name] = value, f"hyper-parameter {found[0]}"
    for name, (field_name, off) in HYPER_PARAMETER_SWITCHES.items():
        found = find_hyper_parameter(hyper_parameters, name)
        if found is not None and _is_false(found[1]):
            kwargs[field_name], sources[field_name] = off, f"hyper-parameter {found[0]}={found[1]!r}"
    found = find_hyper_parameter(hyper_parameters, "do_global_align")
    if found is not None and _is_true(found[1]):
        # Upstream ignores the alignment when its EMA teacher is on; our config refuses that pair, so it stays off.
        teacher = find_hyper_parameter(hyper_parameters, TEACHER_FLAG)
        if kwargs.get("use_ema_teacher") or (teacher is not None and _is_true(teacher[1])):
            sources["do_global_align"] = f"off: hyper-parameter {found[0]}=True is ignored with the EMA teacher"
        else:
            kwargs["do_global_align"], sources["do_global_align"] = True, f"hyper-parameter {found[0]}={found[1]!r}"
    try:
        config = StellarConfig(**kwargs)
    except ValueError as error:
        raise CheckpointError(f"the inferred configuration is invalid: {error}") from error
    return config, sources


def teacher_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The original EMA-teacher keys of a state dict (names without `model.`), its unused pooler included."""
    return [name for name in state_dict if teacher_student_name(name) is not None]


def model_class_for(state_dict: Mapping[str, torch.Tensor]) -> type[StellarPreTrainedModel]:
    """The richest class the checkpoint fills: pretraining (with heads), reconstruction, or the bare encoder."""
    has_decoder = "decoder_proj.weight" in state_dict
    if "clustering_head.layer.weight" in state_dict and has_decoder:
        return StellarForPreTraining
    if has_decoder:
        return StellarForImageReconstruction
    return StellarModel


def _name_summary(names: list[str], all_names: list[str], limit: int = 12) -> str:
    """
    `names`, listed in full when there are at most `limit`; otherwise grouped by their first component, written
    `prefix.*` (count) where `names` holds every key of `all_names` under that prefix.
    """
    if len(names) <= limit:
        return ", ".join(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    totals: dict[str, int] = {}
    for name in all_names:
        first = name.split(".", 1)[0]
        totals[first] = totals.get(first, 0) + 1
    parts = []
    for first, members in groups.items():
        if len(members) == 1 and members[0] == first:
            parts.append(first)
        elif len(members) == totals.get(first):
            parts.append(f"{first}.* ({len(members)})")
        else:
            parts.extend(members)
    return ", ".join(parts)


def _log_dropped(dropped: list[str], all_names: list[str]) -> None:
    """One log line per reason, with the keys it covers."""
    by_reason: dict[str, list[str]] = {}
    for name in dropped:
        by_reason.setdefault(dropped_reason(name), []).append(name)
    for reason, names in by_reason.items():
        logger.info("dropped %d keys: %s: %s", len(names), reason, _name_summary(names, all_names))


def load_converted(
    model: torch.nn.Module, converted: dict[str, torch.Tensor], teacher: StellarEMATeacher | None = None
) -> None:
    """
    Strict load with missing / unexpected keys and shape mismatches listed by name: the model's tensors, and the
    EMA `teacher`'s under `teacher.` when there is one.
    """
    expected = model.state_dict()
    if teacher is not None:
        expected.update(teacher.state_dict(prefix=TEACHER_PREFIX))
    problems = []
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    mismatched = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, tensor in converted.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise CheckpointError("the checkpoint does not fit the inferred model; " + "; ".join(problems))
    model.load_state_dict({name: tensor for name, tensor in converted.items() if not name.startswith(TEACHER_PREFIX)})
    if teacher is not None:
        teacher_state = {name.removeprefix(TEACHER_PREFIX): tensor for name, tensor in converted.items()}
        teacher.load_state_dict({name: teacher_state[name] for name in teacher.state_dict()})


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def model_outputs(model: StellarPreTrainedModel, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the converted weights determine: encoder factors, decoder prediction, clustering logits."""
    encoder = model if isinstance(model, StellarModel) else model.stellar
    outputs = encoder(pixel_values, return_dict=True)
    result = {
        "cls_embedding": outputs.cls_embedding,
        "dense_features": outputs.dense_features,
        "sparse_tokens": outputs.sparse_tokens,
        "spatial_map": outputs.spatial_map,
        "lowrank_features": outputs.lowrank_features,
    }
    if getattr(model, "decoder", None) is not None:
        grid_size = (
            pixel_values.shape[-2] // model.config.patch_size,
            pixel_values.shape[-1] // model.config.patch_size,
        )
        result["prediction"] = model.decode_lowrank(outputs.lowrank_features, grid_size)
    if getattr(model, "sparse_clustering_head", None) is not None:
        result["clustering_logits"] = model.sparse_clustering_head(outputs.sparse_tokens)
    if getattr(model, "cls_clustering_head", None) is not None:
        result["cls_clustering_logits"] = model.cls_clustering_head(outputs.cls_embedding.unsqueeze(1))
    return result


def compare_models(reference: StellarPreTrainedModel, other: StellarPreTrainedModel) -> float:
    """Largest absolute difference between two models' outputs on a fixed random image at the config's size."""
    config = reference.config
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, config.num_channels, config.image_size, config.image_size, generator=generator)
    first, second = model_outputs(reference, pixel_values), model_outputs(other, pixel_values)
    return max((first[name] - second[name]).abs().max().item() for name in first)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    spatial_temperature: float | None | _NotGiven = NOT_GIVEN,
    push_to_hub: str | bool | None = None,
    layer_norm_eps: float | None = None,
    *,
    private: bool | None = None,
    release: str | None = None,
    model_id: str | None = None,
) -> StellarPreTrainedModel:
    """
    Convert `checkpoint_path` into a `save_pretrained` folder at `output_dir` and return the converted model.

    `release` names the released model the file is (`stellar_hf.released.RELEASED_MODELS`, e.g. `"stellar-b16"`): the
    model card then states ImageNet-1k as training data and the paper's numbers for it. `model_id` is what the card's
    snippets load (default: the Hub id pushed to, else the folder's name). `push_to_hub` (a repository id, or `True`
    for the folder's name under your account) uploads the folder with its card once it passed its checks, through
    `push_folder_to_hub` (`private` makes a new repository private; the token is `HF_TOKEN` or `hf auth login`'s).

    The folder holds the weights (safetensors), the config, the image processor, the model code (remote code) and a
    README model card; it is reloaded and its weights and outputs compared with the in-memory converted model before
    this returns (a check that saving lost nothing, not a comparison with the original code).

    Sizes are read from the tensors; the head counts, the spatial temperature and the LayerNorm epsilon come from the
    arguments, the checkpoint's hyper-parameters or the released models' constants, in the order `resolve_config`
    gives, and are never guessed: when one cannot be resolved, `MissingSettingError` names the argument to pass.
    `spatial_temperature=None` means scaled dot products (no temperature); leave it out to look it up.

    An original EMA teacher (`teacher_encoder.*`, `teacher_sparse_tokens`, `teacher_head.*`, `teacher_cls_head.*`)
    is saved in the folder as `teacher.*` tensors beside the student's (`use_ema_teacher=True`) when the model is a
    `StellarForPreTraining`; `StellarEMATeacher.from_pretrained(output_dir, model)` loads it, and so does
    `examples/pretrain.py --model_name_or_path`. For the other classes its tensors are counted in a warning. Every
    dropped key is named in the log, and a checkpoint whose hyper-parameters say `momentum_teacher=True` but that
    holds no teacher weights is reported.

    Raises:
        MissingSettingError: a head count or the spatial temperature cannot be known (the message names the flags).
        CheckpointError: the file cannot be read, is not a STELLAR checkpoint, or does not fit the inferred model
            (keys listed by name).
        RuntimeError: the saved folder does not reload to the same weights and outputs.
    """
    original, hyper_parameters = _load_original(checkpoint_path)
    teacher_flag = find_hyper_parameter(hyper_parameters, TEACHER_FLAG)
    config, sources = resolve_config(
        original, num_attention_heads, decoder_num_attention_heads, spatial_temperature, layer_norm_eps,
        hyper_parameters,
    )  # fmt: skip
    model_class = model_class_for(original)
    converted, dropped = convert_state_dict(original)
    teacher = teacher_keys(original)
    keeps_teacher = model_class is StellarForPreTraining
    # Without a teacher in the target class, its keys (pooler included) are reported once, below.
    _log_dropped([name for name in dropped if keeps_teacher or name not in teacher], list(original))
    if teacher_flag is not None and _is_true(teacher_flag[1]) and not teacher:
        logger.warning(
            "the checkpoint's hyper-parameters say its run used an EMA teacher (%s=%r) but it holds no teacher "
            "weights (teacher_encoder.*, teacher_sparse_tokens, teacher_head.*): converted without one "
            "(use_ema_teacher=False). To pretrain further with a teacher, load with use_ema_teacher=True: "
            "StellarEMATeacher.from_pretrained (and examples/pretrain.py) then starts a new teacher from the student",
            *teacher_flag,
        )
    if teacher and not keeps_teacher:
        logger.warning(
            "not converting the %d EMA teacher tensors (%s): %s has no EMA teacher; only StellarForPreTraining, "
            "which needs both the decoder and the clustering heads, keeps one",
            len(teacher),
            _name_summary(teacher, list(original)),
            model_class.__name__,
        )
        converted = {name: tensor for name, tensor in converted.items() if not name.startswith("teacher.")}
    elif teacher:
        logger.info(
            "converted the EMA teacher: %d tensors -> teacher.*",
            sum(name.startswith(TEACHER_PREFIX) for name in converted),
        )
    if model_class is StellarModel:
        heads = [name for name in original if (target := rename_key(name)) and not target.startswith("stellar.")]
        heads = [name for name in heads if name not in teacher]
        if heads:
            logger.warning(
                "the checkpoint has clustering heads but no decoder, which StellarForPreTraining needs: converting "
                "the encoder only and dropping %d head weights (%s)",
                len(heads),
                _name_summary(heads, list(original)),
            )
        # The key table names the encoder as it sits inside the head models.
        converted = {
            name.removeprefix("stellar."): tensor for name, tensor in converted.items() if name.startswith("stellar.")
        }
    model = model_class(config).eval()
    ema_teacher = StellarEMATeacher(config) if model_class is StellarForPreTraining and teacher else None
    load_converted(model, converted, ema_teacher)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if ema_teacher is None:
        model.save_pretrained(output_dir)
    else:
        ema_teacher.save_pretrained(output_dir, model)
    StellarImageProcessor.from_model_config(config).save_pretrained(output_dir)
    card_id = model_id or (push_to_hub if isinstance(push_to_hub, str) else None)
    write_model_card(output_dir, config, source=Path(checkpoint_path).name, model_id=card_id, release=release)

    # transformers can leave parameters at their initial values without complaint: compare values, then outputs.
    reloaded = model_class.from_pretrained(output_dir).eval()
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    if ema_teacher is not None:
        state.update(ema_teacher.state_dict(prefix=TEACHER_PREFIX))
        reloaded_state.update(StellarEMATeacher.from_pretrained(output_dir, reloaded).state_dict(prefix=TEACHER_PREFIX))
    for name, tensor in state.items():
        if not torch.equal(tensor, reloaded_state[name]):
            raise RuntimeError(
                f"reload check failed: `{name}` of the folder saved at {output_dir} differs from the converted model's"
            )
    difference = compare_models(model, reloaded)
    if difference > 1e-6:
        raise RuntimeError(
            f"reload check failed: the folder saved at {output_dir} gives outputs that differ from the converted "
            f"model's by up to {difference:.3g}"
        )
    logger.info(
        "settings the weights do not record: %s",
        "; ".join(f"{name}={getattr(config, name)!r} ({source})" for name, source in sources.items()),
    )
    logger.info(
        "saved %s (%.1fM parameters) from %s to %s. Reload check (the saved folder against the in-memory converted "
        "model, not against the original code): weights equal, outputs differ by at most %.3g",
        model_class.__name__,
        sum(parameter.numel() for parameter in model.parameters()) / 1e6,
        checkpoint_path,
        output_dir,
        difference,
    )
    if push_to_hub:
        push_folder_to_hub(
            output_dir,
            config,
            source=Path(checkpoint_path).name,
            repo_id=push_to_hub if isinstance(push_to_hub, str) else None,
            private=private,
            release=release,
        )
    return model


class PushToHubError(RuntimeError):
    """The folder was converted and saved, but uploading it failed; the message says where it is and why."""


def push_folder_to_hub(
    output_dir: str | Path,
    config: StellarConfig,
    source: str,
    repo_id: str | None = None,
    private: bool | None = None,
    release: str | None = None,
) -> str:
    """
    Upload a converted folder to the Hub with its model card; returns the repository id.

    The repository (`repo_id`, default: the folder's name under your account) is created if needed (`private` for a
    new one). The card is rendered again for the full repository id the Hub returns, so that its snippets load the
    published copy, then the folder is uploaded in one commit. The token is the environment's (`HF_TOKEN`) or the
    one `hf auth login` stored; it is never a command-line option.

    Raises:
        PushToHubError: creating the repository or uploading failed (not logged in, no rights, no network).
    """
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    repo_id = repo_id or output_dir.resolve().name
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        write_model_card(output_dir, config, source=source, model_id=repo_id, release=release)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=f"Add STELLAR converted from {source} (stellar_hf.convert)",
        )
    except Exception as error:  # huggingface_hub raises HTTP, token and network errors of several types
        raise PushToHubError(
            f"converted and saved to {output_dir}, but uploading it to {repo_id} failed "
            f"({type(error).__name__}: {error}). Log in with `hf auth login` (or set HF_TOKEN) with write access, "
            "then upload the folder again with `hf upload`"
        ) from error
    logger.info("uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id


# The MAE weights the original recipe starts from, by (width, patch size).
MAE_BACKBONES = {
    (768, 16): "facebook/vit-mae-base",
    (1024, 16): "facebook/vit-mae-large",
    (1280, 14): "facebook/vit-mae-huge",
}


def write_model_card(
    output_dir: Path, config: StellarConfig, source: str, model_id: str | None = None, release: str | None = None
) -> None:
    """
    Write the model card (`stellar_hf.model_card`) to `output_dir/README.md`. For a `release` (a released model's
    name) the card also names ImageNet-1k as the training data and gives the paper's numbers when it reports some.
    """
    from .model_card import IMAGENET_1K, PAPER_RESULTS, render_model_card

    details = f"Converted from the original checkpoint `{source}` with `python -m stellar_hf.convert`."
    datasets, results = None, None
    if release is not None:
        from .released import released_model

        released = released_model(release)
        details = (
            f"Converted from `{released.filename}`, the original authors' release `{released.name}` in "
            f"[{released.repo_id}](https://huggingface.co/{released.repo_id}), with `python -m stellar_hf.convert`."
        )
        datasets, results = [IMAGENET_1K], PAPER_RESULTS.get(released.name)
    text = render_model_card(
        config,
        training_details=details,
        model_id=model_id or Path(output_dir).resolve().name,
        base_model=MAE_BACKBONES.get((config.hidden_size, config.patch_size)),
        datasets=datasets,
        results=results,
    )
    (Path(output_dir) / "README.md").write_text(text, encoding="utf-8")


def describe(config: StellarConfig, model_class: type) -> str:
    """One line per inferred group of settings, for the command's output."""
    lines = [
        f"model: {model_class.__name__}",
        f"encoder: ViT width {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} "
        f"heads, MLP {config.intermediate_size}, patch {config.patch_size}, image {config.image_size}, "
        f"{config.num_sparse_tokens} sparse tokens, spatial temperature {config.spatial_temperature}, LayerNorm eps "
        f"{config.layer_norm_eps:g}",
    ]
    if model_class is not StellarModel:
        lines.append(
            f"decoder: width {config.decoder_hidden_size}, {config.decoder_num_hidden_layers} layers, "
            f"{config.decoder_num_attention_heads} heads, MLP {config.decoder_intermediate_size}, "
            + (
                f"VQ head over {config.vq_codebook_size} codes"
                if config.reconstruction_target == "vq"
                else "pixel head"
            )
        )
    if model_class is StellarForPreTraining:
        lines.append(
            f"clustering: {config.num_prototypes} prototypes of width {config.prototype_dim}, "
            f"{config.predictor_num_layers}-layer predictor"
            + (f" (hidden {config.predictor_hidden_size})" if config.predictor_num_layers > 1 else "")
            + (", CLS head" if config.use_cls_clustering else ", no CLS head")
            + (", EMA teacher" if config.use_ema_teacher else "")
        )
    return "\n".join(lines)


def _temperature(value: str) -> float | None:
    """`--spatial_temperature`: a positive number, or 'none' (scaled dot products)."""
    return None if value.lower() == "none" else _positive_argument(float, "a positive number or 'none'")(value)


def _positive_argument(cast, expected: str):
    """An argparse `type` that reads `cast(text)` and accepts only finite values above 0."""

    def parse(text: str):
        try:
            number = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (number > 0 and math.isfinite(number)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return number

    return parse


positive_int_argument = _positive_argument(int, "a positive integer")
positive_float_argument = _positive_argument(float, "a positive number")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    standard = ", ".join(f"{width} → {heads}" for width, (_, heads) in STANDARD_WIDTHS.items())
    parser = argparse.ArgumentParser(
        prog="python -m stellar_hf.convert",
        description="Convert an original STELLAR checkpoint (Lightning .ckpt, .safetensors or .bin) to a "
        "transformers folder. Sizes are read from the tensors; settings the weights do not record are taken from "
        "these options, else the checkpoint's hyper-parameters, else the released models' values, and the command "
        "fails naming the option when none applies. Exit codes: 0 converted, 1 conversion error, 2 usage error.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original .ckpt, .safetensors or .bin file, or a released model's name (stellar-b16, stellar-l16, "
        "stellar-h16, stellar-b8, stellar-b24), downloaded from microsoft/STELLAR through the Hugging Face cache",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write the converted model to")
    parser.add_argument(
        "--num_attention_heads",
        type=positive_int_argument,
        default=None,
        help="encoder heads (not stored in the weights). Without it: the hyper-parameters' vit_pretrained backbone, "
        f"else the standard widths ({standard}); any other width needs this option",
    )
    parser.add_argument(
        "--decoder_num_attention_heads",
        type=positive_int_argument,
        default=None,
        help=f"decoder heads. Without it: {ORIGINAL_DECODER_HEADS} for a {ORIGINAL_DECODER_WIDTH}-wide decoder (the "
        "original's); any other decoder width needs this option",
    )
    parser.add_argument(
        "--spatial_temperature",
        type=_temperature,
        default=NOT_GIVEN,
        help="temperature of the spatial map, or 'none' for scaled dot products. Without it: the hyper-parameters' "
        f"spatial_temp, else {RELEASED_SPATIAL_TEMPERATURE} at a standard width (the released recipe); any other "
        "width needs this option",
    )
    parser.add_argument(
        "--layer_norm_eps",
        type=positive_float_argument,
        default=None,
        help=f"LayerNorm epsilon (default: {VIT_LAYER_NORM_EPS:g}, transformers' ViTConfig default that the "
        "original's ViTs use; e.g. 1e-6 for a timm backbone)",
    )
    parser.add_argument(
        "--revision", default=None, help="with a released name: the branch, tag or commit of microsoft/STELLAR"
    )
    parser.add_argument(
        "--release",
        default=None,
        metavar="NAME",
        help="the checkpoint file is this released model (implied by a released name as --checkpoint): the model "
        "card names ImageNet-1k and the paper's numbers for it",
    )
    parser.add_argument(
        "--push_to_hub",
        nargs="?",
        const=True,
        default=None,
        metavar="REPO_ID",
        help="also upload the checked folder with its model card to the Hub: to REPO_ID, else --hub_model_id, else "
        "the output folder's name under your account. The token is HF_TOKEN or the one `hf auth login` stored",
    )
    parser.add_argument("--hub_model_id", default=None, help="the repository for --push_to_hub (namespace/name)")
    parser.add_argument(
        "--private", action="store_true", help="with --push_to_hub: create the repository as private"
    )
    args = parser.parse_args(argv)
    if (args.hub_model_id or args.private) and not args.push_to_hub:
        parser.error("--hub_model_id and --private need --push_to_hub")
    if isinstance(args.push_to_hub, str) and args.hub_model_id and args.push_to_hub != args.hub_model_id:
        parser.error(f"--push_to_hub {args.push_to_hub} and --hub_model_id {args.hub_model_id} disagree")
    if args.hub_model_id:
        args.push_to_hub = args.hub_model_id
    if args.release is not None:
        from .released import RELEASED_MODELS

        if args.release not in RELEASED_MODELS:
            parser.error(f"--release {args.release!r} is not a released model ({', '.join(RELEASED_MODELS)})")
    return args


def _checkpoint_file(args: argparse.Namespace) -> tuple[str, str | None]:
    """The file to convert and the release it is: `--checkpoint` as given, or a released name's cached download."""
    from .released import RELEASED_MODELS, download_released_file

    name = args.checkpoint.strip().lower()
    if Path(args.checkpoint).exists() or name not in RELEASED_MODELS:
        if args.revision is not None:
            raise CheckpointError(f"--revision applies to a released name, not to the file {args.checkpoint}")
        return args.checkpoint, args.release
    if args.release is not None and args.release != name:
        raise CheckpointError(f"--checkpoint {name} and --release {args.release} disagree")
    return str(download_released_file(name, revision=args.revision)), name


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when converted, 1 for a conversion error (message on stderr); argparse exits 2 on bad usage."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        checkpoint, release = _checkpoint_file(args)
        model = convert_checkpoint(
            checkpoint,
            args.output_dir,
            num_attention_heads=args.num_attention_heads,
            decoder_num_attention_heads=args.decoder_num_attention_heads,
            spatial_temperature=args.spatial_temperature,
            push_to_hub=args.push_to_hub,
            layer_norm_eps=args.layer_norm_eps,
            private=args.private or None,
            release=release,
        )
    # An unreadable or foreign file, an unknown setting, a failed reload or upload, a download refused or offline.
    except (CheckpointError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(model.config, type(model)))
    print(
        f"saved {type(model).__name__} to {args.output_dir} (checked by reloading the folder against the converted "
        "model; not compared with the original code)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
