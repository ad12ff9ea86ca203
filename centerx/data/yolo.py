"""YOLO txt datasets: ``root/images/{split}/*`` with ``root/labels/{split}/{stem}.txt``.

Each label line is ``class cx cy w h`` normalised to [0, 1] (a YOLO-seg polygon line
``class x1 y1 x2 y2 ...`` is reduced to its bounding box). An image without a label file has
no objects. Class names come from the argument, else ``root/classes.txt`` or ``root/data.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo, read_image
from centerx.data.files import (
    IMAGE_EXTENSIONS,
    DropCounter,
    Record,
    check_class_names,
    clean_boxes,
    copy_annotation,
    describe_folder,
    image_size,
    warn_missing_images,
)

log = logging.getLogger(__name__)


def _names_from_root(root: Path) -> list[str]:
    if (root / "classes.txt").is_file():
        return [n for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    if (root / "data.yaml").is_file():
        try:
            names = (yaml.safe_load((root / "data.yaml").read_text()) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as err:
            raise DatasetError(f"{root / 'data.yaml'}: cannot read 'names': {err}") from err
        if isinstance(names, dict):  # {0: person, 1: car}
            names = [names[k] for k in sorted(names)]
        if isinstance(names, list):
            return names
    raise DatasetError(f"YOLO dataset {root}: pass class_names, or add classes.txt or data.yaml")


def _find_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    sub = [split] if split else []
    # Ultralytics layout first, then the Roboflow export layout (root/{split}/images).
    for images, labels in (
        (root.joinpath("images", *sub), root.joinpath("labels", *sub)),
        (root.joinpath(*sub, "images"), root.joinpath(*sub, "labels")),
    ):
        if images.is_dir():
            return images, labels
    raise DatasetError(
        f"no YOLO images: expected {root.joinpath('images', *sub)}; {describe_folder(root)}"
    )


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(normalised xyxy boxes, class ids) of one label file; no file means no objects."""
    if not path.is_file():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    boxes, classes = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{path}:{n}: not numbers: {line!r}") from None
        if len(values) == 4:
            cx, cy, w, h = values
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        elif len(values) >= 6 and len(values) % 2 == 0:  # polygon
            xs, ys = values[0::2], values[1::2]
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
        else:
            raise DatasetError(f"{path}:{n}: expected 'class cx cy w h', got {line!r}")
        classes.append(cls)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64)


class YOLODetection(DetectionSource):
    """YOLO-format boxes; class index k in a label file is ``class_names[k]``."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        class_names: list[str] | None = None,
        ignore_unknown_classes: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"YOLO root {self.root} is not a folder")
        names = class_names if class_names is not None else _names_from_root(self.root)
        self.class_names = check_class_names(names)
        self.category_ids = list(range(1, len(self.class_names) + 1))
        image_dir, label_dir = _find_dirs(self.root, split)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DatasetError(f"no images in {image_dir}; {describe_folder(image_dir)}")
        self._records = self._build_records(images, label_dir, ignore_unknown_classes)

    def _build_records(self, images: list[Path], label_dir: Path, ignore: bool) -> list[Record]:
        drops, missing, records, ignored = DropCounter(), [], [], 0
        num_classes = len(self.class_names)
        for i, path in enumerate(images):
            label_file = label_dir / f"{path.stem}.txt"
            boxes, labels = _read_labels(label_file)
            unknown = (labels < 0) | (labels >= num_classes)
            if unknown.any() and not ignore:
                raise DatasetError(
                    f"{label_file}: class index {int(labels[unknown][0])} is outside "
                    f"class_names {self.class_names}; pass ignore_unknown_classes=True to drop it"
                )
            ignored += int(unknown.sum())
            size = image_size(path)
            if size is None:  # normalised boxes cannot be placed without the size
                missing.append(path)
                size, unknown = (0, 0), np.ones(len(labels), bool)
            width, height = size
            boxes = boxes[~unknown] * np.array([width, height, width, height], np.float32)
            boxes, labels, dropped = clean_boxes(boxes, labels[~unknown], width, height)
            drops.add(dropped, label_file)
            info = ImageInfo(i + 1, path.relative_to(self.root).as_posix(), width, height)
            records.append(Record(path, info, Annotation(boxes, labels)))
        drops.report(str(self.root))
        warn_missing_images(str(self.root), missing, len(images))
        if ignored:
            log.warning(
                "%s: ignored %d objects with class indices outside class_names", self.root, ignored
            )
        return records

    def __len__(self) -> int:
        return len(self._records)

    def image_info(self, index: int) -> ImageInfo:
        return self._records[index].info

    def image_path(self, index: int) -> Path:
        return self._records[index].path

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self._records[index].path)

    def load_annotation(self, index: int) -> Annotation:
        return copy_annotation(self._records[index].annotation)
