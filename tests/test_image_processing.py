"""
Tests of `StellarImageProcessor` (torchvision backend) and `StellarImageProcessorPil` (PIL backend), named as
transformers 5.24 names its own: the original's evaluation transform (shorter side 256 bicubic, centre crop 224,
rescale, ImageNet normalisation), checked against a manual PIL + NumPy pipeline; mode conversion; the Auto round trip;
transformers' backend save/load checks (one `image_processor_type`, a folder saved by either backend loads in the
other); folders saved before the renaming (`tests/fixtures/old_processor_*`, where `StellarImageProcessor` was the PIL
class and `StellarImageProcessorFast` the torchvision one) loading with the same pixels; the deprecated alias; and an
install without torchvision.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor

import stellar_hf
from stellar_hf import StellarImageProcessor, StellarImageProcessorPil
from stellar_hf import image_processing_stellar

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
GREY_LEVEL = 1 / 255 / IMAGENET_STD.min()  # one 8-bit step, in normalised units
FAST_TOLERANCE = 3.01 * GREY_LEVEL

PROCESSORS = [StellarImageProcessorPil, StellarImageProcessor]
BACKENDS = {"pil": StellarImageProcessorPil, "torchvision": StellarImageProcessor}
processor_parametrize = pytest.mark.parametrize("processor_class", PROCESSORS, ids=["pil", "torchvision"])

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_INPUTS = FIXTURES / "old_processor_inputs"
OLD_FOLDERS = {"pil": FIXTURES / "old_processor_pil", "fast": FIXTURES / "old_processor_fast"}
OLD_IMAGE_PATHS = [OLD_INPUTS / "rgb.png", OLD_INPUTS / "grey16.png"]  # RGB, and 16-bit grey (read by `to_rgb_image`)
AUTO_MAP = {
    "torchvision": "image_processing_stellar.StellarImageProcessor",
    "pil": "image_processing_stellar.StellarImageProcessorPil",
}


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
    if processor_class is StellarImageProcessorPil:
        # PIL resampling: the same operations, up to float rounding.
        assert difference.max() < 1e-5, difference.max()
    else:
        # torchvision's bicubic on tensors rounds differently from PIL's: a few 8-bit levels at most, rarely.
        assert difference.max() <= FAST_TOLERANCE, difference.max()
        assert difference.mean() < 0.25 * GREY_LEVEL, difference.mean()


def test_pil_and_torchvision_agree():
    images = [smooth_image(seed=1), smooth_image(300, 500, seed=2)]
    torch.testing.assert_close(
        pixel_values(StellarImageProcessor(), images), pixel_values(StellarImageProcessorPil(), images),
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
    processor = processor_class(crop_size={"height": 64, "width": 64}, size={"shortest_edge": 72})
    processor.save_pretrained(tmp_path)
    backend = processor.backend
    assert BACKENDS[backend] is processor_class
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
    # No choice: transformers' default, torchvision (installed here).
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is StellarImageProcessor


# ---------------------------------------------------------------------------------------------- 5.24 naming

PROCESSOR_KWARGS = {
    "size": {"shortest_edge": 40},
    "crop_size": {"height": 32, "width": 32},
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
    "do_center_crop": True,
}


def assert_configs_match(first, second, names):
    """transformers' backend save/load check: keys one backend lacks are None, the common keys are equal."""
    dict_a, dict_b = first.to_dict(), second.to_dict()
    difference = {key: dict_a.get(key, dict_b.get(key)) for key in set(dict_a) ^ set(dict_b)}
    unexpected = {key: value for key, value in difference.items() if key not in ("default_to_square", "data_format")}
    assert all(value is None for value in unexpected.values()), (names, difference)
    common = set(dict_a) & set(dict_b)
    assert {key: dict_a[key] for key in common} == {key: dict_b[key] for key in common}, names


def test_backends_follow_the_transformers_naming():
    """transformers 5.24: `XImageProcessor` is the torchvision class, `XImageProcessorPil` the PIL one."""
    assert StellarImageProcessor.__name__ == "StellarImageProcessor"
    assert StellarImageProcessor().backend == "torchvision"
    assert StellarImageProcessorPil.__name__ == "StellarImageProcessorPil"
    assert StellarImageProcessorPil().backend == "pil"
    assert image_processing_stellar.IMAGE_PROCESSOR_CLASSES == BACKENDS
    assert {"StellarImageProcessor", "StellarImageProcessorPil"} <= set(stellar_hf.__all__)
    assert "StellarImageProcessorFast" not in stellar_hf.__all__ + image_processing_stellar.__all__


def test_registered_with_auto_image_processor_by_backend():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    assert IMAGE_PROCESSOR_MAPPING[stellar_hf.StellarConfig] == BACKENDS
    assert all(cls._auto_class == "AutoImageProcessor" for cls in PROCESSORS)


@processor_parametrize
def test_both_backends_save_one_image_processor_type(processor_class, tmp_path):
    processor = processor_class(**PROCESSOR_KWARGS)
    assert processor.to_dict()["image_processor_type"] == "StellarImageProcessor"
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "StellarImageProcessor"
    assert saved["auto_map"] == {"AutoImageProcessor": AUTO_MAP}
    assert (tmp_path / "image_processing_stellar.py").is_file()


@pytest.mark.parametrize("saved_by", sorted(BACKENDS))
@pytest.mark.parametrize("loaded_by", sorted(BACKENDS))
def test_save_with_one_backend_load_with_the_other(saved_by, loaded_by, tmp_path):
    """transformers' `test_save_load_backends` and `test_save_load_backends_auto`, and the pixels too."""
    first = BACKENDS[saved_by](**PROCESSOR_KWARGS)
    first.save_pretrained(tmp_path)
    by_class = BACKENDS[loaded_by].from_pretrained(tmp_path)
    by_auto = AutoImageProcessor.from_pretrained(tmp_path, backend=loaded_by)
    assert type(by_class) is type(by_auto) is BACKENDS[loaded_by]
    images = [smooth_image(seed=6), smooth_image(90, 70, seed=7).convert("L")]
    reference = pixel_values(BACKENDS[loaded_by](**PROCESSOR_KWARGS), images)
    for second in (by_class, by_auto):
        assert_configs_match(first, second, (saved_by, loaded_by))
        assert second.to_dict() == BACKENDS[loaded_by](**PROCESSOR_KWARGS, auto_map=first.auto_map).to_dict()
        # The loaded processor is the one built with the same arguments: the same pixels, bit for bit.
        torch.testing.assert_close(pixel_values(second, images), reference, rtol=0, atol=0)
    torch.testing.assert_close(pixel_values(by_auto, images), pixel_values(first, images), rtol=0, atol=FAST_TOLERANCE)
    # Saving what was loaded writes the same file.
    by_auto.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "preprocessor_config.json").read_text() == (
        tmp_path / "preprocessor_config.json"
    ).read_text()


# ---------------------------------------------------------------------------------------------- folders saved before


@pytest.fixture(scope="module")
def old_expected():
    """What the classes of before the renaming gave (`tests/fixtures/old_processor_inputs/make_fixture.py`)."""
    return load_file(str(OLD_INPUTS / "expected.safetensors"))


def old_pixel_values(processor) -> dict[str, torch.Tensor]:
    images = [Image.open(path) for path in OLD_IMAGE_PATHS]
    return {
        "images": pixel_values(processor, images),
        "paths": pixel_values(processor, [str(path) for path in OLD_IMAGE_PATHS]),
    }


def test_old_folders_are_what_the_old_code_saved():
    """The fixtures hold the old names: the regression is real."""
    for name, folder in OLD_FOLDERS.items():
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        old_type = {"pil": "StellarImageProcessor", "fast": "StellarImageProcessorFast"}[name]
        assert saved["image_processor_type"] == old_type
        assert saved["auto_map"]["AutoImageProcessor"] == [
            "image_processing_stellar.StellarImageProcessor",
            "image_processing_stellar.StellarImageProcessorFast",
        ]
        assert "class StellarImageProcessorFast(" in (folder / "image_processing_stellar.py").read_text()


# (load options, the backend they give). transformers 5.24: `backend`, else the deprecated `use_fast`, else
# torchvision when installed.
OLD_LOADS = [
    ({}, "torchvision"),
    ({"backend": "pil"}, "pil"),
    ({"backend": "torchvision"}, "torchvision"),
    ({"use_fast": False}, "pil"),
    ({"use_fast": True}, "torchvision"),
    ({"trust_remote_code": True}, "torchvision"),
    ({"trust_remote_code": True, "backend": "pil"}, "pil"),
    ({"trust_remote_code": True, "use_fast": False}, "pil"),
    ({"trust_remote_code": False, "backend": "torchvision"}, "torchvision"),
]


@pytest.mark.parametrize("folder", sorted(OLD_FOLDERS))
@pytest.mark.parametrize("options, backend", OLD_LOADS, ids=[json.dumps(options) for options, _ in OLD_LOADS])
def test_old_folder_loads_with_identical_pixels(folder, options, backend, old_expected):
    processor = AutoImageProcessor.from_pretrained(OLD_FOLDERS[folder], **options)
    # With stellar_hf imported its classes win over the folder's copied code, trust_remote_code or not.
    assert type(processor) is BACKENDS[backend]
    assert processor.crop_size == {"height": 16, "width": 16} and processor.size == {"shortest_edge": 20}
    assert list(processor.image_mean) == [0.48, 0.45, 0.4] and list(processor.image_std) == [0.27, 0.26, 0.28]
    outputs = old_pixel_values(processor)
    torch.testing.assert_close(outputs["images"], old_expected[backend], rtol=0, atol=0)
    torch.testing.assert_close(outputs["paths"], old_expected[f"{backend}.paths"], rtol=0, atol=0)


@pytest.mark.parametrize("folder", sorted(OLD_FOLDERS))
def test_old_folder_loads_with_each_class(folder, old_expected):
    for backend, processor_class in BACKENDS.items():
        outputs = old_pixel_values(processor_class.from_pretrained(OLD_FOLDERS[folder]))
        torch.testing.assert_close(outputs["images"], old_expected[backend], rtol=0, atol=0)


@pytest.mark.parametrize("folder", sorted(OLD_FOLDERS))
def test_old_folder_saved_again_takes_the_new_names(folder, tmp_path, old_expected):
    loaded = AutoImageProcessor.from_pretrained(OLD_FOLDERS[folder], backend="pil")
    loaded.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    old = json.loads((OLD_FOLDERS[folder] / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "StellarImageProcessor"
    assert saved["auto_map"] == {"AutoImageProcessor": AUTO_MAP}
    assert {k: v for k, v in saved.items() if k not in ("auto_map", "image_processor_type")} == {
        k: v for k, v in old.items() if k not in ("auto_map", "image_processor_type")
    }
    for backend in BACKENDS:
        again = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        torch.testing.assert_close(old_pixel_values(again)["images"], old_expected[backend], rtol=0, atol=0)


OLD_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    fixtures = Path(sys.argv[1])
    inputs = fixtures / "old_processor_inputs"
    expected = load_file(str(inputs / "expected.safetensors"))
    paths = [inputs / "rgb.png", inputs / "grey16.png"]
    report = []
    for folder in ("old_processor_pil", "old_processor_fast"):
        for options in ({}, {"backend": "pil"}, {"backend": "torchvision"}, {"use_fast": False}, {"use_fast": True}):
            processor = AutoImageProcessor.from_pretrained(fixtures / folder, trust_remote_code=True, **options)
            backend = "torchvision" if type(processor).__name__.endswith("Fast") else "pil"
            images = processor([Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
            from_paths = processor([str(path) for path in paths], return_tensors="pt")["pixel_values"]
            equal = (images == expected[backend]).all() and (from_paths == expected[backend + ".paths"]).all()
            report.append({
                "folder": folder, "options": options, "class": type(processor).__name__,
                "module": type(processor).__module__, "equal": bool(equal),
            })
    report.append(sorted(name for name in sys.modules if name.split(".")[0] == "stellar_hf"))
    print(json.dumps(report))
    """
)


def test_old_folders_load_as_remote_code_in_a_fresh_process(tmp_path):
    """Without stellar_hf, `trust_remote_code=True` runs the code saved in the folder: the old classes, old pixels."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", OLD_REMOTE_SCRIPT, str(FIXTURES)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    *loads, imported = json.loads(completed.stdout.strip().splitlines()[-1])
    assert imported == []
    expected_class = {"pil": "StellarImageProcessor", "torchvision": "StellarImageProcessorFast"}  # the old names
    for load in loads:
        options = load["options"]
        backend = options.get("backend") or ("pil" if options.get("use_fast") is False else "torchvision")
        assert load["class"] == expected_class[backend], load
        assert load["module"].startswith("transformers_modules."), load
        assert load["equal"], load


# ---------------------------------------------------------------------------------------------- old names


def test_old_torchvision_name_is_a_deprecated_alias():
    for module in (stellar_hf, image_processing_stellar):
        with pytest.warns(FutureWarning, match="StellarImageProcessorFast. is deprecated") as caught:
            alias = module.StellarImageProcessorFast
        assert alias is StellarImageProcessor
        assert caught[0].filename == __file__  # the warning names the line that used the old name
    with pytest.warns(FutureWarning):
        from stellar_hf import StellarImageProcessorFast
    assert StellarImageProcessorFast().backend == "torchvision"
    with pytest.raises(AttributeError):
        stellar_hf.StellarImageProcessorSlow  # noqa: B018


def test_new_names_import_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from stellar_hf import StellarImageProcessor as new_torchvision
        from stellar_hf import StellarImageProcessorPil as new_pil
        from stellar_hf.image_processing_stellar import StellarImageProcessor as module_torchvision

    assert new_torchvision is module_torchvision is StellarImageProcessor and new_pil is StellarImageProcessorPil


# ---------------------------------------------------------------------------------------------- without torchvision

NO_TORCHVISION_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path

    sys.modules["torchvision"] = None  # as if torchvision were not installed
    from transformers.utils import is_torchvision_available
    assert not is_torchvision_available()

    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    messages = []
    class Collect(logging.logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logging.get_logger("transformers").addHandler(Collect())  # transformers' own loggers do not propagate
    logging.logging.getLogger().addHandler(Collect())  # stellar_hf's do

    import stellar_hf
    from stellar_hf import StellarImageProcessor, StellarImageProcessorPil
    from stellar_hf.image_processing_stellar import IMAGE_PROCESSOR_CLASSES

    fixtures = Path(sys.argv[1])
    inputs = fixtures / "old_processor_inputs"
    expected = load_file(str(inputs / "expected.safetensors"))
    images = [Image.open(inputs / "rgb.png"), Image.open(inputs / "grey16.png")]
    report = {
        "fallback": StellarImageProcessor is StellarImageProcessorPil,
        "fallback_logged": any("falling back to `StellarImageProcessorPil`" in m for m in messages),
        "loads": [],
    }
    try:
        IMAGE_PROCESSOR_CLASSES["torchvision"]()
        report["torchvision_class"] = "built"
    except ImportError as error:
        report["torchvision_class"] = "ImportError: " + str(error)[:200]
    # What the converter and examples/pretrain.py do: `StellarImageProcessor.from_model_config(config).save_pretrained`
    saved = Path(tempfile.mkdtemp()) / "saved"
    StellarImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16},
                          image_mean=[0.48, 0.45, 0.4], image_std=[0.27, 0.26, 0.28]).save_pretrained(saved)
    report["saved"] = json.loads((saved / "preprocessor_config.json").read_text())
    folders = [fixtures / "old_processor_pil", fixtures / "old_processor_fast", saved]
    for folder in folders:
        for options in ({}, {"backend": "pil"}, {"backend": "torchvision"}, {"use_fast": True}):
            processor = AutoImageProcessor.from_pretrained(folder, **options)
            values = processor(images, return_tensors="pt")["pixel_values"]
            report["loads"].append({
                "folder": folder.name, "options": options, "class": type(processor).__name__,
                "equal": bool((values == expected["pil"]).all()),
            })
    print(json.dumps(report))
    """
)


def test_without_torchvision_the_pil_backend_stands_in(tmp_path):
    """As transformers does for its own names: `StellarImageProcessor` falls back to the PIL class, and
    `AutoImageProcessor` gives the PIL class whatever backend is asked for, with the same pixels as before."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(
        [sys.executable, "-c", NO_TORCHVISION_SCRIPT, str(FIXTURES)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["fallback"] and report["fallback_logged"], report
    assert report["torchvision_class"].startswith("ImportError: "), report["torchvision_class"]
    assert "Torchvision library" in report["torchvision_class"]
    assert report["saved"]["image_processor_type"] == "StellarImageProcessor"
    assert report["saved"]["auto_map"] == {"AutoImageProcessor": AUTO_MAP}
    assert len(report["loads"]) == 12
    for load in report["loads"]:
        assert load["class"] == "StellarImageProcessorPil" and load["equal"], load
