"""Optimizer and per-step learning-rate schedule (linear warm-up, then cosine or steps)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from centerx.errors import ConfigError


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], model: nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (decaying them only hurts)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return factory(groups, lr=lr)


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    milestones: Sequence[float] = (0.7, 0.9),
    gamma: float = 0.1,
    min_factor: float = 0.01,
) -> float:
    """Multiplier of the base lr at `step`; milestones are fractions of training."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"unknown train.schedule={schedule!r}; use cosine, multistep or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    milestones: Sequence[float] = (0.7, 0.9),
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, schedule, milestones)  # fail fast on a bad name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule, milestones)
    )
