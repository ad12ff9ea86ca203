"""Helpers shared by the file-based loaders (VOC, COCO, YOLO): image headers, folder
listings for error messages, class-list checks, box cleaning and drop counting."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from centerx.data.base import Annotation, DatasetError, ImageInfo, sanitize_boxes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
_SIZE_UNKNOWN = 1e9  # clip bound when neither annotation nor image gives a size


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) as `read_image` will decode it, from the header only; None if unreadable.

    PIL sniffs the format from the content, so a PNG named .jpg is fine.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            # cv2.imdecode applies EXIF rotation and PIL's size does not; only JPEGs carry it in
            # practice, and reading it elsewhere (PNG) would decode the whole file.
            orientation = image.getexif().get(_EXIF_ORIENTATION) if image.format == "JPEG" else 1
    except Exception:  # any header failure just means "size unknown"; load_image reports it
        return None
    rotated = orientation in (5, 6, 7, 8)  # the transposing orientations
    return (height, width) if rotated else (width, height)


def describe_folder(path: Path, limit: int = 15) -> str:
    """A short listing of a folder for error messages."""
    if not path.is_dir():
        return f"{path} does not exist" if not path.exists() else f"{path} is not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return f"{path} is empty"
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{path} contains: {', '.join(names[:limit])}{more}"


def check_class_names(class_names: Iterable[str]) -> list[str]:
    names = [str(name).strip() for name in class_names]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise DatasetError(f"class_names must be non-empty and unique, got {names}")
    return names


def unknown_class_error(unknown: dict[str, str], class_names: list[str]) -> DatasetError:
    """`unknown` maps each unknown class to the first file it appears in."""
    found = "; ".join(f"{name!r} in {file}" for name, file in sorted(unknown.items()))
    return DatasetError(
        f"unknown class {found}; configured class_names: {class_names}. "
        "Add it to class_names, or pass ignore_unknown_classes=True to drop such objects."
    )


def clean_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`sanitize_boxes`, tolerating an unknown (0) image size by only dropping degenerate boxes."""
    return sanitize_boxes(
        boxes,
        labels,
        width if width > 0 else _SIZE_UNKNOWN,
        height if height > 0 else _SIZE_UNKNOWN,
    )


class DropCounter:
    """Counts boxes dropped while loading, so it is logged once per dataset, not per box."""

    def __init__(self) -> None:
        self.boxes = 0
        self.images = 0
        self.example = ""

    def add(self, dropped: int, file: str | Path) -> None:
        if dropped:
            self.boxes += dropped
            self.images += 1
            self.example = self.example or str(file)

    def report(self, dataset: str) -> None:
        if self.boxes:
            log.warning(
                "%s: dropped %d degenerate boxes (empty after clipping to the image) in %d images, e.g. %s",
                dataset,
                self.boxes,
                self.images,
                self.example,
            )


def warn_missing_images(dataset: str, missing: list[Path], total: int) -> None:
    if missing:
        log.warning(
            "%s: %d of %d images are missing or unreadable (e.g. %s); load_image raises "
            "ImageReadError for them",
            dataset,
            len(missing),
            total,
            missing[0],
        )


@dataclass(frozen=True)
class Record:
    """One image with its cached, already-sanitised annotation."""

    path: Path
    info: ImageInfo
    annotation: Annotation


def copy_annotation(ann: Annotation) -> Annotation:
    # Copies, so a caller that edits boxes in place (augmentation) cannot corrupt the cache.
    return Annotation(
        ann.boxes.copy(), ann.labels.copy(), ann.crowd_boxes.copy(), ann.crowd_labels.copy()
    )
