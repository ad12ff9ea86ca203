"""Checkpoints: plain containers only (loadable with weights_only=True), written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different model."""


def to_plain(value: Any) -> Any:
    """DictConfig/ListConfig/numpy scalars -> builtins, so torch.load(weights_only=True) reads it."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write to a temporary file then rename: a crash mid-write never corrupts `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **to_plain(dict(state))}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a kill (KeyboardInterrupt) or full disk mid-write: leave no debris
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(
            f"{path} is not a centerx checkpoint (no 'model'/'model_config' entries)"
        )
    return state


def inference_weights(checkpoint: Mapping[str, Any]) -> dict:
    """The weights to predict with: the EMA copy when training kept one."""
    return checkpoint.get("ema") or checkpoint["model"]


def check_compatible(
    checkpoint: Mapping[str, Any], path: str | Path, backbone: str, class_names: list[str]
) -> None:
    """Refuse a checkpoint from another backbone or class list, naming both sides."""
    theirs_backbone = checkpoint["model_config"].get("backbone")
    theirs_classes = list(checkpoint.get("class_names", []))
    if theirs_backbone != backbone:
        raise CheckpointError(
            f"{path} was trained with backbone {theirs_backbone!r}, but this run builds {backbone!r}"
        )
    if theirs_classes != list(class_names):
        raise CheckpointError(
            f"{path} has {len(theirs_classes)} classes {theirs_classes}, "
            f"but this run has {len(class_names)} classes {list(class_names)}"
        )
