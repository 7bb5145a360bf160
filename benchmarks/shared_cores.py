#!/usr/bin/env python
"""
How the Quick start's training degrades when another busy process shares the cores, per OpenMP wait policy.

For each policy (`ACTIVE`: waiting threads spin, libgomp's default when OMP_WAIT_POLICY is unset; `PASSIVE`: they
sleep) it times `examples/pretrain.py` on the default small model for `--steps` steps, first alone, then with two
copies started together (two users on one machine, or a run beside the test suite). Runs of one policy alternate
with the other's, so slow drift of the machine hits both alike. It prints the training seconds (the script's own
`minutes`, imports and probes excluded) and the ratios that matter: shared / alone for each policy, and each
policy's time against ACTIVE alone.

    python benchmarks/shared_cores.py --steps 60 --repeats 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("ACTIVE", "PASSIVE")


def start_run(policy: str, steps: int, output_dir: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(OMP_WAIT_POLICY=policy, PYTHONPATH=str(REPO_ROOT))
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir),
        "--max_train_steps", str(steps), "--skip_final_evaluation", "--report_to", "none", "--image_logging_steps",
        str(10 * steps),
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def training_seconds(process: subprocess.Popen, output_dir: Path) -> float:
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"pretrain.py failed:\n{stderr[-3000:]}")
    return json.loads((output_dir / "results.json").read_text())["minutes"] * 60


def measure(policy: str, steps: int, copies: int, work: Path) -> list[float]:
    """Training seconds of each of `copies` runs started together."""
    folders = [Path(tempfile.mkdtemp(dir=work)) / "run" for _ in range(copies)]
    processes = [start_run(policy, steps, folder) for folder in folders]
    return [training_seconds(process, folder) for process, folder in zip(processes, folders)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times = {(policy, copies): [] for policy in POLICIES for copies in (1, 2)}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeats):
            for copies in (1, 2):
                for policy in POLICIES:
                    seconds = measure(policy, args.steps, copies, Path(work))
                    times[(policy, copies)].append(max(seconds))
                    print(f"{policy:>8} x{copies}: {', '.join(f'{value:.1f}' for value in seconds)} s", flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{args.steps} steps of the default small model, {os.cpu_count()} logical CPUs, median of {args.repeats}")
    print(f"{'policy':>8}{'alone s':>10}{'shared s':>10}{'shared/alone':>14}{'alone/ACTIVE alone':>20}")
    for policy in POLICIES:
        alone, shared = median[(policy, 1)], median[(policy, 2)]
        print(f"{policy:>8}{alone:>10.1f}{shared:>10.1f}{shared / alone:>14.2f}{alone / median[('ACTIVE', 1)]:>20.2f}")


if __name__ == "__main__":
    main()
