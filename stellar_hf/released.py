"""The released STELLAR checkpoints, and any original checkpoint file, as transformers models in one call.

    from stellar_hf import list_released_models, load_released_model

    for released in list_released_models():
        print(released.name, released.backbone, released.num_parameters["feature-extraction"])
    model = load_released_model("stellar-b16")                                     # StellarModel
    model = load_released_model("stellar-b16", purpose="reconstruction", vq_tokenizer="maskgit-vqgan")
    model = load_released_model("run.ckpt", purpose="pretraining")                 # a local original file

A released name is downloaded with `huggingface_hub.hf_hub_download` (its cache, `revision`, `local_files_only`,
`HF_HUB_OFFLINE`, `token`); a local file is read where it is. Either is converted by `stellar_hf.convert` with all of
its checks (strict key table, settings never guessed, reload check) into a `save_pretrained` folder, written to a
cache of converted folders and published there with one atomic rename, so that the next call with the same file (by
content identity for Hub files) and the same converter loads that folder at once, and a crash mid-write never leaves
a folder that looks complete. The class asked for is then loaded from the folder with `from_pretrained`.

The converted folders live beside the Hub cache, not inside it (`hf cache scan` would report them as damaged
repositories): `converted_cache_dir=`, else `$STELLAR_HF_CACHE`, else `$HF_HOME/stellar_hf/converted`.

Not imported by `stellar_hf/__init__.py` until one of its names is used; `stellar_hf.convert` is imported only when
a file has to be converted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

from .checkpointing import fsync_path
from .configuration_stellar import StellarConfig
from .modeling_stellar import (
    StellarDecodingModel,
    StellarForImageReconstruction,
    StellarForPreTraining,
    StellarModel,
    StellarPreTrainedModel,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PURPOSES",
    "RELEASED_MODELS",
    "RELEASE_REPO_ID",
    "ReleasedModel",
    "converted_cache_root",
    "download_released_file",
    "list_released_models",
    "load_released_model",
    "released_model",
]

# Where the original authors publish the checkpoints (STELLAR_SPEC.md section 8): one Hub repository, one
# `.safetensors` file per model, named after it.
RELEASE_REPO_ID = "microsoft/STELLAR"

# What a caller may ask for, and the class each purpose loads. A folder converted from a file without a decoder
# serves only feature extraction; pretraining needs the clustering heads as well.
PURPOSES = {
    "feature-extraction": StellarModel,
    "reconstruction": StellarForImageReconstruction,
    "pretraining": StellarForPreTraining,
}
# Written last into a converted folder: what it was converted from and by which converter.
MARKER_NAME = "stellar_hf_conversion.json"
STAGING_SUFFIX = ".partial"
CACHE_ENV = "STELLAR_HF_CACHE"
# Version of the cache layout; part of every cache key.
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    """
    One released checkpoint: where it is on the Hub and the architecture it is published as.

    The architecture is what the original authors describe (STELLAR_SPEC.md section 8, the paper); the number in a
    name is the number of sparse tokens, not the patch size. The converter reads every size from the file itself, and
    `load_released_model` warns when the file differs from this description. `num_parameters` is counted on the meta
    device from the configuration this description gives with the original recipe's decoder and heads
    (`configs/stellar.yaml`: a 6-layer, 512-wide decoder with a VQ head over 1024 codes, 16384 prototypes of width
    256, a 2-layer predictor); `file_size` is `None` because the upstream sources we can read do not state it.
    """

    name: str
    backbone: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    num_sparse_tokens: int
    recipe: str
    image_size: int = 224
    repo_id: str = RELEASE_REPO_ID
    file_size: int | None = None

    @property
    def filename(self) -> str:
        """The file in `repo_id`."""
        return f"{self.name}.safetensors"

    @property
    def purposes(self) -> tuple[str, ...]:
        """
        What the published architecture serves: feature extraction and (through the MaskGIT VQGAN) reconstruction.
        `"pretraining"` also works when the file holds the clustering heads, which is checked when it is loaded.
        """
        return ("feature-extraction", "reconstruction")

    def config(self) -> StellarConfig:
        """The `StellarConfig` this description gives (encoder sizes, and the original recipe for the rest)."""
        return StellarConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
            num_sparse_tokens=self.num_sparse_tokens,
        )

    @property
    def num_parameters(self) -> dict[str, int]:
        """Parameters per purpose (`PURPOSES`), counted from `config()` on the meta device."""
        return dict(_count_parameters(self))


def _released(name, backbone, width, layers, heads, mlp, patch, tokens, recipe) -> ReleasedModel:
    return ReleasedModel(name, backbone, width, layers, heads, mlp, patch, tokens, recipe)


# The five published checkpoints (STELLAR_SPEC.md section 8; the MAE backbones' standard sizes; recipes as the
# original authors give them).
RELEASED_MODELS: dict[str, ReleasedModel] = {
    released.name: released
    for released in (
        _released("stellar-b16", "ViT-B/16", 768, 12, 12, 3072, 16, 16, "150 epochs, lr 1.5e-4"),
        _released("stellar-l16", "ViT-L/16", 1024, 24, 16, 4096, 16, 16, "100 epochs, lr 5e-5"),
        _released("stellar-h16", "ViT-H/14", 1280, 32, 16, 5120, 14, 16, "50 epochs, lr 5e-5"),
        _released("stellar-b8", "ViT-B/16", 768, 12, 12, 3072, 16, 8, "ablation on the number of tokens"),
        _released("stellar-b24", "ViT-B/16", 768, 12, 12, 3072, 16, 24, "ablation on the number of tokens"),
    )
}


@functools.cache
def _count_parameters(released: ReleasedModel) -> tuple[tuple[str, int], ...]:
    config, counts = released.config(), []
    with torch.device("meta"):
        for purpose, model_class in PURPOSES.items():
            model = model_class(config)
            counts.append((purpose, sum(parameter.numel() for parameter in model.parameters())))
    return tuple(counts)


def list_released_models() -> list[ReleasedModel]:
    """
    The released checkpoints, in the order the original authors list them: name, Hub repository and file, backbone
    and sizes, sparse tokens, recipe, purposes and parameter counts per purpose (see `ReleasedModel`).
    """
    return list(RELEASED_MODELS.values())


def _unknown_name_message(name: str) -> str:
    return (
        f"{name!r} is neither a released STELLAR model nor an existing file. Released models: "
        f"{', '.join(RELEASED_MODELS)} (in {RELEASE_REPO_ID}; `stellar_hf.list_released_models()` describes them). "
        "Or pass the path of an original checkpoint file (.safetensors, .ckpt, .bin, .pt)."
    )


def released_model(name: str) -> ReleasedModel:
    """The `ReleasedModel` called `name` (case-insensitive); `ValueError` listing the released names otherwise."""
    released = RELEASED_MODELS.get(str(name).strip().lower())
    if released is None:
        raise ValueError(_unknown_name_message(str(name)))
    return released


# ----------------------------------------------------------------------------------------------------------------------
# Where the original file comes from
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """An original checkpoint file on disk, what identifies its content, and the release it is (if any)."""

    path: Path
    identity: str
    release: ReleasedModel | None


def _offline(local_files_only: bool) -> str:
    return "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"


def download_released_file(
    name: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """
    The path of released model `name`'s original file in the Hub cache, downloaded by `hf_hub_download` unless it
    is there already (with `local_files_only=True` or `HF_HUB_OFFLINE=1` it must be).

    Raises:
        ValueError: `name` is not a released model (the message lists them).
        OSError: the file is not in the cache and downloads are off, or the Hub refused it; the message says what
            to do.
    """
    released = released_model(name)
    where = f"{released.repo_id}/{released.filename}" + (f" at revision {revision}" if revision else "")
    try:
        path = hf_hub_download(
            released.repo_id,
            released.filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        offline = local_files_only or hub_constants.HF_HUB_OFFLINE
        reason = f"downloads are off ({_offline(local_files_only)})" if offline else "the Hub could not be reached"
        raise OSError(
            f"cannot load {released.name}: {where} is not in the Hugging Face cache "
            f"({cache_dir or hub_constants.HF_HUB_CACHE}) and {reason}. Download it once with network access "
            f"(`load_released_model({released.name!r})`, or `hf download {released.repo_id} {released.filename}`), "
            "then this call works offline; or pass the path of the original file you have."
        ) from error
    except EntryNotFoundError as error:
        raise OSError(f"cannot load {released.name}: the Hub has no {where} ({error})") from error
    except OSError as error:  # RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HTTP errors
        raise OSError(f"cannot download {released.name} ({where}): {error}") from error
    return Path(path)


def _file_identity(path: Path) -> str:
    """
    What identifies a file's content without reading it: in the Hub cache, the blob it links to (its ETag, the
    sha256 of an LFS file); elsewhere its resolved path, size and modification time.
    """
    resolved = path.resolve()
    if path.is_symlink() and resolved.parent.name == "blobs":
        return f"blob:{resolved.name}:{resolved.stat().st_size}"
    stat = resolved.stat()
    return f"file:{resolved}:{stat.st_size}:{stat.st_mtime_ns}"


_PATH_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def _resolve_source(name_or_path, revision, cache_dir, local_files_only, token, force_download) -> _Source:
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to released names, not to the local file {path}")
        return _Source(path, _file_identity(path), None)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder, not an original checkpoint file: a converted stellar_hf folder loads with "
            "`from_pretrained`; an original checkpoint is one file (.safetensors, .ckpt, .bin, .pt)"
        )
    if text.strip().lower() in RELEASED_MODELS:
        released = released_model(text)
        file = download_released_file(released.name, revision, cache_dir, local_files_only, token, force_download)
        return _Source(file, _file_identity(file), released)
    if os.sep in text or "/" in text or text.endswith(_PATH_SUFFIXES):
        raise FileNotFoundError(f"no such file: {path}. " + _unknown_name_message(text).split(". ", 1)[1])
    raise ValueError(_unknown_name_message(text))


# ----------------------------------------------------------------------------------------------------------------------
# The cache of converted folders
# ----------------------------------------------------------------------------------------------------------------------


def converted_cache_root(converted_cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted folders are kept: the argument, else `$STELLAR_HF_CACHE`, else
    `$HF_HOME/stellar_hf/converted`."""
    if converted_cache_dir is not None:
        return Path(converted_cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(hub_constants.HF_HOME).expanduser() / "stellar_hf" / "converted"


@functools.cache
def converter_version() -> str:
    """The package version and a digest of the converter's source: a changed key table gives new cache keys."""
    from . import __version__

    source = Path(__file__).with_name("convert.py").read_bytes()
    return f"{__version__}+{hashlib.sha256(source).hexdigest()[:12]}"


def _cache_key(source: _Source, options: Mapping[str, object]) -> str:
    described = {
        "format": CACHE_FORMAT,
        "source": source.identity,
        "release": source.release.name if source.release else None,
        "converter": converter_version(),
        "options": {name: repr(value) for name, value in sorted(options.items())},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _folder_name(source: _Source, key: str) -> str:
    stem = source.release.name if source.release else re.sub(r"[^A-Za-z0-9._-]+", "_", source.path.stem)[:64]
    return f"{stem}--{key}"


def _read_marker(folder: Path, key: str) -> dict | None:
    """The folder's marker when it is a complete conversion with this key, else `None`."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None
    if not all((folder / name).is_file() for name in marker.get("files", [])):
        return None
    return marker


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned(root: Path, folder_name: str) -> None:
    """Remove staging folders of `folder_name` left by processes that died while converting."""
    for staging in root.glob(f".{folder_name}.*{STAGING_SUFFIX}"):
        try:
            pid = int(staging.name[: -len(STAGING_SUFFIX)].split(".")[-2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_alive(pid):
            logger.info("removing %s, left by an interrupted conversion", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _staging_path(final: Path) -> Path:
    """A hidden sibling of `final` that names this process, so that `_remove_abandoned` can tell when it died."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")


def _discard(folder: Path) -> None:
    """Remove `folder`, renaming it away first: a removal cut short never leaves a part under the folder's name."""
    if folder.exists():
        trash = _staging_path(folder)
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _convert_into_cache(source: _Source, root: Path, key: str, options: Mapping[str, object]) -> Path:
    """
    Convert `source` into `root/<name>--<key>`: into a hidden staging folder first, flushed, then renamed in one
    step, so that the folder exists complete or not at all. When another process publishes the same key first,
    its folder is used.
    """
    from . import convert

    final = root / _folder_name(source, key)
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, final.name)
    staging = _staging_path(final)
    try:
        model = convert.convert_checkpoint(
            source.path,
            staging,
            release=source.release.name if source.release else None,
            model_id=str(final),
            **options,
        )
        files = sorted(path.name for path in staging.iterdir() if path.is_file())
        marker = {
            "key": key,
            "source": str(source.path),
            "identity": source.identity,
            "release": source.release.name if source.release else None,
            "converter": converter_version(),
            "options": {name: repr(value) for name, value in options.items()},
            "model_class": type(model).__name__,
            "files": files,
        }
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        for name in [*files, MARKER_NAME]:
            fsync_path(staging / name)
        fsync_path(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if _read_marker(final, key) is not None:
                logger.info("another process converted %s first; using its folder", source.path)
                shutil.rmtree(staging, ignore_errors=True)
            else:  # a damaged folder under the final name (e.g. a half-done removal): replace it
                _discard(final)
                os.rename(staging, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _check_against_release(config: StellarConfig, released: ReleasedModel) -> None:
    expected = released.config()
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size", "image_size", "num_sparse_tokens")
    differences = [
        f"{name} {getattr(config, name)} (described: {getattr(expected, name)})"
        for name in fields
        if getattr(config, name) != getattr(expected, name)
    ]
    if differences:
        logger.warning(
            "%s's file differs from its description in list_released_models(): %s. The converted model follows the "
            "file.",
            released.name,
            ", ".join(differences),
        )


# ----------------------------------------------------------------------------------------------------------------------
# The one call
# ----------------------------------------------------------------------------------------------------------------------


def _model_class_for(purpose: str | None, model_class: type | None) -> type[StellarPreTrainedModel]:
    if model_class is not None:
        if purpose is not None:
            raise ValueError("pass purpose or model_class, not both")
        if not (isinstance(model_class, type) and issubclass(model_class, StellarPreTrainedModel)):
            raise ValueError(f"model_class must be a stellar_hf model class, got {model_class!r}")
        return model_class
    purpose = "feature-extraction" if purpose is None else purpose
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose one of {', '.join(PURPOSES)} (or pass model_class)")
    return PURPOSES[purpose]


def _check_folder_serves(model_class: type, converted_class: str, where: str) -> None:
    """A class whose weights the folder does not hold would start with random decoder or heads: refuse it."""
    needs_decoder = issubclass(model_class, StellarDecodingModel)
    needs_heads = issubclass(model_class, StellarForPreTraining)
    has_decoder = converted_class in ("StellarForImageReconstruction", "StellarForPreTraining")
    has_heads = converted_class == "StellarForPreTraining"
    if (needs_decoder and not has_decoder) or (needs_heads and not has_heads):
        missing = "clustering heads" if has_decoder else "reconstruction decoder"
        raise ValueError(
            f"{where} holds no {missing} (it converts to {converted_class}), so it cannot be loaded as "
            f"{model_class.__name__}; ask for a purpose it serves"
        )


def _vq_tokenizer(vq_tokenizer, root: Path):
    """A tokenizer argument as `set_vq_tokenizer` takes it; an original tokenizer file is converted (and cached)."""
    if isinstance(vq_tokenizer, (str, os.PathLike)) and Path(vq_tokenizer).expanduser().is_file():
        path = Path(vq_tokenizer).expanduser()
        from . import convert_vqgan

        key = hashlib.sha256(f"vqgan:{_file_identity(path)}:{converter_version()}".encode()).hexdigest()[:16]
        final = root / f"vqgan-{re.sub(r'[^A-Za-z0-9._-]+', '_', path.stem)[:64]}--{key}"
        if not (final / "config.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            staging = _staging_path(final)
            try:
                convert_vqgan.convert_vqgan_checkpoint(path, staging)
                for file in staging.iterdir():
                    fsync_path(file)
                try:
                    os.rename(staging, final)
                except OSError:
                    if not (final / "config.json").is_file():
                        raise
                    shutil.rmtree(staging, ignore_errors=True)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return str(final)
    return vq_tokenizer


def load_released_model(
    name_or_path: str | os.PathLike,
    purpose: str | None = None,
    *,
    model_class: type[StellarPreTrainedModel] | None = None,
    vq_tokenizer=None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    converted_cache_dir: str | os.PathLike | None = None,
    conversion_options: Mapping[str, object] | None = None,
    **from_pretrained_kwargs,
) -> StellarPreTrainedModel:
    """
    Load a released STELLAR model (`"stellar-b16"`, ... see `list_released_models()`) or an original checkpoint file,
    converted, as the class a purpose needs.

    Args:
        name_or_path: a released name (downloaded from `microsoft/STELLAR`), or the path of an original checkpoint
            file (a Lightning `.ckpt`, or a `.safetensors` / `.bin` / `.pt` state dict).
        purpose: `"feature-extraction"` (default: `StellarModel`), `"reconstruction"`
            (`StellarForImageReconstruction`) or `"pretraining"` (`StellarForPreTraining`, when the file holds the
            clustering heads).
        model_class: any stellar_hf model class instead of a purpose (e.g. `StellarForImageClassification`, whose new
            classifier starts untrained).
        vq_tokenizer: for the VQ target, the MaskGIT VQGAN to attach (`set_vq_tokenizer`): a `MaskGitVQGANModel`, a
            converted folder or Hub id, or the original tokenizer file (`maskgit-vqgan-imagenet-f16-256.bin`), which
            is converted and cached like the model.
        revision, cache_dir, local_files_only, token, force_download: passed to `huggingface_hub.hf_hub_download`
            for a released name (`HF_HUB_OFFLINE=1` works as `local_files_only=True`). `force_download` also
            converts again.
        converted_cache_dir: where converted folders are kept (default: `$STELLAR_HF_CACHE`, else
            `$HF_HOME/stellar_hf/converted`).
        conversion_options: settings the weights do not record, for a file that needs them (`num_attention_heads`,
            `decoder_num_attention_heads`, `spatial_temperature`, `layer_norm_eps`; see `stellar_hf.convert`).
            Released files need none.
        from_pretrained_kwargs: passed to `model_class.from_pretrained` (e.g. `dtype`, `device_map`,
            `attn_implementation`).

    Returns:
        the model, in eval mode. The converted folder is kept, so the next call with the same file converts nothing.

    Raises:
        ValueError: an unknown name (the message lists the released ones), a purpose the file cannot serve, or a
            `vq_tokenizer` for a model without the VQ target.
        OSError: the file is not cached and downloads are off (`local_files_only`, `HF_HUB_OFFLINE`), or the Hub
            refused it; `FileNotFoundError` for a missing local file.
        stellar_hf.convert.CheckpointError: the file is not a STELLAR checkpoint, or a setting must be given
            (`MissingSettingError` names it).
    """
    target_class = _model_class_for(purpose, model_class)
    options = dict(conversion_options or {})
    source = _resolve_source(name_or_path, revision, cache_dir, local_files_only, token, force_download)
    root = converted_cache_root(converted_cache_dir)
    key = _cache_key(source, options)
    folder = root / _folder_name(source, key)
    where = source.release.name if source.release else str(source.path)
    marker = None if force_download else _read_marker(folder, key)
    if marker is None:
        if force_download:
            _discard(folder)
        logger.info("converting %s into %s", where if source.release is None else f"{where} ({source.path})", folder)
        folder = _convert_into_cache(source, root, key, options)
        marker = _read_marker(folder, key)
    else:
        logger.info("loading %s converted earlier, from %s", where, folder)
    _check_folder_serves(target_class, marker["model_class"], where)
    model = target_class.from_pretrained(folder, **from_pretrained_kwargs).eval()
    if source.release is not None:
        _check_against_release(model.config, source.release)

    if vq_tokenizer is not None:
        if not isinstance(model, StellarDecodingModel) or model.config.reconstruction_target != "vq":
            raise ValueError(
                f"vq_tokenizer is for a model with the VQ reconstruction target; {where} loaded as "
                f"{type(model).__name__} (reconstruction target {model.config.reconstruction_target!r}) has no use "
                "for it"
            )
        model.set_vq_tokenizer(_vq_tokenizer(vq_tokenizer, root))
    elif isinstance(model, StellarDecodingModel) and model.config.reconstruction_target == "vq":
        logger.warning(
            "%s predicts MaskGIT VQGAN codes: pass vq_tokenizer= (the converted tokenizer folder, or "
            "maskgit-vqgan-imagenet-f16-256.bin) to get pixels from reconstruct() and forward()",
            where,
        )
    return model
