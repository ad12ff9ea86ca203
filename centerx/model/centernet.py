"""CenterNet = backbone -> upsampling neck -> heads, with input normalisation in the graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from centerx.model.heads import CenterNetHeads
from centerx.model.neck import UpsampleNeck

OUTPUT_STRIDE = 4


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
def _stage_channels(backbone: nn.Module) -> dict[int, int]:
    """Channels of the last backbone piece at each stride, from one small dummy forward."""
    was_training = backbone.training
    backbone.eval()
    x, channels = torch.zeros(1, 3, 64, 64), {}
    for stage in backbone.stages():
        x = stage(x)
        channels[64 // x.shape[-1]] = x.shape[1]
    backbone.train(was_training)
    missing = [s for s in (4, 8, 16) if s not in channels]
    if missing:
        raise ValueError(
            f"{type(backbone).__name__} has no stage at stride {missing}: use model.skip_connections=false"
        )
    return channels


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
    ) -> None:
        super().__init__()
        self.backbone = backbone
        skips = [_stage_channels(backbone)[s] for s in (16, 8, 4)] if skip_connections else None
        self.neck = UpsampleNeck(backbone.out_channels, neck_channels, skips)
        self.heads = CenterNetHeads(self.neck.out_channels, num_classes, head_channels)
        self.num_classes = num_classes
        self.grad_checkpoint = grad_checkpoint
        # Buffers but not state: normalisation belongs to the backbone, not the checkpoint.
        mean = torch.tensor(backbone.input_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(backbone.input_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)

    def _run(
        self, stage: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
    ) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(
                stage,
                *inputs,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_restored(stage)),
            )
        return stage(*inputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.input_mean) / self.input_std
        by_stride: dict[int, torch.Tensor] = {}
        for stage in self.backbone.stages():
            x = self._run(stage, x)
            by_stride[images.shape[-1] // x.shape[-1]] = x  # the last piece at each stride wins
        for stage, stride in zip(self.neck, (16, 8, 4), strict=True):
            skip = by_stride.get(stride) if self.neck.uses_skips else None
            x = self._run(stage, x, skip)
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(images))


def build_model(
    model_cfg: Mapping[str, Any] | DictConfig, num_classes: int, pretrained: Any = None
) -> CenterNet:
    """Build from the `model` config group. `pretrained`, when not None, overrides the preset's
    (teachers rebuilt from checkpoints pass False: their weights come from the checkpoint)."""
    cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(dict(model_cfg))
    presets = cfg.backbones
    if cfg.backbone not in presets:
        raise ValueError(
            f"unknown model.backbone={cfg.backbone!r}; available: {sorted(presets)} "
            "(add one under model.backbones in conf/model/centernet.yaml)"
        )
    preset = presets[cfg.backbone]
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
    )
