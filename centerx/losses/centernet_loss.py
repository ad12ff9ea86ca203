"""The supervised CenterNet objective: focal loss + L1 wh + L1 offset, as named terms.

Terms are returned unweighted; a weighter (`centerx.losses.weighting`) combines them.
"""

from __future__ import annotations

import torch

from centerx.losses.focal import focal_loss
from centerx.losses.regression import masked_l1


class CenterNetLoss:
    def __init__(
        self,
        wh_relative: bool = False,
        ignore_unlabelled: bool = False,
        alpha: float = 2.0,
        beta: float = 4.0,
    ) -> None:
        self.wh_relative = wh_relative
        self.ignore_unlabelled = ignore_unlabelled
        self.alpha, self.beta = alpha, beta

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        negative_weight = batch["labeled"].float() if self.ignore_unlabelled else None
        return {
            "cls": focal_loss(
                outputs["heatmap"], batch["heatmap"], self.alpha, self.beta, negative_weight
            ),
            "wh": masked_l1(
                outputs["wh"], batch["index"], batch["wh"], batch["mask"], self.wh_relative
            ),
            "offset": masked_l1(outputs["offset"], batch["index"], batch["offset"], batch["mask"]),
        }
