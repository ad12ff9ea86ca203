"""Checkpoints: plain containers only (loadable with weights_only=True), written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from centerx.errors import CenterxError, system_error
from centerx.model.centernet import CenterNet, build_model

FORMAT_VERSION = 1


class CheckpointError(CenterxError, RuntimeError):
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
    except BaseException as err:  # a kill (KeyboardInterrupt) or full disk mid-write: no debris
        tmp.unlink(missing_ok=True)
        system = system_error(err)
        if system is not None and not system.filename:  # write() names no file: say which
            raise OSError(system.errno, system.strerror, str(path)) from err
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/foreign files
        reason = (str(err).strip().splitlines() or [""])[0]  # torch adds paragraphs of advice
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {reason}",
            "is it a centerx .pt checkpoint, written whole?",
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


def model_from_checkpoint(path: str | Path) -> tuple[CenterNet, dict]:
    """Rebuild a model (architecture and classes from the checkpoint) with its weights, in eval mode."""
    state = load_checkpoint(path)
    model = build_model(state["model_config"], len(state["class_names"]), pretrained=False)
    model.load_state_dict(inference_weights(state))
    return model.eval(), state


HEATMAP_OUT = ("heads.heatmap.2.weight", "heads.heatmap.2.bias")  # the per-class output layer


def init_from_checkpoint(model: CenterNet, class_names: list[str], path: str | Path) -> dict:
    """Fine-tuning start: copy a centerx checkpoint's weights into `model` wherever they fit.

    Backbone and neck must match (else CheckpointError); head layers are copied when their
    shapes agree; the heatmap output channels are matched by class name, so a 3-class fruits
    model seeds the fruit channels of a 5-class model and the new classes keep their prior
    initialisation. Returns what was loaded, for the log line.
    """
    state = load_checkpoint(path)
    theirs = inference_weights(state)
    their_classes = [str(name) for name in state.get("class_names", [])]
    own = model.state_dict()
    body = [k for k in own if not k.startswith("heads.")]
    unfit = [k for k in body if k not in theirs or theirs[k].shape != own[k].shape]
    if unfit:
        raise CheckpointError(
            f"model.init_from={path}: its backbone/neck ({state['model_config'].get('backbone')}) "
            f"does not fit this model's; {len(unfit)} tensors differ, e.g. {unfit[0]}"
        )
    shared = [name for name in class_names if name in their_classes]
    with torch.no_grad():
        for key, value in own.items():
            if key in HEATMAP_OUT:
                for name in shared:
                    value[class_names.index(name)] = theirs[key][their_classes.index(name)]
            elif key in theirs and theirs[key].shape == value.shape:
                value.copy_(theirs[key])
    model.load_state_dict(own)
    skipped = [k for k in own if k.startswith("heads.") and k not in HEATMAP_OUT]
    skipped = [k for k in skipped if k not in theirs or theirs[k].shape != own[k].shape]
    return {
        "classes_loaded": shared,
        "classes_new": [name for name in class_names if name not in shared],
        "head_layers_skipped": skipped,
    }
