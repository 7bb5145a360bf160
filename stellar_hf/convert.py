"""Convert original STELLAR checkpoints to stellar_hf folders.

    python -m stellar_hf.convert --checkpoint stellar-b16.safetensors --output_dir stellar-b16-hf

Reads a PyTorch Lightning `.ckpt` (`{"state_dict": {"model.<name>": tensor}}`) or a `.safetensors` / `.bin` / `.pt`
state dict with or without the `model.` prefix, never executing pickled code. Every size is inferred from tensor
shapes; the only free choices are the head counts and the spatial temperature. Names are mapped with one key table,
loaded strictly, saved with `save_pretrained`, reloaded, and the reloaded outputs compared with the converted model.
Not imported by `stellar_hf/__init__.py`.
"""

import argparse
import logging
import math
import re
import sys
import zipfile
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

logger = logging.getLogger(__name__)

# Keys the original saves but never uses in its forward pass, and the EMA teacher copies (re-made from the student
# when a run enables the teacher).
DROPPED_KEY_PATTERNS = [
    r"^encoder\.pooler\.",
    r"^decoder\.embeddings\.",
    r"^decoder\.pooler\.",
    r"^teacher_",
]

# Transformer block names inside a transformers `ViTModel`: 4.x names first, 5.x names second.
_BLOCK_TABLE = [
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
    (r"^clustering_head\.predictor\.layers\.(weight|bias)$", r"sparse_clustering_head.predictor.0.\1"),
    (r"^clustering_head\.predictor\.layers\.(\d+)\.", r"sparse_clustering_head.predictor.\1."),
    (r"^cls_cluster_head\.layer\.weight$", "cls_clustering_head.prototypes.weight"),
    (r"^cls_cluster_head\.predictor\.layers\.(weight|bias)$", r"cls_clustering_head.predictor.0.\1"),
    (r"^cls_cluster_head\.predictor\.layers\.(\d+)\.", r"cls_clustering_head.predictor.\1."),
]
# Encoder and decoder blocks: `encoder.encoder.layer.{i}.` (4.x) or `encoder.layers.{i}.` (5.x).
_LAYER_PREFIXES = [
    (r"^encoder\.(?:encoder\.layer|layers)\.(\d+)\.", "stellar.encoder.layers.{}."),
    (r"^decoder\.(?:encoder\.layer|layers)\.(\d+)\.", "decoder.transformer.layers.{}."),
]


class CheckpointError(ValueError):
    """The file is not a STELLAR checkpoint we can read; the message says why."""


def rename_key(name: str) -> str | None:
    """Our parameter name for an original one, or `None` for a key we drop. Unknown keys raise `CheckpointError`."""
    if any(re.search(pattern, name) for pattern in DROPPED_KEY_PATTERNS):
        return None
    for prefix_pattern, target in _LAYER_PREFIXES:
        match = re.match(prefix_pattern, name)
        if match:
            rest = name[match.end() :]
            for block_pattern, block_target in _BLOCK_TABLE:
                if re.match(block_pattern, rest):
                    return target.format(match.group(1)) + block_target + rest[re.match(block_pattern, rest).end() :]
            raise CheckpointError(f"unknown transformer block key {name!r}")
    for pattern, target in KEY_TABLE:
        if re.search(pattern, name):
            return re.sub(pattern, target, name)
    raise CheckpointError(f"unknown key {name!r}: not part of a STELLAR checkpoint")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read an original checkpoint without executing pickled code.

    Accepts a Lightning `.ckpt` (`{"state_dict": ...}`), a plain `torch.save`d state dict, or `.safetensors`; strips
    the `model.` prefix. Raises `CheckpointError` for missing, corrupt, truncated or foreign files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
        except Exception as error:  # safetensors raises several error types for damaged headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is corrupt or truncated ({error})") from error
        except Exception as error:  # the unpickler refusing a non-tensor object
            raise CheckpointError(f"{path} holds objects other than tensors; refusing to unpickle it ({error})") from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path} does not hold a state dict")
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise CheckpointError(f"{path} holds non-tensor entries; it is not a model state dict")
    state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
    if "sparse_tokens" not in state_dict:
        raise CheckpointError(f"{path} has no `sparse_tokens`: it is not a STELLAR checkpoint")
    return state_dict


def _count_layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(?:encoder\.layer|layers)\.(\d+)\.")
    indices = {int(match.group(1)) for name in state_dict if (match := pattern.match(name))}
    return max(indices) + 1 if indices else 0


def _layer_tensor(state_dict: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...]) -> torch.Tensor:
    for name in names:
        for layer_prefix in (f"{prefix}.encoder.layer.0.", f"{prefix}.layers.0."):
            if layer_prefix + name in state_dict:
                return state_dict[layer_prefix + name]
    raise CheckpointError(f"no {prefix} layer weight among {names}")


def _predictor_shape(state_dict: dict[str, torch.Tensor], head: str) -> tuple[int, int | None]:
    """Number of Linear layers in a clustering predictor and its hidden width."""
    if f"{head}.predictor.layers.weight" in state_dict:
        return 1, None
    pattern = re.compile(rf"^{head}\.predictor\.layers\.(\d+)\.weight$")
    indices = sorted(int(match.group(1)) for name in state_dict if (match := pattern.match(name)))
    if not indices:
        raise CheckpointError(f"{head} has no predictor weights")
    return len(indices), state_dict[f"{head}.predictor.layers.{indices[0]}.weight"].shape[0]


def infer_config(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int = 8,
    spatial_temperature: float | None = 0.06,
) -> StellarConfig:
    """Build the `StellarConfig` of an original state dict (names without `model.`) from its tensor shapes."""
    num_sparse_tokens, hidden_size = state_dict["sparse_tokens"].shape
    projection = state_dict["encoder.embeddings.patch_embeddings.projection.weight"]
    patch_size, num_channels = projection.shape[-1], projection.shape[1]
    num_positions = state_dict["encoder.embeddings.position_embeddings"].shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointError(f"{num_positions} patch position embeddings do not form a square grid")
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=_count_layers(state_dict, "encoder"),
        num_attention_heads=num_attention_heads or max(hidden_size // 64, 1),
        intermediate_size=_layer_tensor(state_dict, "encoder", ("intermediate.dense.weight", "mlp.fc1.weight")).shape[0],
        qkv_bias=any(name.endswith(("query.bias", "q_proj.bias")) for name in state_dict),
        image_size=side * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_sparse_tokens=num_sparse_tokens,
        spatial_temperature=spatial_temperature,
    )
    if "decoder_proj.weight" in state_dict:
        kwargs.update(
            decoder_hidden_size=state_dict["decoder_proj.weight"].shape[0],
            decoder_num_hidden_layers=_count_layers(state_dict, "decoder"),
            decoder_num_attention_heads=decoder_num_attention_heads,
            decoder_intermediate_size=_layer_tensor(
                state_dict, "decoder", ("intermediate.dense.weight", "mlp.fc1.weight")
            ).shape[0],
        )
    head = state_dict.get("reconstruction_head.weight")
    if head is not None:
        if head.ndim == 4:
            kwargs["reconstruction_target"] = "pixel"
        else:
            kwargs.update(reconstruction_target="vq", vq_codebook_size=head.shape[0])
    if "clustering_head.layer.weight" in state_dict:
        num_prototypes, prototype_dim = state_dict["clustering_head.layer.weight"].shape
        predictor_num_layers, predictor_hidden_size = _predictor_shape(state_dict, "clustering_head")
        kwargs.update(
            num_prototypes=num_prototypes,
            prototype_dim=prototype_dim,
            predictor_num_layers=predictor_num_layers,
            use_cls_clustering="cls_cluster_head.layer.weight" in state_dict,
        )
        if predictor_hidden_size is not None:
            kwargs["predictor_hidden_size"] = predictor_hidden_size
    return StellarConfig(**kwargs)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an original state dict to ours. Returns the converted dict and the original keys that were dropped."""
    converted, dropped = {}, []
    for name, tensor in state_dict.items():
        new_name = rename_key(name)
        if new_name is None:
            dropped.append(name)
        else:
            converted[new_name] = tensor.contiguous()
    return converted, dropped


def model_class_for(state_dict: dict[str, torch.Tensor]) -> type[StellarPreTrainedModel]:
    """The richest class the checkpoint fills: pretraining (with heads), reconstruction, or the bare encoder."""
    if "clustering_head.layer.weight" in state_dict and "decoder_proj.weight" in state_dict:
        return StellarForPreTraining
    if "decoder_proj.weight" in state_dict:
        return StellarForImageReconstruction
    return StellarModel


def load_converted(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> None:
    """Strict load with missing / unexpected keys and shape mismatches listed by name."""
    expected = model.state_dict()
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
    model.load_state_dict(converted, strict=True)


def _check_outputs(reference: torch.nn.Module, reloaded: torch.nn.Module, config: StellarConfig) -> float:
    """Largest absolute difference between the two models' encoder outputs on a fixed random image."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, config.num_channels, config.image_size, config.image_size, generator=generator)
    encoder = lambda model: model if isinstance(model, StellarModel) else model.stellar  # noqa: E731
    with torch.no_grad():
        first = encoder(reference)(pixel_values)
        second = encoder(reloaded)(pixel_values)
    return max(
        (first[name] - second[name]).abs().max().item() for name in ("sparse_tokens", "spatial_map", "lowrank_features")
    )


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int = 8,
    spatial_temperature: float | None = 0.06,
    push_to_hub: str | None = None,
) -> StellarPreTrainedModel:
    """
    Convert `checkpoint_path` into a `save_pretrained` folder at `output_dir` and return the converted model.

    The folder holds the weights (safetensors), the config, the image processor, the model code (remote code) and a
    README model card; it is reloaded and checked before this returns.
    """
    original = load_original_state_dict(checkpoint_path)
    config = infer_config(original, num_attention_heads, decoder_num_attention_heads, spatial_temperature)
    converted, dropped = convert_state_dict(original)
    if dropped:
        logger.info("dropped %d keys the original never uses: %s", len(dropped), dropped)
    model_class = model_class_for(original)
    model = model_class(config).eval()
    load_converted(model, converted)

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    StellarImageProcessor().save_pretrained(output_dir)
    write_model_card(output_dir, config, source=Path(checkpoint_path).name)
    reloaded = model_class.from_pretrained(output_dir).eval()
    for name, tensor in model.state_dict().items():
        if not torch.equal(tensor, reloaded.state_dict()[name]):
            raise RuntimeError(f"reloaded weight {name} differs from the converted one")
    difference = _check_outputs(model, reloaded, config)
    if difference > 1e-6:
        raise RuntimeError(f"reloaded model's outputs differ by {difference:.3g}")
    logger.info("converted %s -> %s (%s); reload check passed", checkpoint_path, output_dir, model_class.__name__)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        StellarImageProcessor().push_to_hub(push_to_hub)
    return model


def write_model_card(output_dir: Path, config: StellarConfig, source: str) -> None:
    """Fill `MODEL_CARD.md` (shipped beside the package in a source checkout) into `output_dir/README.md`."""
    from .model_card import render_model_card

    (Path(output_dir) / "README.md").write_text(
        render_model_card(config, training_details=f"Converted from the original checkpoint `{source}`.")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original .ckpt, .safetensors or .bin file")
    parser.add_argument("--output_dir", required=True, help="folder to write the converted model to")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="encoder heads (default: width / 64)")
    parser.add_argument("--decoder_num_attention_heads", type=int, default=8, help="decoder heads (default: 8)")
    parser.add_argument(
        "--spatial_temperature",
        type=lambda value: None if value.lower() == "none" else float(value),
        default=0.06,
        help="temperature of the spatial map, or 'none' for scaled dot products (default: 0.06)",
    )
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also upload to this Hub repository")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            num_attention_heads=args.num_attention_heads,
            decoder_num_attention_heads=args.decoder_num_attention_heads,
            spatial_temperature=args.spatial_temperature,
            push_to_hub=args.push_to_hub,
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"saved {type(model).__name__} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
