"""
Starting N processes on CPUs does what it says: the commands docs/training.md gives really run N gloo ranks, and a
launch that would start fewer processes than asked stops at once with the command to run instead.
"""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_pretrain_example import PRETRAIN, REPO_ROOT, SCRIPT, TINY_OVERRIDES

TINY_RUN = [
    "--config_overrides", TINY_OVERRIDES, "--num_synthetic_images", "32", "--per_device_train_batch_size", "4",
    "--report_to", "none", "--seed", "3", "--max_train_steps", "2", "--checkpointing_steps", "2",
    "--skip_final_evaluation",
]  # fmt: skip
LAUNCHER_VARIABLES = ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def launch(command: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    # No GPU may be used even where one exists: these tests are about CPU launches. An empty accelerate config
    # home keeps a developer's own `accelerate config` out of the test.
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)


def launcher(name: str) -> list[str]:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return [path]


@pytest.mark.parametrize(
    "command",
    [
        ["torchrun", "--nproc_per_node", "2"],
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"],
    ],
    ids=["torchrun", "accelerate-launch-multi-gpu"],
)
def test_documented_cpu_launch_runs_two_ranks(command, tmp_path):
    output_dir = tmp_path / "run"
    result = launch([*launcher(command[0]), *command[1:], str(SCRIPT), "--output_dir", str(output_dir), *TINY_RUN], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 8
    # Each rank saved its own random state into the one shared checkpoint.
    checkpoint = output_dir / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert "2 process(es) on cpu" in result.stderr


@pytest.mark.parametrize("cpu_flag", [[], ["--cpu"]], ids=["plain", "cpu"])
def test_accelerate_launch_that_starts_one_process_stops_at_once(cpu_flag, tmp_path):
    output_dir = tmp_path / "run"
    command = [*launcher("accelerate"), "launch", *cpu_flag, "--num_processes", "2", str(SCRIPT)]
    result = launch([*command, "--output_dir", str(output_dir), *TINY_RUN], tmp_path)
    assert result.returncode != 0
    assert "was asked for 2 processes but started 1" in result.stderr
    assert "torchrun --nproc_per_node N" in result.stderr and "--multi_gpu --num_processes N" in result.stderr
    assert not output_dir.exists(), "nothing may be written by a run that stops"


def fake_accelerator(num_processes: int):
    return SimpleNamespace(num_processes=num_processes, distributed_type="NO")


def test_process_count_must_match_the_launcher():
    PRETRAIN.check_process_count(fake_accelerator(2), {"WORLD_SIZE": "2"})
    PRETRAIN.check_process_count(fake_accelerator(1), {})
    PRETRAIN.check_process_count(fake_accelerator(4), {"OMPI_COMM_WORLD_SIZE": "4"})
    with pytest.raises(SystemExit, match="the launcher started 2 processes but Accelerate sees 1"):
        PRETRAIN.check_process_count(fake_accelerator(1), {"WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match="asked for 3 processes but started 1"):
        PRETRAIN.check_process_count(fake_accelerator(1), {}, asked=3)


def test_accelerate_launch_request_is_read_from_its_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    read = PRETRAIN.accelerate_launch_processes
    accelerate = "/venv/bin/accelerate"
    assert read([accelerate, "launch", "--num_processes", "2", "examples/pretrain.py"]) == 2
    assert read([sys.executable, accelerate, "launch", "--num-processes=3", "--cpu", "pretrain.py", "--seed", "1"]) == 3
    assert read(["accelerate-launch", "launch", "pretrain.py"]) is None  # nothing asked, no config file
    assert read(["bash", "-c", "python pretrain.py"]) is None  # not accelerate
    assert read(["torchrun", "--nproc_per_node", "2", "pretrain.py"]) is None
    config = tmp_path / "config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert read([accelerate, "launch", "--config_file", str(config), "pretrain.py"]) == 4
