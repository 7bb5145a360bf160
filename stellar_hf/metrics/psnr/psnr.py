"""PSNR of reconstructions, as an `evaluate` metric; the computation is `stellar_hf.evaluation.psnr`."""

import evaluate

# Absolute import: evaluate runs a copy of this file from its module cache, where relative imports do not resolve.
from stellar_hf.evaluation import psnr
from stellar_hf.metrics import image_pair_features, image_stack

_DESCRIPTION = """
Peak signal-to-noise ratio, 10 log10(data_range^2 / MSE) in dB, per image, averaged over images. Higher is better;
identical images give infinity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each (C, H, W) (nested lists or arrays) on a [0, data_range] scale.
    references: the original images, same shapes.
    data_range (`float`, defaults to 1.0): the span of the pixel scale (255 for 8-bit values).
Returns:
    psnr (`float`): mean of the per-image PSNR, in dB.
    psnr_per_image (`list[float]`): one value per image.
Examples:
    >>> import evaluate, numpy as np
    >>> from stellar_hf.metrics import metric_path
    >>> metric = evaluate.load(metric_path("psnr"))
    >>> image = np.full((3, 16, 16), 0.5, dtype=np.float32)
    >>> round(metric.compute(predictions=[image + 0.1], references=[image])["psnr"], 2)
    20.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Psnr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
        )

    def _compute(self, predictions, references, data_range: float = 1.0):
        values = psnr(image_stack(predictions), image_stack(references), data_range=data_range)
        return {"psnr": values.mean().item(), "psnr_per_image": values.tolist()}
