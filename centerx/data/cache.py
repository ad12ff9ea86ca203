"""Decoded images kept in RAM, for datasets small enough (data.cache: a budget in MiB).

Decoding is most of what the loader does per photo (fruits: ~30 ms a JPEG against a few ms
to augment and build targets), and every epoch decodes every image again. `CachedImages`
decodes each image once, up front, in the process that builds it. The trainer's loader
workers are forked from that process at every epoch (they are not persistent), so they read
the cached pixels through copy-on-write pages: one copy in RAM whatever data.num_workers is,
and nothing to refill per epoch. (A cache filled lazily inside the workers would die with
them at the end of each epoch; under the spawn start method, macOS and Windows, each worker
unpickles its own copy.) Images beyond the budget are decoded on each load, as without cache.
Each cached image keeps its annotation beside it: a source that renders (synthetic shapes)
would otherwise render the whole image again to give its boxes.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from centerx.data.base import Annotation, DetectionSource, ImageReadError
from centerx.data.partial import SourceView

log = logging.getLogger(__name__)


class CachedImages(SourceView):
    """`source` with its decoded images (uint8, read-only) held in memory, up to `max_mib` MiB.

    Annotations and everything else come from `source` unchanged."""

    def __init__(self, source: DetectionSource, max_mib: float) -> None:
        self.source = source
        self.class_names = source.class_names
        self.category_ids = source.category_ids
        self.budget = int(max_mib * 2**20)
        self.images: dict[int, np.ndarray] = {}
        self.annotations: dict[int, Annotation] = {}
        self.nbytes = 0
        started = time.perf_counter()
        self._fill()
        self.fill_seconds = time.perf_counter() - started
        log.info("%s", self.summary())

    def _fill(self) -> None:
        for index in range(len(self.source)):
            try:
                image, annotation = self.source.load(index)
            except ImageReadError:
                continue  # reported where training meets it, as without cache
            if self.nbytes + image.nbytes > self.budget:
                continue  # a smaller image may still fit
            for array in (image, annotation.boxes, annotation.labels):
                array.flags.writeable = False  # shared by every epoch and every worker
            self.images[index], self.annotations[index] = image, annotation
            self.nbytes += image.nbytes

    def summary(self) -> str:
        """One line on what the cache costs: images held, MiB, budget, time to fill."""
        return (
            f"image cache: {len(self.images)} images, {self.nbytes / 2**20:.0f} MiB "
            f"(of {len(self.source)} images, budget {self.budget / 2**20:.0f} MiB; "
            f"decoded in {self.fill_seconds:.1f} s)"
        )

    def load_image(self, index: int) -> np.ndarray:
        image = self.images.get(index)
        return self.source.load_image(index) if image is None else image

    def load_annotation(self, index: int) -> Annotation:
        annotation = self.annotations.get(index)
        return self.source.load_annotation(index) if annotation is None else annotation

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        if index in self.images:
            return self.images[index], self.annotations[index]
        return self.source.load(index)
