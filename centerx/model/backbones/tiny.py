"""TinyBackbone: a small random-init conv net for tests and CPU demos.

Five stride-2 stages of conv-BN-ReLU (channels w, 2w, 4w, 8w, 8w), each followed by
one stride-1 3x3 conv from the second stage on, so the net has some depth but stays
around tens of milliseconds per training step on a laptop CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from centerx.errors import ConfigError
from centerx.model.backbones.common import IMAGENET_MEAN_255, IMAGENET_STD_255


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Stride-32 feature extractor with out_channels = 8 * width."""

    stride: int = 32
    input_mean: tuple[float, float, float] = IMAGENET_MEAN_255
    input_std: tuple[float, float, float] = IMAGENET_STD_255

    def __init__(self, width: int = 16, pretrained: bool = False):
        super().__init__()
        if pretrained:
            raise ConfigError("TinyBackbone has no pretrained weights; use model.pretrained=null")
        if width < 1:
            raise ConfigError(f"TinyBackbone width must be >= 1, got {width}")
        w = width
        self.stem = conv_bn_relu(3, w, stride=2)
        self.stage1 = self._stage(w, 2 * w)
        self.stage2 = self._stage(2 * w, 4 * w)
        self.stage3 = self._stage(4 * w, 8 * w)
        self.stage4 = self._stage(8 * w, 8 * w)
        self.out_channels: int = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_ch: int, out_ch: int) -> nn.Sequential:
        return nn.Sequential(conv_bn_relu(in_ch, out_ch, stride=2), conv_bn_relu(out_ch, out_ch))

    def stages(self) -> list[nn.Module]:
        """Stem then the four stages (all registered submodules)."""
        return [self.stem, self.stage1, self.stage2, self.stage3, self.stage4]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages():
            x = stage(x)
        return x
