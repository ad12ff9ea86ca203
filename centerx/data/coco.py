"""COCO instances-JSON datasets, keeping the original ids so predictions evaluate against the JSON.

Contiguous class index ``i`` corresponds to COCO category ``category_ids[i]`` (COCO's ids are
non-contiguous: 1..90 for 80 classes), and `ImageInfo.image_id` is the JSON's image id.
``iscrowd=1`` regions go to `Annotation.crowd_boxes`: not trained on, ignored by COCOeval.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from pycocotools.coco import COCO

from centerx.data.base import DatasetError, ImageInfo
from centerx.data.files import (
    FileSource,
    RawBoxes,
    Record,
    RecordBuilder,
    bad_value,
    check_class_names,
    describe_folder,
    image_size,
    is_json_int,
    json_number,
    whole_number,
)

log = logging.getLogger(__name__)


def _resolve(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def _load_json(path: Path, root: Path) -> dict:
    if not path.is_file():
        # Not deeper than one folder: image trees can hold 100k files.
        candidates = [*root.glob("*.json"), *root.glob("*/*.json")]
        found = sorted(p.relative_to(root).as_posix() for p in candidates)[:20]
        raise DatasetError(
            f"COCO annotation file {path} not found; JSON files under {root}: {found or 'none'} "
            f"({describe_folder(root)})"
        )
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise DatasetError(f"{path}: cannot parse COCO JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(data.get("categories"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'categories' list)")
    data.setdefault("annotations", [])  # image-info-only files (test-dev) have none
    return data


def _unique_ids(entries: list, kind: str, path: Path, required: bool = True) -> set[int]:
    """The int ids of images, categories or annotations; pycocotools silently merges duplicates."""
    seen: set[int] = set()
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {kind} #{n} is not an object: {entry!r:.100}")
        if "id" not in entry and not required:
            continue  # hand-written annotations may omit it; _build_index assigns one
        value = entry.get("id")
        if not is_json_int(value):
            raise bad_value(f"{path}: {kind} #{n} id", value, "an integer id")
        if value in seen:
            raise DatasetError(
                f"{path}: {kind} id {value} appears twice; ids must be unique, renumber one"
            )
        seen.add(value)
    return seen


def _check_image(image: dict, path: Path) -> None:
    where = f"{path}: image id {image['id']}"
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise bad_value(f"{where} file_name", name, "a file name")
    for key in ("width", "height"):
        if key in image:  # absent: the image header gives the size
            value = json_number(image[key], f"{where} {key}")
            whole_number(value, f"{where} {key}", minimum=1)


def _check_annotation(ann: dict, where: str, image_ids: set[int], category_ids: set[int]) -> None:
    for key, defined in (("image_id", image_ids), ("category_id", category_ids)):
        value = ann.get(key)
        if not is_json_int(value):
            raise bad_value(f"{where} {key}", value, "an integer id")
        if value not in defined:
            raise DatasetError(
                f"{where} refers to {key[:-3]} {value}, which the file does not define; "
                "add it or remove the annotation"
            )
    where = f"{where} (image {ann['image_id']})"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise bad_value(f"{where} bbox", bbox, "[x, y, width, height]")
    for i, value in enumerate(bbox):
        json_number(value, f"{where} bbox[{i}]")
    if "area" in ann and json_number(ann["area"], f"{where} area") < 0:
        raise bad_value(f"{where} area", ann["area"], "a number >= 0")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise bad_value(f"{where} iscrowd", ann["iscrowd"], "0 or 1")


def _validate(data: dict, path: Path) -> None:
    """Fail at construction, naming the file and the id, on any entry that is not what COCO
    says (see the table in centerx.data.files); pycocotools would trip over it later or, for
    duplicate ids and quoted numbers, silently compute something else."""
    image_ids = _unique_ids(data["images"], "image", path)
    category_ids = _unique_ids(data["categories"], "category", path)
    _unique_ids(data["annotations"], "annotation", path, required=False)
    for image in data["images"]:
        _check_image(image, path)
    for category in data["categories"]:
        if "name" not in category:
            raise DatasetError(f"{path}: category id {category['id']} has no name")
    prefix = f"{path}: annotation"  # formatted once: COCO train has 860k annotations
    for n, ann in enumerate(data["annotations"], 1):
        label = f"id {ann['id']}" if "id" in ann else f"#{n} (no id)"
        _check_annotation(ann, f"{prefix} {label}", image_ids, category_ids)


def _build_index(data: dict, path: Path) -> COCO:
    """pycocotools index of the (validated) JSON."""
    _validate(data, path)
    next_id = 1 + max((a["id"] for a in data["annotations"] if "id" in a), default=0)
    for ann in data["annotations"]:
        if "id" not in ann:  # hand-written files omit it; pycocotools needs unique ids
            ann["id"], next_id = next_id, next_id + 1
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _default_image_dir(root: Path, ann_path: Path, images: list[dict]) -> Path:
    """instances_val2017.json -> root/val2017 (or root/images/val2017, ...), checked on disk."""
    split = ann_path.stem.rsplit("_", 1)[-1]
    candidates = [root / split, root / "images" / split, root / "images", ann_path.parent, root]
    first = images[0]["file_name"] if images else None
    for folder in candidates:
        if first is not None and (folder / first).is_file():
            return folder
    existing = [c for c in candidates[:3] if c.is_dir()]
    if existing:
        return existing[0]
    if first is None:
        return root
    raise DatasetError(
        f"cannot find the images of {ann_path}: {first} is in none of "
        f"{[str(c) for c in candidates]}; pass image_dir"
    )


class COCODetection(FileSource):
    """A COCO instances JSON plus its image folder (paths relative to ``root`` unless absolute).

    With ``class_names`` only those categories are kept, in that order; others are dropped.
    ``split="val2017"`` stands for ``ann_file="annotations/instances_val2017.json"``.
    ``self.coco`` is the pycocotools index of the original JSON, for evaluation.
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        class_names: list[str] | None = None,
        split: str | None = None,
    ) -> None:
        self.root = Path(root)
        if ann_file is None and split is None:
            raise DatasetError(f"COCO dataset {root}: pass ann_file or split")
        # A split names the usual file: annotations/instances_{split}.json
        self.ann_file = _resolve(self.root, ann_file or f"annotations/instances_{split}.json")
        data = _load_json(self.ann_file, self.root)
        self.coco = _build_index(data, self.ann_file)
        self._annotations: list[dict] = data["annotations"]
        if image_dir is None:
            self.image_dir = _default_image_dir(self.root, self.ann_file, data["images"])
        else:
            self.image_dir = _resolve(self.root, image_dir)
            if not self.image_dir.is_dir():
                raise DatasetError(f"image_dir {self.image_dir} is not a folder")
        self._select_categories(data["categories"], class_names)
        self.records = self._build_records(data["images"])

    def _select_categories(self, categories: list[dict], class_names: list[str] | None) -> None:
        categories = sorted(categories, key=lambda c: c["id"])
        if class_names is None:
            self.class_names = [str(c["name"]) for c in categories]
            self.category_ids = [int(c["id"]) for c in categories]
            return
        by_name = {str(c["name"]): int(c["id"]) for c in categories}
        self.class_names = check_class_names(class_names)
        absent = [n for n in self.class_names if n not in by_name]
        if absent:
            raise DatasetError(
                f"class_names {absent} are not categories of {self.ann_file}; "
                f"available: {list(by_name)}"
            )
        self.category_ids = [by_name[n] for n in self.class_names]

    def _build_records(self, images: list[dict]) -> list[Record]:
        index = {cid: i for i, cid in enumerate(self.category_ids)}
        builder = RecordBuilder(str(self.ann_file))
        for img in images:
            path = self.image_dir / img["file_name"]
            width, height = int(img.get("width", 0)), int(img.get("height", 0))
            if not path.is_file():
                builder.missing_image(path)
            elif width <= 0 or height <= 0:  # only read headers when the JSON lacks the size
                width, height = image_size(path) or (0, 0)
            info = ImageInfo(img["id"], img["file_name"], width, height)
            builder.add(path, info, self._boxes(img["id"], index))
        return builder.finish()

    def _boxes(self, image_id: int, index: dict[int, int]) -> RawBoxes:
        """The image's boxes (xyxy) of the kept categories, crowd regions flagged."""
        raw = RawBoxes()
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["category_id"] in index:  # else a category left out by class_names
                x, y, w, h = (float(v) for v in ann["bbox"])
                where = f"annotation id {ann['id']} (image {image_id})"
                crowd = bool(ann.get("iscrowd", 0))
                raw.add((x, y, x + w, y + h), index[ann["category_id"]], where, crowd)
        return raw

    def to_coco(self) -> dict:
        """The original JSON's ground truth for the kept categories.

        Unlike the base export (areas recomputed from sanitised boxes), this keeps COCO's own
        areas (small/medium/large use the mask area) and every box, so metrics match an
        evaluation against the source file.
        """
        keep = set(self.category_ids)
        annotations = []
        for ann in self._annotations:
            if ann["category_id"] in keep:
                ann = dict(ann)
                ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
                ann.setdefault("iscrowd", 0)
                annotations.append(ann)
        images = [
            {"id": i.image_id, "file_name": i.file_name, "width": i.width, "height": i.height}
            for i in (r.info for r in self.records)
        ]
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}
