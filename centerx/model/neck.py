"""Upsampling neck: stride 32 -> stride 4 by three (conv3x3 + deconv x2) stages.

CenterNet's ResNet variant, with a plain 3x3 conv where it used deformable
convolution, so the exported graph holds only standard ops. Optional lateral
skips add the backbone's stride-16/8/4 features after each upsampling (as in
TTFNet): fine localisation no longer has to survive the stride-32 bottleneck,
which makes small models on CPU converge several times faster.
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


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class UpsampleStage(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, skip_channels: int | None = None
    ) -> None:
        super().__init__()
        deconv = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
        _bilinear_deconv_init(deconv)
        self.up = nn.Sequential(
            *_conv_bn_relu(in_channels, out_channels, 3),
            deconv,
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.lateral = (
            nn.Sequential(*_conv_bn_relu(skip_channels, out_channels, 1)) if skip_channels else None
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return x if self.lateral is None else x + self.lateral(skip)


class UpsampleNeck(nn.ModuleList):
    """Three x2 upsampling stages; `skip_channels` are the backbone's stride 16, 8, 4 widths."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (256, 128, 64),
        skip_channels: Sequence[int] | None = None,
    ) -> None:
        skips = list(skip_channels) if skip_channels else [None] * len(channels)
        stages, previous = [], in_channels
        for width, skip in zip(channels, skips, strict=True):
            stages.append(UpsampleStage(previous, width, skip))
            previous = width
        super().__init__(stages)
        self.out_channels = previous
        self.uses_skips = skip_channels is not None
