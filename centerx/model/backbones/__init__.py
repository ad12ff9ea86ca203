"""Backbones: nn.Modules mapping normalised [B,3,H,W] to a stride-32 feature map.

Each has `out_channels`, `stride` (32), `input_mean`/`input_std` (0..255 RGB scale)
and `stages()` (stem first, then each stage; applied in order they equal `forward`).
"""

from centerx.model.backbones.efficientnet_lite import efficientnet_lite0
from centerx.model.backbones.resnet import resnet18, resnet34, resnet50
from centerx.model.backbones.tiny import TinyBackbone

__all__ = ["TinyBackbone", "efficientnet_lite0", "resnet18", "resnet34", "resnet50"]
