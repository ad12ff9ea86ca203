"""What the file-backed loaders (VOC, COCO, YOLO) share: the `FileSource` base over parsed
records, the checks every number in an annotation file goes through, box screening with one
summary warning per dataset, and small helpers for error messages.

Each loader only parses its format into `RawBoxes` (pixels, xyxy, with where each box was
written) and hands them to a `RecordBuilder`. Everything is checked at construction, so a bad
file fails before training starts and the message names the file and the place in it: the
line (YOLO), the object number (VOC), the annotation or image id (COCO).

The rule: when what is written is not a usable number (garbage, NaN, inf, the wrong count of
fields, a JSON type the format forbids), it is an error, because no guess recovers it and the
tool that wrote it has likely broken more. When a well-formed number describes a bad *box*
(degenerate, outside the image), it is a counted skip: real data has such boxes, and one of
them should not stop a dataset of ten thousand images.

| field | problem | verdict |
|---|---|---|
| any number (VOC text, YOLO token, COCO value) | not a number, NaN, inf | error |
| COCO bbox entry, area, image width/height | a string, null or bool | error |
| COCO bbox | not a list of 4 | error |
| YOLO line | neither `class cx cy w h` nor `class` + an even polygon (>= 3 points) | error |
| YOLO class | not a whole number ("1.5"), negative | error |
| YOLO class | >= the number of classes | error, dropped with ignore_unknown_classes |
| box | width or height <= 0 (VOC xmax <= xmin, COCO or YOLO w <= 0) | skip |
| box | an edge outside the image by more than max(2 px, 1% of the side); YOLO: outside [0, 1] by as much | skip |
| box | an edge outside by less | clipped, no warning |
| box | under 1 px wide or high once clipped | skip |
| VOC size width/height | not a whole number >= 0 | error (0 or absent: unknown; a readable image's header wins) |
| VOC difficult | not 0, 1, true, false or empty | error |
| COCO image width/height | absent | taken from the image header |
| COCO image width/height | not a positive whole number | error |
| COCO image, annotation, category id | not an int, or a duplicate | error (an absent annotation id is assigned) |
| COCO annotation image_id, category_id | not an int the file defines | error |
| COCO area | negative | error |
| COCO iscrowd | not 0 or 1 | error |

VOC xmax < xmin is skipped, not sorted into a box as before: the usual cause is a converter
that wrote width and height into xmax and ymax, and then sorting turns garbage into a wrong
box nobody hears about; the skip counts it and names an example, so a systematic bug shows
up as a large count while one slip does not stop training. A box far outside the image is
skipped rather than clipped for the same reason: its numbers are not in this image's pixel
frame (wrong size, wrong scale, pixels in a YOLO file), and clipping would invent a box.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo, read_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112

# An edge may stray this far outside the image and is clipped without a word: VOC is 1-based
# (xmax == width + 1 from some tools) and float round-trips overshoot by a fraction of a pixel.
EDGE_TOLERANCE_PX = 2.0
EDGE_TOLERANCE_FRACTION = 0.01
MIN_BOX_SIZE = 1.0  # px, after clipping: smaller boxes give no usable centre
SKIP_REASONS = (
    "with zero or negative width or height",
    "outside the image by more than max(2 px, 1% of its side)",
    "under 1 px inside the image",
)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def bad_value(where: str, value: object, expected: str) -> DatasetError:
    """The one-line error for a field that holds the wrong thing."""
    return DatasetError(f"{where} is {value!r:.60}, expected {expected}; fix or remove it")


def _finite(value: float, where: str, shown: object) -> float:
    if not math.isfinite(value):
        raise bad_value(where, shown, "a finite number")
    return value


def parse_number(text: str | None, where: str) -> float:
    """A finite float from annotation text (an XML element, a YOLO token)."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_value(where, text, "a number") from None
    return _finite(value, where, text)


def json_number(value: object, where: str) -> float:
    """A finite float from a JSON value; strings, null and booleans are errors, not coerced,
    because a writer that quotes numbers or writes true for 1 has mixed up its fields."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_value(where, value, "a number")
    return _finite(float(value), where, value)


def whole_number(value: float, where: str, minimum: int = 0) -> int:
    """`value` as an int, when it is a whole number >= minimum ("416.0" is fine, "1.5" is not)."""
    if value != int(value) or value < minimum:
        shown = int(value) if value == int(value) else value  # -5, not -5.0
        raise bad_value(where, shown, f"a whole number >= {minimum}")
    return int(value)


def is_json_int(value: object) -> bool:
    """Whether a JSON value is an integer id (True is an int in Python, not in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------


@dataclass
class RawBoxes:
    """One image's boxes as written, in pixels (xyxy), each with where it was written."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)  # not trained on, kept for evaluation
    where: list[str] = field(default_factory=list)

    def add(
        self, box: tuple[float, float, float, float], label: int, where: str, crowd: bool = False
    ) -> None:
        self.boxes.append(box)
        self.labels.append(label)
        self.crowd.append(crowd)
        self.where.append(where)


def screen_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes clipped to the image, why each is skipped: an index into SKIP_REASONS, -1 kept).

    A size of 0 means unknown (image unreadable, no size written): only the lower edges and
    the box's own size are checked then.
    """
    bounds = np.array([width or np.inf, height or np.inf], np.float32)
    tolerance = np.maximum(EDGE_TOLERANCE_PX, EDGE_TOLERANCE_FRACTION * bounds)
    tolerance[np.isinf(bounds)] = EDGE_TOLERANCE_PX
    low, high = boxes[:, :2], boxes[:, 2:]
    degenerate = (high <= low).any(axis=1)
    outside = ((low < -tolerance) | (high > bounds + tolerance)).any(axis=1)
    clipped = np.concatenate([low.clip(0, bounds), high.clip(0, bounds)], axis=1)
    tiny = ((clipped[:, 2:] - clipped[:, :2]) < MIN_BOX_SIZE).any(axis=1)
    reason = np.select([degenerate, outside, tiny], [0, 1, 2], default=-1)
    return clipped, reason


@dataclass(frozen=True)
class Record:
    """One image with its cached, already-screened annotation."""

    path: Path
    info: ImageInfo
    annotation: Annotation


class RecordBuilder:
    """Builds a dataset's records, screening every box, and logs once at the end what was
    skipped and which images are missing: one warning per dataset, not one per box."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.records: list[Record] = []
        self.missing: list[Path] = []
        self.total_boxes = 0
        self.skipped = [0] * len(SKIP_REASONS)
        self.examples = [""] * len(SKIP_REASONS)

    def add(self, path: Path, info: ImageInfo, raw: RawBoxes) -> None:
        boxes = np.array(raw.boxes, np.float32).reshape(-1, 4)
        clipped, reason = screen_boxes(boxes, info.width, info.height)
        for code in np.unique(reason[reason >= 0]).tolist():
            self.skipped[code] += int((reason == code).sum())
            self.examples[code] = self.examples[code] or raw.where[int(np.argmax(reason == code))]
        self.total_boxes += len(boxes)
        keep, labels = reason < 0, np.array(raw.labels, np.int64)
        plain, crowd = keep & ~np.array(raw.crowd, bool), keep & np.array(raw.crowd, bool)
        ann = Annotation(clipped[plain], labels[plain], clipped[crowd], labels[crowd])
        self.records.append(Record(path, info, ann))

    def missing_image(self, path: Path) -> None:
        self.missing.append(path)

    def finish(self) -> list[Record]:
        """The records, after logging the summary warnings."""
        if sum(self.skipped):
            parts = [
                f"{count} {reason} (e.g. {example})"
                for count, reason, example in zip(
                    self.skipped, SKIP_REASONS, self.examples, strict=True
                )
                if count
            ]
            log.warning(
                "%s: skipped %d of %d boxes: %s",
                self.dataset,
                sum(self.skipped),
                self.total_boxes,
                "; ".join(parts),
            )
        if self.missing:
            log.warning(
                "%s: %d of %d images are missing or unreadable (e.g. %s); load_image raises "
                "ImageReadError for them",
                self.dataset,
                len(self.missing),
                len(self.records),
                self.missing[0],
            )
        return self.records


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


class FileSource(DetectionSource):
    """A dataset of image files whose annotations were parsed once, at construction, into
    `records` (they are small), so loading is a file read plus a copy of cached arrays.
    Subclasses parse their format and set `records`, `class_names` and `category_ids`."""

    records: list[Record]

    def __len__(self) -> int:
        return len(self.records)

    def image_info(self, index: int) -> ImageInfo:
        return self.records[index].info

    def image_path(self, index: int) -> Path:
        return self.records[index].path

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.records[index].path)

    def load_annotation(self, index: int) -> Annotation:
        # Copies, so a caller that edits boxes in place (augmentation) cannot corrupt the cache.
        ann = self.records[index].annotation
        return Annotation(
            ann.boxes.copy(), ann.labels.copy(), ann.crowd_boxes.copy(), ann.crowd_labels.copy()
        )


# ---------------------------------------------------------------------------------------------
# Files, folders and class lists
# ---------------------------------------------------------------------------------------------


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
