"""
The `ssim` evaluate metric: `evaluate.load(stellar_hf.metrics.metric_path("ssim"))`.

A package only so that wheels ship the script.
"""
