"""Training objectives: what a training step optimises, as named, unweighted loss terms.

An objective is called as `objective(model, batch) -> {term name: scalar tensor}`; the trainer
owns everything else (optimiser, weighting of the terms, checkpoints). Each objective is one
module here plus one config in conf/objective/ whose `_target_` builds it; the training task
calls that factory with the run's `ObjectiveContext`. A new objective (say, feature
distillation) is one new file here and one new config there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from centerx.data.base import DatasetError, DetectionSource


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know about the run it is built for."""

    class_names: list[str]  # the model's classes, in channel order
    image_size: int  # training input side (pixels)
    device: torch.device
    train_source: DetectionSource


class Objective(Protocol):
    term_names: tuple[str, ...]  # the terms every call returns (the weighter needs each)

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...


def labelled_somewhere(source: DetectionSource) -> np.ndarray:
    """Bool [C]: which classes at least one image of `source` labels."""
    labelled = np.zeros(source.num_classes, dtype=bool)
    for index in range(len(source)):
        labelled |= np.asarray(source.labeled_classes(index), dtype=bool)
        if labelled.all():
            break
    return labelled


def require_labels(source: DetectionSource, class_names: list[str], why: str) -> None:
    """Fail before training when a class in `class_names` is labelled by no training image."""
    labelled = labelled_somewhere(source)
    never = [name for name in class_names if not labelled[source.class_names.index(name)]]
    if never:
        raise DatasetError(
            f"class(es) {never} are labelled by no training image, so {why}. Train on data "
            "that labels them, or drop them from data.class_names"
        )
