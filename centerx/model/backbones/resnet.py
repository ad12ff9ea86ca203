"""ResNet-18/34/50 backbones whose state-dict keys equal torchvision's (without `fc`).

Matching torchvision's key names lets us load its published ImageNet checkpoints
directly, without torchvision installed. ResNet-50 is the "v1.5" variant: the
stride of a downsampling Bottleneck sits on its 3x3 conv, as in torchvision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path

import torch
from torch import Tensor, nn

from centerx.model.backbones.common import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    WeightsError,
    init_conv_bn,
    load_state_strict,
    read_checkpoint,
)

log = logging.getLogger(__name__)

# torchvision's IMAGENET1K_V1 weights; the 8 hex digits are the sha256 prefix of the file.
TORCHVISION_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, ch, stride)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(ch, ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, ch)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = _conv3x3(ch, ch, stride)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = _conv1x1(ch, ch * self.expansion)
        self.bn3 = nn.BatchNorm2d(ch * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet feature extractor: stem + layer1..layer4, output at stride 32 (no pool/fc)."""

    stride: int = 32
    input_mean: tuple[float, float, float] = IMAGENET_MEAN_255
    input_std: tuple[float, float, float] = IMAGENET_STD_255

    def __init__(self, block: Block, layers: Sequence[int]):
        super().__init__()
        self._in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.out_channels: int = 512 * block.expansion
        init_conv_bn(self)

    def _make_layer(self, block: Block, ch: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_ch != ch * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, ch * block.expansion, stride),
                nn.BatchNorm2d(ch * block.expansion),
            )
        blocks = [block(self._in_ch, ch, stride, downsample)]
        self._in_ch = ch * block.expansion
        blocks += [block(self._in_ch, ch) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def stages(self) -> list[nn.Module]:
        """Stem then layer1..4. The stem is a transient, unregistered view over existing modules."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _cache_dir() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch/hub).
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_torchvision_weights(arch: str) -> Path:
    """Return the cached torchvision checkpoint for `arch`, downloading it if absent."""
    url = TORCHVISION_URLS[arch]
    file = _cache_dir() / url.rsplit("/", 1)[-1]
    if file.is_file():
        return file
    file.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = file.stem.rsplit("-", 1)[-1]
    log.info("Downloading %s weights from %s to %s", arch, url, file)
    try:
        torch.hub.download_url_to_file(url, str(file), hash_prefix=hash_prefix, progress=True)
    except (OSError, HTTPException, RuntimeError) as e:  # URLError is an OSError
        raise WeightsError(
            f"Downloading the torchvision {arch} weights failed (offline?): {e}\n"
            f"  URL: {url}\n"
            f"  Fetch that file elsewhere and either put it at {file} or pass its local "
            f"path instead, e.g. pretrained=/path/to/{file.name} "
            f"(Hydra: model.backbone.pretrained=/path/to/{file.name})."
        ) from e
    return file


def _build(arch: str, block: Block, layers: Sequence[int], pretrained: str | bool | None) -> ResNet:
    model = ResNet(block, layers)
    if pretrained is True:  # tolerate a boolean from configs
        pretrained = "torchvision"
    if pretrained in (None, False, ""):
        return model
    path = download_torchvision_weights(arch) if pretrained == "torchvision" else Path(pretrained)
    state = read_checkpoint(path)
    # torchvision checkpoints carry the ImageNet classifier; the backbone has none.
    load_state_strict(model, state, ignore_prefixes=("fc.",), source=f"{arch} weights {path}")
    return model


def resnet18(pretrained: str | None = None) -> ResNet:
    """ResNet-18 (out_channels 512). pretrained: None, "torchvision" or a local .pth path."""
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), pretrained)


def resnet34(pretrained: str | None = None) -> ResNet:
    """ResNet-34 (out_channels 512). pretrained: None, "torchvision" or a local .pth path."""
    return _build("resnet34", BasicBlock, (3, 4, 6, 3), pretrained)


def resnet50(pretrained: str | None = None) -> ResNet:
    """ResNet-50 v1.5 (out_channels 2048). pretrained: None, "torchvision" or a local .pth path."""
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), pretrained)
