"""Exponential moving average of model weights (evaluated and exported instead of the raw ones).

The decay ramps as min(decay, (1 + n) / (10 + n)) after n updates (the num_updates rule of
TensorFlow's ExponentialMovingAverage): the average spans about the last tenth of the steps
so far, whatever the run's length, until it reaches `decay`. Why not the former ramp,
decay * (1 - exp(-n / 200)) (YOLOX's form; YOLOX uses 2000): it assumes thousands of steps. A
16-epoch run on 100-300 photos has 80-320 steps, over which it stays below 0.33-0.80, so the
"average" was the last one to five raw steps, and validation AP swung by up to 0.4 between
evaluations.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(current[name].detach(), alpha=1 - decay)
            else:
                value.copy_(current[name])

    def current_decay(self) -> float:
        """The decay of the latest update: early, random weights fade out quickly."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
