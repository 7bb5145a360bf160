"""
The `psnr` evaluate metric: `evaluate.load(stellar_hf.metrics.metric_path("psnr"))`.

A package only so that wheels ship the script.
"""
