"""Source wrappers for the partial-label story: class subsets and pseudo-labelled views.

Both wrap another `DetectionSource` and cost O(1) per item on top of it:

* `ClassSubset(source, class_names)`: the same images with only the named classes, labels
  remapped to the subset's order and category ids renumbered 1..k. It trains a one-class
  teacher on the view that labels its class, and scores a teacher on its own class.
* `PseudoLabeled(source, detections_by_index, class_names_to_fill)`: adds boxes (teacher
  detections computed once, before training) for classes the source does not label, and
  marks those classes labelled. The pseudo-label baseline of the story trains on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo

# One image's pseudo-labels: boxes xyxy in original pixels [N,4] and labels [N] as indices
# into the wrapped source's class list (an Annotation is accepted too).
PseudoBoxes = tuple[np.ndarray, np.ndarray] | Annotation


class _SourceView(DetectionSource):
    """The same images as `self.source`; subclasses change only the annotations."""

    source: DetectionSource

    def __len__(self) -> int:
        return len(self.source)

    def image_info(self, index: int) -> ImageInfo:
        return self.source.image_info(index)

    def load_image(self, index: int) -> np.ndarray:
        return self.source.load_image(index)


class ClassSubset(_SourceView):
    """The named classes of `source` only (in the given order); `class_names=None` keeps all."""

    def __init__(self, source: DetectionSource, class_names: Sequence[str] | None = None) -> None:
        names = list(source.class_names) if class_names is None else list(class_names)
        unknown = [name for name in names if name not in source.class_names]
        if unknown:
            raise DatasetError(f"classes {unknown} are not in the source's {source.class_names}")
        if not names or len(set(names)) != len(names):
            raise DatasetError(f"a class subset needs distinct class names, got {names}")
        self.source = source
        self.class_names = names
        self.category_ids = list(range(1, len(names) + 1))
        self._picked = np.array([source.class_names.index(name) for name in names], np.int64)
        # source class index -> subset index (-1: dropped)
        self._remap = np.full(source.num_classes, -1, np.int64)
        self._remap[self._picked] = np.arange(len(names))

    def _subset(self, ann: Annotation) -> Annotation:
        labels = self._remap[ann.labels]
        keep = labels >= 0
        crowd_labels = self._remap[ann.crowd_labels]
        crowd_keep = crowd_labels >= 0
        return Annotation(
            ann.boxes[keep],
            labels[keep],
            ann.crowd_boxes[crowd_keep],
            crowd_labels[crowd_keep],
        )

    def load_annotation(self, index: int) -> Annotation:
        return self._subset(self.source.load_annotation(index))

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        image, ann = self.source.load(index)
        return image, self._subset(ann)

    def labeled_classes(self, index: int) -> np.ndarray:
        return np.asarray(self.source.labeled_classes(index))[self._picked]


class PseudoLabeled(_SourceView):
    """`source` plus pseudo-label boxes for `class_names_to_fill`, which become labelled.

    `detections_by_index[i]` holds image i's pseudo-labels as (boxes, labels) with labels
    indexing `source.class_names` (a mapping may leave images out: no pseudo-labels there).
    Pseudo-labels are added only for fill classes that the source does not label on that
    image; where the source labels a class its ground truth stands alone.
    """

    def __init__(
        self,
        source: DetectionSource,
        detections_by_index: Sequence[PseudoBoxes | None] | Mapping[int, PseudoBoxes],
        class_names_to_fill: Sequence[str],
    ) -> None:
        unknown = [name for name in class_names_to_fill if name not in source.class_names]
        if unknown:
            raise DatasetError(f"classes {unknown} are not in the source's {source.class_names}")
        if not isinstance(detections_by_index, Mapping) and len(detections_by_index) != len(source):
            raise DatasetError(
                f"pseudo-labels for {len(detections_by_index)} images, the source has {len(source)}"
            )
        self.source = source
        self.class_names = list(source.class_names)
        self.category_ids = list(source.category_ids)
        self._fill = np.array([name in class_names_to_fill for name in self.class_names])
        self._detections = detections_by_index

    def _pseudo(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self._detections, Mapping):
            item = self._detections.get(index)
        else:
            item = self._detections[index]
        if item is None:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        if isinstance(item, Annotation):
            boxes, labels = item.boxes, item.labels
        else:
            boxes, labels = item
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DatasetError(f"image {index}: pseudo-label class out of range: {labels}")
        # Only fill classes the source leaves unlabelled on this image.
        wanted = self._fill & ~np.asarray(self.source.labeled_classes(index), bool)
        keep = wanted[labels]
        return boxes[keep], labels[keep]

    def _merge(self, index: int, ann: Annotation) -> Annotation:
        boxes, labels = self._pseudo(index)
        if not len(labels):
            return ann
        return Annotation(
            np.concatenate([ann.boxes.astype(np.float32).reshape(-1, 4), boxes]),
            np.concatenate([ann.labels.astype(np.int64), labels]),
            ann.crowd_boxes,
            ann.crowd_labels,
        )

    def load_annotation(self, index: int) -> Annotation:
        return self._merge(index, self.source.load_annotation(index))

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        image, ann = self.source.load(index)
        return image, self._merge(index, ann)

    def labeled_classes(self, index: int) -> np.ndarray:
        return np.asarray(self.source.labeled_classes(index), bool) | self._fill
