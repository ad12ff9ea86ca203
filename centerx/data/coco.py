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

import numpy as np
from pycocotools.coco import COCO

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo, read_image
from centerx.data.files import (
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


def _validate(data: dict, path: Path) -> None:
    """Fail at construction, naming the file, on entries pycocotools would trip over later."""
    for kind, keys in (("images", ("id", "file_name")), ("categories", ("id", "name"))):
        for entry in data[kind]:
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                raise DatasetError(f"{path}: {kind} entry without {keys}: {entry!r:.200}")
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotation is not an object: {ann!r:.200}")
        if ann.get("image_id") not in image_ids or ann.get("category_id") not in category_ids:
            raise DatasetError(
                f"{path}: annotation id {ann.get('id')} refers to image {ann.get('image_id')} / "
                f"category {ann.get('category_id')}, which the file does not define"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{path}: annotation id {ann.get('id')} has bbox {bbox!r}")


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


class COCODetection(DetectionSource):
    """A COCO instances JSON plus its image folder (paths relative to ``root`` unless absolute).

    With ``class_names`` only those categories are kept, in that order; others are dropped.
    ``self.coco`` is the pycocotools index of the original JSON, for evaluation.
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        image_dir: str | Path | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ann_file = _resolve(self.root, ann_file)
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
        self._records = self._build_records(data["images"])

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
        drops, missing, records = DropCounter(), [], []
        for img in images:
            path = self.image_dir / img["file_name"]
            width, height = int(img.get("width") or 0), int(img.get("height") or 0)
            if not path.is_file():
                missing.append(path)
            elif width <= 0 or height <= 0:  # only read headers when the JSON lacks the size
                width, height = image_size(path) or (0, 0)
            plain, crowd = self._boxes(img["id"], index)
            boxes, labels, dropped = clean_boxes(*plain, width, height)
            crowd_boxes, crowd_labels, _ = clean_boxes(*crowd, width, height)
            drops.add(dropped, img["file_name"])
            info = ImageInfo(int(img["id"]), str(img["file_name"]), width, height)
            ann = Annotation(boxes, labels, crowd_boxes, crowd_labels)
            records.append(Record(path, info, ann))
        drops.report(str(self.ann_file))
        warn_missing_images(str(self.ann_file), missing, len(images))
        return records

    def _boxes(self, image_id: int, index: dict[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(boxes, labels), (crowd_boxes, crowd_labels)], xyxy, for the kept categories."""
        groups: tuple[tuple[list, list], ...] = (([], []), ([], []))
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["category_id"] not in index:
                continue  # a category left out by class_names
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes, labels = groups[1 if ann.get("iscrowd", 0) else 0]
            boxes.append((x, y, x + w, y + h))
            labels.append(index[ann["category_id"]])
        return [(np.array(b, np.float32).reshape(-1, 4), np.array(c, np.int64)) for b, c in groups]

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
            for i in (r.info for r in self._records)
        ]
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

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
