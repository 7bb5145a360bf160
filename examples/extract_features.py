#!/usr/bin/env python
"""Extract STELLAR features from image files: sparse tokens, spatial maps and pooled features, plus one PNG per image.

    python examples/extract_features.py --model path/to/stellar --images a.jpg b.png --output_dir features/
    python examples/extract_features.py --model org/stellar-b16 --images photos/*.jpg --trust_remote_code \\
        --device cuda --dtype bfloat16 --batch_size 64

Writes to `--output_dir`:
- `features.safetensors`: `sparse_tokens` (num_images, r, d), `spatial_map` (num_images, N, r) and `pooler_output`
  (num_images, d), in float32 whatever `--dtype` the model ran in, rows in the order of `--images`. Its metadata
  holds `images`, a JSON list of the paths as given.
- `features.json`: the same index with more detail (model, patch grid, overlay file per image, tensor shapes).
- one `<image stem>.png` per image (`<stem>_<index>.png` where stems repeat): the processed image, the hard
  assignment of patches to tokens, and each sparse token's spatial map over the image, with its mass share.

Every image is opened and decoded before anything is loaded or written, so a bad path fails fast, naming the file,
and leaves an existing output directory as it was. The model loads through `stellar_hf` when it is importable,
otherwise through `AutoModel` with `--trust_remote_code` (the code saved next to the weights).
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

try:
    import stellar_hf
except ModuleNotFoundError as error:  # not installed: use the code saved with the model, see `load_model_and_processor`
    if error.name != "stellar_hf":
        raise
    stellar_hf = None


def load_checkout_module(file_name: str, module_name: str):
    """`stellar_hf/<file_name>` of this checkout as the module `module_name`, for when stellar_hf is not installed."""
    path = Path(__file__).resolve().parents[1] / "stellar_hf" / file_name
    if not path.is_file():
        raise SystemExit(f"stellar_hf is not installed and {path} does not exist: pip install the package first")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if stellar_hf is not None:
    from stellar_hf.devices import resolve_device
    from stellar_hf.image_processing_stellar import to_rgb_image, unnormalize_images
    from stellar_hf.visualization import spatial_map_overlays
else:
    # None of these files imports from the package, so a checkout's copies load on their own.
    _visualization = load_checkout_module("visualization.py", "stellar_visualization")
    spatial_map_overlays = _visualization.spatial_map_overlays
    _image_processing = load_checkout_module("image_processing_stellar.py", "stellar_image_processing")
    to_rgb_image, unnormalize_images = _image_processing.to_rgb_image, _image_processing.unnormalize_images
    resolve_device = load_checkout_module("devices.py", "stellar_devices").resolve_device

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local folder or Hub id of a STELLAR model and its processor")
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="image files (anything PIL opens)")
    parser.add_argument("--output_dir", type=Path, default=Path("stellar_features"), help="where outputs are written")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's dtype")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the model's own code from its folder or Hub repo (needed when stellar_hf is not installed)",
    )
    parser.add_argument("--no_overlays", action="store_true", help="save the features only, no PNGs")
    parser.add_argument(
        "--overlay_columns",
        type=int,
        default=0,
        help="tiles per row in each PNG (0: one row for up to 16 tokens, 10 per row beyond)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.overlay_columns < 0:
        parser.error(f"--overlay_columns must be 0 or positive, got {args.overlay_columns}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir} exists and is not a directory")
    problems = [problem for problem in map(check_image, args.images) if problem]
    if problems:
        parser.error("cannot read every image, nothing was written:\n  " + "\n  ".join(problems))
    return args


def check_image(path: Path) -> str | None:
    """The reason `path` cannot be used as an image, or None. Decodes the whole file, so truncated files fail here."""
    if not path.is_file():
        return f"{path}: no such file"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises several types for unreadable data
        return f"{path}: not a readable image ({type(error).__name__}: {error})"
    return None


def load_model_and_processor(model_id: str, trust_remote_code: bool, device: torch.device, dtype: torch.dtype):
    """
    `StellarModel` from `stellar_hf` when importable (the base model of any STELLAR checkpoint), else `AutoModel`
    with the code saved next to the weights; and the image processor saved with it.
    """
    try:
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        if stellar_hf is not None:
            model = stellar_hf.StellarModel.from_pretrained(model_id)
        else:
            model = AutoModel.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if stellar_hf is not None or trust_remote_code:
            raise
        raise SystemExit(
            f"could not load {model_id} without stellar_hf: install stellar_hf, or pass --trust_remote_code to run "
            f"the code saved with the model ({error})"
        ) from error
    if not hasattr(model.config, "num_sparse_tokens"):
        raise SystemExit(f"{model_id} holds a {type(model).__name__}, not a STELLAR model")
    return model.to(device=device, dtype=dtype).eval(), processor


def overlay_names(paths: list[Path]) -> list[str]:
    """`<stem>.png` per image, `<stem>_<index>.png` for stems that occur more than once."""
    stems = [path.stem for path in paths]
    return [
        f"{stem}.png" if stems.count(stem) == 1 else f"{stem}_{index}.png" for index, stem in enumerate(stems)
    ]


def display_images(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """The processed batch back on the [0, 1] scale, with the statistics this processor used."""
    images = pixel_values.float()
    if getattr(processor, "do_normalize", False):
        images = unnormalize_images(images.float(), processor.image_mean, processor.image_std).clamp(0, 1)
    if not getattr(processor, "do_rescale", True):
        images = images / 255.0
    return images.clamp(0.0, 1.0)


def save_atomically(write, path: Path) -> None:
    """`write(tmp_path)`, then rename onto `path`, so a failed write never leaves a half-written file."""
    tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    model, processor = load_model_and_processor(args.model, args.trust_remote_code, device, DTYPES[args.dtype])
    patch_size = model.config.patch_size
    num_tokens = model.config.num_sparse_tokens
    columns = args.overlay_columns or (None if num_tokens <= 16 else 10)
    names = overlay_names(args.images)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    features = {"sparse_tokens": [], "spatial_map": [], "pooler_output": []}
    shape = None
    starts = range(0, len(args.images), args.batch_size)
    progress = tqdm(starts, desc="extracting", unit="batch") if tqdm is not None else starts
    for start in progress:
        paths = args.images[start : start + args.batch_size]
        pictures = []
        for path in paths:
            with Image.open(path) as image:
                # STELLAR's one reading rule (16-bit, float, transparency), whatever processor version was saved with
                # the model: the processor then gets 8-bit RGB, which every version reads alike.
                pictures.append(to_rgb_image(image))
        pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"]
        if shape is None:
            shape = tuple(pixel_values.shape[-2:])
        elif tuple(pixel_values.shape[-2:]) != shape:
            raise SystemExit(
                f"{paths[0]} and later images were processed to {tuple(pixel_values.shape[-2:])} pixels, earlier ones "
                f"to {shape}: features of one file need one size (enable the processor's centre crop)"
            )
        outputs = model(pixel_values=pixel_values.to(device))
        for key in features:
            features[key].append(getattr(outputs, key).float().cpu())
        if not args.no_overlays:
            grid_size = (shape[0] // patch_size, shape[1] // patch_size)
            images = display_images(pixel_values, processor)
            spatial_maps = outputs.spatial_map.float().cpu()
            for offset in range(len(paths)):
                panel = spatial_map_overlays(images[offset], spatial_maps[offset], grid_size, columns=columns)
                panel.save(args.output_dir / names[start + offset])

    tensors = {key: torch.cat(chunks).contiguous() for key, chunks in features.items()}
    image_paths = [str(path) for path in args.images]
    grid_size = [shape[0] // patch_size, shape[1] // patch_size]
    metadata = {"images": json.dumps(image_paths), "model": str(args.model), "grid_size": json.dumps(grid_size)}
    index = {
        "model": str(args.model),
        "dtype": args.dtype,
        "image_size": list(shape),
        "patch_size": patch_size,
        "grid_size": grid_size,
        "tensors": {key: list(value.shape) for key, value in tensors.items()},
        "images": [
            {"index": i, "path": path, "file_name": Path(path).name, "overlay": None if args.no_overlays else name}
            for i, (path, name) in enumerate(zip(image_paths, names))
        ],
    }
    features_path = args.output_dir / "features.safetensors"
    index_path = args.output_dir / "features.json"
    save_atomically(lambda tmp: save_file(tensors, str(tmp), metadata=metadata), features_path)
    save_atomically(lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"), index_path)
    overlays = "" if args.no_overlays else f" and {len(names)} overlay PNGs"
    print(f"wrote features of {len(image_paths)} images to {features_path}{overlays} (index: {index_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
