"""Convert the MaskGIT VQGAN tokenizer checkpoint of the TiTok project to a `MaskGitVQGANModel` folder.

The released file is `maskgit-vqgan-imagenet-f16-256.bin`, a `torch.save`d state dict whose key names our model
uses unchanged, so conversion is a strict load plus checks:

    python -m stellar_hf.convert_vqgan --checkpoint maskgit-vqgan-imagenet-f16-256.bin --output_dir maskgit-vqgan

The checkpoint is read with `torch.load(weights_only=True)` (or as `.safetensors`); a prefix in front of the
tokenizer's keys (`module.`, `tokenizer.`, `model.tokenizer.` of a whole STELLAR checkpoint, ...) is removed and
keys outside it are dropped. The output folder holds `config.json`, `model.safetensors` and the two model files, so
it also loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
"""

import argparse
import contextlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from transformers.utils import logging

from .configuration_maskgit_vqgan import MaskGitVQGANConfig
from .convert import read_state_dict
from .modeling_maskgit_vqgan import MaskGitVQGANModel

logger = logging.get_logger(__name__)

RELEASED_CHECKPOINT_NAME = "maskgit-vqgan-imagenet-f16-256.bin"
# The codebook is the one key every tokenizer checkpoint has; where it sits tells us the prefix to strip.
CODEBOOK_KEY = "quantize.embedding.weight"
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict = read_state_dict(path)
    return _strip_prefix(state_dict, path)


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


def _config_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Best-effort command-line flags that match the checkpoint's shapes, for error messages."""
    try:
        hidden_channels = state_dict["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down.")})
        widths = [state_dict[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] for level in levels]
        channel_mult = [width // hidden_channels for width in widths]
        num_res_blocks = len({key.split(".")[4] for key in state_dict if key.startswith("encoder.down.0.block.")})
        z_channels = state_dict["encoder.conv_out.weight"].shape[0]
        codebook_size = state_dict[CODEBOOK_KEY].shape[0]
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return ""
    return (
        f" The checkpoint's shapes suggest --hidden_channels {hidden_channels} --channel_mult "
        f"{','.join(map(str, channel_mult))} --num_res_blocks {num_res_blocks} --z_channels {z_channels} "
        f"--codebook_size {codebook_size}."
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
            "the checkpoint does not fit a MaskGitVQGANModel with this config." + _config_hint(state_dict) + " "
            + "; ".join(problems)
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
    checkpoint_path: str | Path, output_dir: str | Path, **config_overrides
) -> MaskGitVQGANModel:
    """
    Convert an original MaskGIT VQGAN checkpoint to a `save_pretrained` folder and verify the result.

    Args:
        checkpoint_path (`str` or `Path`): the original checkpoint (see `load_original_vqgan_state_dict`).
        output_dir (`str` or `Path`): folder to write; created if needed.
        **config_overrides: `MaskGitVQGANConfig` arguments for checkpoints other than the released one, e.g.
            `hidden_channels=32, channel_mult=[1, 2]`. `codebook_dim` follows `z_channels` unless given.

    Returns:
        `MaskGitVQGANModel`: the converted model, in eval mode.

    Raises:
        FileNotFoundError, ValueError: an unreadable checkpoint, or one that does not fit the config (every missing,
            unexpected or mis-shaped key is named).
        RuntimeError: the saved folder does not reload to the same weights and outputs.
    """
    state_dict = load_original_vqgan_state_dict(checkpoint_path)
    if "z_channels" in config_overrides:
        config_overrides.setdefault("codebook_dim", config_overrides["z_channels"])
    config = MaskGitVQGANConfig(**config_overrides)
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
            raise RuntimeError(f"conversion check failed: `{key}` differs after reloading {output_dir}")
    difference = _max_output_difference(model, reloaded)
    if difference > 1e-6:
        raise RuntimeError(f"conversion check failed: reloaded outputs differ by up to {difference:.3g}")
    logger.info(f"Converted {checkpoint_path} to {output_dir}; reloaded outputs differ by at most {difference:.3g}")
    return model


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    released = MaskGitVQGANConfig()
    parser = argparse.ArgumentParser(
        prog="python -m stellar_hf.convert_vqgan",
        description="Convert the MaskGIT VQGAN tokenizer checkpoint (TiTok project) to a transformers folder.",
    )
    parser.add_argument("--checkpoint", required=True, help=f"original checkpoint, e.g. {RELEASED_CHECKPOINT_NAME}")
    parser.add_argument("--output_dir", required=True, help="folder to write the converted model to")
    parser.add_argument("--hidden_channels", type=int, default=released.hidden_channels, help="base width")
    parser.add_argument(
        "--channel_mult",
        type=_int_list,
        default=released.channel_mult,
        help=f"comma-separated width multiplier per level (default: {','.join(map(str, released.channel_mult))})",
    )
    parser.add_argument(
        "--num_res_blocks", type=int, default=released.num_res_blocks, help="residual blocks per level"
    )
    parser.add_argument("--z_channels", type=int, default=released.z_channels, help="latent and codebook width")
    parser.add_argument("--codebook_size", type=int, default=released.codebook_size, help="codebook entries")
    parser.add_argument("--image_size", type=int, default=released.image_size, help="training resolution")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = convert_vqgan_checkpoint(
            args.checkpoint,
            args.output_dir,
            hidden_channels=args.hidden_channels,
            channel_mult=args.channel_mult,
            num_res_blocks=args.num_res_blocks,
            z_channels=args.z_channels,
            codebook_size=args.codebook_size,
            image_size=args.image_size,
        )
    except (FileNotFoundError, ValueError) as err:  # an unreadable or foreign file, as for stellar_hf.convert
        print(f"convert_vqgan: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the reloaded model does not reproduce the checkpoint
        print(f"convert_vqgan: error: {err}", file=sys.stderr)
        return 1
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"Converted {args.checkpoint} ({num_parameters / 1e6:.1f}M parameters, codebook "
        f"{model.config.codebook_size} x {model.config.codebook_dim}) to {args.output_dir}; "
        "the reloaded model matches the checkpoint's weights and outputs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
