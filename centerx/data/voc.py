"""Pascal VOC XML datasets: the standard VOCdevkit layout and flat "XML beside the image" folders.

Two layouts are recognised from what is on disk:

* standard: ``root/Annotations/*.xml`` + ``root/JPEGImages/*``; a split is a list of ids in
  ``root/ImageSets/Main/{split}.txt`` or ``root/ImageSets/{split}.txt``, or a `.txt` file of ids
  given by path (absolute, or relative to the working directory or to root).
* flat (LabelImg style): each image sits beside its XML in ``root/{split}/`` (or ``root/``).

All XMLs are parsed at construction (they are small) so that a malformed file fails early
with its name, and `load_annotation` is a cheap copy of cached arrays. Image sizes come from
the image header (PIL reads only the header), because real XMLs say 0 or are off by a pixel.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from centerx.data.base import DatasetError, ImageInfo
from centerx.data.files import (
    IMAGE_EXTENSIONS,
    FileSource,
    RawBoxes,
    Record,
    RecordBuilder,
    bad_value,
    check_class_names,
    describe_folder,
    image_size,
    parse_number,
    unknown_class_error,
    whole_number,
)

log = logging.getLogger(__name__)

_CORNERS = ("xmin", "ymin", "xmax", "ymax")
_DIFFICULT = {"": False, "0": False, "false": False, "1": True, "true": True}


# ---------------------------------------------------------------------------------------------
# VOC XML parsing
# ---------------------------------------------------------------------------------------------


@dataclass
class _VocObject:
    name: str
    box: tuple[float, float, float, float]
    difficult: bool
    where: str  # "a.xml: object 3 (dog)", for the skip summary


@dataclass
class _VocFile:
    xml: Path
    filename: str  # <filename>, may be empty or wrong (the mask set names .txt files)
    width: int  # 0: not written (the image header decides later)
    height: int
    objects: list[_VocObject]


def _parse_size(root: ET.Element, xml: Path) -> tuple[int, int]:
    """<size> width and height; absent, empty or 0 in real files means "ask the image"."""
    sizes = []
    for key in ("width", "height"):
        text = (root.findtext(f"size/{key}") or "").strip()
        where = f"{xml}: size/{key}"
        sizes.append(whole_number(parse_number(text, where), where) if text else 0)
    return sizes[0], sizes[1]


def _parse_object(obj: ET.Element, number: int, xml: Path) -> _VocObject:
    where = f"{xml}: object {number}"
    name = (obj.findtext("name") or "").strip()
    box = obj.find("bndbox")
    if not name or box is None:
        raise DatasetError(f"{where} has no <name> or no <bndbox>; fix or remove it")
    where = f"{where} ({name})"
    x0, y0, x1, y1 = (parse_number(box.findtext(k), f"{where} {k}") for k in _CORNERS)
    difficult = (obj.findtext("difficult") or "").strip().lower()
    if difficult not in _DIFFICULT:
        raise bad_value(f"{where} difficult", difficult, "0 or 1")
    return _VocObject(name, (x0, y0, x1, y1), _DIFFICULT[difficult], where)


def _parse_voc_xml(xml: Path) -> _VocFile:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as err:
        raise DatasetError(f"{xml}: cannot parse annotation XML: {err}") from err
    width, height = _parse_size(root, xml)
    objects = [_parse_object(obj, n, xml) for n, obj in enumerate(root.iter("object"), 1)]
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
    if split.endswith(".txt"):  # a split file of one's own (e.g. one half of a dataset)
        candidates = [Path(split), root / split]
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


class VOCDetection(FileSource):
    """Pascal VOC XML annotations, standard or flat layout (see the module docstring).

    Boxes are kept as written (xyxy pixels), clipped to the image; bad ones are skipped and
    counted (centerx.data.files says which). With ``skip_difficult`` the difficult objects
    are not trained on but kept as crowd (ignore) regions, so a detection on them is not
    counted as a false positive.
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
        self.records = self._build_records(files, image_dir, skip_difficult)

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
        builder, resized = RecordBuilder(str(self.root)), 0
        for i, f in enumerate(files):
            folder = image_dir if image_dir is not None else f.xml.parent
            if folder not in folders:
                folders[folder] = _ImageFolder(folder)
            path = folders[folder].find(f.xml.stem, f.filename)
            width, height = f.width, f.height
            header = image_size(path)
            if header is None:
                builder.missing_image(path)
            elif (width, height) != header:
                # The pixels are the truth: XML sizes are 0 (fruits) or off by one (mask).
                resized += width > 0 and height > 0
                width, height = header
            raw = RawBoxes()
            for o in f.objects:
                if o.name in index:
                    raw.add(o.box, index[o.name], o.where, crowd=skip_difficult and o.difficult)
            builder.add(path, ImageInfo(i + 1, self._relative(path), width, height), raw)
        if resized:
            log.warning(
                "%s: %d XML sizes differ from their image; using the image size", self.root, resized
            )
        return builder.finish()

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
