"""
Reconstruction metrics as `evaluate` metric scripts, loadable offline by path:

    import evaluate
    from stellar_hf.metrics import metric_path

    psnr = evaluate.load(metric_path("psnr"))  # or evaluate.load("/abs/path/to/stellar_hf/metrics/psnr")
    psnr.compute(predictions=reconstructions, references=images)  # (B, 3, H, W) arrays in [0, 1]

Each script delegates to `stellar_hf.evaluation`, imported by its absolute name (evaluate copies the script into its
module cache, where relative imports do not resolve), so `stellar_hf` must be importable where the metric runs.
"""

from pathlib import Path

import numpy as np
import torch

METRICS = ("psnr", "ssim")


def image_stack(images) -> torch.Tensor:
    """A list of (C, H, W) images (nested lists or arrays) -> a (B, C, H, W) float64 tensor."""
    return torch.stack([torch.as_tensor(np.asarray(image, dtype=np.float64)) for image in images])


def image_pair_features():
    """The `datasets.Features` of both metrics: `predictions` and `references`, each a (C, H, W) float image."""
    import datasets

    image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
    return datasets.Features({"predictions": image, "references": image})


def metric_path(name: str) -> str:
    """Absolute path of the folder of metric `name` (one of `METRICS`), for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {METRICS}")
    return str(Path(__file__).resolve().parent / name)


__all__ = ["METRICS", "image_pair_features", "image_stack", "metric_path"]
