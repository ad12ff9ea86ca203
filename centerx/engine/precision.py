"""Mixed precision and memory layout for training (train.amp, train.channels_last).

Autocast covers the model's forward only: the outputs come back as float32, so the objective
computes the loss (focal log terms, L1, distillation) in full precision. fp16 needs a loss scale
(its gradients underflow otherwise): a GradScaler, on CUDA only; bf16 has fp32's exponent range
and needs none.

On a CPU, bf16 pays where convolutions dominate and the CPU has bf16 dot-product instructions
(AVX512-BF16 or AMX: recent Xeons and EPYCs): a ResNet-18 step at 256 px took ~1.8x less time
than in float32 on this project's 2-core EPYC (docs/results/benchmarks/train_resnet18_bf16.txt
against train_resnet18.txt). EfficientNet-Lite0,
mostly depthwise convolutions and elementwise layers, gains nothing there. Without those
instructions bf16 is emulated and slower than float32: a warning says so.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from centerx.errors import ConfigError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype train.amp asks for; None: full float32."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"train.amp={amp!r} is not a precision", "use null, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.amp=fp16 needs a CUDA device (train.device={device})",
            "use train.amp=bf16 on CPU",
        )
    if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        _warn_emulated_bf16()
    return AMP_DTYPES[amp]


@functools.cache  # once per process: the trainer checks the config more than once
def _warn_emulated_bf16() -> None:
    log.warning(
        "train.amp=bf16: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16), so bf16 "
        "is emulated and slower than float32; drop train.amp here"
    )


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU flags (Linux /proc/cpuinfo) list bf16 dot products; None: unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


class AutocastForward(nn.Module):
    """Runs `module` under torch.autocast and returns its dict of outputs as float32."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.module(images)
        return {name: value.float() for name, value in outputs.items()}
