"""Turn any DetectionSource into training batches (augment + targets) or eval batches.

Images travel as uint8 (4x less to copy between worker processes); the model
normalises them. A sample whose image cannot be read becomes None and is
dropped by the collate function, which counts it so the trainer can report it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from centerx.data.base import DetectionSource, ImageReadError
from centerx.data.targets import build_targets
from centerx.data.transforms import (
    AugmentConfig,
    clip_boxes,
    color_jitter,
    letterbox_matrix,
    random_affine,
    transform_boxes,
    warp_image,
)

log = logging.getLogger(__name__)

STRIDE = 4


def check_image_size(image_size: int, stride: int = 32) -> int:
    if image_size <= 0 or image_size % stride:
        raise ValueError(
            f"image_size={image_size} must be a positive multiple of {stride} (the backbone stride)"
        )
    return int(image_size)


class TrainingDataset(Dataset):
    """Augmented images with CenterNet targets. `augment=None` uses the letterbox only."""

    def __init__(
        self,
        source: DetectionSource,
        image_size: int,
        augment: AugmentConfig | None = None,
        max_objects: int = 64,
        min_overlap: float = 0.3,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.image_size = check_image_size(image_size)
        self.augment = augment
        self.max_objects = max_objects
        self.min_overlap = min_overlap
        self.seed = seed
        self.epoch = 0  # set by the trainer so each epoch draws new augmentations reproducibly

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        try:
            image, ann = self.source.load(index)
        except ImageReadError as err:
            log.warning("skipping unreadable image: %s", err)
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        height, width = image.shape[:2]
        if self.augment is None:
            matrix = letterbox_matrix(width, height, self.image_size)
        else:
            matrix = random_affine(rng, width, height, self.image_size, self.augment)
        image = warp_image(image, matrix, self.image_size)
        if self.augment is not None:
            image = color_jitter(image, rng, self.augment.color)
        boxes, labels = clip_boxes(transform_boxes(ann.boxes, matrix), ann.labels, self.image_size)
        grid = self.image_size // STRIDE
        targets = build_targets(
            boxes / STRIDE,
            labels,
            self.source.num_classes,
            (grid, grid),
            self.max_objects,
            self.min_overlap,
        )
        return {
            "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
            "heatmap": targets.heatmap,
            "wh": targets.wh,
            "offset": targets.offset,
            "index": targets.index,
            "mask": targets.mask,
            "labeled": self.source.labeled_classes(index),
            "absent": self.source.absent_classes(index),
        }


class EvalDataset(Dataset):
    """Letterboxed images with what is needed to map predictions back to the original."""

    def __init__(self, source: DetectionSource, image_size: int) -> None:
        self.source = source
        self.image_size = check_image_size(image_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        try:
            image = self.source.load_image(index)
        except ImageReadError as err:
            log.warning("skipping unreadable image: %s", err)
            return None
        height, width = image.shape[:2]
        matrix = letterbox_matrix(width, height, self.image_size)
        image = warp_image(image, matrix, self.image_size)
        return {
            "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
            "image_id": self.source.image_info(index).image_id,
            "matrix": matrix.astype(np.float32),
            "source_index": index,
        }


def collate(samples: Sequence[dict | None]) -> dict:
    """Stack samples into tensors; unreadable ones (None) are dropped and counted."""
    kept = [s for s in samples if s is not None]
    batch: dict = {"num_skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    for key in kept[0]:
        batch[key] = torch.as_tensor(np.stack([s[key] for s in kept]))
    return batch


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=generator,
        # Not persistent: workers keep the dataset copy they started with, so the trainer's
        # per-epoch `dataset.epoch` (new augmentations each epoch) would never reach them, and
        # the shuffle order would depend on whether the workers were just started (inexact resume).
        persistent_workers=False,
    )
