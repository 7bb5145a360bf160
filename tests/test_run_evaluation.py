"""`examples/run_evaluation.py` end to end on a tiny random STELLAR model: every subcommand, every data source, bad input."""

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
SCRIPT = REPO_ROOT / "examples" / "run_evaluation.py"
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
            f"run_evaluation.py failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
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
    # The figure says what it measures: the label, its classes, chance, and the references it is read against.
    assert metrics["label"] == "class" and metrics["label_description"] == "class (subfolder)"
    assert metrics["num_classes"] == 3 and metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["majority_class"] == pytest.approx(1 / 3)  # 3 eval images per class
    assert 0.0 <= metrics["top1"] <= 1.0 and 0.0 <= metrics["random_init_top1"] <= 1.0
    # Three classes are always all in the top 5: no top-5 figure, and why.
    assert metrics["top5"] is None and metrics["random_init_top5"] is None and "3 classes" in metrics["top5_note"]
    assert metrics["num_train_images"] == 18 and metrics["num_eval_images"] == 9
    # No processor saved with the model: the model config's StellarImageProcessor (shorter side 36 = 32 * 256 / 224).
    assert metrics["preprocessing"] == "StellarImageProcessor (shorter side 36, centre crop 32)"
    assert metrics["data"]["source"] == "image_folders"
    assert json.loads(output.read_text()) == metrics
    # Exactly one JSON line on stdout, the last one; the readable line, on stderr, names the label next to chance.
    assert sum(line.startswith("{") for line in result.stdout.splitlines()) == 1
    summary = next(line for line in result.stderr.splitlines() if line.startswith("knn top-1"))
    assert f"knn top-1 {metrics['top1']:.3f} on label class (class (subfolder); 3 classes): chance 0.333" in summary
    assert f"random-init encoder {metrics['random_init_top1']:.3f}" in summary and "18 train / 9 eval" in summary


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
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["top5"] is None
    assert metrics["num_train_images"] == 12 and metrics["num_eval_images"] == 9 and metrics["num_classes"] == 3
    assert metrics["label"] == "label" and "'label' column" in metrics["label_description"]
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


# ----------------------------------------------------------------------------------------------------------------------
# On the synthetic scenes the probes are the Quick start's: the same label, images, preprocessing and settings
# ----------------------------------------------------------------------------------------------------------------------

PRETRAIN_SCRIPT = REPO_ROOT / "examples" / "pretrain.py"
TINY_OVERRIDES = ",".join(f"{key}={value}" for key, value in TINY.items())


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_example_for_evaluate", PRETRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_defaults_are_the_quick_start_probe_recipe(workspace):
    """run_evaluation.py's default synthetic splits are pretrain.py's final-probe splits, image for image, label for label."""
    import inspect

    from stellar_hf.evaluation import knn_accuracy, linear_probe

    pretrain = load_pretrain_script()
    pretrain_args = pretrain.parse_args([])  # the Quick start: no arguments
    tasks = pretrain.probe_labels(pretrain_args)
    config = StellarConfig(**TINY)
    quick_loaders = dict(zip(("train", "eval"), pretrain.probe_loaders(pretrain_args, config, tasks)))

    model = str(workspace / "model")
    preprocess = evaluate_example.Preprocess(None, config, synthetic=True)
    args = evaluate_example.parse_args(["knn", "--model", model, "--label", "all"])
    loaders, labels, sizes = evaluate_example.build_loaders(args, config, preprocess, ["train", "eval"], True, False)
    assert [label.name for label in labels] == list(tasks) == ["dominant_color", "dominant_shape"]
    assert sizes == {split: len(loader.dataset) for split, loader in quick_loaders.items()}
    assert sizes == {"train": 2048, "eval": 1024}
    assert args.batch_size == quick_loaders["train"].batch_size == 128  # same batches and images
    from stellar_hf.evaluation import probe_processor

    processor = probe_processor(config)
    for split in ("train", "eval"):
        ours, theirs = next(iter(loaders[split])), next(iter(quick_loaders[split]))
        images = [loaders[split].dataset[index]["image"] for index in range(ours["pixel_values"].shape[0])]
        assert torch.equal(ours["pixel_values"], processor(images, return_tensors="pt")["pixel_values"]), split
        # The Quick start's probes see the same pixels (up to the rounding of the normalisation).
        assert torch.allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-4), split
        assert torch.equal(ours["labels"], theirs["labels"]), split

    # Without --label: colour alone, the Quick start's headline figure.
    args = evaluate_example.parse_args(["linear-probe", "--model", model])
    _, labels, _ = evaluate_example.build_loaders(args, config, preprocess, ["train", "eval"], True, False)
    assert [label.name for label in labels] == ["dominant_color"] and labels[0].num_classes == 8
    # The protocol settings are the ones pretrain.py uses (the library defaults, 30 probe epochs).
    knn_defaults = inspect.signature(knn_accuracy).parameters
    knn_args = evaluate_example.parse_args(["knn", "--model", model])
    assert (knn_args.k, knn_args.temperature, knn_args.feature, knn_args.seed) == (
        knn_defaults["k"].default, knn_defaults["temperature"].default, "pooled", 0,
    )  # fmt: skip
    probe_defaults = inspect.signature(linear_probe).parameters
    assert (args.epochs, args.learning_rate, args.weight_decay, args.probe_batch_size, args.seed) == (
        30, probe_defaults["learning_rate"].default, probe_defaults["weight_decay"].default,
        probe_defaults["batch_size"].default, probe_defaults["seed"].default,
    )  # fmt: skip


def test_the_readme_command_prints_the_figure_the_quick_start_printed(tmp_path, capsys):
    """
    A short pretraining run (tiny model, the Quick start's probe split sizes), then the README's evaluation command:
    the same figure, exactly, for the same label; and every other figure of results.json with --label all.
    """
    run_dir = tmp_path / "stellar-pretrain"
    command = [
        sys.executable, str(PRETRAIN_SCRIPT), "--output_dir", str(run_dir), "--config_overrides", TINY_OVERRIDES,
        "--num_synthetic_images", "2048", "--per_device_train_batch_size", "8", "--max_train_steps", "6",
        "--warmup_ratio", "0", "--base_learning_rate", "0.05", "--report_to", "none",
    ]  # fmt: skip
    launcher = ("ACCELERATE_USE_CPU", "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in launcher}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    trained = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    quick = json.loads((run_dir / "results.json").read_text())["probes"]
    assert quick["num_probe_images"] == {"train": 2048, "eval": 1024}

    # The README command, as typed: the Quick start's colour kNN figure, with its label, chance and reference.
    result, metrics = run("knn", "--model", str(run_dir), workspace=tmp_path)
    color = quick["dominant_color"]
    assert metrics["label"] == "dominant_color" and metrics["num_classes"] == 8
    assert metrics["top1"] == color["knn_top1"] and metrics["random_init_top1"] == color["random_init_knn_top1"]
    assert metrics["chance"] == color["chance"] == 1 / 8
    assert (metrics["num_train_images"], metrics["num_eval_images"]) == (2048, 1024)
    assert f"knn top-1 {color['knn_top1']:.3f} on label dominant_color" in result.stderr

    # Both labels, both protocols.
    for subcommand, key in (("knn", "knn_top1"), ("linear-probe", "linear_probe_top1")):
        assert evaluate_example.main([subcommand, "--model", str(run_dir), "--label", "all", "--no_progress"]) == 0
        metrics = last_json_line(capsys)
        assert metrics["label"] == "all" and "top1" not in metrics  # no figure without its label
        for name in ("dominant_color", "dominant_shape"):
            entry = metrics["labels"][name]
            assert entry["label"] == name and entry["chance"] == quick[name]["chance"]
            assert entry["top1"] == quick[name][key], (subcommand, name)
            assert entry["random_init_top1"] == quick[name][f"random_init_{key}"], (subcommand, name)
    # The trained encoder is the one evaluated: some figure differs from the random-init one.
    assert any(
        quick[name][key] != quick[name][f"random_init_{key}"]
        for name in ("dominant_color", "dominant_shape")
        for key in ("knn_top1", "linear_probe_top1")
    )


def test_label_and_random_init_options(workspace, capsys, monkeypatch):
    model = str(workspace / "model")
    folders = ["--train_dir", str(workspace / "train"), "--eval_dir", str(workspace / "eval")]
    message = error_of(capsys, "knn", "--model", model, *folders, "--label", "dominant_shape")
    assert "--label dominant_shape" in message and "class subfolder" in message
    message = error_of(capsys, "linear-probe", "--model", model, "--dataset_name", str(workspace / "dataset"), "--label", "all")  # fmt: skip
    assert "--label_column_name" in message

    assert evaluate_example.main(["knn", "--model", model, *folders, "--random_init", "no", "--no_progress"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["random_init_top1"] is None and "not requested" in metrics["random_init_skipped"]
    assert "random-init encoder not run (not requested" in captured.err

    monkeypatch.setattr(evaluate_example, "RANDOM_INIT_AUTO_LIMIT", 20)  # 18 + 9 images exceed it
    assert evaluate_example.main(["knn", "--model", model, *folders, "--no_progress"]) == 0
    metrics = last_json_line(capsys)
    assert metrics["random_init_top1"] is None and "--random_init yes" in metrics["random_init_skipped"]
    assert evaluate_example.main(["knn", "--model", model, *folders, "--random_init", "yes", "--no_progress"]) == 0
    assert last_json_line(capsys)["random_init_top1"] is not None

    # Per-split sizes on the synthetic scenes.
    arguments = ["knn", "--model", model, "--num_train_images", "10", "--num_eval_images", "6", "--label", "dominant_shape"]  # fmt: skip
    assert evaluate_example.main([*arguments, "--no_progress"]) == 0
    metrics = last_json_line(capsys)
    assert (metrics["num_train_images"], metrics["num_eval_images"]) == (10, 6)
    assert metrics["label"] == "dominant_shape" and metrics["num_classes"] == 6 and metrics["top5"] is not None


def test_a_model_id_that_cannot_be_fetched_says_what_to_do(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, set by `run`) with an empty cache: one error naming the id and the ways out."""
    result, _ = run(
        "knn", "--model", "stellar-org/not-cached", "--num_images", "2", workspace=tmp_path, check=False,
        env_extra={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    message = " ".join(error)
    assert "cannot load a STELLAR configuration from stellar-org/not-cached" in message
    assert "hf download stellar-org/not-cached" in message and "HF_HUB_OFFLINE" in message


# ----------------------------------------------------------------------------------------------------------------------
# segmentation: the linear segmentation probe on the synthetic scenes, label folders and a datasets split
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmentation_data(workspace):
    """Image / label-PNG folder pairs (3 classes, 255 = ignored) and the same as a `scene_parse_150`-style dataset."""
    import datasets
    import numpy as np

    root = workspace / "segmentation"
    generator = np.random.default_rng(0)
    rows = {"train": [], "validation": []}
    for split, count in (("train", 6), ("eval", 4)):
        for index in range(count):
            labels = np.zeros((40, 48), dtype=np.uint8)
            labels[:, 16:32] = 1
            labels[20:, 32:] = 2
            labels[:2] = 255
            colours = np.array([(200, 30, 30), (30, 200, 40), (40, 60, 230)], dtype=np.int64)
            pixels = colours[np.minimum(labels, 2)] + generator.integers(-30, 30, (40, 48, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            for kind, picture in (
                ("images", image),
                ("labels", Image.fromarray(labels)),
            ):
                folder = root / kind / split
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / f"{index}.png")
            # ADE20K numbering in the dataset: 0 = unlabelled, classes from 1.
            ade = np.where(labels == 255, 0, labels + 1).astype(np.uint8)
            rows["train" if split == "train" else "validation"].append(
                {"image": image, "annotation": Image.fromarray(ade)}
            )
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.DatasetDict(
        {split: datasets.Dataset.from_list(items, features=features) for split, items in rows.items()}
    ).save_to_disk(str(root / "dataset"))
    return root


def test_segmentation_on_synthetic_scenes_end_to_end(workspace, tmp_path):
    output = tmp_path / "segmentation.json"
    result, metrics = run(
        "segmentation", "--model", str(workspace / "model"), "--num_images", "12", "--batch_size", "6",
        "--epochs", "2", "--feature", "all", "--classes", "color", "--output_json", str(output), workspace=workspace,
    )  # fmt: skip
    assert metrics["task"] == "segmentation" and metrics["feature"] == "all" and metrics["num_classes"] == 9
    assert metrics["class_names"][0] == "background" and metrics["classes"] == "color"
    assert metrics["label_size"] == [32, 32] and metrics["logit_grid"] == [4, 4] and metrics["ignore_index"] == 255
    assert set(metrics["features"]) == {"dense", "lowrank", "spatial_map"}
    assert metrics["features"]["spatial_map"]["num_channels"] == TINY["num_sparse_tokens"]
    for entry in metrics["features"].values():
        for key in (
            "mean_iou",
            "pixel_accuracy",
            "grid_mean_iou",
            "grid_pixel_accuracy",
            "random_init_mean_iou",
        ):
            assert 0.0 <= entry[key] <= 1.0, key
        assert entry["steps"] == 2  # 12 images, --probe_batch_size 64: one step per epoch
    assert 0.0 < metrics["majority_class_pixel_accuracy"] <= 1.0
    assert "classes present in the labels or the predictions" in metrics["mean_iou_over"]
    assert json.loads(output.read_text()) == metrics
    assert sum(line.startswith("segmentation mIoU") for line in result.stderr.splitlines()) == 3


def test_segmentation_on_label_folders_and_a_dataset(workspace, segmentation_data, capsys):
    model = str(workspace / "model")
    root = segmentation_data
    folders = [
        "--train_dir", str(root / "images" / "train"), "--train_label_dir", str(root / "labels" / "train"),
        "--eval_dir", str(root / "images" / "eval"), "--eval_label_dir", str(root / "labels" / "eval"),
    ]  # fmt: skip
    common = [
        "--num_classes",
        "3",
        "--epochs",
        "3",
        "--learning_rate",
        "0.05",
        "--random_init",
        "no",
        "--no_progress",
    ]
    assert evaluate_example.main(["segmentation", "--model", model, *folders, *common]) == 0
    on_folders = last_json_line(capsys)
    assert on_folders["feature"] == "dense" and on_folders["num_classes"] == 3 and on_folders["class_names"] is None
    assert on_folders["data"]["train_label_dir"] == str(root / "labels" / "train")
    assert on_folders["random_init_mean_iou"] is None and "not requested" in on_folders["random_init_skipped"]
    assert on_folders["num_train_images"] == 6 and on_folders["num_eval_images"] == 4
    assert on_folders["label_size"] == [
        32,
        32,
    ]  # 40 x 48 images, resized (shorter side 36) and centre-cropped
    # The same data in the scene_parse_150 layout (0 = unlabelled, classes from 1): the same figures.
    dataset = ["--dataset_name", str(root / "dataset"), "--reduce_labels"]
    assert evaluate_example.main(["segmentation", "--model", model, *dataset, *common]) == 0
    on_dataset = last_json_line(capsys)
    assert on_dataset["data"]["annotation_column"] == "annotation" and on_dataset["reduce_labels"] is True
    for key in ("mean_iou", "pixel_accuracy", "grid_mean_iou", "grid_pixel_accuracy"):
        assert on_dataset[key] == pytest.approx(on_folders[key]), key


def test_segmentation_bad_input_gives_clear_errors(workspace, segmentation_data, tmp_path, capsys):
    model = str(workspace / "model")
    root = segmentation_data
    dataset = ["--dataset_name", str(root / "dataset")]
    message = error_of(capsys, "segmentation", "--model", model, *dataset)
    assert "needs --num_classes" in message
    # Without --reduce_labels the ADE-numbered maps hold the value 3 for a 3-class problem: named, with the way out.
    message = error_of(
        capsys,
        "segmentation",
        "--model",
        model,
        *dataset,
        "--num_classes",
        "3",
        "--epochs",
        "1",
    )
    assert "values 3 outside the classes 0..2" in message and "reduce the labels" in message
    message = error_of(capsys, "segmentation", "--model", model, *dataset, "--num_classes", "4", "--annotation_column_name", "mask")  # fmt: skip
    assert "no annotation column 'mask'" in message and "'annotation'" in message
    message = error_of(capsys, "segmentation", "--model", model, "--train_dir", str(root / "images" / "train"), "--num_classes", "3")  # fmt: skip
    assert "missing: --train_label_dir, --eval_dir, --eval_label_dir" in message
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in (
        "0",
        "1",
        "2",
        "3",
        "4",
    ):  # 5 of the 6 training images, and one label without an image
        Image.open(root / "labels" / "train" / f"{name}.png").save(labels / f"{name}.png")
    Image.new("L", (48, 40)).save(labels / "extra.png")
    folders = [
        "--train_dir", str(root / "images" / "train"), "--train_label_dir", str(labels),
        "--eval_dir", str(root / "images" / "eval"), "--eval_label_dir", str(root / "labels" / "eval"),
    ]  # fmt: skip
    message = error_of(capsys, "segmentation", "--model", model, *folders, "--num_classes", "3")
    assert "5.png" in message and "no label PNG" in message and "extra.png" in message and "no image" in message
    message = error_of(capsys, "segmentation", "--model", model, "--synthetic", "--num_classes", "3")
    assert "--num_classes" in message and "--classes" in message
    message = error_of(capsys, "segmentation", "--model", model, *dataset, "--num_classes", "300")
    assert "2..255" in message


def test_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    script = load_script()
    path = tmp_path / "results" / "knn.json"
    script.save_results(path, {"knn_top1": 0.5})
    before = path.read_text()
    real_write_text = Path.write_text

    def disk_full_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        script.save_results(path, {"knn_top1": 0.75, "note": "x" * 1000})
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in path.parent.iterdir()) == ["knn.json"]
    script.save_results(path, {"knn_top1": 0.75})
    assert json.loads(path.read_text()) == {"knn_top1": 0.75}
