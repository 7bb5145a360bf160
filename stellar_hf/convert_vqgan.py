"""Convert the MaskGIT VQGAN tokenizer checkpoint of the TiTok project to a `MaskGitVQGANModel` folder.

The released file is `maskgit-vqgan-imagenet-f16-256.bin`, a `torch.save`d state dict whose key names our model
uses unchanged, so conversion is a strict load plus checks:

    python -m stellar_hf.convert_vqgan --checkpoint maskgit-vqgan-imagenet-f16-256.bin --output_dir maskgit-vqgan

Every size is read from the tensors (`infer_vqgan_sizes`): input channels, base width, channel multipliers (and so
the number of levels and the downsampling factor), residual blocks per level, latent width, codebook size and width.
The one setting the tensors do not tell is the resolution the tokenizer was trained at (`image_size`): it comes from
`--image_size`, else the TiTok tokenizer config in the checkpoint's hyper-parameters (`resolution`), else the
released tokenizer's 256 when the tensors have exactly the released architecture; otherwise the conversion stops
naming `--image_size`. GroupNorm groups (32) and epsilon (1e-6) are fixed by the original code.

The checkpoint is read with `torch.load(weights_only=True)` (or as `.safetensors`); a prefix in front of the
tokenizer's keys (`module.`, `tokenizer.`, `model.tokenizer.` of a whole STELLAR checkpoint, ...) is removed and
keys outside it are dropped. The output folder holds `config.json`, `model.safetensors` and the two model files, so
it also loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`. Exit codes: 0 converted, 1 conversion
error (the message says why), 2 usage error (argparse).
"""

import argparse
import contextlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from transformers.utils import logging

from .configuration_maskgit_vqgan import MaskGitVQGANConfig
from .convert import MissingSettingError, find_hyper_parameter, positive_int_argument, read_checkpoint
from .modeling_maskgit_vqgan import MaskGitVQGANModel

logger = logging.get_logger(__name__)

RELEASED_CHECKPOINT_NAME = "maskgit-vqgan-imagenet-f16-256.bin"
# The codebook is the one key every tokenizer checkpoint has; where it sits tells us the prefix to strip.
CODEBOOK_KEY = "quantize.embedding.weight"
# The sizes the tensors determine, as `MaskGitVQGANConfig` arguments (`infer_vqgan_sizes` returns these keys).
SIZE_FIELDS = (
    "num_channels", "hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim"
)  # fmt: skip
# The released `maskgit-vqgan-imagenet-f16-256.bin`: its sizes (the config's defaults) and the resolution it was
# trained at, taken for a checkpoint of exactly this architecture when nothing else gives one.
RELEASED_SIZES = {name: getattr(MaskGitVQGANConfig(), name) for name in SIZE_FIELDS}
RELEASED_IMAGE_SIZE = 256


def _strip_prefix(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keep the tokenizer's keys, without whatever prefix precedes its codebook key."""
    codebook_keys = [key for key in state_dict if key == CODEBOOK_KEY or key.endswith("." + CODEBOOK_KEY)]
    if not codebook_keys:
        raise ValueError(
            f"{path} does not look like a MaskGIT VQGAN tokenizer: it has no `{CODEBOOK_KEY}` (the codebook). "
            f"Its first keys are {list(state_dict)[:5]}"
        )
    if len(codebook_keys) > 1:
        raise ValueError(f"{path} holds several tokenizer codebooks ({codebook_keys}); extract one state dict first")
    prefix = codebook_keys[0][: -len(CODEBOOK_KEY)]
    if not prefix:
        return state_dict
    kept = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if len(kept) < len(state_dict):
        logger.warning(f"Dropped {len(state_dict) - len(kept)} keys of {path} outside the tokenizer prefix `{prefix}`")
    return kept


def load_original_vqgan_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read a MaskGIT VQGAN tokenizer checkpoint (`torch.save`d state dict, training checkpoint, or `.safetensors`).

    Args:
        path (`str` or `Path`): the checkpoint file, e.g. `maskgit-vqgan-imagenet-f16-256.bin`.

    Returns:
        `dict[str, torch.Tensor]`: the tokenizer's tensors under the original key names (`encoder.*`, `decoder.*`,
        `quantize.embedding.weight`), any prefix removed.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: the file cannot be deserialized (corrupt, truncated, not a checkpoint), is not a state dict, or has
            no tokenizer codebook.
    """
    return _load_original_vqgan(path)[0]


def _load_original_vqgan(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """`load_original_vqgan_state_dict`, and the file's hyper-parameters (`stellar_hf.convert.read_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict, hyper_parameters = read_checkpoint(path)
    return _strip_prefix(state_dict, path), hyper_parameters


def config_kwargs_from_original(
    tokenizer_config: Mapping, codebook_size: int = 1024, codebook_dim: int | None = None
) -> dict:
    """
    Map the original tokenizer's constructor config to `MaskGitVQGANConfig` keyword arguments.

    Args:
        tokenizer_config (`Mapping`): the original's config (`channel_mult`, `num_resolutions`, `dropout`,
            `hidden_channels`, `num_channels`, `num_res_blocks`, `resolution`, `z_channels`), as in the TiTok code.
        codebook_size (`int`, defaults to 1024): entries of the quantizer (passed separately in the original).
        codebook_dim (`int`, *optional*): width of an entry; defaults to `z_channels`.

    Returns:
        `dict` of `MaskGitVQGANConfig` arguments.
    """
    channel_mult = list(tokenizer_config["channel_mult"])
    num_resolutions = tokenizer_config.get("num_resolutions", len(channel_mult))
    if num_resolutions != len(channel_mult):
        raise ValueError(
            f"num_resolutions ({num_resolutions}) must equal len(channel_mult) ({len(channel_mult)}) in the original "
            "config: our model derives the number of levels from channel_mult"
        )
    kwargs = {
        "channel_mult": channel_mult,
        "codebook_size": codebook_size,
        "codebook_dim": codebook_dim if codebook_dim is not None else tokenizer_config["z_channels"],
    }
    renamed = {"resolution": "image_size"}
    for key in ("dropout", "hidden_channels", "num_channels", "num_res_blocks", "resolution", "z_channels"):
        if key in tokenizer_config:
            kwargs[renamed.get(key, key)] = tokenizer_config[key]
    return kwargs


def _indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The integers `i` of keys `{prefix}{i}.…`, sorted."""
    return sorted({int(key[len(prefix) :].split(".", 1)[0]) for key in state_dict
                   if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0].isdigit()})  # fmt: skip


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"cannot read the tokenizer's sizes: the checkpoint has no `{key}`")
    tensor = state_dict[key]
    if tensor.ndim != ndim:
        raise ValueError(f"`{key}` has shape {tuple(tensor.shape)}; a MaskGIT VQGAN has a {ndim}-D tensor there")
    return tensor


def infer_vqgan_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """
    Every size of a MaskGIT VQGAN that its tensors determine, as `MaskGitVQGANConfig` arguments.

    - `num_channels`, `hidden_channels`: `encoder.conv_in.weight` (hidden_channels, num_channels, 3, 3);
    - `channel_mult`: the output width of each encoder level's first block (`encoder.down.{i}.block.0.conv1.weight`)
      over `hidden_channels`; its length is the number of levels, so the downsampling factor is
      2 ** (len(channel_mult) - 1);
    - `num_res_blocks`: the blocks of each level (`encoder.down.{i}.block.{j}`), the same at every level;
    - `z_channels`: `encoder.conv_out.weight` (z_channels, C, 1, 1);
    - `codebook_size`, `codebook_dim`: `quantize.embedding.weight`.

    The rest of the tensors is checked against the model these sizes build, key by key, when converting.

    Raises:
        ValueError: a tensor these sizes are read from is missing or has another layout (the key is named), or the
            levels are inconsistent.
    """
    conv_in = _tensor(state_dict, "encoder.conv_in.weight", 4)
    hidden_channels, num_channels = conv_in.shape[:2]
    levels = _indices(state_dict, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"cannot read the tokenizer's levels: encoder.down.* are numbered {levels}, not 0..n-1")
    channel_mult, block_counts = [], []
    for level in levels:
        width = _tensor(state_dict, f"encoder.down.{level}.block.0.conv1.weight", 4).shape[0]
        if width % hidden_channels:
            raise ValueError(
                f"encoder level {level} is {width} wide, not a multiple of the base width {hidden_channels} "
                "(encoder.conv_in.weight): not a MaskGIT VQGAN layout"
            )
        channel_mult.append(width // hidden_channels)
        blocks = _indices(state_dict, f"encoder.down.{level}.block.")
        if blocks != list(range(len(blocks))):
            raise ValueError(f"encoder level {level}'s residual blocks are numbered {blocks}, not 0..n-1")
        block_counts.append(len(blocks))
    if len(set(block_counts)) != 1:
        raise ValueError(
            f"the encoder levels have different numbers of residual blocks {block_counts}; the MaskGIT VQGAN has "
            "num_res_blocks at every level"
        )
    codebook = _tensor(state_dict, CODEBOOK_KEY, 2)
    return {
        "num_channels": int(num_channels),
        "hidden_channels": int(hidden_channels),
        "channel_mult": channel_mult,
        "num_res_blocks": block_counts[0],
        "z_channels": int(_tensor(state_dict, "encoder.conv_out.weight", 4).shape[0]),
        "codebook_size": int(codebook.shape[0]),
        "codebook_dim": int(codebook.shape[1]),
    }


def _tokenizer_config_in_hyper_parameters(hyper_parameters: object) -> tuple[str, dict]:
    """
    The TiTok tokenizer config inside a checkpoint's hyper-parameters: the entries beside its `z_channels` (so that
    an unrelated `resolution` elsewhere, e.g. a data setting, is never taken for the tokenizer's). ("", {}) if none.
    """
    found = find_hyper_parameter(hyper_parameters, "z_channels")
    if found is None:
        return "", {}
    parent = found[0].rpartition(".")[0]
    entries = {"z_channels": found[1]}
    for name in ("resolution", "hidden_channels", "num_res_blocks", "channel_mult", "num_channels"):
        other = find_hyper_parameter(hyper_parameters, name)
        if other is not None and other[0].rpartition(".")[0] == parent:
            entries[name] = other[1]
    return parent, entries


def resolve_image_size(
    sizes: Mapping, image_size: int | None = None, hyper_parameters: object = None
) -> tuple[int, str]:
    """
    The resolution the tokenizer was trained at, which its tensors do not record, and where it came from: the
    argument (`--image_size`); the `resolution` of the TiTok tokenizer config in the hyper-parameters; 256 when the
    tensors have exactly the released tokenizer's architecture (`RELEASED_SIZES`). Otherwise `MissingSettingError`
    naming `--image_size`. The hyper-parameters' sizes must agree with the tensors.
    """
    where, entries = _tokenizer_config_in_hyper_parameters(hyper_parameters)
    for name, value in entries.items():
        if name == "resolution":
            continue
        expected = sizes[name]
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise ValueError(
                f"the checkpoint's hyper-parameters say {where}.{name}={value!r} but its tensors give {expected!r}"
            )
    if image_size is not None:
        return image_size, "--image_size"
    if entries.get("resolution") is not None:
        resolution = entries["resolution"]
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise ValueError(f"the checkpoint's hyper-parameter {where}.resolution={resolution!r} is not an integer")
        return resolution, f"hyper-parameter {where}.resolution"
    if dict(sizes) == RELEASED_SIZES:
        return RELEASED_IMAGE_SIZE, f"the released tokenizer's resolution ({RELEASED_CHECKPOINT_NAME})"
    factor = 2 ** (len(sizes["channel_mult"]) - 1)
    raise MissingSettingError(
        "cannot convert without --image_size: the tensors do not record the resolution the tokenizer was trained at, "
        "the checkpoint's hyper-parameters hold no tokenizer config with a `resolution`, and the architecture is not "
        f"the released tokenizer's (which was trained at {RELEASED_IMAGE_SIZE} px). Pass --image_size (in Python: "
        f"image_size=), a multiple of its downsampling factor {factor} (read from its {len(sizes['channel_mult'])} "
        "levels)",
        ["--image_size"],
    )


def _first_names(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def _check_against_model(model: MaskGitVQGANModel, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming every missing, unexpected, mis-shaped or non-finite tensor of `state_dict`."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = [
        f"{len(names)} {kind} keys: {_first_names(names)}"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if names
    ]
    if problems:
        raise ValueError(
            "the checkpoint does not fit the MaskGitVQGANModel its sizes describe: " + "; ".join(problems)
        )
    not_float = [key for key, tensor in state_dict.items() if not tensor.is_floating_point()]
    if not_float:
        raise ValueError(f"the checkpoint has non floating point tensors: {not_float}")
    not_finite = [key for key, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
    if not_finite:
        raise ValueError(f"the checkpoint has NaN or infinite values in {not_finite}")


@contextlib.contextmanager
def _registered_for_auto_classes() -> Iterator[None]:
    """Register the config and model for the Auto classes while saving, so the folder carries its own code."""
    previous = (MaskGitVQGANConfig._auto_class, MaskGitVQGANModel._auto_class)
    MaskGitVQGANConfig.register_for_auto_class()
    MaskGitVQGANModel.register_for_auto_class("AutoModel")
    try:
        yield
    finally:
        MaskGitVQGANConfig._auto_class, MaskGitVQGANModel._auto_class = previous


def _max_output_difference(model: MaskGitVQGANModel, reloaded: MaskGitVQGANModel) -> float:
    """Run both models on one random, deliberately non-square batch; raise if the codes differ."""
    config = model.config
    factor = config.downsample_factor
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.rand(2, config.num_channels, 2 * factor, 3 * factor, generator=generator)
    with torch.no_grad():
        expected = model(pixel_values)
        actual = reloaded(pixel_values)
    if not torch.equal(expected.codes, actual.codes):
        raise RuntimeError("conversion check failed: the reloaded model gives different codes")
    return max(
        (expected.latents - actual.latents).abs().max().item(),
        (expected.reconstruction - actual.reconstruction).abs().max().item(),
    )


def convert_vqgan_checkpoint(
    checkpoint_path: str | Path, output_dir: str | Path, image_size: int | None = None, **config_overrides
) -> MaskGitVQGANModel:
    """
    Convert an original MaskGIT VQGAN checkpoint to a `save_pretrained` folder and verify the result.

    Args:
        checkpoint_path (`str` or `Path`): the original checkpoint (see `load_original_vqgan_state_dict`).
        output_dir (`str` or `Path`): folder to write; created if needed.
        image_size (`int`, *optional*): the resolution the tokenizer was trained at. Required unless the checkpoint's
            hyper-parameters hold the TiTok tokenizer config or the tensors have the released architecture (then
            256); see `resolve_image_size`.
        **config_overrides: other `MaskGitVQGANConfig` arguments. Sizes are read from the tensors
            (`infer_vqgan_sizes`); one given here must equal the tensors' (a check, never an override). The settings
            the tensors do not hold (`dropout`, `norm_num_groups`, `norm_eps`, `initializer_range`) keep the original
            code's values unless given.

    Returns:
        `MaskGitVQGANModel`: the converted model, in eval mode.

    Raises:
        FileNotFoundError, ValueError: an unreadable checkpoint, one whose tensors do not form a MaskGIT VQGAN (every
            missing, unexpected or mis-shaped key is named), a size argument that contradicts the tensors, or an
            unknown `image_size` (`MissingSettingError`, a `ValueError`, naming `--image_size`).
        RuntimeError: the saved folder does not reload to the same weights and outputs.
    """
    state_dict, hyper_parameters = _load_original_vqgan(checkpoint_path)
    sizes = infer_vqgan_sizes(state_dict)
    contradicted = [
        f"{name}={config_overrides[name]!r} (the tensors give {sizes[name]!r})"
        for name in SIZE_FIELDS
        if name in config_overrides
        and (list(config_overrides[name]) if name == "channel_mult" else config_overrides[name]) != sizes[name]
    ]
    if contradicted:
        raise ValueError(f"sizes given for {checkpoint_path} contradict its tensors: {', '.join(contradicted)}")
    config_overrides = {name: value for name, value in config_overrides.items() if name not in SIZE_FIELDS}
    image_size, image_size_source = resolve_image_size(sizes, image_size, hyper_parameters)
    config = MaskGitVQGANConfig(**sizes, image_size=image_size, **config_overrides)
    model = MaskGitVQGANModel(config)
    _check_against_model(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _registered_for_auto_classes():
        model.save_pretrained(output_dir)

    # Compare values, not just loading without complaint: a key that fails to load would stay randomly initialised.
    reloaded = MaskGitVQGANModel.from_pretrained(output_dir).eval()
    for key, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, state_dict[key].to(tensor.dtype)):
            raise RuntimeError(f"reload check failed: `{key}` of {output_dir} differs from the checkpoint's")
    difference = _max_output_difference(model, reloaded)
    if difference > 1e-6:
        raise RuntimeError(
            f"reload check failed: the folder's outputs differ from the converted model's by up to {difference:.3g}"
        )
    logger.info(
        f"Converted {checkpoint_path} to {output_dir}: sizes read from the tensors ({_describe_sizes(sizes)}), "
        f"image_size {image_size} ({image_size_source}). Reload check: the folder's weights equal the checkpoint's "
        f"and its outputs differ from the converted model's by at most {difference:.3g}"
    )
    return model


def _describe_sizes(sizes: Mapping) -> str:
    return (
        f"hidden_channels {sizes['hidden_channels']}, channel_mult {','.join(map(str, sizes['channel_mult']))} "
        f"(downsampling x{2 ** (len(sizes['channel_mult']) - 1)}), num_res_blocks {sizes['num_res_blocks']}, "
        f"z_channels {sizes['z_channels']}, codebook {sizes['codebook_size']} x {sizes['codebook_dim']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stellar_hf.convert_vqgan",
        description="Convert the MaskGIT VQGAN tokenizer checkpoint (TiTok project) to a transformers folder. Every "
        "size is read from the tensors. Exit codes: 0 converted, 1 conversion error, 2 usage error.",
    )
    parser.add_argument("--checkpoint", required=True, help=f"original checkpoint, e.g. {RELEASED_CHECKPOINT_NAME}")
    parser.add_argument("--output_dir", required=True, help="folder to write the converted model to")
    parser.add_argument(
        "--image_size",
        type=positive_int_argument,
        default=None,
        help="resolution the tokenizer was trained at, which the tensors do not record. Without it: the tokenizer "
        f"config in the checkpoint's hyper-parameters, else {RELEASED_IMAGE_SIZE} for the released architecture; "
        "any other tokenizer needs this option",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when converted, 1 for a conversion error (message on stderr); argparse exits 2 on bad usage."""
    args = parse_args(argv)
    try:
        model = convert_vqgan_checkpoint(args.checkpoint, args.output_dir, image_size=args.image_size)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # unreadable, foreign, unknown size, failed reload
        print(f"convert_vqgan: error: {err}", file=sys.stderr)
        return 1
    config = model.config
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"Converted {args.checkpoint} ({num_parameters / 1e6:.1f}M parameters; "
        f"{_describe_sizes({name: getattr(config, name) for name in SIZE_FIELDS})}; image_size {config.image_size}, "
        f"a {config.image_size // config.downsample_factor} x {config.image_size // config.downsample_factor} code "
        f"grid) to {args.output_dir}; the saved folder reloads to the checkpoint's weights and to the converted "
        "model's outputs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
