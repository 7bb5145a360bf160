"""SSIM of reconstructions, as an `evaluate` metric; the computation is `stellar_hf.evaluation.ssim`."""

import evaluate

# Absolute import: evaluate runs a copy of this file from its module cache, where relative imports do not resolve.
from stellar_hf.evaluation import ssim
from stellar_hf.metrics import image_pair_features, image_stack

_DESCRIPTION = """
Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), population covariance, K1 0.01,
K2 0.03, over the positions where the window fits, averaged over positions and channels, per image, then over
images. Matches skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False). 1 for identical images.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each (C, H, W) (nested lists or arrays) on a [0, data_range] scale, at least
        11 x 11 pixels.
    references: the original images, same shapes.
    data_range (`float`, defaults to 1.0): the span of the pixel scale (255 for 8-bit values).
Returns:
    ssim (`float`): mean of the per-image SSIM.
    ssim_per_image (`list[float]`): one value per image.
Examples:
    >>> import evaluate, numpy as np
    >>> from stellar_hf.metrics import metric_path
    >>> metric = evaluate.load(metric_path("ssim"))
    >>> image = np.random.rand(3, 16, 16).astype(np.float32)
    >>> metric.compute(predictions=[image], references=[image])["ssim"]
    1.0
"""

_CITATION = """
@article{wang2004image,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C and Sheikh, Hamid R and Simoncelli, Eero P},
  journal={IEEE Transactions on Image Processing},
  volume={13}, number={4}, pages={600--612}, year={2004}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ssim(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
        )

    def _compute(self, predictions, references, data_range: float = 1.0):
        values = ssim(image_stack(predictions), image_stack(references), data_range=data_range)
        return {"ssim": values.mean().item(), "ssim_per_image": values.tolist()}
