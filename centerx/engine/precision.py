"""Mixed precision and memory layout for training (train.amp, train.channels_last).

Autocast covers the model's forward only: the outputs come back as float32, so the objective
computes the loss (focal log terms, L1, distillation) in full precision. fp16 needs a loss scale
(its gradients underflow otherwise): a GradScaler, on CUDA only; bf16 has fp32's exponent range
and needs none. On a CPU without bf16 instructions bf16 is emulated and slower: it is there to
test the path, the speed is a GPU's (or a recent Xeon's).
"""

from __future__ import annotations

import torch
from torch import nn

from centerx.errors import ConfigError

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
    return AMP_DTYPES[amp]


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
