"""
One image-reading rule everywhere (`to_rgb_image`): every PIL mode is read as the same 8-bit RGB pixels by the
training data (`stellar_hf.data.to_rgb`), both image processors (PIL images and file paths) and
examples/extract_features.py.

Each case below is an image of one mode, built in memory, with the RGB pixels the documented rule gives for it,
computed here by hand (not by `to_rgb_image`), so a path that reads a mode its own way fails. The reported defect: a
16-bit PNG read by the processors (PIL's `convert("RGB")` clips `I;16` at 255) came out white.
"""

import base64
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import PIL
from PIL import Image
from safetensors import safe_open
from stellar_tester import TINY_CONFIG

from stellar_hf import StellarConfig, StellarImageProcessor, StellarImageProcessorPil, StellarModel
from stellar_hf.data import to_rgb
from stellar_hf.image_processing_stellar import to_rgb_image

REPO_ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 30, 40
PROCESSORS = [StellarImageProcessorPil, StellarImageProcessor]  # the PIL and torchvision backends
processor_parametrize = pytest.mark.parametrize("processor_class", PROCESSORS, ids=["pil", "torchvision"])


@dataclass
class ModeCase:
    """An image of one mode, the RGB pixels the rule gives for it, and the file format that keeps its mode."""

    name: str
    image: Image.Image
    expected: np.ndarray  # (HEIGHT, WIDTH, 3) uint8
    file_format: str | None = None  # "PNG" or "TIFF"; None where no format PIL writes keeps the mode


def reopened(image: Image.Image, file_format: str, **save_options) -> Image.Image:
    """`image` written in `file_format` and read back, as a file on disk would be."""
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **save_options)
    buffer.seek(0)
    return Image.open(buffer)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def on_white(rgb: np.ndarray, transparent: np.ndarray) -> np.ndarray:
    """`rgb` with the fully transparent pixels (the rest being opaque) composited on white."""
    return np.where(transparent[..., None], np.uint8(255), rgb)


def mode_cases() -> list[ModeCase]:
    rng = np.random.default_rng(0)
    # A 16-bit ramp over the whole range, every value distinct (so a transparency key marks one pixel).
    ramp16 = np.linspace(0, 65535, HEIGHT * WIDTH).round().astype(np.uint16).reshape(HEIGHT, WIDTH)
    ramp8 = (ramp16 >> 8).astype(np.uint8)  # distinct 8-bit values are not needed: keys below use ramp16
    grey8 = np.linspace(0, 255, HEIGHT * WIDTH).round().astype(np.uint8).reshape(HEIGHT, WIDTH)
    colours = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    transparent = (np.indices((HEIGHT, WIDTH)).sum(0) // 3) % 2 == 1  # stripes of fully transparent pixels
    alpha = Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8))
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = (grey8 // 16).astype(np.uint8)
    paletted = Image.fromarray(indices, mode="P")
    paletted.putpalette(palette.flatten().tolist())

    cases = []
    # 16-bit grey: the high byte. As a PNG file first, the reported case.
    cases.append(ModeCase("I;16 PNG", reopened(Image.fromarray(ramp16), "PNG"), grey_to_rgb(ramp8), "PNG"))
    for mode, dtype in (("I;16", "=u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")):
        image = Image.frombytes(mode, (WIDTH, HEIGHT), ramp16.astype(dtype).tobytes())
        cases.append(ModeCase(mode, image, grey_to_rgb(ramp8), "TIFF" if mode == "I;16B" else None))
    key16 = int(ramp16[7, 9])
    cases.append(
        ModeCase(
            "I;16 PNG with transparency",
            reopened(Image.fromarray(ramp16), "PNG", transparency=key16),
            on_white(grey_to_rgb(ramp8), ramp16 == key16),
            "PNG",
        )
    )
    # 32-bit integers: the 16-bit scale, clipped.
    ints = np.linspace(-10000, 80000, HEIGHT * WIDTH).round().astype(np.int32).reshape(HEIGHT, WIDTH)
    expected_ints = (np.clip(ints, 0, 65535) >> 8).astype(np.uint8)
    cases.append(ModeCase("I", Image.fromarray(ints), grey_to_rgb(expected_ints), "TIFF"))
    # Floats: [0, 1], clipped, rounded half up.
    floats = np.linspace(-0.2, 1.2, HEIGHT * WIDTH, dtype=np.float32).reshape(HEIGHT, WIDTH)
    expected_floats = np.floor(np.clip(floats, 0, 1) * 255 + 0.5).astype(np.uint8)
    cases.append(ModeCase("F", Image.fromarray(floats), grey_to_rgb(expected_floats), "TIFF"))
    # 8-bit grey, bilevel and palette.
    bilevel = grey_to_rgb(np.where(transparent, 255, 0).astype(np.uint8))
    cases.append(ModeCase("1", Image.fromarray(transparent), bilevel, "PNG"))
    cases.append(ModeCase("L", Image.fromarray(grey8), grey_to_rgb(grey8), "PNG"))
    key8 = int(grey8[4, 4])
    cases.append(
        ModeCase(
            "L with transparency",
            reopened(Image.fromarray(grey8), "PNG", transparency=key8),
            on_white(grey_to_rgb(grey8), grey8 == key8),
            "PNG",
        )
    )
    cases.append(ModeCase("P", paletted, palette[indices], "PNG"))
    cases.append(
        ModeCase(
            "P with transparency",
            reopened(paletted, "PNG", transparency=3),
            on_white(palette[indices], indices == 3),
            "PNG",
        )
    )
    # Alpha bands, premultiplied ones included: transparent pixels become white.
    grey_on_white = on_white(grey_to_rgb(grey8), transparent)
    cases.append(ModeCase("LA", Image.merge("LA", (Image.fromarray(grey8), alpha)), grey_on_white, "PNG"))
    cases.append(ModeCase("La", Image.merge("La", (Image.fromarray(grey8), alpha)), grey_on_white))
    palette_alpha = paletted.convert("PA")
    palette_alpha.putalpha(alpha)
    cases.append(ModeCase("PA", palette_alpha, on_white(palette[indices], transparent), "TIFF"))
    rgba = Image.fromarray(colours)
    rgba.putalpha(alpha)
    cases.append(ModeCase("RGBA", rgba, on_white(colours, transparent), "PNG"))
    cases.append(ModeCase("RGBa", rgba.convert("RGBa"), on_white(colours, transparent)))
    # Colour without alpha.
    cases.append(ModeCase("RGB", Image.fromarray(colours), colours, "PNG"))
    key_colour = tuple(int(c) for c in colours[2, 3])
    cases.append(
        ModeCase(
            "RGB with transparency",
            reopened(Image.fromarray(colours), "PNG", transparency=key_colour),
            on_white(colours, (colours == key_colour).all(-1)),
            "PNG",
        )
    )
    cases.append(ModeCase("RGBX", Image.fromarray(colours).convert("RGBX"), colours))
    cases.append(ModeCase("CMYK", Image.fromarray(colours).convert("CMYK"), colours, "TIFF"))  # K = 0: exact
    # Other colour spaces: PIL's own conversion, which is the rule for them.
    for mode, file_format in (("YCbCr", "TIFF"), ("LAB", "TIFF"), ("HSV", None)):
        image = Image.fromarray(colours).convert(mode)
        cases.append(ModeCase(mode, image, np.asarray(image.convert("RGB")), file_format))
    return cases


CASES = mode_cases()
case_parametrize = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def reopens_in_its_mode(case: ModeCase) -> bool:
    """Whether this Pillow writes the case's file so that it reopens in the same mode (Pillow 12 reads a YCbCr TIFF
    back as RGB; Pillow 13 keeps it)."""
    buffer = io.BytesIO()
    case.image.save(buffer, format=case.file_format)
    buffer.seek(0)
    with Image.open(buffer) as saved:
        return saved.mode == case.image.mode


FILE_CASES = [case for case in CASES if case.file_format and reopens_in_its_mode(case)]
UNWRITABLE_CASES = [case.name for case in CASES if case.file_format and not reopens_in_its_mode(case)]
file_case_parametrize = pytest.mark.parametrize("case", FILE_CASES, ids=[case.name for case in FILE_CASES])


def save_case(case: ModeCase, folder: Path) -> Path:
    """The case's image as a file that reopens in its mode (and with its transparency key)."""
    suffix = {"PNG": ".png", "TIFF": ".tif"}[case.file_format]
    path = folder / (case.name.replace(" ", "_").replace(";", "") + suffix)
    case.image.save(path, format=case.file_format)
    with Image.open(path) as saved:
        assert saved.mode == case.image.mode, f"{path.name} reopens as {saved.mode}"
        assert saved.info.get("transparency") == case.image.info.get("transparency"), path.name
    return path


def pixel_values(processor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


def test_every_pil_mode_has_a_case():
    """A mode Pillow adds must get a decision (a rule here, or a ValueError) and a case, not a silent guess."""
    assert set(Image.MODES) <= {case.image.mode for case in CASES}


@case_parametrize
def test_rule_gives_the_documented_pixels(case):
    rgb = to_rgb_image(case.image)
    assert rgb.mode == "RGB" and rgb.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(rgb), case.expected)


def test_documented_values():
    sixteen = Image.fromarray(np.array([[0, 255, 256, 32767, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb_image(sixteen))[0, :, 0].tolist() == [0, 0, 1, 127, 128, 255]
    ints = Image.fromarray(np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32))
    assert np.asarray(to_rgb_image(ints))[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    floats = np.array([[-1.0, 0.0, 1 / 255, 0.5, 1.0, 2.0, np.inf, -np.inf]], dtype=np.float32)
    assert np.asarray(to_rgb_image(Image.fromarray(floats)))[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255, 255, 0]
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_image(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)))


def test_half_transparent_pixels_are_blended_on_white():
    colour, alpha = np.array([0, 100, 200]), 128
    rgba = Image.new("RGBA", (4, 4), (*colour.tolist(), alpha))
    expected = (colour * alpha + 255 * (255 - alpha)) / 255
    assert np.abs(np.asarray(to_rgb_image(rgba))[0, 0] - expected).max() <= 1
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), np.asarray(to_rgb_image(rgba)))


@case_parametrize
def test_training_data_reads_each_mode_by_the_rule(case, tmp_path):
    np.testing.assert_array_equal(np.asarray(to_rgb(case.image)), case.expected)
    if case in FILE_CASES:
        path = save_case(case, tmp_path)
        np.testing.assert_array_equal(np.asarray(to_rgb(path)), case.expected)
        np.testing.assert_array_equal(np.asarray(to_rgb({"bytes": path.read_bytes(), "path": None})), case.expected)


@processor_parametrize
@case_parametrize
def test_processors_read_each_mode_by_the_rule(processor_class, case):
    processor = processor_class()
    expected = pixel_values(processor, Image.fromarray(case.expected))
    torch.testing.assert_close(pixel_values(processor, case.image), expected, rtol=0, atol=0)


@processor_parametrize
@file_case_parametrize
def test_processors_read_each_file_by_the_rule(processor_class, case, tmp_path):
    """Paths are loaded by the processors themselves, by loaders that used to clip or keep 16 bits."""
    processor = processor_class()
    path = save_case(case, tmp_path)
    expected = pixel_values(processor, Image.fromarray(case.expected))
    torch.testing.assert_close(pixel_values(processor, str(path)), expected, rtol=0, atol=0)


@processor_parametrize
def test_sixteen_bit_gradient_is_not_white(processor_class, tmp_path):
    """The reported defect: a 16-bit PNG gradient came out as a white image (from a PIL image, a path or base64)."""
    # From 256 up: every value clipped at 255 by PIL's convert("RGB"), so the old result was exactly white.
    gradient = np.tile(np.linspace(256, 65535, 256).round().astype(np.uint16), (200, 1))
    path = tmp_path / "gradient16.png"
    Image.fromarray(gradient).save(path)
    processor = processor_class(do_resize=False, do_center_crop=False, do_normalize=False)
    white = pixel_values(processor, Image.new("RGB", (256, 200), (255, 255, 255)))
    with Image.open(path) as image:
        from_image = pixel_values(processor, image)
    as_base64 = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for values in (from_image, pixel_values(processor, str(path)), pixel_values(processor, as_base64)):
        assert not torch.equal(values, white)
        # Unnormalised and unresized: the rule's own values, 0 .. 255 along the gradient.
        torch.testing.assert_close(values[0, :, 0] * 255, torch.from_numpy(gradient[0] >> 8).float().expand(3, -1))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("modes") / "model"
    torch.manual_seed(0)
    StellarModel(StellarConfig(**TINY_CONFIG)).eval().save_pretrained(folder)
    StellarImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_extract_features_reads_each_mode_by_the_rule(tiny_model_dir, tmp_path):
    """Features of each mode's file equal those of its expected RGB pixels; a 16-bit gradient's differ from white's."""
    script_path = REPO_ROOT / "examples" / "extract_features.py"
    spec = importlib.util.spec_from_file_location("extract_features_example", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    (tmp_path / "modes").mkdir()
    (tmp_path / "expected").mkdir()
    mode_paths, expected_paths = [], []
    for case in FILE_CASES:
        mode_paths.append(save_case(case, tmp_path / "modes"))
        expected_paths.append(tmp_path / "expected" / f"{len(expected_paths)}.png")
        Image.fromarray(case.expected).save(expected_paths[-1])
    white_path = tmp_path / "white.png"
    Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255)).save(white_path)
    paths = mode_paths + expected_paths + [white_path]
    output_dir = tmp_path / "features"
    arguments = ["--model", str(tiny_model_dir), "--images", *map(str, paths), "--output_dir", str(output_dir)]
    assert script.main(arguments + ["--device", "cpu", "--no_overlays", "--batch_size", "64"]) == 0

    with safe_open(output_dir / "features.safetensors", framework="pt") as saved:
        assert json.loads(saved.metadata()["images"]) == [str(path) for path in paths]
        pooled = saved.get_tensor("pooler_output")
        sparse_tokens = saved.get_tensor("sparse_tokens")
    count = len(FILE_CASES)
    for index, case in enumerate(FILE_CASES):
        torch.testing.assert_close(pooled[index], pooled[count + index], rtol=0, atol=1e-6, msg=case.name)
        torch.testing.assert_close(
            sparse_tokens[index], sparse_tokens[count + index], rtol=0, atol=1e-6, msg=case.name
        )
    gradient = [case.name for case in FILE_CASES].index("I;16 PNG")
    assert (pooled[gradient] - pooled[-1]).abs().max() > 1e-3


@pytest.mark.skipif(not UNWRITABLE_CASES, reason="this Pillow writes every file case in its own mode")
def test_file_cases_this_pillow_cannot_write():
    pytest.skip(
        f"Pillow {PIL.__version__} reopens {', '.join(UNWRITABLE_CASES)} files in another mode: their file cases "
        "are not run (the in-memory cases of those modes still are)"
    )
