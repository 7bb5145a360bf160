#!/usr/bin/env python
"""
The pretraining views, old path against new, side by side in one run (issue: views at accelerator speed).

- **CPU part**, images per second per core (one thread, as a DataLoader worker runs): the per-view float32 path
  (`MultiViewTransform`: crops and colour, what the workers did before) against the new worker part
  (`MultiViewCrops`: the draws and uint8 crops), on a real photograph (scikit-image's `chelsea`, resized to
  500 x 375), at the paper's recipe: 8 global views at 224 px and 8 local views at 96 px.
- **Bytes per image** moved from the workers to the device: the float32 views against the uint8 crops and the
  colour parameters.
- **Photometric augmentation of the same views**, on the CPU with one thread: per view (`MultiViewTransform.color_view`,
  torchvision's ops one view at a time) against batched (`ViewAugmentation.color_views`, all views of a batch at once:
  on a CPU the fused C kernels, `batched_path` says whether they built) and against the eager torch path of
  `ViewAugmentation` (`native=False`, what accelerators run), in ms per image.
- **Device part per batch** on `--device` (`ViewAugmentation` on a batch of uint8 crops: colour, normalisation;
  with `--compile` also its compiled graph) against one training step (forward, backward, AdamW) of ViT-S/16 and
  ViT-B/16 STELLAR at the recipe on the same device, per image: the share of a step the device part adds. On a CPU
  the step runs at `--step_batch_size` images.

Rounds of the two sides alternate, and each figure is the median over rounds, so slow drift of the machine hits both
alike. The last line printed is one JSON object with every figure, so runs compare over time.

    python benchmarks/data_pipeline.py                       # CPU, about 2 minutes
    python benchmarks/data_pipeline.py --device cuda --batch_size 128 --compile   # on a GPU (benchmarks/gpu_checks.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stellar_hf import StellarConfig, native  # noqa: E402
from stellar_hf.data import MultiViewCrops, MultiViewTransform, ViewAugmentation, collate_views  # noqa: E402
from stellar_hf.modeling_stellar import StellarForPreTraining  # noqa: E402

RECIPE = dict(image_size=224, num_global_views=8, num_local_views=8, local_image_size=96)
# The targets, printed beside the measured ratios.
TARGETS = {"cpu_part_speedup": 3.0, "bytes_ratio": 0.25, "photometric_speedup": 5.0, "device_share_b16": 0.05}
BACKBONES = {
    "vit_s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit_b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image", help="the photograph (default: scikit-image's chelsea; prepare_gpu_checks.sh saves it to .bench/)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per comparison (median reported)")
    parser.add_argument("--images", type=int, default=8, help="images per CPU round")
    parser.add_argument("--device", default="cpu", help="where the device part and the training steps run")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch of the device part")
    parser.add_argument("--step_batch_size", type=int, default=2, help="images per training step")
    parser.add_argument("--step_repeats", type=int, default=2, help="timed training steps per backbone")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training step autocast dtype")
    parser.add_argument("--compile", action="store_true", help="also time the device part with compile=True")
    parser.add_argument("--skip_training_step", action="store_true", help="skip the ViT-S/16 and ViT-B/16 steps")
    return parser.parse_args(argv)


def photograph(path: str | None = None):
    """The benchmark's photograph, 500 x 375: `path`, else scikit-image's `chelsea`."""
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB").resize((500, 375))
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((500, 375))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device = torch.device("cpu")) -> float:
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def alternate(functions: dict, rounds: int, device: torch.device = torch.device("cpu")) -> dict:
    """Median seconds of each function over `rounds` rounds, the functions taking turns (one warm-up call each)."""
    for function in functions.values():
        function()
    seconds = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            seconds[name].append(timed(function, device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def tensor_bytes(item: dict) -> int:
    return sum(value.numel() * value.element_size() for value in item.values() if torch.is_tensor(value))


def cpu_part(args, image) -> dict:
    """Images per second per core of the old worker path and of the new one; bytes each ships per image."""
    reference, crops = MultiViewTransform(**RECIPE), MultiViewCrops(**RECIPE)
    seeds = range(args.images)
    seconds = alternate(
        {
            "old": lambda: [reference(image, seed=seed) for seed in seeds],
            "new": lambda: [crops(image, seed=seed) for seed in seeds],
        },
        args.rounds,
    )
    return {
        "old_images_per_s_per_core": args.images / seconds["old"],
        "new_images_per_s_per_core": args.images / seconds["new"],
        "old_bytes_per_image": tensor_bytes(reference(image, seed=0)),
        "new_bytes_per_image": tensor_bytes(crops(image, seed=0)),
    }


def view_batch(image, batch_size: int) -> dict:
    crops = MultiViewCrops(**RECIPE)
    return collate_views([crops(image, seed=seed) for seed in range(batch_size)])


def photometric(args, image) -> dict:
    """ms per image of the colour augmentation of the same float views: per view against batched, CPU, one thread."""
    batch = view_batch(image, args.images)
    reference = MultiViewTransform(**RECIPE)
    # The default (on a CPU, the fused C kernels where they build) and the eager torch path, which accelerators run.
    batched = {
        "batched": ViewAugmentation(reference.color),
        "eager_batched": ViewAugmentation(reference.color, native=False),
    }
    num_global = RECIPE["num_global_views"]
    groups = [
        (batch["global_crops"].flatten(0, 1).float() / 255, batch["view_parameters"][:, :num_global].flatten(0, 1)),
        (batch["local_crops"].flatten(0, 1).float() / 255, batch["view_parameters"][:, num_global:].flatten(0, 1)),
    ]

    def per_view():
        for views, parameters in groups:
            for view, row in zip(views, parameters):
                reference.color_view(view, row)

    # The batched path writes into a tensor it is given (`ViewAugmentation.__call__` colours the float views it makes
    # from the crops in place): one output buffer per group, as a training loop reuses its batch memory.
    buffers = [torch.empty_like(views) for views, _ in groups]

    def batched_views(augmentation):
        for (views, parameters), buffer in zip(groups, buffers):
            augmentation.color_views(views, parameters, out=buffer)

    functions = {"per_view": per_view}
    for name, augmentation in batched.items():
        functions[name] = lambda augmentation=augmentation: batched_views(augmentation)
    seconds = alternate(functions, args.rounds)
    return {f"{name}_photometric_ms": 1000 * value / args.images for name, value in seconds.items()}


def device_part(args, image, device: torch.device) -> dict:
    """ms per image of `ViewAugmentation` on a batch already on `device` (the host-to-device copy excluded): the
    eager chunks (the default) and, with `--compile`, the compiled graph, side by side."""
    batch = {key: value.to(device) for key, value in view_batch(image, args.batch_size).items() if torch.is_tensor(value)}
    augmentations = {"device_part": ViewAugmentation()}
    if args.compile:
        augmentations["device_part_compiled"] = ViewAugmentation(compile=True)
    functions = {name: (lambda augment=augment: augment(batch)) for name, augment in augmentations.items()}
    seconds = alternate(functions, args.rounds, device)
    return {f"{name}_ms_per_image": 1000 * value / args.batch_size for name, value in seconds.items()}


def training_step_ms(args, image, device: torch.device, backbone: dict) -> float:
    """ms per image of one STELLAR training step (forward, backward, AdamW) at the recipe on `device`."""
    config = StellarConfig(
        **backbone, image_size=224, num_masked_views=8, num_local_views=8, local_image_size=96,
        reconstruction_target="pixel", attn_implementation="sdpa",
    )
    model = StellarForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {key: value.to(device) for key, value in view_batch(image, args.step_batch_size).items() if torch.is_tensor(value)}
    inputs = ViewAugmentation(image_mean=config.image_mean, image_std=config.image_std)(batch)
    generator = torch.Generator(device=device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def step():
        generator.manual_seed(0)
        noise = model.draw_mask_noise(inputs["global_views"], generator, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**inputs, mask_noise=noise).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = statistics.median(timed(step, device) for _ in range(args.step_repeats))
    del model, optimizer
    return 1000 * seconds / args.step_batch_size


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    image = photograph(args.image)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's view of the CPU: one thread per DataLoader worker
    try:
        results = {**cpu_part(args, image), **photometric(args, image)}
    finally:
        torch.set_num_threads(threads)
    results.update(device_part(args, image, device))
    if not args.skip_training_step:
        for name, backbone in BACKBONES.items():
            step = training_step_ms(args, image, device, backbone)
            results[f"{name}_step_ms_per_image"] = step
            results[f"device_part_share_of_{name}_step"] = results["device_part_ms_per_image"] / step
            if "device_part_compiled_ms_per_image" in results:
                results[f"device_part_compiled_share_of_{name}_step"] = (
                    results["device_part_compiled_ms_per_image"] / step
                )
    results.update(
        cpu_part_speedup=results["new_images_per_s_per_core"] / results["old_images_per_s_per_core"],
        bytes_ratio=results["new_bytes_per_image"] / results["old_bytes_per_image"],
        photometric_speedup=results["per_view_photometric_ms"] / results["batched_photometric_ms"],
        eager_photometric_speedup=results["per_view_photometric_ms"] / results["eager_batched_photometric_ms"],
        batched_path="native" if native.view_kernels() is not None else f"eager ({native.why_unavailable()})",
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        cpu=platform.processor() or platform.machine(),
        threads_for_device_part=torch.get_num_threads(),
        torch=torch.__version__,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )

    print(f"views at the recipe (8 x 224 px + 8 x 96 px) of a 500 x 375 photograph; device part on {results['device']}")
    print(f"  CPU part, images/s per core:  old {results['old_images_per_s_per_core']:8.1f}   "
          f"new {results['new_images_per_s_per_core']:8.1f}   x{results['cpu_part_speedup']:.2f} "
          f"(target >= x{TARGETS['cpu_part_speedup']:g})")  # fmt: skip
    print(f"  bytes per image to the device: old {results['old_bytes_per_image']:,}   "
          f"new {results['new_bytes_per_image']:,}   ratio {results['bytes_ratio']:.3f} "
          f"(target <= {TARGETS['bytes_ratio']:g})")  # fmt: skip
    print(f"  photometric, ms per image (CPU, 1 thread): per view {results['per_view_photometric_ms']:.2f}   "
          f"batched {results['batched_photometric_ms']:.2f}   x{results['photometric_speedup']:.2f} "
          f"(target >= x{TARGETS['photometric_speedup']:g}; {results['batched_path']})")  # fmt: skip
    print(f"  photometric, eager torch path (accelerators' path, on this CPU): "
          f"{results['eager_batched_photometric_ms']:.2f}   x{results['eager_photometric_speedup']:.2f}")  # fmt: skip
    print(f"  device part: {results['device_part_ms_per_image']:.2f} ms per image "
          f"({results['threads_for_device_part']} thread(s))")  # fmt: skip
    if "device_part_compiled_ms_per_image" in results:
        print(f"  device part, compiled graph: {results['device_part_compiled_ms_per_image']:.2f} ms per image")
    for name in BACKBONES:
        if f"{name}_step_ms_per_image" in results:
            print(f"  {name} training step: {results[f'{name}_step_ms_per_image']:.0f} ms per image; the device part "
                  f"adds {100 * results[f'device_part_share_of_{name}_step']:.2f} %")  # fmt: skip
    print(json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
