"""Turn any DetectionSource into training batches (augment + targets) or eval batches.

Images travel as uint8 (4x less to copy between worker processes); the model
normalises them. A training image that cannot be read is replaced by the next readable one
(deterministically, so resume stays exact), and counted so the trainer can report it: every
batch stays full, so under DDP every rank takes the same steps. An evaluation image that cannot
be read becomes None and is dropped (and counted) by the collate function.
"""

from __future__ import annotations

import logging
import operator
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from centerx.data.base import Annotation, DetectionSource, ImageReadError
from centerx.data.targets import build_targets
from centerx.data.transforms import (
    AugmentConfig,
    clip_boxes,
    color_jitter,
    letterbox_matrix,
    mosaic,
    random_affine,
    transform_boxes,
    warp_image,
)
from centerx.errors import ConfigError, check_number

log = logging.getLogger(__name__)

STRIDE = 4
# An unreadable training image is replaced by the first readable one among the next this many.
SUBSTITUTES = 16


def check_image_size(image_size: int, stride: int = 32, key: str = "image_size") -> int:
    try:
        size = operator.index(image_size)
    except TypeError:
        size = 0  # a float or a string
    if size <= 0 or size % stride:
        below = max(stride, size // stride * stride)
        raise ConfigError(
            f"{key}={image_size!r} must be a positive multiple of {stride}, the backbone stride",
            f"e.g. {key}={below} or {below + stride}",
        )
    return size


def check_data_config(data_cfg: DictConfig) -> None:
    """The `data` settings the pipeline uses, and every dataset root: set and a folder."""
    check_image_size(data_cfg.image_size, key="data.image_size")
    check_number(data_cfg, "max_objects", "data", integer=True, minimum=1)
    check_number(data_cfg, "min_overlap", "data", above=0, below=1)
    check_number(data_cfg, "num_workers", "data", integer=True, minimum=0)
    check_number(data_cfg, "cache", "data", minimum=0)
    parts = data_cfg.get("parts")  # None when absent or still ???
    nodes = [("data", data_cfg)] + [
        (f"data.parts[{i}]", part) for i, part in enumerate(parts or [])
    ]
    for where, node in nodes:
        # list(node) holds the keys whose value is ??? too (`"root" in node` does not)
        if not isinstance(node, DictConfig) or "root" not in list(node):
            continue
        if OmegaConf.is_missing(node, "root") or node.root is None:
            raise ConfigError(
                f"{where}.root is not set", f"give the dataset folder: {where}.root=PATH"
            )
        root = Path(str(node.root)).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise ConfigError(f"{where}.root={root} {what}", "give the dataset folder")


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
        # Mosaic partners come from images whose sources label the same classes.
        self._groups = self.label_groups() if augment is not None and augment.mosaic > 0 else {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        """The sample of `index`, or of the next readable image when its image cannot be read
        ("unreadable" lists the indices that failed; no "image" when none of SUBSTITUTES could
        be read either)."""
        unreadable = []
        for step in range(min(len(self.source), SUBSTITUTES + 1)):
            candidate = (index + step) % len(self.source)
            try:
                image, ann = self.source.load(candidate)
            except ImageReadError as err:
                log.warning("skipping unreadable image: %s", err)
                unreadable.append(candidate)
                continue
            return {**self._sample(index, candidate, image, ann), "unreadable": unreadable}
        return {"unreadable": unreadable}

    def _sample(self, index: int, candidate: int, image: np.ndarray, ann: Annotation) -> dict:
        """Augmentation draws depend on (seed, epoch, index), the labels on the image's own
        source (`candidate`)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self._groups and rng.random() < self.augment.mosaic:
            four = [(image, ann.boxes, ann.labels), *self._mosaic_partners(rng, candidate)]
            image, boxes, labels = mosaic(rng, four, self.image_size, self.augment)
        else:
            image, boxes, labels = self._one_image(rng, image, ann)
        if self.augment is not None:
            image = color_jitter(image, rng, self.augment.color)
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
            "labeled": self.source.labeled_classes(candidate),
            "absent": self.source.absent_classes(candidate),
        }

    def _one_image(
        self, rng: np.random.Generator, image: np.ndarray, ann: Annotation
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The letterbox (no augmentation) or a random affine crop; boxes follow."""
        height, width = image.shape[:2]
        if self.augment is None:
            matrix = letterbox_matrix(width, height, self.image_size)
        else:
            matrix = random_affine(rng, width, height, self.image_size, self.augment)
        boxes, labels = clip_boxes(transform_boxes(ann.boxes, matrix), ann.labels, self.image_size)
        return warp_image(image, matrix, self.image_size), boxes, labels

    def _mosaic_partners(self, rng: np.random.Generator, candidate: int) -> list[tuple]:
        """Three more (image, boxes, labels) whose sources label and rule out the same classes
        as `candidate`'s, so the mosaic's labelled/absent flags hold for all four quarters."""
        group = self._groups[self._label_key(candidate)]
        partners = []
        for pick in rng.choice(group, 3):
            try:
                image, ann = self.source.load(int(pick))
            except ImageReadError:  # a mosaic needs no particular partner: take another
                image, ann = self.source.load(candidate)
            partners.append((image, ann.boxes, ann.labels))
        return partners

    def label_groups(self) -> dict[bytes, list[int]]:
        """The indices grouped by the classes their source labels and declares absent: a
        union's parts, told apart without knowing how it was built."""
        groups: dict[bytes, list[int]] = {}
        for index in range(len(self.source)):
            groups.setdefault(self._label_key(index), []).append(index)
        return groups

    def _label_key(self, index: int) -> bytes:
        return np.concatenate(
            [self.source.labeled_classes(index), self.source.absent_classes(index)]
        ).tobytes()


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
    """Stack samples into tensors. Unreadable images are counted in "num_skipped": evaluation
    samples that are None (dropped), and the images training samples replaced (their indices
    in "unreadable"); a training sample holding nothing else found no readable substitute."""
    kept = [s for s in samples if s is not None and s.keys() != {"unreadable"}]
    unreadable = [i for s in samples if s is not None for i in s.get("unreadable", ())]
    batch: dict = {"num_skipped": samples.count(None) + len(unreadable)}
    if unreadable:
        batch["unreadable"] = unreadable
    if not kept:
        return batch
    for key in kept[0]:
        if key != "unreadable":
            batch[key] = torch.as_tensor(np.stack([s[key] for s in kept]))
    return batch


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave interrupts to the main process. A terminal's Ctrl-C reaches every
    process of the group: a worker that died of it first would turn a clean stop into "worker
    exited unexpectedly". And a worker whose batch the interrupted main process stopped
    receiving halfway must not print that BrokenPipeError's traceback over the one-line error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = sys.excepthook

    def drop_broken_pipes(kind, value, traceback) -> None:
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError)):
            report(kind, value, traceback)

    sys.excepthook = drop_broken_pipes  # multiprocessing's resource sharer reports through it


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """`sampler`, if given, decides the order (and its own DDP sharding); else a shuffle."""
    if sampler is None and distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
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
        worker_init_fn=_quiet_worker,
        pin_memory=pin_memory,  # page-locked batches: host-to-GPU copies overlap compute
        # Not persistent: workers keep the dataset copy they started with, so the trainer's
        # per-epoch `dataset.epoch` (new augmentations each epoch) would never reach them, and
        # the shuffle order would depend on whether the workers were just started (inexact resume).
        persistent_workers=False,
    )
