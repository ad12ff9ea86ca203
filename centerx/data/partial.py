"""Partial labels: which classes each image's source labels, and every source wrapper.

Real datasets label different class sets: dataset A annotates raccoons, dataset B kangaroos,
and each may hold unannotated objects of the other. A source reports, per image, which of its
classes are labelled (`labeled_classes`): an absent box of a labelled class is a true negative;
of an unlabelled class it means nothing. Training (ignore-unlabelled negatives), distillation
and evaluation (a class is scored only where it is labelled) all read this one flag.

Wrappers (each costs O(1) per item on top of the wrapped source):

* `Relabeled`: the classes of a source mapped by name onto another class list
  (`{new_class: source_class}`, or `{new_class: [source classes]}` to merge): subset, rename,
  merge. A class the map leaves out is unlabelled; a class declared `absent` is labelled
  with no objects (the part is known not to contain it).
* `SourceUnion`: sources with the same class list (relabel them first) as one dataset; each
  image keeps its own part's labelled classes.
* `Shard`: every n-th image of a source, to split one dataset into disjoint parts.
* `PseudoLabeled`: extra boxes (a teacher's detections) for classes a source leaves
  unlabelled; those classes become labelled.

`build_union` turns the `parts` list of conf/data/union.yaml into one of these trees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import get_class

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo

log = logging.getLogger(__name__)

ClassMap = Mapping[str, str | Sequence[str]] | Sequence[str]
NO_BOXES = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))


class SourceView(DetectionSource):
    """The images of `self.source`; subclasses change annotations or which images are shown."""

    source: DetectionSource

    def _local(self, index: int) -> int:
        """The wrapped source's index of image `index` (views that select images override it)."""
        return index

    def __len__(self) -> int:
        return len(self.source)

    def image_info(self, index: int) -> ImageInfo:
        return self.source.image_info(self._local(index))

    def load_image(self, index: int) -> np.ndarray:
        return self.source.load_image(self._local(index))

    def load_annotation(self, index: int) -> Annotation:
        return self.source.load_annotation(self._local(index))

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        return self.source.load(self._local(index))

    def labeled_classes(self, index: int) -> np.ndarray:
        return self.source.labeled_classes(self._local(index))

    def absent_classes(self, index: int) -> np.ndarray:
        return self.source.absent_classes(self._local(index))


def _normalise_map(
    classes: ClassMap | None, class_names: Sequence[str], source_names: Sequence[str]
) -> dict[str, list[str]]:
    """{new class: [source classes]}; None keeps the source classes named like a new class."""
    if classes is None:
        return {name: [name] for name in class_names if name in source_names}
    pairs = classes.items() if isinstance(classes, Mapping) else ((name, name) for name in classes)
    return {
        str(new): [str(old)] if isinstance(old, str) else [str(o) for o in old]
        for new, old in pairs
    }


class Relabeled(SourceView):
    """`source` with its classes mapped by name onto `class_names`.

    classes: {new class: source class or [source classes]}; a list means the same names;
    None maps every source class whose name is in `class_names`. New classes the map leaves
    out are unlabelled; `absent` ones are labelled and hold no objects.
    """

    def __init__(
        self,
        source: DetectionSource,
        class_names: Sequence[str],
        classes: ClassMap | None = None,
        absent: Sequence[str] = (),
    ) -> None:
        self.source = source
        self.class_names = [str(name) for name in class_names]
        self.category_ids = list(range(1, len(self.class_names) + 1))
        self.classes = _normalise_map(classes, self.class_names, source.class_names)
        self._check(absent)
        self._remap = np.full(source.num_classes, -1, np.int64)
        for new, olds in self.classes.items():
            for old in olds:
                self._remap[source.class_names.index(old)] = self.class_names.index(new)
        # new class -> the source classes it needs labelled (all of them, for a merge)
        self._needs = np.zeros((len(self.class_names), source.num_classes), bool)
        for new, olds in self.classes.items():
            for old in olds:
                self._needs[self.class_names.index(new), source.class_names.index(old)] = True
        self._absent = np.array([name in absent for name in self.class_names])

    def _check(self, absent: Sequence[str]) -> None:
        unknown_new = [n for n in [*self.classes, *absent] if n not in self.class_names]
        if unknown_new:
            raise DatasetError(f"classes {unknown_new} are not in class_names {self.class_names}")
        olds = [old for group in self.classes.values() for old in group]
        unknown_old = sorted({o for o in olds if o not in self.source.class_names})
        if unknown_old:
            raise DatasetError(
                f"the source has no class(es) {unknown_old}; its classes: {self.source.class_names}"
            )
        if len(set(olds)) != len(olds):
            raise DatasetError(f"a source class is mapped twice in {self.classes}")
        both = sorted(set(absent) & set(self.classes))
        if both:
            raise DatasetError(f"classes {both} are both mapped and declared absent")

    def _relabel(self, ann: Annotation) -> Annotation:
        labels, crowd_labels = self._remap[ann.labels], self._remap[ann.crowd_labels]
        keep, crowd_keep = labels >= 0, crowd_labels >= 0
        return Annotation(
            ann.boxes[keep], labels[keep], ann.crowd_boxes[crowd_keep], crowd_labels[crowd_keep]
        )

    def load_annotation(self, index: int) -> Annotation:
        return self._relabel(self.source.load_annotation(index))

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        image, ann = self.source.load(index)
        return image, self._relabel(ann)

    def labeled_classes(self, index: int) -> np.ndarray:
        source_labeled = np.asarray(self.source.labeled_classes(index), bool)
        mapped = self._needs.any(1) & ~(self._needs & ~source_labeled).any(1)
        return mapped | self._absent

    def absent_classes(self, index: int) -> np.ndarray:
        return self._absent.copy()


class Shard(SourceView):
    """Images `index, index + count, index + 2 count, ...` of `source` (disjoint for 0..count-1)."""

    def __init__(self, source: DetectionSource, index: int, count: int) -> None:
        if not 0 <= int(index) < int(count):
            raise DatasetError(f"shard [{index}, {count}]: need 0 <= index < count")
        self.source = source
        self.class_names = list(source.class_names)
        self.category_ids = list(source.category_ids)
        self._picked = np.arange(int(index), len(source), int(count))

    def _local(self, index: int) -> int:
        return int(self._picked[index])

    def __len__(self) -> int:
        return len(self._picked)

    def load_annotation(self, index: int) -> Annotation:
        return self.source.load_annotation(self._local(index))


class SourceUnion(DetectionSource):
    """Sources with one class list as one dataset. Image ids are renumbered 1..N and file names
    prefixed with the part's name (two parts may hold the same file name, and a name means the
    same image whichever parts are in use); each image keeps its part's labelled classes."""

    def __init__(
        self, parts: Sequence[DetectionSource], names: Sequence[str] | None = None
    ) -> None:
        if not parts:
            raise DatasetError("a union needs at least one part")
        lists = [list(p.class_names) for p in parts]
        if any(names_ != lists[0] for names_ in lists):
            raise DatasetError(f"cannot join sources with different class lists: {lists}")
        self.parts = list(parts)
        self.names = [str(n) for n in names] if names else [f"part{i}" for i in range(len(parts))]
        self.class_names = lists[0]
        self.category_ids = list(parts[0].category_ids)
        self._offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def part_of(self, index: int) -> tuple[int, int]:
        """(part number, index inside that part) of union image `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return part, index - int(self._offsets[part])

    def image_info(self, index: int) -> ImageInfo:
        part, local = self.part_of(index)
        info = self.parts[part].image_info(local)
        name = f"{self.names[part]}/{info.file_name}"
        return ImageInfo(index + 1, name, info.width, info.height)

    def load_image(self, index: int) -> np.ndarray:
        part, local = self.part_of(index)
        return self.parts[part].load_image(local)

    def load_annotation(self, index: int) -> Annotation:
        part, local = self.part_of(index)
        return self.parts[part].load_annotation(local)

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        part, local = self.part_of(index)
        return self.parts[part].load(local)

    def labeled_classes(self, index: int) -> np.ndarray:
        part, local = self.part_of(index)
        return self.parts[part].labeled_classes(local)

    def absent_classes(self, index: int) -> np.ndarray:
        part, local = self.part_of(index)
        return self.parts[part].absent_classes(local)


class PseudoLabeled(SourceView):
    """`source` plus pseudo-label boxes for `fill_classes`, which become labelled.

    `boxes_by_file[file_name]` holds an image's pseudo-labels (boxes xyxy in original pixels,
    labels indexing `source.class_names`). They are added only for fill classes the source
    leaves unlabelled on that image: where it labels a class, its ground truth stands alone.
    """

    def __init__(
        self,
        source: DetectionSource,
        boxes_by_file: Mapping[str, tuple[np.ndarray, np.ndarray]],
        fill_classes: Sequence[str],
    ) -> None:
        unknown = [name for name in fill_classes if name not in source.class_names]
        if unknown:
            raise DatasetError(f"classes {unknown} are not in the source's {source.class_names}")
        self.source = source
        self.class_names = list(source.class_names)
        self.category_ids = list(source.category_ids)
        self._fill = np.array([name in fill_classes for name in self.class_names])
        self._boxes = boxes_by_file

    def _merge(self, index: int, ann: Annotation) -> Annotation:
        boxes, labels = self._boxes.get(self.source.image_info(index).file_name, NO_BOXES)
        wanted = self._fill & ~np.asarray(self.source.labeled_classes(index), bool)
        keep = wanted[labels]
        if not keep.any():
            return ann
        return Annotation(
            np.concatenate([ann.boxes.reshape(-1, 4), boxes[keep]]).astype(np.float32),
            np.concatenate([ann.labels, labels[keep]]).astype(np.int64),
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


def read_pseudo_labels(
    path: str | Path, class_names: Sequence[str]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """A pseudo-label file (COCO instances JSON written by `run.sh pseudo_label`) ->
    ({file_name: (boxes xyxy, labels into class_names)}, the classes it fills)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        files = {int(i["id"]): str(i["file_name"]) for i in data["images"]}
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"pseudo-label file {path}: cannot read it ({err})") from err
    unknown = sorted(set(categories.values()) - set(class_names))
    if unknown:
        raise DatasetError(f"pseudo-label file {path}: classes {unknown} not in {class_names}")
    grouped: dict[str, tuple[list, list]] = {name: ([], []) for name in files.values()}
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes, labels = grouped[files[int(ann["image_id"])]]
        boxes.append((x, y, x + w, y + h))
        labels.append(list(class_names).index(categories[int(ann["category_id"])]))
    as_arrays = {
        name: (np.array(b, np.float32).reshape(-1, 4), np.array(lab, np.int64))
        for name, (b, lab) in grouped.items()
    }
    return as_arrays, sorted(set(categories.values()), key=list(class_names).index)


# ---------------------------------------------------------------------------------------------
# Parts from config (conf/data/union.yaml)
# ---------------------------------------------------------------------------------------------

PART_KEYS = {
    "name", "format", "root", "classes", "absent", "train_split", "val_split", "shard", "options"
}  # fmt: skip


def _split_kwargs(split: Any) -> dict[str, Any]:
    """A split is a name (passed as `split=`) or a mapping of source arguments (e.g. a seed)."""
    if split is None:
        return {}
    if isinstance(split, Mapping):
        return dict(split)
    return {"split": str(split)}


def build_part(
    spec: Mapping[str, Any],
    split: str,
    class_names: Sequence[str],
    formats: Mapping[str, str],
    defaults: Mapping[str, Any],
) -> DetectionSource:
    """One part of a union, relabelled onto `class_names`. `split` is "train" or "val"."""
    where = f"part {spec.get('name')!r}"
    extra = sorted(set(spec) - PART_KEYS)
    if extra:
        raise DatasetError(f"{where}: unknown keys {extra}; known: {sorted(PART_KEYS)}")
    fmt = spec.get("format")
    if fmt not in formats:
        raise DatasetError(f"{where}: unknown format {fmt!r}; known: {sorted(formats)}")
    kwargs = dict(spec.get("options") or {})
    if spec.get("root") is not None:
        kwargs["root"] = str(spec["root"])
    kwargs.update(_split_kwargs(spec.get(f"{split}_split", defaults.get(f"{split}_split"))))
    source = get_class(formats[fmt])(**kwargs)
    if spec.get("shard") is not None:
        source = Shard(source, *spec["shard"])
    if len(source) == 0:
        raise DatasetError(f"{where} ({fmt}, {kwargs}) has no images")
    return Relabeled(source, class_names, spec.get("classes"), spec.get("absent") or ())


def _check_every_class_labelled(union: SourceUnion) -> None:
    labelled = {
        name: list(part.classes) for name, part in zip(union.names, union.parts, strict=True)
    }
    orphans = [c for c in union.class_names if not any(c in got for got in labelled.values())]
    if orphans:
        raise DatasetError(
            f"class(es) {orphans} are labelled by no part (parts label {labelled}); add a part "
            "that labels them, map them with a part's `classes`, or drop them from class_names"
        )


def build_union(
    class_names: Sequence[str],
    parts: Sequence[Mapping[str, Any]],
    split: str,
    formats: Mapping[str, str],
    val_parts: Sequence[Mapping[str, Any]] | None = None,
    test_parts: Sequence[Mapping[str, Any]] | None = None,
    use_parts: Sequence[str] | None = None,
    pseudo_labels: Sequence[str] | None = None,
    train_split: Any = "train",
    val_split: Any = "val",
) -> DetectionSource:
    """The union of `parts` (see conf/data/union.yaml) for `split`: "train", "val" or "test".

    val: `val_parts` when given (e.g. one fully labelled split), else each part's val split;
    test: `test_parts`, else val's. `use_parts` keeps only the named parts (a teacher trains
    and validates on its own part). Pseudo-label files (`run.sh pseudo_label`) add boxes to
    the training images where a part leaves a class unlabelled. Every class must be labelled
    by some training part.
    """
    if split not in ("train", "val", "test"):
        raise DatasetError(f"unknown split {split!r}; use train, val or test")
    class_names = [str(name) for name in class_names]
    chosen = {"train": None, "val": val_parts, "test": test_parts or val_parts}[split]
    specs = _named_specs(
        chosen if chosen is not None else parts, use_parts if chosen is None else None
    )
    defaults = {"train_split": train_split, "val_split": val_split}
    which = "train" if split == "train" else "val"
    built = [build_part(spec, which, class_names, formats, defaults) for spec in specs]
    union = SourceUnion(built, [spec["name"] for spec in specs])
    if split != "train":
        return union
    _check_every_class_labelled(union)
    source: DetectionSource = union
    for path in pseudo_labels or ():
        boxes, fill = read_pseudo_labels(path, class_names)
        source = PseudoLabeled(source, boxes, fill)
    return source


def _named_specs(
    parts: Sequence[Mapping[str, Any]] | None, use_parts: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Part specs with a name each (default part0, part1, ...), narrowed to `use_parts`."""
    if not parts:
        raise DatasetError("data.parts is empty: list at least one {format, root} part")
    specs = [{"name": f"part{i}", **dict(spec)} for i, spec in enumerate(parts)]
    names = [str(spec["name"]) for spec in specs]
    if len(set(names)) != len(names):
        raise DatasetError(f"part names must be unique, got {names}")
    if use_parts is None:
        return specs
    unknown = [name for name in use_parts if name not in names]
    if unknown:
        raise DatasetError(f"data.use_parts names unknown parts {unknown}; parts: {names}")
    return [spec for spec in specs if spec["name"] in use_parts]
