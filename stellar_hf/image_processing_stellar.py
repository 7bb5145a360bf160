"""Image processors for STELLAR: the original's evaluation preprocessing, normalisation included."""

from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def evaluation_resize(crop_size: int) -> int:
    """Shorter side to resize to before the centre crop: 256 / 224 of the crop, as the original evaluates."""
    return int(crop_size * 256 / 224)


class StellarImageProcessingDefaults:
    """
    The original's evaluation transform: shorter side to 256 (bicubic), centre crop 224, rescale to [0, 1], then
    ImageNet normalisation. The original normalises inside its model; here the processor does it, and the models
    take normalised `pixel_values` of shape `(B, 3, 224, 224)`.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    @classmethod
    def from_model_config(cls, config):
        """A processor for a model with `config` (a `StellarConfig`): its crop size, resize rule and statistics."""
        return cls(
            size={"shortest_edge": evaluation_resize(config.image_size)},
            crop_size={"height": config.image_size, "width": config.image_size},
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Name both backends in a saved folder, so remote-code users get the same class (torchvision when it is
        # installed, PIL otherwise) as users who import stellar_hf, and hence the same pixels.
        if "AutoImageProcessor" in (output.get("auto_map") or {}):
            output["auto_map"] = {
                **output["auto_map"],
                "AutoImageProcessor": [
                    "image_processing_stellar.StellarImageProcessor",
                    "image_processing_stellar.StellarImageProcessorFast",
                ],
            }
        return output


class StellarImageProcessor(StellarImageProcessingDefaults, PilBackend):
    """STELLAR preprocessing on PIL / NumPy (no torchvision needed). See [`StellarImageProcessingDefaults`]."""


class StellarImageProcessorFast(StellarImageProcessingDefaults, TorchvisionBackend):
    """STELLAR preprocessing with torchvision, batched and on any device. See [`StellarImageProcessingDefaults`]."""


__all__ = ["StellarImageProcessor", "StellarImageProcessorFast", "evaluation_resize"]
