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

METRICS = ("psnr", "ssim")


def metric_path(name: str) -> str:
    """Absolute path of the folder of metric `name` (one of `METRICS`), for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {METRICS}")
    return str(Path(__file__).resolve().parent / name)


__all__ = ["METRICS", "metric_path"]
