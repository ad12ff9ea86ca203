"""Upsampling neck: stride 32 -> stride 4 by three (conv3x3 + deconv x2) stages.

CenterNet's ResNet variant, with a plain 3x3 conv where it used deformable
convolution, so the exported graph holds only standard ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _bilinear_deconv_init(deconv: nn.ConvTranspose2d) -> None:
    """Start the deconvolution as bilinear upsampling (per channel), as CenterNet does."""
    weight = deconv.weight.data
    weight.zero_()
    k = weight.shape[-1]
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float32)
    filt_1d = 1 - (og - center).abs() / factor
    filt = filt_1d[:, None] * filt_1d[None, :]
    for c in range(min(weight.shape[0], weight.shape[1])):
        weight[c, c] = filt


class UpsampleStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        deconv = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
        _bilinear_deconv_init(deconv)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            deconv,
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpsampleNeck(nn.Sequential):
    """Three x2 upsampling stages; `out_channels` is the last stage's width."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (256, 128, 64)) -> None:
        stages, previous = [], in_channels
        for width in channels:
            stages.append(UpsampleStage(previous, width))
            previous = width
        super().__init__(*stages)
        self.out_channels = previous
