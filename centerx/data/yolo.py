"""YOLO txt datasets: ``root/images/{split}/*`` with ``root/labels/{split}/{stem}.txt``.

Each label line is ``class cx cy w h`` normalised to [0, 1] (a YOLO-seg polygon line
``class x1 y1 x2 y2 ...`` is reduced to its bounding box). An image without a label file has
no objects. Class names come from the argument, else ``root/classes.txt`` or ``root/data.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from centerx.data.base import DatasetError, ImageInfo
from centerx.data.files import (
    IMAGE_EXTENSIONS,
    FileSource,
    RawBoxes,
    Record,
    RecordBuilder,
    check_class_names,
    describe_folder,
    image_size,
    parse_number,
    whole_number,
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


@dataclass(frozen=True)
class _YoloBox:
    where: str  # "labels/a.txt:3"
    cls: int
    box: tuple[float, float, float, float]  # normalised xyxy


def _parse_line(parts: list[str], where: str) -> _YoloBox:
    """One label line: ``class cx cy w h`` or ``class x1 y1 x2 y2 ...`` (a polygon)."""
    cls = whole_number(parse_number(parts[0], f"{where} class"), f"{where} class")
    values = [parse_number(v, f"{where} value {i}") for i, v in enumerate(parts[1:], 1)]
    if len(values) == 4:
        cx, cy, w, h = values
        return _YoloBox(where, cls, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    if len(values) >= 6 and len(values) % 2 == 0:
        xs, ys = values[0::2], values[1::2]
        return _YoloBox(where, cls, (min(xs), min(ys), max(xs), max(ys)))
    raise DatasetError(
        f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
        f"got {' '.join(parts)!r:.80}; fix or remove the line"
    )


def _read_labels(path: Path) -> list[_YoloBox]:
    """The boxes of one label file; no file means no objects."""
    if not path.is_file():
        return []
    lines = enumerate(path.read_text().splitlines(), 1)
    return [_parse_line(line.split(), f"{path}:{n}") for n, line in lines if line.strip()]


class YOLODetection(FileSource):
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
        self.records = self._build_records(images, label_dir, ignore_unknown_classes)

    def _build_records(self, images: list[Path], label_dir: Path, ignore: bool) -> list[Record]:
        builder, ignored = RecordBuilder(str(self.root)), 0
        for i, path in enumerate(images):
            known, unknown = self._split_classes(_read_labels(label_dir / f"{path.stem}.txt"))
            if unknown and not ignore:
                raise DatasetError(
                    f"{unknown[0].where}: class index {unknown[0].cls} is outside class_names "
                    f"{self.class_names}; add the class or pass ignore_unknown_classes=True"
                )
            ignored += len(unknown)
            size = image_size(path)
            if size is None:  # normalised boxes cannot be placed without the size
                builder.missing_image(path)
            width, height = size or (0, 0)
            raw = RawBoxes()
            for b in known if size else []:
                x0, y0, x1, y1 = b.box
                raw.add((x0 * width, y0 * height, x1 * width, y1 * height), b.cls, b.where)
            info = ImageInfo(i + 1, path.relative_to(self.root).as_posix(), width, height)
            builder.add(path, info, raw)
        if ignored:
            log.warning(
                "%s: ignored %d objects with class indices outside class_names", self.root, ignored
            )
        return builder.finish()

    def _split_classes(self, boxes: list[_YoloBox]) -> tuple[list[_YoloBox], list[_YoloBox]]:
        """(boxes of configured classes, boxes with a class index beyond class_names)."""
        known = [b for b in boxes if b.cls < len(self.class_names)]
        return known, [b for b in boxes if b.cls >= len(self.class_names)]
