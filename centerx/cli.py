"""Hydra entry points: each subcommand composes conf/{name}.yaml and runs one task function.

SUBCOMMANDS is the one list of subcommands (run.sh and `centerx --help` read it). Task modules
are imported only when their subcommand runs, so `predict` on an ONNX model does not pay for
importing the training code.

Every failure ends here: centerx.errors prints a known one as one line and chooses the exit
code; Hydra never gets to print its own traceback or "Set the environment variable
HYDRA_FULL_ERROR" advice (the task runs inside a handler of ours, and composition errors are
re-raised to us instead of printed).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence

import hydra
from omegaconf import DictConfig

from centerx import errors

log = logging.getLogger("centerx")

# conf/ is installed as the package centerx.conf: found from any directory, in a wheel too.
CONF_PACKAGE = "pkg://centerx.conf"

SUBCOMMANDS = {
    "main": "centerx.recipes.main_job:main_job_task",
    "train": "centerx.engine.training:train_task",
    "distill": "centerx.engine.training:train_task",
    "eval": "centerx.engine.tasks:eval_task",
    "predict": "centerx.engine.tasks:predict_task",
    "export": "centerx.exporter.onnx:export_task",
    "pseudo_label": "centerx.engine.pseudo_label:pseudo_label_task",
}


def split_command(args: Sequence[str]) -> tuple[str, list[str]]:
    """(subcommand, overrides); overrides alone run the main job."""
    args = list(args)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in SUBCOMMANDS:
            raise errors.UsageError(
                f"unknown subcommand {command!r}", f"choose one of {', '.join(SUBCOMMANDS)}"
            )
        return command, args
    return "main", args


@contextlib.contextmanager
def _hydra_raises() -> Iterator[None]:
    """Hydra prints composition errors itself unless HYDRA_FULL_ERROR is set; then it re-raises
    them, to us. Restored afterwards so child processes see the user's setting."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def run(name: str, overrides: Sequence[str] = ()) -> int:
    """Compose conf/{name}.yaml with `overrides`, run its task; the exit code."""
    # A kill (SIGTERM) unwinds like Ctrl-C, so the trainer can say where to resume from.
    signal.signal(signal.SIGTERM, errors.raise_terminated)
    module, function = SUBCOMMANDS[name].split(":")
    failures: list[BaseException] = []

    @hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name=name)
    def entry(cfg: DictConfig) -> None:
        try:
            result = getattr(importlib.import_module(module), function)(cfg)
        except BaseException as exc:  # reported after Hydra returns, by centerx.errors
            failures.append(exc)
            return
        if result:
            log.info("%s done: %s", name, json.dumps(result, default=str)[:2000])

    sys.argv = [f"centerx {name}", *overrides]  # what hydra.main parses
    try:
        with _hydra_raises():
            entry()
    except SystemExit:
        raise  # argparse (--help, a bad flag) has already said why
    except BaseException as exc:  # composition, run-directory creation
        failures.append(exc)
    return errors.report(failures[0]) if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`centerx [SUBCOMMAND] [overrides]` -> exit code."""
    try:
        command, overrides = split_command(sys.argv[1:] if argv is None else argv)
    except errors.UsageError as err:
        return errors.report(err)
    return run(command, overrides)
