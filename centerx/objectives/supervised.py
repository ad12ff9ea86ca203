"""The supervised objective: CenterNet's focal + L1 terms on each sample's own labels."""

from __future__ import annotations

import torch
from torch import nn

from centerx.losses.centernet_loss import CenterNetLoss
from centerx.objectives import ObjectiveContext, require_labels


class SupervisedObjective:
    term_names = ("cls", "wh", "offset")

    def __init__(self, criterion: CenterNetLoss, context: ObjectiveContext | None = None) -> None:
        self.criterion = criterion
        if context is not None:
            require_labels(
                context.train_source, context.class_names, "the model could never learn them"
            )

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.criterion(model(batch["image"]), batch)
