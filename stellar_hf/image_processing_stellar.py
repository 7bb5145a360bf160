"""Image processors for STELLAR: the original's evaluation preprocessing, normalisation included.

Two backends, named as transformers 5.24 names its own: `StellarImageProcessor` (torchvision) and
`StellarImageProcessorPil` (PIL / NumPy). Both save `image_processor_type: StellarImageProcessor`, so a folder saved
by either loads with either (`AutoImageProcessor.from_pretrained(folder, backend="pil" | "torchvision")`).

Before 5.24's naming, `StellarImageProcessor` was the PIL class and `StellarImageProcessorFast` the torchvision one.
Folders saved then load unchanged: their `image_processor_type` (`StellarImageProcessor`, or
`StellarImageProcessorFast`, which transformers reads as `StellarImageProcessor`) names the same pair, and the backend
is chosen at load time; `trust_remote_code` without stellar_hf runs the old code the folder carries.
`StellarImageProcessorFast` still imports, as the torchvision class, with a `FutureWarning`. Without torchvision
installed, `StellarImageProcessor` is `StellarImageProcessorPil` (with a logged warning), as transformers does for its
own `XImageProcessor` names.

`to_rgb_image` is the one rule by which every STELLAR path (training data, both processors, the examples) reads a PIL
image of any mode as 8-bit RGB. It lives here, not in `stellar_hf.data`, because this file is copied to the Hub as
remote code and must load on its own.

`normalize_images` / `unnormalize_images` are the one place where pixel statistics are applied or undone (training
views, reconstruction targets, figures), for the same reason.
"""

import base64
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.utils import is_torchvision_available, logging
from transformers.utils.import_utils import requires_backends

logger = logging.get_logger(__name__)

# Grey modes with more than 8 bits per pixel; PIL's convert("RGB") clips them at 255 instead of rescaling.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes with an alpha band (premultiplied "La"/"RGBa" included); they are composited on white.
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# 8-bit modes whose PIL conversion to RGB is exact or colorimetric, not a clip.
PIL_CONVERTED_MODES = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def to_rgb_image(image: Image.Image) -> Image.Image:
    """
    Read a PIL image of any mode as a loaded 8-bit RGB PIL image: the one reading rule of STELLAR's training data,
    image processors and examples. Per mode:

    - `RGB` without a `"transparency"` entry in `image.info`: returned as it is (loaded).
    - `I;16`, `I;16L`, `I;16B`, `I;16N` (16-bit grey): each value `v` in 0..65535 becomes `v >> 8` (the high byte:
      65535 -> 255, 32768 -> 128, 255 -> 0), replicated over the three channels.
    - `I` (32-bit integer grey, how some Pillow versions open 16-bit PNGs): read on the same 16-bit scale, values
      first clipped to 0..65535, then `v >> 8`.
    - `F` (32-bit float grey): read as [0, 1], values clipped to it, then `floor(v * 255 + 0.5)` (0.5 -> 128, the
      rounding `stellar_hf.data.to_rgb` applies to float tensors). NaN raises `ValueError`.
    - Transparency, i.e. an alpha band (`RGBA`, `LA`, `PA`, `La`, `RGBa`) or a `"transparency"` entry in
      `image.info` (a palette alpha in `P`, a colour key in `L` or `RGB`): composited on white, as transformers'
      `convert_to_rgb` does. In 16-bit and `I` images, pixels equal to the transparency key become white.
    - `1`, `L`, `P`, `RGBX`, `CMYK`, `YCbCr`, `LAB`, `HSV`: PIL's `convert("RGB")`.
    - Any other mode raises `ValueError` rather than guess a scale.
    """
    image.load()  # decode now, so errors surface here and `image.mode` is final
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)
        # >> 8 rather than rounding: the high byte, as the training data has always been read.
        grey = (np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        if isinstance(transparency, int):
            grey[values == transparency] = 255  # a fully transparent pixel on white
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if np.isnan(values).any():
            raise ValueError("a mode F image holds NaN values, which have no 8-bit value")
        grey = np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ALPHA_MODES or transparency is not None:
        # PIL converts premultiplied "La" to nothing but "LA" (un-premultiplying); "RGBa" goes to "RGBA" directly.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode in PIL_CONVERTED_MODES:
        return image.convert("RGB")
    raise ValueError(f"no rule to read a mode {mode!r} image as RGB")


def open_image(source: str) -> Image.Image:
    """
    The PIL image at `source` (a file path, an http(s) URL or base64 data, as transformers' `load_image` takes), in
    the file's own mode, EXIF orientation applied. Unlike `load_image` it does not convert to RGB, so that the caller
    can apply `to_rgb_image`.
    """
    if source.startswith(("http://", "https://")):
        from huggingface_hub.utils import httpx  # the client transformers' `load_image` uses

        image = Image.open(io.BytesIO(httpx.get(source, follow_redirects=True).content))
    elif os.path.isfile(source):
        image = Image.open(source)
    else:
        encoded = source.split(",", 1)[1] if source.startswith("data:image/") else source
        try:
            image = Image.open(io.BytesIO(base64.decodebytes(encoded.encode())))
        except Exception as error:  # PIL and base64 raise several types
            raise ValueError(
                f"Incorrect image source: not an http(s) URL, an existing file or base64 image data: {source[:100]}"
            ) from error
    return ImageOps.exif_transpose(image)


def _channel_statistics(images, mean, std):
    """`mean`, `std` as `(C, 1, 1)` tensors on `images`' device and dtype, checked to have one value per channel."""
    import torch

    dtype = images.dtype if images.is_floating_point() else torch.float32
    mean = torch.as_tensor(mean, dtype=dtype, device=images.device).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=dtype, device=images.device).reshape(-1, 1, 1)
    channels = images.shape[-3] if images.ndim >= 3 else None
    if mean.shape[0] != channels or std.shape[0] != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {mean.shape[0]} and {std.shape[0]} for "
            f"images of shape {tuple(images.shape)}"
        )
    return mean, std


def normalize_images(images, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, inplace=False):
    """
    Images on the [0, 1] scale -> the models' `pixel_values`: `(..., C, H, W)` -> the same shape, `(x - mean) / std`
    per channel (any leading dimensions: views, batch). A uint8 tensor is read as 0-255 and comes back float32.
    `inplace`: normalise a float tensor in place and return it (no second copy of a large batch).
    """
    if not images.is_floating_point():
        images, inplace = images.float().div_(255.0), True
    mean, std = _channel_statistics(images, mean, std)
    if inplace:
        return images.sub_(mean).div_(std)
    return (images - mean) / std


def unnormalize_images(images, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """The inverse of `normalize_images`: `(..., C, H, W)` `pixel_values` -> the same shape on the [0, 1] scale
    (not clamped; the reconstruction target keeps bicubic overshoot as the original does)."""
    mean, std = _channel_statistics(images, mean, std)
    return images * std + mean


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

    def fetch_images(self, image_url_or_urls):
        """
        Open image paths, URLs and base64 strings with `open_image` (in their own mode); pass everything else on. The
        backends' own loaders convert to RGB (clipping 16-bit images) or decode to uint16 tensors, before
        `to_rgb_image` could see the file's mode.
        """
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return open_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image, do_convert_rgb=None, **kwargs):
        """
        The backend's `process_image`, with PIL images read by `to_rgb_image` first when `do_convert_rgb` is on. Both
        backends share this override: their own conversion clips 16-bit images to white and misreads mode F.
        """
        if do_convert_rgb and isinstance(image, Image.Image):
            image = to_rgb_image(image)
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)

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
        # Both backends save `image_processor_type: StellarImageProcessor` (transformers' PilBackend drops the "Pil").
        # A saved folder names both backends, so remote-code users get the backend they ask for (torchvision by
        # default when it is installed, PIL otherwise), as users who import stellar_hf do, and hence the same pixels.
        # This also renames the classes of a folder saved before 5.24's naming when it is saved again.
        if "AutoImageProcessor" in (output.get("auto_map") or {}):
            output["auto_map"] = {**output["auto_map"], "AutoImageProcessor": dict(AUTO_MAP)}
        return output


class StellarImageProcessor(StellarImageProcessingDefaults, TorchvisionBackend):
    """
    STELLAR preprocessing with torchvision, batched and on any device (transformers' default backend). See
    [`StellarImageProcessingDefaults`]; [`StellarImageProcessorPil`] is the same on PIL / NumPy.

    Before transformers 5.24's naming this class was `StellarImageProcessorFast`, and `StellarImageProcessor` was the
    PIL one: its outputs differ from PIL's by a few 8-bit levels at most (bicubic resampling rounds differently).
    """

    def __init__(self, **kwargs):
        requires_backends(self, ["torch", "torchvision"])  # an ImportError that says what to install
        super().__init__(**kwargs)


class StellarImageProcessorPil(StellarImageProcessingDefaults, PilBackend):
    """
    STELLAR preprocessing on PIL / NumPy (no torchvision needed). See [`StellarImageProcessingDefaults`]. Before
    transformers 5.24's naming this class was `StellarImageProcessor`.
    """


# Backend name -> class, for `AutoImageProcessor.register(config_class, image_processor_classes=...)`. Torchvision
# first: transformers' default, and the class a folder's `image_processor_type` names.
IMAGE_PROCESSOR_CLASSES = {"torchvision": StellarImageProcessor, "pil": StellarImageProcessorPil}
# What a saved folder's `auto_map["AutoImageProcessor"]` holds: the same, as remote-code references.
AUTO_MAP = {backend: f"image_processing_stellar.{cls.__name__}" for backend, cls in IMAGE_PROCESSOR_CLASSES.items()}

if not is_torchvision_available():
    # As transformers does for its own `XImageProcessor` names: without torchvision the name falls back to the PIL
    # class (see `compatible_class`), and `AutoImageProcessor` skips the torchvision class as it skips its own
    # placeholders (`is_dummy`), falling back to PIL with a logged warning whatever backend was asked for.
    StellarImageProcessor.is_dummy = True
    del StellarImageProcessor


def compatible_class(name: str, stacklevel: int = 2):
    """
    The class a name kept for compatibility stands for, or None for other names: `StellarImageProcessor` without
    torchvision (the PIL class, with a logged warning), `StellarImageProcessorFast` (the torchvision class, with a
    `FutureWarning` attributed `stacklevel` frames up from the caller of this function).
    """
    if name == "StellarImageProcessor" and not is_torchvision_available():
        logger.warning_once(
            "`StellarImageProcessor` requires torchvision (not installed); falling back to "
            "`StellarImageProcessorPil`. Install torchvision to use the default backend, or use "
            "`StellarImageProcessorPil` to silence this warning."
        )
        return StellarImageProcessorPil
    if name == "StellarImageProcessorFast":
        warnings.warn(
            "`StellarImageProcessorFast` is deprecated and will be removed in a future version: the torchvision "
            "backend is now `StellarImageProcessor`, as transformers 5.24 names it (the PIL backend is "
            "`StellarImageProcessorPil`). Saved folders load unchanged.",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )
        return IMAGE_PROCESSOR_CLASSES["torchvision"]
    return None


def __getattr__(name: str):
    compatible = compatible_class(name, stacklevel=2)  # the warning names the line that asked for the name
    if compatible is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return compatible


__all__ = [
    "StellarImageProcessor",
    "StellarImageProcessorPil",
    "evaluation_resize",
    "normalize_images",
    "open_image",
    "to_rgb_image",
    "unnormalize_images",
]
