"""The three CenterNet heads: class heatmap (C sigmoid channels), box size, centre offset."""

from __future__ import annotations

import math

import torch
from torch import nn

# Bias so the initial sigmoid is 0.1: the focal loss starts stable instead of
# being flooded by confident negatives (CenterNet's -2.19).
HEATMAP_PRIOR = 0.1
HEATMAP_BIAS = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)


def _head(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )


class CenterNetHeads(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.heatmap = _head(in_channels, hidden, num_classes)
        self.wh = _head(in_channels, hidden, 2)
        self.offset = _head(in_channels, hidden, 2)
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_BIAS)
        for head in (self.wh, self.offset):
            nn.init.normal_(head[-1].weight, std=0.001)
            nn.init.zeros_(head[-1].bias)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heatmap logits (sigmoid not applied), wh and offset in output-grid units."""
        return {
            "heatmap": self.heatmap(features),
            "wh": self.wh(features),
            "offset": self.offset(features),
        }
