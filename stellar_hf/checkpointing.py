"""
Crash-safe training checkpoints for `examples/pretrain.py` (and any Accelerate training loop).

A checkpoint is a folder `checkpoint-{step}` holding Accelerate's full training state (model, optimiser,
scheduler, sampler and random states) plus `training_step.json`, the completeness marker. The write is ordered so
that a run killed at any moment (SIGKILL, power loss, a full disk) never leaves a folder that looks complete but
is not:

1. every process writes its part of the state into a staging folder `.checkpoint-{step}.partial`;
2. the main process flushes every file to disk, then writes the marker (to a temporary name, flushed, renamed):
   it records the step and the size of every file, so a later truncation is noticed too;
3. the staging folder is renamed to `checkpoint-{step}` (one atomic rename) and the parent folder is flushed;
4. only then are checkpoints beyond the rotation limit removed, each renamed away first so that a half-deleted
   folder never carries the `checkpoint-N` name.

Before anything is written, the state is checked for NaN and infinity on every process: a diverged state is never
saved, so the newest complete checkpoint is always the last good one.

`latest_checkpoint` takes the newest complete checkpoint and reports every `checkpoint-*` folder it skipped and why;
`remove_stale_files` clears what a killed write left behind (staging and half-deleted folders).

Not imported by `stellar_hf/__init__.py`: it needs Accelerate, which the models do not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import dataclasses
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MARKER_NAME = "training_step.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
REPLACED_SUFFIX = ".replaced"
# Where the final model folder is assembled before its files are moved into the output folder.
FINAL_STAGING_NAME = ".final.partial"
# Version of the marker's layout; markers written before it existed hold only `completed_steps`.
MARKER_FORMAT = 1


class TrainingCheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which and why."""


class NonFiniteStateError(TrainingCheckpointError):
    """The training state holds NaN or infinite values, so it is not saved."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder, the optimiser step it was saved at and what the run recorded with it."""

    path: Path
    step: int
    extra: dict = dataclasses.field(default_factory=dict)


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """`output_dir/checkpoint-{step}`."""
    return Path(output_dir) / f"checkpoint-{step}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk; best effort where a folder cannot be opened (Windows). A rename
    is durable only once the folder holding the new name is flushed."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows)
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _files_with_sizes(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike):
    """
    `with replace_atomically(path) as temporary: write(temporary)`: the file appears at `path` whole, flushed to
    disk, or not at all (an interrupted write leaves at most a hidden `.name.tmp` beside it).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def publish_files(staging: str | os.PathLike, destination: str | os.PathLike, last: str | None = None) -> list[Path]:
    """
    Move every file of the folder `staging` into `destination` (flushed, one atomic rename each), the file named
    `last` after all the others, then remove `staging`. Each file of `destination` is at any moment either its old
    version or its new one, and `last` is new only once all the others are. Returns the new paths.
    """
    staging, destination = Path(staging), Path(destination)
    names = sorted(path.name for path in staging.iterdir() if path.is_file())
    if last in names:
        names.remove(last)
        names.append(last)
    published = []
    for name in names:
        _fsync_file(staging / name)
        os.replace(staging / name, destination / name)
        published.append(destination / name)
        if name == last:
            fsync_path(destination)
    fsync_path(destination)
    shutil.rmtree(staging, ignore_errors=True)
    return published


def write_json_atomically(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as JSON to `path`: a reader sees the old file or the whole new one, never a part."""
    with replace_atomically(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """
    Check that `path` is a complete checkpoint and return it.

    Raises `TrainingCheckpointError` naming what is wrong: not a folder, no marker (the write was interrupted), an unreadable
    marker, a step that does not match the folder name, or a file that is missing or has another size than when it
    was written (truncated or replaced since).
    """
    path = Path(path)
    if not path.is_dir():
        raise TrainingCheckpointError(f"{path} is not a folder")
    marker = path / MARKER_NAME
    if not marker.is_file():
        raise TrainingCheckpointError(f"{path} has no {MARKER_NAME}: its write did not finish (or it is not a checkpoint)")
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        step = int(record["completed_steps"])
    except (ValueError, KeyError, TypeError) as error:
        raise TrainingCheckpointError(f"{marker} is unreadable ({error}): the checkpoint is incomplete") from error
    match = CHECKPOINT_PATTERN.match(path.name)
    if match and int(match.group(1)) != step:
        raise TrainingCheckpointError(f"{marker} says step {step} but the folder is named {path.name}")
    for name, size in (record.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            raise TrainingCheckpointError(f"{path} lacks {name}, which was written with it")
        if file.stat().st_size != size:
            raise TrainingCheckpointError(f"{file} has {file.stat().st_size} bytes, {size} were written: it was truncated")
    if record.get("files") is None:
        logger.info("%s was written before checkpoints listed their files; its files are not size-checked", path)
    return Checkpoint(path, step, dict(record.get("extra") or {}))


def find_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """
    The complete checkpoints in `output_dir`, oldest first, and the `checkpoint-*` folders that are not, with why.
    """
    complete, skipped = [], []
    folder = Path(output_dir)
    if not folder.is_dir():
        return complete, skipped
    for path in folder.iterdir():
        if not CHECKPOINT_PATTERN.match(path.name):
            continue
        try:
            complete.append(read_checkpoint(path))
        except TrainingCheckpointError as error:
            skipped.append((path, str(error)))
    complete.sort(key=lambda checkpoint: checkpoint.step)
    skipped.sort()
    return complete, skipped


def latest_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest complete checkpoint in `output_dir` (None if there is none); logs every folder it skipped."""
    complete, skipped = find_checkpoints(output_dir)
    for path, reason in skipped:
        logger.warning("skipping %s: %s", path.name, reason)
    return complete[-1] if complete else None


def describe_last_good(output_dir: str | os.PathLike) -> str:
    """A sentence naming the newest complete checkpoint (the one a resume with `latest` would take), or its absence."""
    complete, _ = find_checkpoints(output_dir)
    if not complete:
        return f"no complete checkpoint exists in {output_dir}"
    newest = complete[-1]
    return f"the last good checkpoint is {newest.path} (step {newest.step}); resume it with --resume_from_checkpoint latest"


def remove_stale_files(output_dir: str | os.PathLike) -> list[Path]:
    """
    Clear what an interrupted write left in `output_dir`; returns what was removed.

    Staging folders (`.checkpoint-N.partial`, and `.final.partial` of the final model) and half-deleted ones (`.checkpoint-N.deleting`) are removed. A complete
    checkpoint set aside to be replaced by a newer write of the same step (`.checkpoint-N.replaced`) is put back when
    the replacement never arrived, and removed otherwise. Call it on the main process only, before training.
    """
    folder = Path(output_dir)
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        name = path.name
        if name == FINAL_STAGING_NAME:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        if not name.startswith(".checkpoint-"):
            continue
        if name.endswith(REPLACED_SUFFIX):
            original = folder / name[1 : -len(REPLACED_SUFFIX)]
            if not original.exists():
                os.replace(path, original)
                logger.warning("restored %s, set aside by an interrupted checkpoint write", original.name)
                continue
        if name.endswith((STAGING_SUFFIX, DELETING_SUFFIX, REPLACED_SUFFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.warning("removed %s, left by an interrupted checkpoint write or rotation", name)
    if removed:
        fsync_path(folder)
    return removed


def _local_state_tensors(model: torch.nn.Module, optimizers) -> list[tuple[str, torch.Tensor]]:
    tensors = [(f"model.{name}", tensor) for name, tensor in model.state_dict(keep_vars=True).items()]
    for index, optimizer in enumerate(optimizers):
        for parameter_index, state in enumerate(optimizer.state.values()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    tensors.append((f"optimizer{index}.state[{parameter_index}].{key}", value))
    return [(name, tensor) for name, tensor in tensors if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]


def nonfinite_state(model: torch.nn.Module, optimizers=()) -> list[str]:
    """
    Names of the floating-point tensors of `model` (parameters and buffers) and of the optimisers' state (moments)
    that hold NaN or infinity, on this process (sharded states are checked shard by shard).
    """
    named = _local_state_tensors(model, optimizers)
    tensors = [tensor.detach() for _, tensor in named]
    if not tensors:
        return []
    # One fused pass: the infinity norm is NaN or inf exactly when a tensor holds NaN or inf.
    norms = torch.stack([norm.float().cpu() for norm in torch._foreach_norm(tensors, ord=float("inf"))])
    return [named[index][0] for index in torch.nonzero(~torch.isfinite(norms)).flatten().tolist()]


def check_state_finite(accelerator, model: torch.nn.Module, optimizers=(), when: str = "") -> None:
    """
    Raise `NonFiniteStateError` on every process when any process holds a non-finite weight or optimiser moment.
    """
    bad = nonfinite_state(model, optimizers)
    count = torch.tensor([len(bad)], device=accelerator.device)
    total = int(accelerator.reduce(count, reduction="sum").item()) if accelerator.num_processes > 1 else len(bad)
    if total:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise NonFiniteStateError(
            f"the training state {when}holds NaN or infinite values in {total} tensor(s)"
            + (f" (this process: {shown})" if bad else "")
        )


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    limit: int | None = None,
    model=None,
    optimizers=(),
    extra: dict | None = None,
) -> Checkpoint:
    """
    Save the full training state as `output_dir/checkpoint-{step}`, crash-safely; call it on every process.

    Args:
        accelerator: the run's `accelerate.Accelerator` (its `save_state` writes the state).
        output_dir: the run's output folder; must be on a file system every process sees.
        step: completed optimiser steps, recorded in the marker.
        limit: keep at most this many complete checkpoints; older ones are removed after the new one is complete.
        model, optimizers: checked for NaN / infinity first (all processes agree); a non-finite state raises
            `NonFiniteStateError` and nothing is written.
        extra: JSON-serialisable facts about the run kept in the marker (`Checkpoint.extra` on reading).
    Returns:
        The new complete `Checkpoint`.
    Raises:
        `NonFiniteStateError`, or `TrainingCheckpointError` when the write fails (a full disk, say): the staging folder is
        removed and every earlier checkpoint is left as it was.
    """
    output_dir = Path(output_dir)
    if model is not None:
        check_state_finite(accelerator, model, optimizers, when=f"at step {step} ")
    final = checkpoint_path(output_dir, step)
    staging = output_dir / f".{final.name}{STAGING_SUFFIX}"
    errors = []

    def attempt(action) -> None:
        # Every process takes part in each phase, and all learn whether any failed (one reduction per phase).
        if not errors:
            try:
                action()
            except OSError as error:
                errors.append(f"{type(error).__name__}: {error}")
        failed = torch.tensor([float(bool(errors))], device=accelerator.device)
        if accelerator.num_processes > 1:
            failed = accelerator.reduce(failed, reduction="sum")
        if failed.item() and not errors:
            errors.append("a write failed on another process")

    attempt(lambda: accelerator.is_main_process and shutil.rmtree(staging, ignore_errors=True))
    attempt(lambda: accelerator.save_state(str(staging)))
    attempt(lambda: accelerator.is_main_process and _complete(staging, final, step, extra or {}))
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise TrainingCheckpointError(
            f"writing {final.name} failed ({errors[0]}); nothing was replaced or deleted, "
            f"{describe_last_good(output_dir)}"
        )
    if accelerator.is_main_process and limit:
        try:
            rotate_checkpoints(output_dir, limit)
        except OSError as error:
            # The new checkpoint is complete; an old one left behind costs space, not work.
            logger.warning("could not remove checkpoints beyond --checkpoints_total_limit %d: %s", limit, error)
    accelerator.wait_for_everyone()
    return Checkpoint(final, step, dict(extra or {}))


def _complete(staging: Path, final: Path, step: int, extra: dict) -> None:
    files = _files_with_sizes(staging)
    for name in files:
        _fsync_file(staging / name)
    write_json_atomically(
        staging / MARKER_NAME,
        {"completed_steps": step, "format": MARKER_FORMAT, "complete": True, "files": files, "extra": extra},
    )
    replaced = None
    if final.exists():
        # A checkpoint of the same step from an earlier run (resumed from an older checkpoint): set aside, not
        # deleted, until the new one is in place; `remove_stale_files` puts it back if the run dies in between.
        replaced = final.with_name(f".{final.name}{REPLACED_SUFFIX}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int) -> list[Path]:
    """
    Remove the oldest complete checkpoints beyond `limit`; returns them. Incomplete folders are left for
    `remove_stale_files`, and the newest complete checkpoint is never removed (`limit` is at least 1).
    """
    complete, _ = find_checkpoints(output_dir)
    removed = []
    for checkpoint in complete[: -max(int(limit), 1)]:
        doomed = checkpoint.path.with_name(f".{checkpoint.path.name}{DELETING_SUFFIX}")
        # Renamed first: a deletion cut short leaves a hidden folder, never a half-empty `checkpoint-N`.
        os.replace(checkpoint.path, doomed)
        fsync_path(doomed.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(checkpoint.path)
    return removed


__all__ = [
    "FINAL_STAGING_NAME",
    "Checkpoint",
    "TrainingCheckpointError",
    "NonFiniteStateError",
    "check_state_finite",
    "describe_last_good",
    "find_checkpoints",
    "latest_checkpoint",
    "nonfinite_state",
    "publish_files",
    "read_checkpoint",
    "remove_stale_files",
    "replace_atomically",
    "rotate_checkpoints",
    "save_checkpoint",
    "write_json_atomically",
]
