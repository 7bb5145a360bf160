"""
Tests of `StellarImageProcessor` (PIL backend) and `StellarImageProcessorFast` (torchvision backend): the original's
evaluation transform (shorter side 256 bicubic, centre crop 224, rescale, ImageNet normalisation), checked against a
manual PIL + NumPy pipeline, plus the Auto round trip and mode conversion.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from stellar_hf import StellarImageProcessor, StellarImageProcessorFast

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
GREY_LEVEL = 1 / 255 / IMAGENET_STD.min()  # one 8-bit step, in normalised units
FAST_TOLERANCE = 3.01 * GREY_LEVEL

PROCESSORS = [StellarImageProcessor, StellarImageProcessorFast]
processor_parametrize = pytest.mark.parametrize("processor_class", PROCESSORS, ids=["pil", "fast"])


def smooth_image(width: int = 400, height: int = 300, seed: int = 0) -> Image.Image:
    """A natural-looking (smooth, non-square) RGB image: upsampled coarse noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def manual_preprocess(image: Image.Image, shortest_edge: int = 256, crop: int = 224) -> torch.Tensor:
    """The original's eval transform by hand: resize the shorter side (bicubic), centre crop, /255, normalise."""
    width, height = image.size
    if width <= height:
        size = (shortest_edge, int(shortest_edge * height / width))
    else:
        size = (int(shortest_edge * width / height), shortest_edge)
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left = round((size[0] - crop) / 2.0)
    top = round((size[1] - crop) / 2.0)
    cropped = np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    normalised = (cropped - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(normalised).permute(2, 0, 1).unsqueeze(0)


def pixel_values(processor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


@processor_parametrize
def test_defaults_are_the_original_eval_transform(processor_class):
    processor = processor_class()
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert list(processor.image_mean) == pytest.approx(IMAGENET_MEAN.tolist())
    assert list(processor.image_std) == pytest.approx(IMAGENET_STD.tolist())
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale and processor.do_normalize
    assert processor.model_input_names == ["pixel_values"]


@processor_parametrize
@pytest.mark.parametrize("size", [(400, 300), (300, 400), (224, 224), (257, 640)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_manual_pipeline(processor_class, size):
    image = smooth_image(*size)
    output = pixel_values(processor_class(), image)
    expected = manual_preprocess(image)
    assert output.shape == (1, 3, 224, 224) and output.dtype == torch.float32
    difference = (output - expected).abs()
    if processor_class is StellarImageProcessor:
        # PIL resampling: the same operations, up to float rounding.
        assert difference.max() < 1e-5, difference.max()
    else:
        # torchvision's bicubic on tensors rounds differently from PIL's: a few 8-bit levels at most, rarely.
        assert difference.max() <= FAST_TOLERANCE, difference.max()
        assert difference.mean() < 0.25 * GREY_LEVEL, difference.mean()


def test_pil_and_fast_agree():
    images = [smooth_image(seed=1), smooth_image(300, 500, seed=2)]
    torch.testing.assert_close(
        pixel_values(StellarImageProcessorFast(), images), pixel_values(StellarImageProcessor(), images),
        rtol=0, atol=FAST_TOLERANCE,
    )  # fmt: skip


@processor_parametrize
def test_values_are_normalised_not_raw(processor_class):
    white = Image.new("RGB", (300, 260), (255, 255, 255))
    black = Image.new("RGB", (300, 260), (0, 0, 0))
    output = pixel_values(processor_class(), [white, black])
    expected_white = torch.from_numpy((1 - IMAGENET_MEAN) / IMAGENET_STD).view(3, 1, 1).expand(3, 224, 224)
    expected_black = torch.from_numpy(-IMAGENET_MEAN / IMAGENET_STD).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(output[0], expected_white, rtol=0, atol=1e-5)
    torch.testing.assert_close(output[1], expected_black, rtol=0, atol=1e-5)


@processor_parametrize
@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_are_converted_to_rgb(processor_class, mode):
    rgb = smooth_image(320, 280)
    if mode == "L":
        image = rgb.convert("L")
        reference = image.convert("RGB")  # grey replicated over three channels
    elif mode == "RGBA":
        image = rgb.copy()
        image.putalpha(255)  # opaque: must match the RGB image exactly
        reference = rgb
    else:
        image = rgb.convert("P")
        reference = image.convert("RGB")
    processor = processor_class()
    output = pixel_values(processor, image)
    assert output.shape == (1, 3, 224, 224)
    torch.testing.assert_close(output, pixel_values(processor, reference), rtol=0, atol=1e-6)
    if mode == "L":
        unnormalised = output[0] * torch.from_numpy(IMAGENET_STD).view(3, 1, 1) + torch.from_numpy(IMAGENET_MEAN).view(
            3, 1, 1
        )
        torch.testing.assert_close(unnormalised[0], unnormalised[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(unnormalised[0], unnormalised[2], rtol=0, atol=1e-5)


@processor_parametrize
def test_transparent_pixels_become_white(processor_class):
    image = Image.new("RGBA", (300, 300), (10, 200, 30, 0))
    output = pixel_values(processor_class(), image)
    white = torch.from_numpy((1 - IMAGENET_MEAN) / IMAGENET_STD).view(1, 3, 1, 1).expand_as(output)
    torch.testing.assert_close(output, white, rtol=0, atol=1e-5)


@processor_parametrize
def test_batch_of_images_of_different_sizes(processor_class):
    images = [
        smooth_image(400, 300, seed=3),
        smooth_image(250, 600, seed=4).convert("L"),
        smooth_image(256, 256, seed=5),
    ]
    processor = processor_class()
    batch = pixel_values(processor, images)
    assert batch.shape == (3, 3, 224, 224)
    for index, image in enumerate(images):
        torch.testing.assert_close(batch[index : index + 1], pixel_values(processor, image), rtol=0, atol=1e-6)
    arrays = pixel_values(processor, [np.array(image.convert("RGB")) for image in images])
    torch.testing.assert_close(arrays, batch, rtol=0, atol=1e-6)


@processor_parametrize
def test_auto_image_processor_round_trip(processor_class, tmp_path):
    import stellar_hf  # noqa: F401  (registers the classes with AutoImageProcessor)

    processor = processor_class(crop_size={"height": 64, "width": 64}, size={"shortest_edge": 72})
    processor.save_pretrained(tmp_path)
    backend = "pil" if processor_class is StellarImageProcessor else "torchvision"
    loaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    assert type(loaded) is processor_class
    assert loaded.crop_size == {"height": 64, "width": 64} and loaded.size == {"shortest_edge": 72}
    image = smooth_image()
    output = pixel_values(loaded, image)
    assert output.shape == (1, 3, 64, 64)
    torch.testing.assert_close(output, pixel_values(processor, image), rtol=0, atol=0)
    # Either backend can be asked for, whichever was saved.
    other = AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision" if backend == "pil" else "pil")
    assert type(other) in PROCESSORS and type(other) is not processor_class
    torch.testing.assert_close(pixel_values(other, image), output, rtol=0, atol=FAST_TOLERANCE)
