"""End-to-end tests of examples/extract_features.py on a tiny saved STELLAR model and real images."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from stellar_tester import TINY_CONFIG
from transformers import AutoImageProcessor

from stellar_hf import StellarConfig, StellarImageProcessor, StellarModel
from stellar_hf.image_processing_stellar import unnormalize_images
from stellar_hf.visualization import spatial_map_overlays

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "extract_features.py"



def sample_images() -> dict[str, np.ndarray]:
    """Real photographs when scikit-image is installed, otherwise drawn ones; a non-square one and a grey one."""
    try:
        from skimage import data

        photos = {"astronaut.png": data.astronaut(), "coffee.jpg": data.coffee()}  # 512 x 512, 400 x 600
    except ImportError:
        y, x = np.mgrid[0:120, 0:90]
        photos = {
            "astronaut.png": np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8),
            "coffee.jpg": np.stack([(x * y) % 256, 255 - y * 2, x], -1).astype(np.uint8)[:, :80],
        }
    photos["gray.png"] = np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (70, 1))  # mode "L", 70 x 50
    return photos


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    model = StellarModel(StellarConfig(**TINY_CONFIG)).eval()
    model.save_pretrained(root / "model")
    StellarImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "model"
    )
    paths = []
    for name, array in sample_images().items():
        path = root / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return root, paths


def load_script():
    """The example as a module, so its `main(argv)` runs in this process (no second interpreter start-up)."""
    spec = importlib.util.spec_from_file_location("extract_features_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_outputs(model_dir: Path, paths: list[Path]):
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pictures = [Image.open(path).convert("RGB") for path in paths]
    pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"]
    model = StellarModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return processor, pixel_values, model(pixel_values=pixel_values)


def test_end_to_end_subprocess(workspace):
    root, paths = workspace
    output_dir = root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(SCRIPT), "--model", str(root / "model"), "--images", *map(str, paths)]
    command += ["--output_dir", str(output_dir), "--batch_size", "2", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote features of 3 images" in result.stdout

    processor, pixel_values, outputs = expected_outputs(root / "model", paths)
    with safe_open(output_dir / "features.safetensors", framework="pt") as saved:
        assert set(saved.keys()) == {"sparse_tokens", "spatial_map", "pooler_output"}
        assert json.loads(saved.metadata()["images"]) == [str(path) for path in paths]
        tensors = {key: saved.get_tensor(key) for key in saved.keys()}
    assert tensors["sparse_tokens"].shape == (3, 4, 32)
    assert tensors["spatial_map"].shape == (3, 16, 4)
    assert tensors["pooler_output"].shape == (3, 32)
    for key, value in tensors.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, getattr(outputs, key), atol=1e-5, rtol=0)

    index = json.loads((output_dir / "features.json").read_text())
    assert index["grid_size"] == [4, 4] and index["image_size"] == [32, 32]
    assert [entry["file_name"] for entry in index["images"]] == [path.name for path in paths]
    overlays = sorted(output_dir.glob("*.png"))
    assert [path.name for path in overlays] == ["astronaut.png", "coffee.png", "gray.png"]
    assert [entry["overlay"] for entry in index["images"]] == ["astronaut.png", "coffee.png", "gray.png"]

    images = unnormalize_images(pixel_values, processor.image_mean, processor.image_std).clamp(0, 1)
    for i, path in enumerate(paths):
        with Image.open(output_dir / f"{path.stem}.png") as png:
            expected = spatial_map_overlays(images[i], outputs.spatial_map[i], (4, 4))
            assert png.size == expected.size
            assert png.width == 6 * 32 + 7 * 2  # image, argmax and 4 tokens, 32 px each, 2 px padding
            # the overlay is drawn from the very features saved: identical up to rounding of the pixel values
            difference = np.abs(np.asarray(png, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
            assert difference.max() <= 2


def test_unreadable_inputs_fail_before_anything_is_written(workspace, capsys):
    root, paths = workspace
    output_dir = root / "existing"
    output_dir.mkdir()
    (output_dir / "features.safetensors").write_bytes(b"old features")
    (output_dir / "features.json").write_text("old index")
    (output_dir / "astronaut.png").write_bytes(b"old overlay")
    broken = root / "images" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = root / "images" / "missing.png"
    script = load_script()
    for bad in (missing, broken):
        with pytest.raises(SystemExit) as error:
            script.main(
                ["--model", str(root / "model"), "--images", str(paths[0]), str(bad), "--output_dir", str(output_dir)]
            )
        assert error.value.code == 2
        message = capsys.readouterr().err
        assert str(bad) in message and str(paths[0]) not in message
    assert (output_dir / "features.safetensors").read_bytes() == b"old features"
    assert (output_dir / "features.json").read_text() == "old index"
    assert (output_dir / "astronaut.png").read_bytes() == b"old overlay"
    assert sorted(p.name for p in output_dir.iterdir()) == ["astronaut.png", "features.json", "features.safetensors"]


FALLBACK_DRIVER = """
import importlib.util, sys
sys.modules["stellar_hf"] = None  # as if stellar_hf were not installed, even where it is
spec = importlib.util.spec_from_file_location("extract_features_example", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
assert script.stellar_hf is None
assert script.spatial_map_overlays.__module__ == "stellar_visualization"
try:
    script.main(sys.argv[2:] + ["--no_overlays"])
    print("NO REFUSAL")
except SystemExit as error:
    print("REFUSED:", error.code)
sys.exit(script.main(sys.argv[2:] + ["--trust_remote_code", "--dtype", "bfloat16", "--overlay_columns", "3"]))
"""


def test_remote_code_fallback_without_stellar_hf(workspace, tmp_path):
    """Without stellar_hf the script refuses without --trust_remote_code, then runs on the code saved with the model."""
    root, paths = workspace
    copy = tmp_path / "again.jpg"
    copy.write_bytes(paths[1].read_bytes())
    output_dir = tmp_path / "out"
    arguments = ["--model", str(root / "model"), "--images", str(paths[1]), str(copy), "--output_dir", str(output_dir)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_DRIVER, str(SCRIPT), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "REFUSED: could not load" in result.stdout and "--trust_remote_code" in result.stdout
    with safe_open(output_dir / "features.safetensors", framework="pt") as saved:
        spatial_map = saved.get_tensor("spatial_map")
    assert spatial_map.shape == (2, 16, 4) and spatial_map.dtype == torch.float32
    torch.testing.assert_close(spatial_map.sum(-1), torch.ones(2, 16), atol=2e-2, rtol=0)
    torch.testing.assert_close(spatial_map[0], spatial_map[1])
    assert sorted(p.name for p in output_dir.glob("*.png")) == ["again.png", "coffee.png"]
    with Image.open(output_dir / "coffee.png") as png:
        assert png.width == 3 * 32 + 4 * 2  # 6 tiles, 3 per row


def test_overlay_names_deduplicate_stems():
    script = load_script()
    names = script.overlay_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg")])
    assert names == ["x_0.png", "x_1.png", "y.png"]


def test_resolve_device():
    from stellar_hf.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps", "xpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
