"""ModelEMA: the average must smooth a short run (a small photo set's 80 steps), not only a
long one, and follow the weights' drift."""

from __future__ import annotations

import torch
from torch import nn

from centerx.engine.ema import ModelEMA


def run_ema(weights: torch.Tensor, decay: float = 0.998) -> torch.Tensor:
    """Feed weights[n] as the model's weight at update n; return the EMA's weight."""
    model = nn.Linear(weights.shape[1], 1, bias=False)
    ema = ModelEMA(model, decay)
    for step_weights in weights:
        with torch.no_grad():
            model.weight.copy_(step_weights[None])
        ema.update(model)
    return ema.module.weight[0].detach()


def test_ema_averages_noise_within_a_short_run() -> None:
    """80 updates of weights = 5 + unit noise: the EMA's error must be a fraction of one
    raw step's. (The former YOLOX-style ramp, decay * (1 - exp(-n / 200)), left 0.7 of it here.)"""
    generator = torch.Generator().manual_seed(0)
    weights = 5 + torch.randn(80, 4000, generator=generator)
    error = (run_ema(weights) - 5).std().item()
    assert error < 0.3, error


def test_ema_follows_drift_and_caps_the_decay() -> None:
    """Weights rising 1, 2, ..., 300: the EMA lags by about a tenth of the steps so far, not
    by the cap's 1 / (1 - 0.998) = 500 steps; once n is large the decay is the configured one."""
    weights = torch.arange(1, 301, dtype=torch.float32)[:, None].repeat(1, 3)
    average = run_ema(weights)
    assert 255 < average.mean().item() < 295, average
    ema = ModelEMA(nn.Linear(1, 1), decay=0.9)
    ema.updates = 10_000
    assert ema.current_decay() == 0.9
