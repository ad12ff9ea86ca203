"""Pascal VOC XML datasets: the standard VOCdevkit layout and flat "XML beside the image" folders.

Two layouts are recognised from what is on disk:

* standard: ``root/Annotations/*.xml`` + ``root/JPEGImages/*``; a split is a list of ids in
  ``root/ImageSets/Main/{split}.txt`` or ``root/ImageSets/{split}.txt``.
* flat (LabelImg style): each image sits beside its XML in ``root/{split}/`` (or ``root/``).

All XMLs are parsed at construction (they are small) so that a malformed file fails early
with its name, and `load_annotation` is a cheap copy of cached arrays. Image sizes come from
the image header (PIL reads only the header), because real XMLs say 0 or are off by a pixel.

This module also holds the small helpers the other file-based loaders share.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from centerx.data.base import (
    Annotation,
    DatasetError,
    DetectionSource,
    ImageInfo,
    read_image,
)
from centerx.data.files import (
    IMAGE_EXTENSIONS,
    DropCounter,
    Record,
    check_class_names,
    clean_boxes,
    copy_annotation,
    describe_folder,
    image_size,
    unknown_class_error,
    warn_missing_images,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# VOC XML parsing
# ---------------------------------------------------------------------------------------------


@dataclass
class _VocObject:
    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class _VocFile:
    xml: Path
    filename: str  # <filename>, may be empty or wrong (the mask set names .txt files)
    width: int
    height: int
    objects: list[_VocObject]


def _number(text: str | None, what: str, xml: Path) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{xml}: {what} is {text!r}, expected a number") from None


def _parse_voc_xml(xml: Path) -> _VocFile:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as err:
        raise DatasetError(f"{xml}: cannot parse annotation XML: {err}") from err
    size = root.find("size")
    width = height = 0
    if size is not None:  # absent or 0 in real files: the image header decides later
        width = int(_number(size.findtext("width") or "0", "size/width", xml))
        height = int(_number(size.findtext("height") or "0", "size/height", xml))
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise DatasetError(f"{xml}: object #{i} has no <name> or no <bndbox>")
        coords = [
            _number(box.findtext(k), f"object #{i} {k}", xml)
            for k in ("xmin", "ymin", "xmax", "ymax")
        ]
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        objects.append(_VocObject(name, (coords[0], coords[1], coords[2], coords[3]), difficult))
    filename = (root.findtext("filename") or "").strip().replace("\\", "/").rsplit("/", 1)[-1]
    return _VocFile(xml, filename, width, height, objects)


class _ImageFolder:
    """Names in one image folder, listed once, so finding each XML's image costs no stat calls."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        self.names = set(names)
        self.by_stem: dict[str, list[str]] = {}
        rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
        for name in sorted(names, key=lambda n: rank.get(os.path.splitext(n)[1].lower(), 99)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in rank:
                self.by_stem.setdefault(stem, []).append(name)

    def find(self, stem: str, filename: str) -> Path:
        """The image for an XML: same stem (any extension) first, then <filename>."""
        candidates = self.by_stem.get(stem, [])
        if candidates:
            return self.folder / (filename if filename in candidates else candidates[0])
        if filename in self.names:
            return self.folder / filename
        return self.folder / (filename or stem + ".jpg")  # missing: reported by the caller


def _read_split_ids(split_file: Path) -> list[str]:
    # Lines may carry a second column (class-specific VOC lists: "000005 -1"); the id is first.
    lines = split_file.read_text(encoding="utf-8-sig").splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _standard_layout(root: Path, split: str | None) -> tuple[list[Path], Path]:
    ann_dir = root / "Annotations"
    if split is None:
        xmls = sorted(ann_dir.glob("*.xml"))
        if not xmls:
            raise DatasetError(f"no *.xml files in {ann_dir}")
        return xmls, root / "JPEGImages"
    candidates = [root / "ImageSets" / "Main" / f"{split}.txt", root / "ImageSets" / f"{split}.txt"]
    split_file = next((p for p in candidates if p.is_file()), None)
    if split_file is None:
        found = sorted(
            {
                p.stem
                for d in (root / "ImageSets" / "Main", root / "ImageSets")
                for p in d.glob("*.txt")
            }
        )
        raise DatasetError(
            f"split {split!r}: expected {candidates[0]} or {candidates[1]}; "
            f"available splits: {found or 'none'}"
        )
    ids = _read_split_ids(split_file)
    xmls = [ann_dir / f"{i}.xml" for i in ids]
    missing = [x for x in xmls if not x.is_file()]
    if missing:
        raise DatasetError(
            f"{split_file} lists {len(missing)} ids with no annotation in {ann_dir}, "
            f"e.g. {missing[0].name}"
        )
    return xmls, root / "JPEGImages"


def _flat_layout(root: Path, split: str | None) -> tuple[list[Path], Path | None]:
    folder = root
    if split is not None:
        if (root / split).is_dir():
            folder = root / split
        else:
            log.warning("%s has no %r folder; using the XML files directly in it", root, split)
    xmls = sorted(folder.glob("*.xml"))
    if not xmls:
        raise DatasetError(
            f"no VOC annotations found: expected {root}/Annotations/*.xml (standard layout) or "
            f"*.xml beside the images in {folder}; {describe_folder(folder)}"
        )
    return xmls, None  # None: each image sits beside its XML


class VOCDetection(DetectionSource):
    """Pascal VOC XML annotations, standard or flat layout (see the module docstring).

    Boxes are kept as written (xyxy pixels), clipped to the image; degenerate ones are dropped.
    With ``skip_difficult`` the difficult objects are not trained on but kept as crowd
    (ignore) regions, so a detection on them is not counted as a false positive.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        class_names: list[str] | None = None,
        skip_difficult: bool = False,
        ignore_unknown_classes: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(
                f"VOC root {self.root} is not a folder ({describe_folder(self.root)})"
            )
        if (self.root / "Annotations").is_dir():
            xmls, image_dir = _standard_layout(self.root, split)
        else:
            xmls, image_dir = _flat_layout(self.root, split)
        files = [_parse_voc_xml(x) for x in xmls]
        if class_names is None:
            self.class_names = sorted({o.name for f in files for o in f.objects})
        else:
            self.class_names = check_class_names(class_names)
        self.category_ids = list(range(1, len(self.class_names) + 1))
        self._check_classes(files, ignore_unknown_classes)
        self._records = self._build_records(files, image_dir, skip_difficult)

    def _check_classes(self, files: list[_VocFile], ignore_unknown: bool) -> None:
        known = set(self.class_names)
        unknown: dict[str, str] = {}
        for f in files:
            for o in f.objects:
                if o.name not in known:
                    unknown.setdefault(o.name, str(f.xml))
        if unknown and not ignore_unknown:
            raise unknown_class_error(unknown, self.class_names)
        if unknown:
            log.warning("%s: ignoring objects of unknown classes %s", self.root, sorted(unknown))

    def _build_records(
        self, files: list[_VocFile], image_dir: Path | None, skip_difficult: bool
    ) -> list[Record]:
        index = {name: i for i, name in enumerate(self.class_names)}
        folders: dict[Path, _ImageFolder] = {}
        drops, missing, resized = DropCounter(), [], 0
        records = []
        for i, f in enumerate(files):
            folder_path = image_dir if image_dir is not None else f.xml.parent
            if folder_path not in folders:
                folders[folder_path] = _ImageFolder(folder_path)
            path = folders[folder_path].find(f.xml.stem, f.filename)
            width, height = f.width, f.height
            header = image_size(path)
            if header is None:
                missing.append(path)
            elif (width, height) != header:
                # The pixels are the truth: XML sizes are 0 (fruits) or off by one (mask).
                resized += width > 0 and height > 0
                width, height = header
            objects = [o for o in f.objects if o.name in index]
            hard = np.array([skip_difficult and o.difficult for o in objects], bool)
            boxes = np.array([o.box for o in objects], np.float32).reshape(-1, 4)
            labels = np.array([index[o.name] for o in objects], np.int64)
            kept, kept_labels, dropped = clean_boxes(boxes[~hard], labels[~hard], width, height)
            crowd, crowd_labels, _ = clean_boxes(boxes[hard], labels[hard], width, height)
            drops.add(dropped, f.xml)
            info = ImageInfo(i + 1, self._relative(path), width, height)
            records.append(Record(path, info, Annotation(kept, kept_labels, crowd, crowd_labels)))
        drops.report(str(self.root))
        warn_missing_images(str(self.root), missing, len(files))
        if resized:
            log.warning(
                "%s: %d XML sizes differ from their image; using the image size", self.root, resized
            )
        return records

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

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
