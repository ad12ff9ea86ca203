"""A run directory holds one run.

A training run claims its directory for as long as it runs (`claim`):

- a lock: a second process writing into the same directory fails at once. It is an flock, which
  the kernel releases when its process ends, so the lock of a killed run is simply taken over;
- a directory that already holds a run (checkpoints or metrics) is refused, unless this run
  resumes into it (train.resume inside it, or the main job's main_job.reuse) or `overwrite=true`
  is given, which first deletes the previous run's outputs (RUN_OUTPUTS, nothing else);
- partial checkpoint files (`*.tmp`, left by a kill mid-write) are removed.

Under torchrun rank 0 claims, and every rank learns whether it may go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from centerx.engine import distributed as dist
from centerx.errors import CenterxError, UsageError

log = logging.getLogger(__name__)

LOCK_NAME = ".centerx.lock"
# What a training run writes into its directory (the main job: into each stage's directory too).
RUN_OUTPUTS = (
    "config.yaml", "checkpoints", "metrics.jsonl", "curves.png", "eval.json", "detections.json",
    "pr_curves.png", "samples.png",
)  # fmt: skip
# Any of these means the directory holds a run whose results a new run would destroy.
RUN_MARKERS = ("checkpoints/*.pt", "metrics.jsonl", "eval.json", "*/checkpoints/*.pt")
PARTIAL_FILES = ("checkpoints/*.tmp", "*/checkpoints/*.tmp", "metrics.jsonl.tmp")


class RunDirInUse(CenterxError):
    """Another process holds the run directory's lock."""


class RunDirHoldsRun(UsageError):
    """The run directory holds a previous run, and neither resume nor overwrite was asked for."""


def holds_run(directory: Path, markers: tuple[str, ...] = RUN_MARKERS) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in markers)


def resumes_into(resume: str | None, directory: Path) -> bool:
    """Whether checkpoint `resume` lies inside `directory` (the run continues there)."""
    return bool(resume) and Path(resume).resolve().is_relative_to(directory.resolve())


def clear_outputs(directory: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Delete a previous run's outputs (RUN_OUTPUTS, or a task's own) from `directory`."""
    for name in outputs:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_partial_files(directory: Path) -> None:
    for pattern in PARTIAL_FILES:
        for partial in directory.glob(pattern):
            log.info("removing %s (a write that was interrupted)", partial)
            partial.unlink()


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    with open(directory / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunDirInUse(
                f"run directory {directory} is in use by another centerx process (pid {owner})",
                "wait for it to end, or choose another hydra.run.dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield  # closing the file releases the lock


def _make_room(
    directory: Path, resuming: bool, overwrite: bool, resume_with: str, outputs: tuple[str, ...]
) -> None:
    markers = RUN_MARKERS if outputs == RUN_OUTPUTS else outputs
    if holds_run(directory, markers) and not resuming:
        if not overwrite:
            held = "a run (checkpoints or metrics)" if markers == RUN_MARKERS else list(outputs)
            raise RunDirHoldsRun(
                f"{directory} already holds {held}",
                f"choose another directory{'; continue it with ' + resume_with if resume_with else ''}; "
                "or replace it with overwrite=true",
            )
        clear_outputs(directory, outputs)
        log.warning("overwrite=true: deleted the previous run's outputs in %s", directory)
    remove_partial_files(directory)


@contextlib.contextmanager
def claim(
    directory: Path,
    *,
    resuming: bool = False,
    overwrite: bool,
    resume_with: str = "",
    outputs: tuple[str, ...] = RUN_OUTPUTS,
) -> Iterator[None]:
    """Hold `directory` for one run (see the module docstring); every rank enters or raises.
    `resume_with` says how this kind of run continues in a directory (for the message).
    Tasks other than training pass the files they write as `outputs`: only those existing
    already refuses the directory (export next to a training run's checkpoints is fine)."""
    with contextlib.ExitStack() as stack:
        refusal: CenterxError | None = None
        if dist.is_main():
            directory.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(_lock(directory))
                _make_room(directory, resuming, overwrite, resume_with, outputs)
            except CenterxError as err:
                refusal = err
        if not dist.all_true(refusal is None):
            raise refusal or CenterxError("rank 0 refused the run directory (its error says why)")
        yield
