"""Training several stages of a recipe at once, each in a process of its own.

A small CenterNet on a CPU does not use two cores well: on the 2-core machine, the main job's
training step (tiny backbone, 128 px, batch 16) takes about as long with one torch thread as
with two (0.22 s against 0.20-0.24 s). Two such stages side by side, one thread each and no
loader worker (nothing to overlap with on a core that is already busy), trained 4 epochs each
in 47 s, against 34 s for one stage alone with both cores and a worker: about 1.45x the
throughput. The main job's figures are in the README.

Stages run in spawned processes (not forked: the parent's torch thread pool does not survive a
fork safely). Each process logs to the terminal and to the parent's log files, every line
prefixed with its stage's name.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from centerx.engine.distributed import launched_world_size
from centerx.errors import ConfigError

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - [{name}] %(message)s"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The main job on the 2-core machine (seed 0, before its stages used the image cache): 610 s
# with 3 stages at once, 644 s with 2; the same figures.
AUTO_SLOTS_CPU = 3


def stage_slots(setting: Any, device: str) -> int:
    """How many stages train at once: `auto` is AUTO_SLOTS_CPU on a CPU with 2 or more cores,
    else 1 (one GPU, or torchrun's processes, already take the whole machine). One stage more
    than the 2 cores: the last of the seven stages does not train alone beside an idle core,
    and stages that wait for nothing (the baselines without pseudo-labels) fill in while the
    teachers train."""
    if setting == "auto":
        if device != "cpu" or launched_world_size() > 1 or usable_cpus() < 2:
            return 1
        return AUTO_SLOTS_CPU
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"main_job.parallel must be auto or a whole number >= 1, got {setting!r}")
    return setting


class InlineExecutor(Executor):
    """Runs each call when it is submitted: one stage at a time, in this process."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # handed to whoever reads the result
            future.set_exception(err)
        return future


def stage_executor(slots: int) -> Executor:
    """`slots` worker processes (spawned), or this process alone for one slot."""
    if slots == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(slots, mp_context=multiprocessing.get_context("spawn"))


def stop(executor: Executor) -> None:
    """Cancel what has not started and end the running stages now (on an error or Ctrl-C:
    waiting for the other stage to finish could take many minutes)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def log_files() -> list[str]:
    """The files this process logs to (Hydra's run-directory log), for the stage processes."""
    return [
        handler.baseFilename
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.FileHandler)
    ]


def enter_stage_process(name: str, files: list[str], start_method: str) -> None:
    """First thing in a stage process: the parent's start method for the processes it starts
    (a spawned process defaults to spawn: every loader worker would import torch again and be
    sent a copy of the cached images instead of sharing them), then its logging."""
    multiprocessing.set_start_method(start_method, force=True)
    log_as_stage(name, files)


def log_as_stage(name: str, files: list[str]) -> None:
    """In a stage process: log INFO and up to stdout and `files`, lines prefixed with `name`."""
    formatter = logging.Formatter(LOG_FORMAT.format(name=name))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in [logging.StreamHandler(sys.stdout), *map(logging.FileHandler, files)]:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
