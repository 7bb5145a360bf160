"""
Kill `examples/pretrain.py` at every write of its output folder, then resume it, and compare with a run that was
never interrupted.

A *write point* is one step of what the script does to its output folder: a file opened for writing, a rename, a
removal, a folder created, and for every `torch.save` / safetensors save (Accelerate's and transformers' writers,
which do not go through Python's `open`) the moment before it and a moment in the middle of it (the file written,
then cut to half its size, as a kill during the write leaves it). Points are found with an audit hook
(`sys.addaudithook`) and by wrapping the two save functions, so the script itself carries no test hooks.

`sweep` runs in a fresh process that imports torch once and forks one child per run (the imports dominate a tiny
run's time): a reference run that counts the points, then for each chosen point a run killed there with SIGKILL
(or failing there with ENOSPC, as a full disk would) and a run that resumes with `--resume_from_checkpoint latest`
(or starts afresh when no complete checkpoint exists, as a user would).

    python tests/fault_injection.py '{"work_dir": "/tmp/x", "argv": [...], "points": "all", "action": "kill"}'

prints one JSON object: the reference's points and, per chosen point, what the interrupted run did, what the
resume found and whether its final weights equal the reference's bit for bit.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WritePoints:
    """Counts write points under `root`; at point number `stop_at` (1-based) kills the process or raises ENOSPC."""

    def __init__(self, root: Path, stop_at: int | None = None, action: str = "kill"):
        self.root = str(root)
        self.stop_at = stop_at
        self.action = action
        self.descriptions: list[str] = []

    def _under_root(self, path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(os.fspath(path))).startswith(self.root)
        except TypeError:
            return False  # a file descriptor

    def point(self, description: str, cut_file: Path | None = None) -> None:
        self.descriptions.append(description)
        if len(self.descriptions) != self.stop_at:
            return
        if self.action == "kill":
            if cut_file is not None and cut_file.is_file():
                with open(cut_file, "r+b") as handle:
                    handle.truncate(cut_file.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {description})")

    def audit(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writing and self._under_root(path):
                self.point(f"open {os.path.relpath(os.fsdecode(path), self.root)}")
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
            if self._under_root(args[0]):
                self.point(f"{event} {os.path.relpath(os.fsdecode(os.fspath(args[0])), self.root)}")

    def wrap_save(self, save, name: str):
        def wrapped(obj, path, *args, **kwargs):
            if not self._under_root(path):
                return save(obj, path, *args, **kwargs)
            relative = os.path.relpath(os.fsdecode(os.fspath(path)), self.root)
            self.point(f"before {name} {relative}")
            result = save(obj, path, *args, **kwargs)
            self.point(f"during {name} {relative}", cut_file=Path(path))
            return result

        return wrapped

    def install(self) -> None:
        import accelerate.utils.other
        import torch

        torch.save = self.wrap_save(torch.save, "torch.save")
        import transformers.modeling_utils

        accelerate.utils.other.safe_save_file = self.wrap_save(accelerate.utils.other.safe_save_file, "safetensors")
        # save_pretrained writes safetensors itself, not through its `save_function`.
        transformers.modeling_utils.safe_save_file = self.wrap_save(
            transformers.modeling_utils.safe_save_file, "safetensors"
        )
        sys.addaudithook(self.audit)


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_example", REPO_ROOT / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_child(main, argv: list[str], log_file: Path, points: WritePoints | None, points_file: Path | None) -> dict:
    """Fork; the child runs `main(argv)` with `points` installed. Returns how it ended."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            descriptor = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(descriptor, 1)
            os.dup2(descriptor, 2)
            if points is not None:
                points.install()
            try:
                code = main(argv) or 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (print(exit_.code, file=sys.stderr) or 1)
            if points_file is not None:
                points_file.write_text(json.dumps(points.descriptions))
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "log": log_file.read_text(errors="replace")[-4000:]}
    return {"exit_code": os.WEXITSTATUS(status), "log": log_file.read_text(errors="replace")[-4000:]}


def tensors_equal(expected_file: Path, actual_file: Path) -> list[str]:
    """Names of the tensors that differ (or are missing) between two safetensors files."""
    import torch
    from safetensors.torch import load_file

    expected, actual = load_file(expected_file), load_file(actual_file)
    differ = sorted(set(expected) ^ set(actual))
    differ += [name for name in set(expected) & set(actual) if not torch.equal(expected[name], actual[name])]
    return differ


def sweep(work_dir: str, argv: list[str], points="all", action: str = "kill") -> dict:
    """See the module docstring. `points`: "all" or a list of 1-based point numbers (negative: from the end)."""
    from stellar_hf.checkpointing import find_checkpoints

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pretrain = load_pretrain_script()
    reference_dir = work / "reference"
    counted = WritePoints(reference_dir.resolve())
    reference = run_in_child(
        pretrain.main, [*argv, "--output_dir", str(reference_dir)], work / "reference.log", counted, work / "points.json"
    )
    if reference.get("exit_code") != 0:
        return {"reference": reference}
    descriptions = json.loads((work / "points.json").read_text())
    chosen = range(1, len(descriptions) + 1) if points == "all" else [p if p > 0 else len(descriptions) + 1 + p for p in points]
    report = {"reference_points": descriptions, "runs": []}
    for number in chosen:
        run_dir = (work / f"point-{number}").resolve()
        interrupted = run_in_child(
            pretrain.main, [*argv, "--output_dir", str(run_dir)], work / f"point-{number}.log",
            WritePoints(run_dir, stop_at=number, action=action), None,
        )  # fmt: skip
        complete, skipped = find_checkpoints(run_dir)
        resume_args = ["--resume_from_checkpoint", "latest"] if complete else ["--overwrite_output_dir"]
        resumed = run_in_child(
            pretrain.main, [*argv, "--output_dir", str(run_dir), *resume_args], work / f"resume-{number}.log", None, None
        )
        entry = {
            "point": number,
            "description": descriptions[number - 1],
            "interrupted": {key: value for key, value in interrupted.items() if key != "log"},
            "interrupted_log": interrupted["log"][-1500:],
            "complete_checkpoints_after": [checkpoint.step for checkpoint in complete],
            "incomplete_after": [f"{path.name}: {reason}" for path, reason in skipped],
            "resumed_with": resume_args[0],
            "resumed": {key: value for key, value in resumed.items() if key != "log"},
            "resumed_log": resumed["log"][-3000:],
            "leftovers": sorted(path.name for path in run_dir.iterdir() if path.name.startswith(".")),
        }
        final = run_dir / "model.safetensors"
        entry["differing_tensors"] = (
            tensors_equal(reference_dir / "model.safetensors", final) if final.is_file() else ["<no model.safetensors>"]
        )
        results = run_dir / "results.json"
        entry["completed_steps"] = json.loads(results.read_text())["completed_steps"] if results.is_file() else None
        report["runs"].append(entry)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    spec = json.loads(sys.argv[1])
    print(json.dumps(sweep(**spec)))
