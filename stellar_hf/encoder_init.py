"""Initialise a STELLAR encoder from MAE or ViT weights, as the original recipe does (from `facebook/vit-mae-base`).

    from stellar_hf.encoder_init import load_encoder_weights

    model = StellarForPreTraining(config)  # or any Stellar model, or a StellarModel
    copied = load_encoder_weights(model, "facebook/vit-mae-base")

Sources:
- a transformers `ViTMAEModel` / `ViTModel`, or a model that holds one under a prefix (`vit.` in
  `ViTMAEForPreTraining` and `ViTForImageClassification`): a `save_pretrained` folder, a Hub id or a weights file,
  with transformers 4.x key names (`encoder.layer.N.attention.attention.query`) or 5.x names
  (`layers.N.attention.q_proj`);
- a timm `VisionTransformer` checkpoint (`blocks.N.attn.qkv`, split into query, key and value), e.g. a timm Hub
  folder or the original MAE release `mae_pretrain_vit_base.pth` (`{"model": ...}`);
- a state dict in any of these layouts.

Copied: the CLS token, the position embeddings (bicubically resized when the patch grid differs, as in section 1 of
the spec; MAE's fixed sin-cos table is copied like learned ones), the patch embedding, every layer and the final
LayerNorm. The sparse tokens and the factorization are STELLAR's own and keep their initialisation. Poolers,
classifier heads, mask tokens and MAE decoders are ignored. Files are read without executing pickled code.

Hub ids: with `HF_HUB_OFFLINE=1` nothing is requested from the network and the Hugging Face cache is used; online, a
Hub that cannot be reached falls back to the cache too. When neither works, [`HubDownloadError`] (a
`CheckpointError`) names the id and says what to do (see [`hub_download_advice`]).

Not imported by `stellar_hf/__init__.py`.
"""

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from .convert import CheckpointError, read_state_dict, rename_key
from .modeling_stellar import StellarModel

logger = logging.getLogger(__name__)

__all__ = [
    "HubDownloadError",
    "hub_download_advice",
    "hub_offline",
    "is_network_error",
    "load_encoder_weights",
    "read_backbone",
    "resize_position_embeddings",
    "timm_to_vit_names",
]

# timm `VisionTransformer` names -> transformers 5.x `ViTModel` names; from there `stellar_hf.convert`'s key table
# takes over. The fused `attn.qkv` is split separately.
TIMM_KEY_TABLE = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^norm\.", "layernorm."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.mlp.fc2."),
]
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")

# Parts of a backbone that a STELLAR encoder has no use for: poolers and classifier heads, mask tokens, and MAE
# decoders (timm's `decoder_*` and `mask_token`; transformers' `decoder.` lies outside the `vit.` prefix anyway).
IGNORED_PATTERNS = [
    r"^pooler\.",
    r"^embeddings\.mask_token$",
    r"^mask_token$",
    r"^decoder",
    r"^head\.",
    r"^fc_norm\.",
    r"^attn_pool\.",
    r"^classifier\.",
]

# Where each layout keeps its patch embedding; the text before it is the backbone's prefix in the file.
_PATCH_EMBEDDING_KEYS = {
    "transformers": "embeddings.patch_embeddings.projection.weight",
    "timm": "patch_embed.proj.weight",
}
# Encoder parameters that belong to STELLAR, not to the ViT it starts from.
_STELLAR_OWN = (r"^embeddings\.sparse_tokens$", r"^factorization\.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------------------------


def _weights_files(folder: Path) -> list[Path]:
    """The weights files of a `save_pretrained` or timm folder: sharded index, safetensors, then PyTorch pickles."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(
        path for path in folder.iterdir() if path.suffix in _WEIGHTS_SUFFIXES
    )
    if len(candidates) != 1:
        found = [path.name for path in candidates] or "none"
        raise CheckpointError(f"cannot tell which file in {folder} holds the backbone's weights (found: {found})")
    return candidates


def _read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    state_dict = {}
    for path in _weights_files(folder):
        state_dict.update(read_state_dict(path))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return state_dict, config


class HubDownloadError(CheckpointError):
    """A Hub id could not be downloaded (no network, offline mode, not cached, no such repository); the message names
    the id and says what to do."""


_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# Transport errors of the HTTP clients huggingface_hub has used (httpx2, httpx, requests, urllib3, and their cores):
# connection refused, name resolution, timeouts.
_NETWORK_ERROR_MODULES = ("httpx2", "httpx", "httpcore2", "httpcore", "requests", "urllib3")
_NETWORK_ERROR_NAMES = {
    "TransportError",
    "NetworkError",
    "ConnectError",
    "ConnectTimeout",
    "TimeoutException",
    "ConnectionError",
    "Timeout",
    "ReadTimeout",
    "ProxyError",
    "NewConnectionError",
    "MaxRetryError",
}


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on: `HF_HUB_OFFLINE` as set now, else as huggingface_hub read it."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE_VALUES
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_network_error(error: BaseException) -> bool:
    """Whether `error` says the Hub could not be reached (rather than that it answered no)."""
    if isinstance(error, (ConnectionError, TimeoutError)):  # huggingface_hub's OfflineModeIsEnabled included
        return True
    return any(
        cls.__name__ in _NETWORK_ERROR_NAMES and cls.__module__.split(".")[0] in _NETWORK_ERROR_MODULES
        for cls in type(error).__mro__
    )


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_download_advice(repo_id: str, offline: bool = False) -> str:
    """What to do when the Hub id `repo_id` cannot be downloaded here (`offline`: because HF_HUB_OFFLINE is set)."""
    fetch = (
        f"download it where there is network access with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) and copy that Hugging Face cache into {_hub_cache()} (HF_HUB_CACHE)"
    )
    if offline:
        return (
            f"To use it, {fetch}; or pass a local folder or weights file instead; or unset HF_HUB_OFFLINE to download it."
        )
    return (
        "Check the network connection (and any proxy or HF_ENDPOINT setting); or "
        f"{fetch} and set HF_HUB_OFFLINE=1 to read it from there without network access; or pass a local folder or "
        "weights file instead of the Hub id."
    )


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot of `repo_id` (no network request); raises huggingface_hub's LocalEntryNotFoundError."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))


def _download(repo_id: str, revision: str | None = None) -> Path:
    """
    Fetch a Hub repository's config and weights (safetensors when it has them) with `huggingface_hub`, or take them
    from the cache: always in offline mode, and online when the Hub cannot be reached.

    Raises:
        HubDownloadError: the repository cannot be downloaded nor found in the cache; the message says what to do.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = repo_id + (f" (revision {revision})" if revision else "")
    if hub_offline():
        try:
            return _cached_snapshot(repo_id, revision)
        except (OSError, ValueError) as error:
            raise HubDownloadError(
                f"cannot load the Hub id {what}: HF_HUB_OFFLINE is set, so nothing is downloaded, and it is not in the "
                f"Hugging Face cache {_hub_cache()} ({type(error).__name__}). "
                + hub_download_advice(repo_id, offline=True)
            ) from None
    try:
        files = set(HfApi().list_repo_files(repo_id, revision=revision))
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        # Gated first: it is a kind of RepositoryNotFoundError.
        if isinstance(error, GatedRepoError):
            reason = "it is a gated repository: accept its terms on the Hub and log in (`hf auth login`)"
        elif isinstance(error, RevisionNotFoundError):
            reason = f"it has no revision {revision!r}"
        else:
            reason = "no such repository on the Hub, or a private one (log in with `hf auth login`)"
        raise HubDownloadError(f"cannot download {what} from the Hugging Face Hub: {reason}") from error
    except Exception as error:
        if not is_network_error(error):
            raise
        try:
            cached = _cached_snapshot(repo_id, revision)
        except (OSError, ValueError):
            raise HubDownloadError(
                f"cannot download {what} from the Hugging Face Hub: the Hub could not be reached "
                f"({type(error).__name__}: {error}) and it is not in the Hugging Face cache. "
                f"{hub_download_advice(repo_id)}"
            ) from None
        logger.warning("the Hub could not be reached (%s); using the cached copy of %s at %s", error, what, cached)
        return cached
    for weights, shards in (("model.safetensors", "model-*.safetensors"), ("pytorch_model.bin", "pytorch_model-*.bin")):
        if weights in files:
            patterns = [weights]
            break
        if f"{weights}.index.json" in files:
            patterns = [f"{weights}.index.json", shards]
            break
    else:
        candidates = sorted(name for name in files if name.endswith(_WEIGHTS_SUFFIXES) and "/" not in name)
        if len(candidates) != 1:
            raise CheckpointError(f"cannot tell which file of {repo_id} holds the backbone's weights: {candidates}")
        patterns = candidates
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", *patterns]))
    except Exception as error:
        if not is_network_error(error):
            raise
        raise HubDownloadError(
            f"cannot download {what} from the Hugging Face Hub: the connection failed during the download "
            f"({type(error).__name__}: {error}). {hub_download_advice(repo_id)}"
        ) from None


def _read_hub_snapshot(repo_id: str, revision: str | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    folder = _download(repo_id, revision)
    try:
        return _read_folder(folder)
    except CheckpointError as error:
        if folder.is_dir() and not any(path.suffix in _WEIGHTS_SUFFIXES for path in folder.iterdir()):
            raise HubDownloadError(
                f"the copy of {repo_id} in the Hugging Face cache ({folder}) holds no weights file (only "
                f"{sorted(path.name for path in folder.iterdir()) or 'nothing'}). "
                + hub_download_advice(repo_id, offline=hub_offline())
            ) from error
        raise


def read_backbone(
    source: str | Path | Mapping[str, torch.Tensor], revision: str | None = None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """
    The state dict of a backbone and, for transformers folders, its `config.json` as a dict (else `None`).

    `source` is a state dict, a weights file, a folder, or a Hub id (downloaded with `huggingface_hub`, or read from
    its cache with `HF_HUB_OFFLINE=1` or when the Hub cannot be reached; `revision` picks a branch, tag or commit).

    Raises:
        HubDownloadError: a Hub id that can be neither downloaded nor found in the cache.
        CheckpointError: anything else that cannot be read.
    """
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return read_state_dict(path), None
    if isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(_WEIGHTS_SUFFIXES):
        return _read_hub_snapshot(source, revision)
    raise CheckpointError(f"{source} is neither a weights file, a folder, nor a Hub id")


# ----------------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------------


def _find_backbone(state_dict: Mapping[str, torch.Tensor], hidden_size: int, prefix: str | None) -> tuple[str, str]:
    """The backbone's prefix in `state_dict` and its layout, `"transformers"` or `"timm"`."""
    candidates = []
    for layout, key in _PATCH_EMBEDDING_KEYS.items():
        for name in state_dict:
            if name.endswith(key):
                found = name[: -len(key)]
                if found == "" or found.endswith("."):
                    candidates.append((found, layout))
    if prefix is not None:
        candidates = [candidate for candidate in candidates if candidate[0] == prefix]
        if not candidates:
            raise CheckpointError(f"no ViT patch embedding under the prefix {prefix!r}")
    if not candidates:
        raise CheckpointError(
            "no ViT patch embedding found (`embeddings.patch_embeddings.projection.weight` of transformers or "
            f"`patch_embed.proj.weight` of timm): not a ViT / MAE backbone. Its first keys are {list(state_dict)[:5]}"
        )
    if len(candidates) > 1:
        # E.g. a whole STELLAR checkpoint, whose encoder and decoder are both ViTs: keep the one of the right width.
        fitting = [c for c in candidates if state_dict[c[0] + _PATCH_EMBEDDING_KEYS[c[1]]].shape[0] == hidden_size]
        if len(fitting) != 1:
            raise CheckpointError(
                f"several ViTs in one state dict, under the prefixes {[c[0] for c in candidates]}; choose with prefix="
            )
        candidates = fitting
    return candidates[0]


def timm_to_vit_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Rename a timm `VisionTransformer` state dict (without prefix) to transformers 5.x `ViTModel` names, splitting
    each fused `attn.qkv` into `q_proj`, `k_proj` and `v_proj`. Names the table does not know are kept as they are.
    """
    renamed = {}
    for name, tensor in state_dict.items():
        qkv = _TIMM_QKV.match(name)
        if qkv:
            layer, kind = qkv.groups()
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                renamed[f"layers.{layer}.attention.{projection}.{kind}"] = part
            continue
        for pattern, target in TIMM_KEY_TABLE:
            if re.search(pattern, name):
                name = re.sub(pattern, target, name)
                break
        renamed[name] = tensor
    return renamed


def _stellar_name(vit_name: str) -> str | None:
    """Our `StellarModel` name for a transformers `ViTModel` name (4.x or 5.x), `None` for a pooler."""
    # The original STELLAR checkpoint holds its encoder as a `ViTModel` under `encoder.`: reuse that key table.
    target = rename_key(f"encoder.{vit_name}")
    if target is None:
        return None
    if not target.startswith("stellar."):
        raise CheckpointError(f"unknown ViT key {vit_name!r}")
    return target.removeprefix("stellar.")


def resize_position_embeddings(position_embeddings: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    Resize ViT position embeddings to another patch grid: `(1, 1 + n * n, d)` -> `(1, 1 + h * w, d)`.

    The CLS position is kept; the square `n x n` patch table is resized with bicubic interpolation
    (`align_corners=False`, in float32), as transformers' ViT interpolates at run time.
    """
    num_positions = position_embeddings.shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointError(
            f"{position_embeddings.shape[1]} position embeddings are not a CLS position plus a square grid "
            "(a backbone without a CLS position embedding is not supported)"
        )
    height, width = grid_size
    if (side, side) == (height, width):
        return position_embeddings
    dim = position_embeddings.shape[-1]
    patch_positions = position_embeddings[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(patch_positions, size=(height, width), mode="bicubic", align_corners=False)
    patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    return torch.cat((position_embeddings[:, :1].float(), patch_positions), dim=1).to(position_embeddings.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _check_config(source_config: dict | None, config, strict: bool) -> None:
    """Compare what a transformers `config.json` records, and the weights cannot show, with the STELLAR config."""
    if not source_config or "num_attention_heads" not in source_config:
        return
    problems = []
    for field in ("num_attention_heads", "hidden_act"):
        if field in source_config and source_config[field] != getattr(config, field):
            problems.append(f"{field}: backbone {source_config[field]!r}, model {getattr(config, field)!r}")
    if problems:
        message = "the backbone's config disagrees with the model's: " + "; ".join(problems)
        if strict:
            raise CheckpointError(message + ". Build the StellarConfig with the backbone's values.")
        logger.warning(message)
    eps = source_config.get("layer_norm_eps")
    if eps is not None and not math.isclose(eps, config.layer_norm_eps):
        logger.warning("the backbone's LayerNorm eps is %g, the model's %g", eps, config.layer_norm_eps)


def load_encoder_weights(
    model: torch.nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    strict: bool = True,
    prefix: str | None = None,
    revision: str | None = None,
) -> list[str]:
    """
    Copy a ViT / MAE backbone's weights into the STELLAR encoder of `model`.

    Args:
        model: a `StellarModel`, or any Stellar model holding one as `model.stellar`.
        source: a transformers `ViTMAEModel` / `ViTModel` folder, Hub id or weights file (4.x or 5.x names), a timm
            `VisionTransformer` checkpoint, or a state dict (see the module docstring).
        strict: when `True`, every encoder weight except the sparse tokens and the factorization must come from the
            backbone, no backbone weight may be left unused (poolers, heads, mask tokens and MAE decoders aside), and
            the head count and activation in a transformers `config.json` must equal the model's; otherwise what fits
            is copied and the rest is reported in the log.
        prefix: where the backbone sits in the state dict (e.g. `"vit."`); found automatically when `None`.
        revision: Hub revision, for Hub ids.

    Returns:
        The names, in `model.named_parameters()`, of the parameters set from the backbone (query, key and value
        biases set to zero included, for a backbone built without them).

    Raises:
        CheckpointError: unreadable source, not a ViT, a width, patch size or channel mismatch, or (strict) missing /
            unused weights, all named.
        HubDownloadError: (a `CheckpointError`) a Hub id that cannot be downloaded nor found in the cache.
    """
    encoder = model if isinstance(model, StellarModel) else getattr(model, "stellar", None)
    if not isinstance(encoder, StellarModel):
        raise TypeError(
            f"expected a StellarModel or a Stellar model with a `.stellar` encoder, got {type(model).__name__}"
        )
    name_prefix = "" if encoder is model else "stellar."
    config = encoder.config
    state_dict, source_config = read_backbone(source, revision)
    backbone_prefix, layout = _find_backbone(state_dict, config.hidden_size, prefix)
    backbone = {
        name[len(backbone_prefix) :]: tensor for name, tensor in state_dict.items() if name.startswith(backbone_prefix)
    }
    if layout == "timm":
        backbone = timm_to_vit_names(backbone)
    _check_config(source_config if backbone_prefix in ("", "vit.") else None, config, strict)

    mapped, unused, ignored = {}, [], []
    for name, tensor in backbone.items():
        if any(re.search(pattern, name) for pattern in IGNORED_PATTERNS):
            ignored.append(name)
            continue
        try:
            target = _stellar_name(name)
        except CheckpointError:
            unused.append(name)
            continue
        if target is None:
            ignored.append(name)
        else:
            mapped[target] = tensor
    if ignored:
        logger.info("ignored %d backbone keys (poolers, heads, mask tokens, decoders): %s", len(ignored), ignored)

    projection = mapped.get("embeddings.patch_embeddings.projection.weight")
    if projection is None:
        raise CheckpointError("the backbone has no patch embedding weight")
    expected_projection = encoder.embeddings.patch_embeddings.projection.weight
    if projection.shape[0] != config.hidden_size:
        raise CheckpointError(
            f"width mismatch: the backbone is {projection.shape[0]} wide, "
            f"the model's hidden_size is {config.hidden_size}"
        )
    if projection.shape != expected_projection.shape:
        raise CheckpointError(
            f"patch embedding mismatch: the backbone's is {tuple(projection.shape)} (channels, patch size), "
            f"the model's {tuple(expected_projection.shape)}"
        )

    own_state = encoder.state_dict()
    wanted = {name for name in own_state if not any(re.search(pattern, name) for pattern in _STELLAR_OWN)}
    if config.qkv_bias and not any(re.search(r"attention\.[qkv]_proj\.bias$", name) for name in mapped):
        # A backbone built without query/key/value biases equals one with zero biases.
        logger.info("the backbone has no query/key/value biases: setting the model's to zero")
        for name in wanted:
            if re.search(r"attention\.[qkv]_proj\.bias$", name):
                mapped[name] = torch.zeros_like(own_state[name])
    if "embeddings.position_embeddings" in mapped:
        grid = (config.image_size // config.patch_size, config.image_size // config.patch_size)
        original = mapped["embeddings.position_embeddings"]
        mapped["embeddings.position_embeddings"] = resize_position_embeddings(original, grid)
        if mapped["embeddings.position_embeddings"] is not original:
            logger.info("resized position embeddings from %d to %d patches", original.shape[1] - 1, grid[0] * grid[1])

    backbone_layers = {int(m.group(1)) for name in mapped if (m := re.match(r"encoder\.layers\.(\d+)\.", name))}
    depth_note = ""
    if backbone_layers and max(backbone_layers) + 1 != config.num_hidden_layers:
        depth_note = f" (the model has {config.num_hidden_layers} layers, the backbone {max(backbone_layers) + 1})"
    unused += sorted(f"{name} (as an encoder name)" for name in mapped if name not in wanted)
    mapped = {name: tensor for name, tensor in mapped.items() if name in wanted}
    missing = sorted(wanted - set(mapped))
    mismatched = [
        f"{name}: backbone {tuple(tensor.shape)} vs model {tuple(own_state[name].shape)}"
        for name, tensor in mapped.items()
        if tensor.shape != own_state[name].shape
    ]
    if mismatched:
        raise CheckpointError("the backbone does not fit the model; shape mismatches: " + "; ".join(mismatched))
    if strict and (missing or unused):
        problems = []
        if missing:
            problems.append(f"missing from the backbone: {missing}")
        if unused:
            problems.append(f"backbone weights the encoder has no place for: {unused}")
        raise CheckpointError(
            "the backbone does not match the encoder"
            + depth_note
            + "; "
            + "; ".join(problems)
            + ". Pass strict=False to copy what fits."
        )
    if missing:
        logger.warning("not in the backbone, left as initialised%s: %s", depth_note, missing)
    if unused:
        logger.warning("backbone weights not copied: %s", unused)

    with torch.no_grad():
        parameters = dict(encoder.named_parameters())
        buffers = dict(encoder.named_buffers())
        for name, tensor in mapped.items():
            target = parameters.get(name, buffers.get(name))
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    copied = [name_prefix + name for name in own_state if name in mapped]
    logger.info(
        "copied %d encoder tensors from %s", len(copied), source if not isinstance(source, Mapping) else "a state dict"
    )
    return copied
