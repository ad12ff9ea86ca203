"""CenterNet = backbone -> upsampling neck -> heads, with input normalisation in the graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from centerx.errors import ConfigError
from centerx.model.heads import CenterNetHeads
from centerx.model.neck import UpsampleNeck

OUTPUT_STRIDE = 4
NECK_STRIDES = (16, 8, 4)  # output stride of each neck stage
# Gradient checkpointing recomputes in backward only the pieces whose output stride is at most
# the backbone's `checkpoint_max_stride` (default 8), and the neck stages at those strides. Which
# pieces hold the activations depends on the backbone. ResNet: the stride-2 stem and stride-4
# layer1, and the neck's last two stages; its stride-16 layer3 is small, and recomputing it
# saves no peak memory (ResNet-18, 256 px: -38% at 8 and at 16). EfficientNet-Lite0: its x6
# expansions run at their stage's input resolution, and the six stride-16 blocks (expanded to
# 480 and 672 channels) hold most of what remains once the fine pieces are recomputed, so it
# says 16 (photos recipe: -31% at 8, -65% at 16). Recomputing the heads saves nothing: their
# activations are needed first in backward, when everything else is still held. Measured by
# scripts/benchmark_train.py (time, RSS).
DEFAULT_CHECKPOINT_MAX_STRIDE = 8


@contextlib.contextmanager
def _batchnorm_stats_restored(module: nn.Module) -> Iterator[None]:
    """Gradient checkpointing re-runs the forward in backward; without this, BatchNorm
    would update its running statistics a second time for the same batch."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.detach().clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for current, old in zip(m.buffers(), buffers, strict=True):
                    current.copy_(old)


@torch.no_grad()
def _stage_layout(backbone: nn.Module) -> list[tuple[int, int]]:
    """(output stride, channels) of each backbone piece, from one small dummy forward."""
    was_training = backbone.training
    backbone.eval()
    x, layout = torch.zeros(1, 3, 64, 64), []
    for stage in backbone.stages():
        x = stage(x)
        layout.append((64 // x.shape[-1], x.shape[1]))
    backbone.train(was_training)
    return layout


def _skip_channels(backbone: nn.Module, layout: list[tuple[int, int]]) -> list[int]:
    """Channels of the last backbone piece at strides 16, 8, 4 (the neck's lateral inputs)."""
    channels = dict(layout)  # the last piece at each stride wins
    missing = [s for s in NECK_STRIDES if s not in channels]
    if missing:
        raise ConfigError(
            f"{type(backbone).__name__} has no stage at stride {missing}: use model.skip_connections=false"
        )
    return [channels[s] for s in NECK_STRIDES]


class CenterNet(nn.Module):
    """Takes RGB images 0..255 (uint8 or float) [B,3,H,W]; returns heatmap logits, wh, offset
    at stride 4 (sizes and offsets in output-grid units)."""

    stride = OUTPUT_STRIDE

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        neck_channels: tuple[int, ...] = (256, 128, 64),
        head_channels: int = 64,
        grad_checkpoint: bool = False,
        skip_connections: bool = True,
        freeze_stages: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        layout = _stage_layout(backbone)
        self.stage_strides = [stride for stride, _ in layout]
        if not 0 <= freeze_stages <= len(layout):
            raise ConfigError(
                f"model.freeze_stages={freeze_stages}: {type(backbone).__name__} has "
                f"{len(layout)} pieces",
                f"use 0..{len(layout)}",
            )
        self.freeze_stages = freeze_stages
        for stage in backbone.stages()[:freeze_stages]:
            stage.requires_grad_(False)
        skips = _skip_channels(backbone, layout) if skip_connections else None
        self.neck = UpsampleNeck(backbone.out_channels, neck_channels, skips)
        self.heads = CenterNetHeads(self.neck.out_channels, num_classes, head_channels)
        self.num_classes = num_classes
        self.grad_checkpoint = grad_checkpoint
        self.checkpoint_max_stride = int(
            getattr(backbone, "checkpoint_max_stride", DEFAULT_CHECKPOINT_MAX_STRIDE)
        )
        # Buffers but not state: normalisation belongs to the backbone, not the checkpoint.
        mean = torch.tensor(backbone.input_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(backbone.input_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)

    def _run(
        self, stage: Callable[..., torch.Tensor], stride: int, *inputs: torch.Tensor | None
    ) -> torch.Tensor:
        """stage(*inputs), checkpointed when on, training, and the output stride is fine."""
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        if recompute and stride <= self.checkpoint_max_stride:
            return checkpoint(
                stage,
                *inputs,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_restored(stage)),
            )
        return stage(*inputs)

    def train(self, mode: bool = True) -> CenterNet:
        """Frozen backbone pieces stay in eval mode: their BatchNorm statistics do not move."""
        super().train(mode)
        for stage in self.backbone.stages()[: self.freeze_stages]:
            stage.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.input_mean) / self.input_std
        by_stride: dict[int, torch.Tensor] = {}
        for index, (stage, stride) in enumerate(
            zip(self.backbone.stages(), self.stage_strides, strict=True)
        ):
            if index < self.freeze_stages:
                with torch.no_grad():  # frozen: no activations kept for a backward
                    x = stage(x)
            else:
                x = self._run(stage, stride, x)
            by_stride[stride] = x  # the last piece at each stride wins
        for stage, stride in zip(self.neck, NECK_STRIDES, strict=True):
            skip = by_stride.get(stride) if self.neck.uses_skips else None
            x = self._run(stage, stride, x, skip)
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(images))


def backbone_preset(cfg: DictConfig) -> DictConfig:
    """The model.backbones preset that model.backbone names."""
    if cfg.backbone not in cfg.backbones:
        raise ConfigError(
            f"unknown model.backbone={cfg.backbone!r}; available: {sorted(cfg.backbones)}",
            "add one under model.backbones in conf/model/centernet.yaml",
        )
    return cfg.backbones[cfg.backbone]


def check_model_config(cfg: DictConfig) -> None:
    """The `model` settings, before any data is read: a known backbone, an existing init_from."""
    backbone_preset(cfg)
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise ConfigError(
            f"model.init_from={cfg.init_from} is not a file", "give a centerx checkpoint (.pt)"
        )


def build_model(
    model_cfg: Mapping[str, Any] | DictConfig, num_classes: int, pretrained: Any = None
) -> CenterNet:
    """Build from the `model` config group. `pretrained`, when not None, overrides the preset's
    (teachers rebuilt from checkpoints pass False: their weights come from the checkpoint)."""
    cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(dict(model_cfg))
    preset = backbone_preset(cfg)
    choice = cfg.get("pretrained") if pretrained is None else pretrained
    kwargs = {} if choice is None else {"pretrained": choice}
    backbone = instantiate(preset.module, **kwargs)
    return CenterNet(
        backbone,
        num_classes,
        neck_channels=tuple(cfg.get("neck_channels") or preset.neck_channels),
        head_channels=int(cfg.get("head_channels") or preset.head_channels),
        grad_checkpoint=bool(cfg.get("grad_checkpoint", False)),
        skip_connections=bool(cfg.get("skip_connections", True)),
        freeze_stages=int(cfg.get("freeze_stages") or 0),
    )
