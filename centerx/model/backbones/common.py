"""Helpers shared by the backbones: normalisation constants and strict checkpoint loading.

Loading is strict on purpose: a silently half-loaded backbone trains, but badly, and
that is hard to notice. Every mismatch is reported by key, with shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from centerx.errors import CenterxError

# ImageNet statistics in the 0..255 RGB scale (torchvision's 0..1 values x 255).
IMAGENET_MEAN_255: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD_255: tuple[float, float, float] = (58.395, 57.12, 57.375)

_MAX_LISTED = 10  # keys listed per category in an error message


class WeightsError(CenterxError, RuntimeError):
    """Pretrained backbone weights cannot be read, fetched or loaded."""


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from `path`; accepts a bare state dict or {"state_dict"|"model": ...}."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"Backbone checkpoint not found: {file}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise WeightsError(f"Could not read backbone checkpoint {file}: {e}") from e
    return extract_state_dict(obj, source=str(file))


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap common checkpoint layouts and a DataParallel "module." prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"{source} is not a state dict (expected a mapping of name -> tensor, "
            "optionally under a 'state_dict' or 'model' key)"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load `state` into `module` strictly, after dropping keys under `ignore_prefixes`.

    Raises RuntimeError listing missing keys, unexpected keys and shape mismatches.
    """
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        msg = f"Cannot load {source} into {type(module).__name__}:"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if mismatched:
            msg += _listing("shape mismatches", mismatched)
        raise WeightsError(msg)
    module.load_state_dict(state, strict=True)


def init_conv_bn(module: nn.Module) -> None:
    """torchvision's initialisation (Kaiming fan-out convolutions, unit BatchNorm), so a backbone
    trained from scratch here starts like its torchvision counterpart."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
