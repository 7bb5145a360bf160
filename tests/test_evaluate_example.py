"""`examples/evaluate.py` end to end on a tiny random STELLAR model: every subcommand, every data source, bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from stellar_tester import TINY_CONFIG

from stellar_hf import StellarConfig, StellarModel
from stellar_hf.modeling_stellar import StellarForPreTraining

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "evaluate.py"
TINY = TINY_CONFIG
CLASS_COLOURS = {"apple": (220, 30, 30), "grass": (30, 200, 40), "sky": (40, 60, 230)}


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_example = load_script()


@pytest.fixture(autouse=True)
def one_thread():
    """These workloads are tiny: one intra-op thread avoids OpenMP spin-waits on a busy machine (seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny StellarForPreTraining, labelled train / eval image folders, and the same as a saved dataset."""
    import datasets

    root = tmp_path_factory.mktemp("evaluate_example")
    torch.manual_seed(0)
    StellarForPreTraining(StellarConfig(**TINY)).save_pretrained(root / "model")
    StellarModel(StellarConfig(**TINY)).save_pretrained(root / "encoder_only")
    generator = torch.Generator().manual_seed(0)
    rows = {"train": [], "validation": []}
    for split, count in (("train", 6), ("eval", 3)):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                noise = torch.randint(-40, 40, (40, 48, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                image = Image.fromarray(pixels)  # not square, not the model's size: preprocessing must cope
                image.save(folder / f"{index}.png")
                rows["train" if split == "train" else "validation"].append({"image": image, "label": name})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=sorted(CLASS_COLOURS))})
    datasets.DatasetDict(
        {split: datasets.Dataset.from_list(items, features=features) for split, items in rows.items()}
    ).save_to_disk(str(root / "dataset"))
    return root


def run(*arguments: str, workspace: Path, check: bool = True, env_extra: dict | None = None):
    """The script in a fresh process, as a user runs it. Returns (completed process, parsed final JSON line)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TORCH_HOME": str(workspace / "empty_torch_home"),  # no cached LPIPS / Inception weights
        **(env_extra or {}),
    }
    command = [sys.executable, str(SCRIPT), *arguments, "--no_progress"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=workspace, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"evaluate.py failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    lines = result.stdout.strip().splitlines()
    return result, (json.loads(lines[-1]) if lines and result.returncode == 0 else None)


def test_knn_on_image_folders(workspace):
    output = workspace / "out" / "knn.json"
    result, metrics = run(
        "knn", "--model", str(workspace / "model"), "--train_dir", str(workspace / "train"),
        "--eval_dir", str(workspace / "eval"), "--k", "5", "--batch_size", "7", "--output_json", str(output),
        workspace=workspace,
    )  # fmt: skip
    assert metrics["task"] == "knn" and metrics["k"] == 5 and metrics["feature"] == "pooled"
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["num_classes"] == 3 and metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["num_train_images"] == 18 and metrics["num_eval_images"] == 9
    assert metrics["preprocessing"] == "EvalTransform" and metrics["data"]["source"] == "image_folders"
    assert json.loads(output.read_text()) == metrics
    # Exactly one JSON line on stdout, the last one.
    assert sum(line.startswith("{") for line in result.stdout.splitlines()) == 1


def test_reconstruction_with_decoder_probe_on_synthetic_scenes(workspace, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    # SqueezeNet: the smallest LPIPS backbone, so the subprocess starts fast (AlexNet is covered in process).
    torch.save(torchvision.models.squeezenet1_1().state_dict(), tmp_path / "squeezenet.pth")
    output = tmp_path / "reconstruction.json"
    _, metrics = run(
        "reconstruction", "--model", str(workspace / "model"), "--synthetic", "--num_images", "6",
        "--batch_size", "3", "--train_decoder_steps", "2", "--lpips_net", "squeeze", "--lpips_weights", str(tmp_path / "squeezenet.pth"),
        "--output_json", str(output), workspace=workspace,
    )  # fmt: skip
    assert metrics["task"] == "reconstruction" and metrics["decoder"] == "probe" and metrics["decoder_steps"] == 2
    assert metrics["num_images"] == 6 and metrics["num_train_images"] == 6
    assert 0.0 < metrics["psnr"] < 60.0 and -1.0 <= metrics["ssim"] <= 1.0 and metrics["lpips"] >= 0.0
    assert "rfid" not in metrics and "rfid" in metrics["skipped"] and "lpips" not in metrics["skipped"]
    assert metrics["decoder_final_loss"] > 0.0
    assert json.loads(output.read_text()) == metrics


def last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_linear_probe_on_a_saved_dataset(workspace, capsys):
    """In process (the subprocess tests cover the script's start-up); a `save_to_disk` folder as --dataset_name."""
    arguments = ["linear-probe", "--model", str(workspace / "model"), "--dataset_name", str(workspace / "dataset")]
    assert evaluate_example.main([*arguments, "--feature", "cls", "--epochs", "3", "--num_images", "12", "--no_progress"]) == 0  # fmt: skip
    metrics = last_json_line(capsys)
    assert metrics["task"] == "linear-probe" and metrics["feature"] == "cls" and metrics["epochs"] == 3
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["num_train_images"] == 12 and metrics["num_eval_images"] == 9 and metrics["num_classes"] == 3
    assert metrics["data"] == {"source": str(workspace / "dataset"), "config": None, "train_split": "train", "eval_split": "validation"}  # fmt: skip


def test_reconstruction_and_object_discovery_in_process(workspace, capsys, monkeypatch):
    """The model's own decoder (keys of a StellarForPreTraining folder); missing weights reported as skipped."""
    monkeypatch.setenv("TORCH_HOME", str(workspace / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert evaluate_example.main(["reconstruction", "--model", str(workspace / "model"), "--num_images", "4", "--no_progress", "--no_rfid"]) == 0  # fmt: skip
    metrics = last_json_line(capsys)
    assert metrics["decoder"] == "model" and metrics["data"]["source"] == "synthetic"
    assert set(metrics["skipped"]) == {"lpips", "rfid"} and metrics["skipped"]["rfid"] == "not requested"
    assert {"psnr", "ssim", "num_images"} <= set(metrics) and "lpips" not in metrics

    assert evaluate_example.main(["object-discovery", "--model", str(workspace / "model"), "--num_images", "6", "--batch_size", "4", "--no_progress"]) == 0  # fmt: skip
    metrics = last_json_line(capsys)
    assert metrics["task"] == "object-discovery" and metrics["num_images"] == 6 and metrics["grid_blocks"] == "2x2"
    for key in ("fg_ari", "grid_fg_ari"):
        assert -1.0 <= metrics[key] <= 1.0
    for key in ("mbo", "grid_mbo"):
        assert 0.0 <= metrics[key] <= 1.0


def error_of(capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_example.main([*arguments, "--no_progress"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_give_clear_errors(workspace, tmp_path, capsys):
    model = str(workspace / "model")
    message = error_of(capsys, "knn", "--model", model, "--train_dir", str(workspace / "train"))
    assert "--train_dir needs --eval_dir" in message

    message = error_of(capsys, "linear-probe", "--model", model, "--eval_dir", str(workspace / "eval"))
    assert "give --train_dir as well" in message

    message = error_of(
        capsys, "knn", "--model", model, "--train_dir", str(workspace / "train"), "--eval_dir", str(tmp_path / "nope")
    )
    assert "does not exist" in message

    mismatched = tmp_path / "mismatched"
    for name in ("apple", "pear"):
        (mismatched / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(mismatched / name / "0.png")
    message = error_of(
        capsys, "knn", "--model", model, "--train_dir", str(workspace / "train"), "--eval_dir", str(mismatched)
    )
    assert "same class subfolders" in message and "pear" in message and "grass" in message

    message = error_of(capsys, "object-discovery", "--model", model, "--eval_dir", str(workspace / "eval"))
    assert "object masks" in message and "synthetic" in message
    message = error_of(capsys, "object-discovery", "--model", model, "--dataset_name", str(workspace / "dataset"))
    assert "object masks" in message

    message = error_of(capsys, "knn", "--model", model, "--synthetic", "--dataset_name", str(workspace / "dataset"))
    assert "choose one data source" in message

    message = error_of(
        capsys, "knn", "--model", model, "--dataset_name", str(workspace / "dataset"), "--label_column_name", "kind"
    )
    assert "no label column 'kind'" in message

    message = error_of(capsys, "reconstruction", "--model", str(workspace / "encoder_only"), "--num_images", "2")
    assert "no trained decoder" in message and "--train_decoder_steps" in message

    message = error_of(capsys, "knn", "--model", str(tmp_path / "no_model"), "--num_images", "2")
    assert "cannot load a STELLAR configuration" in message

    with pytest.raises(SystemExit):
        evaluate_example.parse_args(["knn"])  # --model is required
    assert "--model" in capsys.readouterr().err
