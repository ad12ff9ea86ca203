"""Hydra entry points: each subcommand composes conf/{name}.yaml and runs one task function.

SUBCOMMANDS is the one list of subcommands (run.sh and `centerx --help` read it). Task modules
are imported only when their subcommand runs, so `predict` on an ONNX model does not pay for
importing the training code.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
from pathlib import Path

import hydra
from omegaconf import DictConfig

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


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(name: str) -> None:
    # A kill (SIGTERM) unwinds like Ctrl-C, so the trainer can say where to resume from.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    module, function = SUBCOMMANDS[name].split(":")

    @hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name=name)
    def entry(cfg: DictConfig) -> None:
        result = getattr(importlib.import_module(module), function)(cfg)
        if result:
            log.info("%s done: %s", name, json.dumps(result, default=str)[:2000])

    entry()
