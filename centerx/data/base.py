"""The contract every dataset source fulfils, and robust image reading.

A *source* knows images and their annotations in original-image pixels. It does
not augment or build targets: `centerx.data.pipeline` wraps any source for that.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from centerx.errors import CenterxError

# One image reader for training, evaluation and deployment: the kit is the bottom layer.
# ImageReadError is what the loader's skip-and-count path catches.
from centerx_export.imaging import ImageReadError as ImageReadError
from centerx_export.imaging import read_image as read_image

log = logging.getLogger(__name__)


class DatasetError(CenterxError, ValueError):
    """A dataset cannot be loaded: wrong root, unreadable annotations, unknown class."""


@dataclass(frozen=True)
class ImageInfo:
    image_id: int  # COCO image id used for evaluation
    file_name: str
    width: int
    height: int


@dataclass
class Annotation:
    """Boxes of one image in original pixels, xyxy, float32; labels are contiguous indices."""

    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    # Crowd regions (COCO iscrowd=1): not trained on, kept for evaluation.
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


class DetectionSource(ABC):
    """A dataset of images with boxes. Subclasses set `class_names` (and `category_ids`)."""

    class_names: list[str]
    # COCO category id of each contiguous class index; 1..C unless the data says otherwise.
    category_ids: list[int]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image_info(self, index: int) -> ImageInfo: ...

    @abstractmethod
    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 [H, W, 3]; raises ImageReadError."""

    @abstractmethod
    def load_annotation(self, index: int) -> Annotation: ...

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        """Image and annotation together; sources that produce both at once override this."""
        return self.load_image(index), self.load_annotation(index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labeled_classes(self, index: int) -> np.ndarray:
        """Bool [C]: which classes this image's source labels. Absent classes are true negatives
        only where this is True (partial-label data sets it False for the others)."""
        return np.ones(self.num_classes, dtype=bool)

    def absent_classes(self, index: int) -> np.ndarray:
        """Bool [C]: classes this image's source is known not to contain (declared by the user,
        see centerx.data.partial.Relabeled): a teacher's detections of them are false."""
        return np.zeros(self.num_classes, dtype=bool)

    def to_coco(self) -> dict:
        """Ground truth as a COCO dict for pycocotools (images, annotations, categories)."""
        images, annotations = [], []
        for index in range(len(self)):
            info = self.image_info(index)
            images.append(
                {
                    "id": info.image_id,
                    "file_name": info.file_name,
                    "width": info.width,
                    "height": info.height,
                }
            )
            ann = self.load_annotation(index)
            for boxes, labels, crowd in (
                (ann.boxes, ann.labels, 0),
                (ann.crowd_boxes, ann.crowd_labels, 1),
            ):
                for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
                    x0, y0, x1, y1 = box
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": info.image_id,
                            "category_id": self.category_ids[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": (x1 - x0) * (y1 - y0),
                            "iscrowd": crowd,
                        }
                    )
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}
