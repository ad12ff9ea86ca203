"""Combine named loss terms into one scalar: fixed weights, or adaptive fixed magnitudes.

Terms are matched to their weight or target by exact name, from the config
(`loss.weights` / `loss.targets`); a term with no entry is an error, never a guess.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


def _lookup(table: Mapping[str, float], name: str, what: str) -> float:
    if name not in table:
        raise KeyError(f"loss term {name!r} has no {what}; configured: {sorted(table)}")
    return float(table[name])


class FixedWeights:
    """total = sum(weight[name] * term)."""

    may_skip_terms = False  # every term is always in the graph

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)

    def __call__(self, terms: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        weighted, logs = [], {}
        for name, value in terms.items():
            weighted.append(_lookup(self.weights, name, "weight") * value)
            logs[f"raw/{name}"] = float(value.detach())
            logs[f"weighted/{name}"] = float(weighted[-1].detach())
        return torch.stack(weighted).sum(), logs

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdaptiveMagnitudeWeights:
    """Each term is rescaled to a configured magnitude every step:

        weighted = term * target / magnitude,   magnitude = EMA of |term| (detached)

    With momentum 0 the weighted value equals the target exactly; momentum > 0 smooths the
    scale so one noisy batch does not jerk it. The gradient of each term is scaled by
    target / magnitude, so no term can swamp the others, and a loss that spikes is scaled
    back down at once instead of producing a spike-sized update. A term that is zero, tiny
    (< eps) or non-finite is skipped for this step (its scale is not updated) and logged.

    The lr robustness this buys is an SGD property: SGD's step is proportional to the
    gradient, so rescaling terms rescales the step. Adam(W) divides every gradient by its
    own running RMS, so the step size ignores the weights; there the weighter only changes
    the balance between terms (scripts/lr_stress.py measures both).
    """

    # A skipped term leaves its head without a gradient in that step: under DDP the trainer
    # then lets DistributedDataParallel look for unused parameters.
    may_skip_terms = True

    def __init__(
        self, targets: Mapping[str, float], momentum: float = 0.0, eps: float = 1e-8
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.targets = dict(targets)
        self.momentum = momentum
        self.eps = eps
        self.magnitudes: dict[str, float] = {}

    def _magnitude(self, name: str, value: float) -> float:
        previous = self.magnitudes.get(name)
        smoothed = (
            value if previous is None else self.momentum * previous + (1 - self.momentum) * value
        )
        self.magnitudes[name] = smoothed
        return smoothed

    def __call__(self, terms: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total, logs = None, {}
        for name, value in terms.items():
            target = _lookup(self.targets, name, "target magnitude")
            raw = float(value.detach())
            logs[f"raw/{name}"] = raw
            if not math.isfinite(raw) or abs(raw) < self.eps:
                logs[f"skipped/{name}"] = 1.0
                log.debug("adaptive weighter skipped %s=%s", name, raw)
                continue
            scale = target / max(abs(self._magnitude(name, abs(raw))), self.eps)
            weighted = value * scale
            logs[f"weighted/{name}"] = float(weighted.detach())
            logs[f"scale/{name}"] = scale
            total = weighted if total is None else total + weighted
        if total is None:
            # Every term skipped: a constant zero; the trainer skips backward for it.
            total = torch.zeros(())
        return total, logs

    def state_dict(self) -> dict:
        return {"magnitudes": dict(self.magnitudes)}

    def load_state_dict(self, state: dict) -> None:
        self.magnitudes = dict(state.get("magnitudes", {}))
