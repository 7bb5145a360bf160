"""`examples/pretrain.py` end to end on tiny models and data: outputs, resume, NaN handling, bad data."""

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
from safetensors.torch import load_file
from stellar_tester import TINY_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "pretrain.py"


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = load_script()
LOCAL_SIZE_VARIABLES = PRETRAIN.LOCAL_SIZE_VARIABLES
# The shared tiny model, as `--config_overrides` text.
TINY_OVERRIDES = ",".join(f"{key}={value}" for key, value in TINY_CONFIG.items())


def run_pretrain(output_dir: Path, *extra: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """
    Run the script in a fresh process (Accelerate's state is per process), on one thread (`OMP_NUM_THREADS=1` set
    by hand, which the script respects) unless `env` says otherwise.
    """
    command = [
        sys.executable,
        str(SCRIPT),
        "--output_dir", str(output_dir),
        "--config_overrides", TINY_OVERRIDES,
        "--num_synthetic_images", "32",
        "--num_synthetic_eval_images", "16",
        "--per_device_train_batch_size", "4",
        "--report_to", "none",
        "--seed", "3",
        *extra,
    ]  # fmt: skip
    launcher_variables = ("ACCELERATE_USE_CPU", *LOCAL_SIZE_VARIABLES)
    base = {key: value for key, value in os.environ.items() if key not in launcher_variables}
    env = {**base, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def test_few_steps_end_to_end(tmp_path):
    output_dir = tmp_path / "run"
    result = run_pretrain(output_dir, "--max_train_steps", "3", "--image_logging_steps", "2", "--report_to", "tensorboard")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "results.json"):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "results.json").read_text())
    assert results["completed_steps"] == 3
    assert (results["device"], results["cpu_threads"]) == ("cpu", 1)
    assert results["dataloader_num_workers"] == (1 if PRETRAIN.physical_cores() >= 2 else 0)
    assert 0.0 <= results["data_wait_fraction"] < 1.0
    assert set(results["probes"]) == {"dominant_color", "dominant_shape", "num_probe_images"}
    for task in ("dominant_color", "dominant_shape"):
        scores = results["probes"][task]
        for metric in ("knn_top1", "linear_probe_top1", "random_init_knn_top1", "random_init_linear_probe_top1"):
            assert 0.0 <= scores[metric] <= 1.0, (task, metric)
    assert results["probes"]["dominant_color"]["chance"] == 1 / 8
    # A person reads a table with every probe figure next to chance and the untrained encoder, then what was saved.
    printed = result.stdout
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "chance", "untrained", "kNN", "untrained", "linear", "trained", "kNN", "trained",
                              "linear"]  # fmt: skip
    color_row = next(line for line in printed.splitlines() if line.startswith("dominant_color")).split()
    scores = results["probes"]["dominant_color"]
    expected = [scores[key] for key in ("chance", "random_init_knn_top1", "random_init_linear_probe_top1", "knn_top1",
                                        "linear_probe_top1")]  # fmt: skip
    assert [float(value) for value in color_row[1:]] == [round(value, 3) for value in expected]
    assert f"saved to {output_dir}/:" in printed
    for name in ("model.safetensors", "README.md", "results.json", "images/reconstructions_final.png"):
        assert f"  {name}" in printed, name
    assert "expected to finish" not in printed  # 3 steps: no estimate; it goes to the log of longer runs
    images = sorted(path.name for path in (output_dir / "images").glob("*.png"))
    assert "spatial_maps_000002.png" in images and "reconstructions_final.png" in images
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "no tensorboard events written"
    card = (output_dir / "README.md").read_text()
    assert "synthetic scenes" in card and "{{" not in card

    from stellar_hf import StellarConfig
    from stellar_hf.modeling_stellar import StellarForPreTraining

    model = StellarForPreTraining.from_pretrained(output_dir)
    assert model.config.hidden_size == 32 and isinstance(model.config, StellarConfig)
    saved = load_file(output_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_figures_show_the_same_images_at_every_step(tmp_path):
    from stellar_hf import StellarConfig
    from stellar_hf.data import SyntheticScenes
    from stellar_hf.evaluation import probe_processor

    output_dir = tmp_path / "run"
    run_pretrain(output_dir, "--max_train_steps", "4", "--image_logging_steps", "2", "--skip_final_evaluation")
    first, second, final = (
        np.asarray(Image.open(output_dir / "images" / f"reconstructions_{tag}.png").convert("RGB"))
        for tag in ("000002", "000004", "final")
    )
    # Each figure's top row is the input images (as the reconstruction grid lays them out): the same at every step.
    scenes = SyntheticScenes(num_images=8, image_size=32, split="validation")
    processor = probe_processor(StellarConfig(image_size=32), do_normalize=False)
    inputs = processor([scenes[index]["image"] for index in range(8)], return_tensors="pt")["pixel_values"]
    top = 2 + inputs[0].shape[-1]  # the grid's padding, then one row of tiles
    assert np.array_equal(first[:top], second[:top]) and np.array_equal(first[:top], final[:top])
    # ... and those rows are the fixed validation scenes, not a training batch.
    expected_left = inputs[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(first[2:top, 2:top].astype(float) - expected_left).max() <= 1
    assert not np.array_equal(first[top:], second[top:]), "the reconstructions should change as it trains"


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    # 32 images / batch 4 = 8 batches per epoch, so step 6 of 10 resumes mid-epoch and the run crosses an epoch.
    common = ("--max_train_steps", "10", "--checkpointing_steps", "6", "--skip_final_evaluation")
    run_pretrain(uninterrupted, *common)
    checkpoint = uninterrupted / "checkpoint-6"
    assert (checkpoint / "training_step.json").is_file()
    run_pretrain(resumed, *common, "--resume_from_checkpoint", str(checkpoint))
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_resume_with_gradient_accumulation(tmp_path):
    # Batch 2 x 2 micro-batches: every micro-batch draws its own masks from (seed, step, micro-batch, rank), so a run
    # resumed at step 3 of 6 (mid-epoch: 8 steps per epoch) repeats them and ends with the same weights.
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    common = (
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--skip_final_evaluation",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    run_pretrain(uninterrupted, *common)
    run_pretrain(resumed, *common, "--resume_from_checkpoint", str(uninterrupted / "checkpoint-3"))
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert json.loads((resumed / "results.json").read_text())["completed_steps"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    output_dir = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update, so step 2's loss is not finite.
    result = run_pretrain(
        output_dir, "--max_train_steps", "5", "--checkpointing_steps", "1", "--base_learning_rate", "1e32",
        "--warmup_ratio", "0", "--max_grad_norm", "0", check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "NaN or infinite" in result.stderr
    checkpoints = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    assert checkpoints, "the last good checkpoint was not kept"
    assert not (output_dir / "model.safetensors").exists()


def test_image_folder_with_unreadable_files(tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for index in range(6):
        color = (index * 40, 255 - index * 40, 128)
        Image.new("RGB", (40, 36), color).save(images / f"rgb_{index}.png")
    Image.new("L", (36, 36), 90).save(images / "nested" / "gray.png")
    Image.new("RGBA", (36, 44), (10, 200, 30, 100)).save(images / "nested" / "rgba.png")
    (images / "broken.jpg").write_bytes(b"not an image at all")
    output_dir = tmp_path / "run"
    result = run_pretrain(output_dir, "--train_dir", str(images), "--max_train_steps", "2")
    assert "skipping unreadable image" in result.stderr and "broken.jpg" in result.stderr
    assert (output_dir / "model.safetensors").is_file()
    results = json.loads((output_dir / "results.json").read_text())
    assert results["probes"] is None
    # 9 files, batch 4, 2 steps: the broken file is drawn in 8 of 9 slots at most, always counted.
    skipped = results["skipped_images"]
    assert skipped["count"] == 1 and skipped["first"] == [str(images / "broken.jpg")], skipped
    assert skipped["substituted_slots"] >= 1
    assert "1 unreadable image(s) were skipped" in result.stderr


def test_skipped_images_are_counted_with_workers_and_across_a_resume(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(8):
        Image.new("RGB", (36, 36), (index * 30, 90, 200 - index * 20)).save(images / f"good_{index}.png")
    for index in range(4):
        (images / f"broken_{index}.jpg").write_bytes(b"truncated")
    # 12 files, batch 4: 3 steps per epoch, so 6 steps see every file twice; two DataLoader workers.
    common = ("--train_dir", str(images), "--max_train_steps", "6", "--skip_final_evaluation",
              "--dataloader_num_workers", "2")  # fmt: skip
    run_pretrain(tmp_path / "whole", *common, "--checkpointing_steps", "3")
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["skipped_images"]
    assert whole["count"] == 4 and whole["substituted_slots"] == 8
    assert sorted(whole["first"]) == sorted(str(images / f"broken_{index}.jpg") for index in range(4))
    run_pretrain(tmp_path / "resumed", *common, "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-3"))
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["skipped_images"] == whole


def test_empty_folder_and_bad_arguments_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_pretrain(tmp_path / "run", "--train_dir", str(empty), "--max_train_steps", "1", check=False)
    assert result.returncode != 0 and "no image files" in result.stderr
    result = run_pretrain(tmp_path / "run", "--config_overrides", "not_a_field=3", "--max_train_steps", "1", check=False)
    assert result.returncode != 0 and "not_a_field" in result.stderr


def test_refuses_to_overwrite_a_trained_model(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"precious")
    result = run_pretrain(output_dir, "--max_train_steps", "1", "--skip_final_evaluation", check=False)
    assert result.returncode != 0 and "already holds a trained model" in result.stderr
    assert (output_dir / "model.safetensors").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "requested, environ, expected",
    [
        (None, {}, None),  # torch's default
        (None, {"OMP_NUM_THREADS": "4"}, None),  # the user's choice
        (None, {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "True"}, None),  # accelerate launch --cpu chose
        (None, {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "False"}, "cores"),  # accelerate's placeholder
        (None, {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "False", "LOCAL_WORLD_SIZE": "2"}, "cores/2"),
        (None, {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "False", "MPI_LOCALNRANKS": "3"}, "cores/3"),
        (3, {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "False"}, 3),
        (2, {}, 2),
    ],
)
def test_cpu_thread_count(requested, environ, expected):
    if isinstance(expected, str):
        divisor = int(expected.partition("/")[2] or 1)
        expected = max(1, PRETRAIN.physical_cores() // divisor)
    assert PRETRAIN.cpu_thread_count(requested, 1, environ) == expected


def test_cpu_thread_count_refuses_zero():
    with pytest.raises(SystemExit, match="--cpu_threads"):
        PRETRAIN.cpu_thread_count(0, 1, {})


def test_accelerate_launch_placeholder_thread_count_is_replaced(tmp_path):
    # `accelerate launch` without --cpu runs the script with OMP_NUM_THREADS=1 and ACCELERATE_USE_CPU=False.
    output_dir = tmp_path / "run"
    launcher = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "False"}
    run_pretrain(output_dir, "--max_train_steps", "1", "--skip_final_evaluation", env=launcher)
    assert json.loads((output_dir / "results.json").read_text())["cpu_threads"] == PRETRAIN.physical_cores()


def test_loader_defaults_are_sized_to_the_machine(monkeypatch):
    monkeypatch.setattr(PRETRAIN, "physical_cores", lambda: 16)
    settings = PRETRAIN.default_loader_settings
    cpu = {"num_workers": 1, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    assert settings(None, "cpu", 1) == cpu
    assert settings(None, "cpu", 16)["num_workers"] == 0  # one core per process: the crops stay in the loop
    assert settings(None, "cuda", 1) == {
        "num_workers": 12, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4
    }  # fmt: skip
    assert settings(None, "cuda", 4)["num_workers"] == 3  # 16 cores shared by 4 GPU processes, one left to each loop
    assert settings(None, "cuda", 32)["num_workers"] == 1
    assert settings(2, "cpu", 1)["persistent_workers"] and not settings(2, "cuda", 1, streaming=True)["persistent_workers"]
    with pytest.raises(SystemExit, match="--dataloader_num_workers"):
        settings(-1, "cpu", 1)


def test_data_wait_is_the_share_of_time_spent_in_the_loader():
    import time

    class SlowLoader:
        def __iter__(self):
            for index in range(4):
                time.sleep(0.03)  # the input path
                yield index

    wait = PRETRAIN.DataWait()
    for _ in wait.timed(SlowLoader()):
        time.sleep(0.01)  # the training step
        wait.step_done()
    assert 0.6 < wait.recent_fraction < 0.85 and 0.6 < wait.total_fraction < 0.85
    fast = PRETRAIN.DataWait()
    for _ in fast.timed(range(4)):
        time.sleep(0.01)
        fast.step_done()
    assert fast.recent_fraction < 0.1
