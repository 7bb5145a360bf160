"""`benchmarks/compare_mae.py` end to end on tiny models: both default datasets, a labelled folder, the JSON layout."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "compare_mae.py"
TINY_OVERRIDES = ",".join(
    [
        "hidden_size=32",
        "num_hidden_layers=1",
        "num_attention_heads=2",
        "intermediate_size=64",
        "patch_size=8",
        "num_sparse_tokens=4",
        "decoder_hidden_size=16",
        "decoder_num_hidden_layers=1",
        "decoder_num_attention_heads=2",
        "decoder_intermediate_size=32",
        "num_prototypes=32",
        "prototype_dim=8",
        "predictor_hidden_size=32",
    ]
)
PROBES = {"knn", "linear_probe", "random_init_knn", "random_init_linear_probe"}
MODEL_KEYS = {
    "stellar": PROBES | {"psnr", "ssim"},
    "mae": PROBES | {"psnr", "psnr_all_visible", "ssim_all_visible"},
    "pixels": {"knn"},
}


def run_compare(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    output_json = tmp_path / "results.json"
    command = [
        sys.executable, str(SCRIPT),
        "--image_size", "16",
        "--config_overrides", TINY_OVERRIDES,
        "--steps", "3",
        "--batch_size", "8",
        "--seed", "1",
        "--device", "cpu",
        "--no_progress",
        "--output_json", str(output_json),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, f"compare_mae.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(output_json.read_text()) == printed
    return printed, result.stdout


def check_block(block: dict, num_classes: int) -> None:
    for model, keys in MODEL_KEYS.items():
        assert set(block[model]) == keys, (model, block[model])
        for key in PROBES & set(block[model]):
            assert 0.0 <= block[model][key] <= 1.0
        for key, value in block[model].items():
            if key.startswith("psnr"):
                assert 0.0 < value < 100.0  # dB on the [0, 1] scale: finite, positive
            if key.startswith("ssim"):
                assert -1.0 <= value <= 1.0
    assert block["num_classes"] == num_classes
    assert block["chance"] == pytest.approx(1.0 / num_classes)
    assert block["num_train"] > 0 and block["num_eval"] > 0


def test_default_datasets(tmp_path):
    results, stdout = run_compare(
        tmp_path, "--num_synthetic_images", "32", "--num_synthetic_eval_images", "16", "--num_digits_images", "60"
    )
    assert list(results) == ["synthetic-color", "synthetic-shape", "digits", "settings"]
    check_block(results["synthetic-color"], 8)
    check_block(results["synthetic-shape"], 6)
    check_block(results["digits"], 10)
    # The reconstruction numbers belong to the dataset, so both synthetic tasks carry the same ones.
    assert results["synthetic-color"]["stellar"]["psnr"] == results["synthetic-shape"]["stellar"]["psnr"]
    assert results["synthetic-color"]["mae"]["psnr"] == results["synthetic-shape"]["mae"]["psnr"]
    # The first 60 digits, every third image of each class held out.
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target[:60], minlength=10)
    assert results["digits"]["num_train"] + results["digits"]["num_eval"] == 60
    assert results["digits"]["num_eval"] == int((counts // 3).sum())

    settings = results["settings"]
    assert settings["steps"] == 3 and settings["batch_size"] == 8 and settings["seed"] == 1
    assert settings["encoder"] == {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "patch_size": 8, "image_size": 16,
    }  # fmt: skip
    assert settings["mae"]["norm_pix_loss"] is False
    assert settings["optimizer"]["learning_rate"] == pytest.approx(
        settings["optimizer"]["base_learning_rate"] * 8 / 256
    )
    for name in ("synthetic", "digits"):
        trained = settings["datasets"][name]
        assert trained["stellar_seconds"] >= 0 and trained["mae_seconds"] >= 0
        assert all(trained[f"{model}_final_loss"] > 0 for model in ("stellar", "mae"))
    assert "| synthetic-color | STELLAR" in stdout and "| digits | MAE" in stdout


def test_labelled_folders(tmp_path):
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
    for split, count in (("train", 8), ("val", 4)):
        for name, colour in colours.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                shade = tuple(min(255, channel + 5 * index) for channel in colour)
                Image.new("RGB", (20, 20), shade).save(folder / f"{index}.png")
    results, _ = run_compare(
        tmp_path, "--train_dir", str(tmp_path / "train"), "--eval_dir", str(tmp_path / "val"), "--steps", "2"
    )
    assert list(results) == ["folder", "settings"]
    check_block(results["folder"], 3)
    assert (results["folder"]["num_train"], results["folder"]["num_eval"]) == (24, 12)
    assert list(results["settings"]["datasets"]) == ["folder"]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train_dir", "somewhere"], "--train_dir and --eval_dir go together"),
        (["--datasets", "synthetic,imagenet"], "unknown ['imagenet']"),
        (["--num_digits_images", "12"], "--num_digits_images must be at least 30"),
        (["--mae_mask_ratio", "1.0"], "--mae_mask_ratio must be in (0, 1)"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        load_script().parse_args(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err
