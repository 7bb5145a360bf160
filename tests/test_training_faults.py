"""
Training runs that can be trusted: `examples/pretrain.py` and `stellar_hf.checkpointing` under faults.

- kill (SIGKILL) at every write point of a run, or fail there as a full disk does, then resume `latest`: the final
  weights equal an uninterrupted run's bit for bit (`fault_injection.py` finds the points);
- a diverged state is never written, and the message names the checkpoint that is good;
- incomplete or truncated checkpoint folders are skipped by `latest`, which says why;
- a checkpoint past `--max_train_steps`, or holding NaN, is refused with a message;
- unreadable images are counted in `results.json`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pretrain_example import REPO_ROOT, TINY_OVERRIDES, run_pretrain

from stellar_hf import checkpointing
from stellar_hf.checkpointing import TrainingCheckpointError, find_checkpoints, latest_checkpoint, read_checkpoint

# Three steps, a checkpoint after each, at most two kept: every kind of write (first checkpoint, later ones,
# rotation, images, the final folder) happens at least once.
SWEEP_ARGS = [
    "--config_overrides", TINY_OVERRIDES, "--num_synthetic_images", "32", "--per_device_train_batch_size", "4",
    "--report_to", "none", "--seed", "3", "--skip_final_evaluation", "--max_train_steps", "3",
    "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--image_logging_steps", "2",
]  # fmt: skip


def run_sweep(tmp_path: Path, action: str) -> dict:
    """Every write point of the run, in a fresh process that forks one child per run (see fault_injection.py)."""
    spec = {"work_dir": str(tmp_path / "sweep"), "argv": SWEEP_ARGS, "points": "all", "action": action}
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "fault_injection.py"), json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "runs" in report, f"the uninterrupted reference run failed: {report}"
    return report


def assert_every_resume_matches(report: dict) -> None:
    descriptions = report["reference_points"]
    # The sweep must reach the writes the issue names: inside a checkpoint, its marker, rotation and the final save.
    for expected in ("during safetensors .checkpoint-1.partial/model.safetensors", "os.rename .checkpoint-2.partial",
                     "os.rename checkpoint-1", "os.rename .final.partial/model.safetensors"):  # fmt: skip
        assert expected in descriptions, expected
    assert len(report["runs"]) == len(descriptions)
    for run in report["runs"]:
        where = f"point {run['point']} ({run['description']})"
        assert run["resumed"] == {"exit_code": 0}, f"{where}: resume failed\n{run['resumed_log']}"
        assert run["differing_tensors"] == [], f"{where}: final weights differ from the uninterrupted run"
        assert run["completed_steps"] == 3, where
        assert run["leftovers"] == [], f"{where}: {run['leftovers']} left after the resume"
        # `latest` only ever sees complete checkpoints: writes go to hidden staging folders.
        assert run["incomplete_after"] == [], f"{where}: {run['incomplete_after']}"


def test_kill_at_every_write_point_then_resume_latest(tmp_path):
    report = run_sweep(tmp_path, "kill")
    assert_every_resume_matches(report)
    for run in report["runs"]:
        assert run["interrupted"] == {"signal": 9}, run["description"]
    # Killed before the first checkpoint was complete, a user starts afresh; afterwards `latest` resumes.
    assert {run["resumed_with"] for run in report["runs"]} == {"--overwrite_output_dir", "--resume_from_checkpoint"}


def test_full_disk_at_every_write_point_is_a_clear_error(tmp_path):
    report = run_sweep(tmp_path, "enospc")
    assert_every_resume_matches(report)
    for run in report["runs"]:
        where = f"point {run['point']} ({run['description']})"
        code = run["interrupted"].get("exit_code")
        # 0: a write whose failure costs nothing (a progress image, removing an old checkpoint, an existing folder).
        assert code in (0, 1), f"{where}: exit {run['interrupted']}\n{run['interrupted_log']}"
        if code == 1:
            log = run["interrupted_log"]
            assert "error:" in log and "No space left on device" in log, f"{where}\n{log}"
            assert "Traceback" not in log, f"{where}\n{log}"
            assert "last good checkpoint is" in log or "no complete checkpoint exists" in log, f"{where}\n{log}"
        if run["description"].startswith(("before", "during")) and ".checkpoint-" in run["description"]:
            assert code == 1, f"{where}: a failed checkpoint write must stop the run"


def test_nonfinite_update_is_never_saved(tmp_path):
    # The reproduction: a finite loss followed by a non-finite update, a checkpoint every step, one kept.
    output_dir = tmp_path / "run"
    result = run_pretrain(
        output_dir, "--max_train_steps", "6", "--checkpoints_total_limit", "1", "--checkpointing_steps", "1",
        "--base_learning_rate", "1e5", "--warmup_ratio", "0", "--skip_final_evaluation", check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "NaN or infinite" in result.stderr
    complete, skipped = find_checkpoints(output_dir)
    assert len(complete) == 1 and not skipped
    good = complete[0]
    # The message names the checkpoint that really is the last good one.
    assert f"the last good checkpoint is {good.path} (step {good.step})" in result.stderr
    for name, tensor in load_file(good.path / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    optimizer_state = torch.load(good.path / "optimizer.bin", weights_only=True)["state"]
    for index, state in optimizer_state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (index, key)
    assert not (output_dir / "model.safetensors").exists()


def test_nonfinite_state_names_the_tensors():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert checkpointing.nonfinite_state(model, [optimizer]) == []
    with torch.no_grad():
        model.bias[0] = float("nan")
    optimizer.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert checkpointing.nonfinite_state(model, [optimizer]) == ["model.bias", "optimizer0.state[0].exp_avg_sq"]


def make_checkpoint(output_dir: Path, step: int, payload: bytes = b"weights" * 10) -> Path:
    """A complete checkpoint folder written the way `save_checkpoint` completes one (marker with file sizes)."""
    staging = output_dir / f".checkpoint-{step}.partial"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(payload)
    checkpointing._complete(staging, checkpointing.checkpoint_path(output_dir, step), step, {"note": step})
    return output_dir / f"checkpoint-{step}"


def test_latest_skips_incomplete_checkpoints_and_says_why(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    good = make_checkpoint(tmp_path, 4)
    no_marker = tmp_path / "checkpoint-9"
    no_marker.mkdir()
    (no_marker / "model.safetensors").write_bytes(b"half")
    empty_marker = tmp_path / "checkpoint-8"
    empty_marker.mkdir()
    (empty_marker / "training_step.json").write_bytes(b"")
    truncated = make_checkpoint(tmp_path, 7)
    with open(truncated / "model.safetensors", "r+b") as handle:
        handle.truncate(10)
    missing_file = make_checkpoint(tmp_path, 6)
    (missing_file / "model.safetensors").unlink()
    renamed = make_checkpoint(tmp_path, 5)
    renamed.rename(tmp_path / "checkpoint-10")

    with caplog.at_level("WARNING", logger="stellar_hf.checkpointing"):
        latest = latest_checkpoint(tmp_path)
    assert latest.path == good and latest.step == 4 and latest.extra == {"note": 4}
    reasons = {path.name: reason for path, reason in find_checkpoints(tmp_path)[1]}
    assert set(reasons) == {"checkpoint-6", "checkpoint-7", "checkpoint-8", "checkpoint-9", "checkpoint-10"}
    assert "did not finish" in reasons["checkpoint-9"]
    assert "unreadable" in reasons["checkpoint-8"]
    assert "truncated" in reasons["checkpoint-7"]
    assert "lacks model.safetensors" in reasons["checkpoint-6"]
    assert "step 5" in reasons["checkpoint-10"]
    for name in reasons:
        assert f"skipping {name}" in caplog.text
    with pytest.raises(TrainingCheckpointError, match="truncated"):
        read_checkpoint(truncated)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    incomplete = tmp_path / "checkpoint-5"
    incomplete.mkdir()
    removed = checkpointing.rotate_checkpoints(tmp_path, 2)
    assert [path.name for path in removed] == ["checkpoint-1"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-5"]
    # An incomplete folder never counts as the newest one: limit 1 still keeps checkpoint-3.
    checkpointing.rotate_checkpoints(tmp_path, 1)
    assert latest_checkpoint(tmp_path).step == 3


def test_stale_files_are_cleared_and_a_set_aside_checkpoint_restored(tmp_path):
    make_checkpoint(tmp_path, 1)
    (tmp_path / ".checkpoint-2.partial").mkdir()
    (tmp_path / ".checkpoint-1.deleting").mkdir()
    (tmp_path / ".final.partial").mkdir()
    set_aside = make_checkpoint(tmp_path / "elsewhere", 3)
    set_aside.rename(tmp_path / ".checkpoint-3.replaced")
    checkpointing.remove_stale_files(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "elsewhere"]
    assert latest_checkpoint(tmp_path).step == 3


def test_legacy_marker_is_still_accepted(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "training_step.json").write_text(json.dumps({"completed_steps": 5}))
    assert read_checkpoint(folder).step == 5


def test_checkpoint_past_max_train_steps_is_refused(tmp_path):
    output_dir = tmp_path / "run"
    run_pretrain(output_dir, "--max_train_steps", "3", "--checkpointing_steps", "3", "--skip_final_evaluation")
    result = run_pretrain(
        tmp_path / "continued", "--max_train_steps", "2", "--resume_from_checkpoint", str(output_dir / "checkpoint-3"),
        "--skip_final_evaluation", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "saved at step 3, past --max_train_steps 2" in result.stderr
    assert not (tmp_path / "continued" / "model.safetensors").exists()
    assert not (tmp_path / "continued" / "results.json").exists()


def test_checkpoint_holding_nan_is_refused_on_resume(tmp_path):
    output_dir = tmp_path / "run"
    run_pretrain(output_dir, "--max_train_steps", "2", "--checkpointing_steps", "1", "--skip_final_evaluation")
    # A checkpoint written by an older version, before states were checked: same sizes, one NaN weight.
    weights_file = output_dir / "checkpoint-2" / "model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, weights_file, metadata={"format": "pt"})
    result = run_pretrain(
        tmp_path / "continued", "--max_train_steps", "3", "--resume_from_checkpoint", str(output_dir / "checkpoint-2"),
        "--skip_final_evaluation", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "holds NaN or infinite values" in result.stderr and "resume an earlier checkpoint" in result.stderr
    # The earlier checkpoint resumes fine.
    run_pretrain(
        tmp_path / "continued", "--max_train_steps", "3", "--resume_from_checkpoint", str(output_dir / "checkpoint-1"),
        "--skip_final_evaluation",
    )  # fmt: skip


def test_resume_latest_without_any_complete_checkpoint_is_a_clear_error(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-4").mkdir(parents=True)
    result = run_pretrain(output_dir, "--max_train_steps", "1", "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode != 0
    assert "no complete checkpoint" in result.stderr and "skipping checkpoint-4" in result.stderr
