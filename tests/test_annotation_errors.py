"""Malformed numbers in VOC, COCO and YOLO annotation files, one row each.

Every row writes a tiny dataset (two PNGs, one good box plus the case's box) and expects one
of the verdicts of the table in centerx.data.files: a one-line DatasetError naming the file
and the place in it, a counted skip (one summary warning, the good box survives), or a box
kept (clipped) without a word.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from centerx.data.base import DatasetError, DetectionSource
from centerx.data.coco import COCODetection
from centerx.data.voc import VOCDetection
from centerx.data.yolo import YOLODetection

WIDTH, HEIGHT = 64, 48  # the image every case's boxes are on
DELETE = object()  # a COCO value that is removed rather than replaced


def write_png(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))


# ---------------------------------------------------------------------------------------------
# Datasets: a good box [10, 10, 30, 30] on a.png, plus the case's box
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Yolo:
    """a.txt holds the good box on line 1 and `line` on line 2."""

    line: str

    def load(self, root: Path) -> DetectionSource:
        write_png(root / "images" / "train" / "a.png", WIDTH, HEIGHT)
        write_png(root / "images" / "train" / "b.png", 32, 32)
        (root / "labels" / "train").mkdir(parents=True)
        good = f"0 {20 / WIDTH} {20 / HEIGHT} {20 / WIDTH} {20 / HEIGHT}"
        (root / "labels" / "train" / "a.txt").write_text(f"{good}\n{self.line}\n")
        return YOLODetection(root, "train", class_names=["cat", "dog"])


@dataclass(frozen=True)
class Voc:
    """a.xml holds the good box as object 1 and a 'dog' with these fields as object 2."""

    xmin: str | None = "30"
    ymin: str | None = "5"
    xmax: str | None = "40"
    ymax: str | None = "15"
    difficult: str | None = "0"
    size: tuple[str, str] = (str(WIDTH), str(HEIGHT))

    def load(self, root: Path) -> DetectionSource:
        write_png(root / "train" / "a.png", WIDTH, HEIGHT)
        write_png(root / "train" / "b.png", 32, 32)
        fields = {k: getattr(self, k) for k in ("xmin", "ymin", "xmax", "ymax")}
        box = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items() if v is not None)
        hard = "" if self.difficult is None else f"<difficult>{self.difficult}</difficult>"
        (root / "train" / "a.xml").write_text(
            f"<annotation><filename>a.png</filename><size><width>{self.size[0]}</width>"
            f"<height>{self.size[1]}</height></size>"
            "<object><name>cat</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>30</xmax>"
            f"<ymax>30</ymax></bndbox></object>"
            f"<object><name>dog</name>{hard}<bndbox>{box}</bndbox></object></annotation>"
        )
        (root / "train" / "b.xml").write_text(
            "<annotation><filename>b.png</filename><size><width>32</width>"
            "<height>32</height></size></annotation>"
        )
        return VOCDetection(root, "train", class_names=["cat", "dog"])


def coco_dict() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [30, 5, 10, 10], "area": 100},
        ],
    }


@dataclass(frozen=True)
class Coco:
    """instances.json with the value at `path` (keys and list indices) set to `value`."""

    path: tuple
    value: object

    def load(self, root: Path) -> DetectionSource:
        write_png(root / "images" / "a.png", WIDTH, HEIGHT)
        write_png(root / "images" / "b.png", 32, 32)
        data = coco_dict()
        *parents, last = self.path
        target = data
        for key in parents:
            target = target[key]
        if self.value is DELETE:
            del target[last]
        else:
            target[last] = self.value
        (root / "instances.json").write_text(
            json.dumps(data)
        )  # writes NaN and Infinity as Python's json reads them
        return COCODetection(root, "instances.json", image_dir="images")


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------

GOOD = [10, 10, 30, 30]
OUTSIDE = "outside the image by more than"
DEGENERATE = "with zero or negative width or height"


@dataclass(frozen=True)
class Error:
    """DatasetError whose one line holds `where` (file and place) and `what`."""

    where: str
    what: str


@dataclass(frozen=True)
class Skip:
    """One summary warning with the reason and `example`; the good box survives alone."""

    reason: str
    example: str


@dataclass(frozen=True)
class Kept:
    """No warning; the boxes of a.png are `boxes` (the case's box clipped to the image)."""

    boxes: list = field(default_factory=list)


CASES = [
    # YOLO ------------------------------------------------------------------------------------
    (Yolo("0 abc 0.5 0.2 0.2"), Error("a.txt:2 value 1", "'abc', expected a number")),
    (Yolo("0 nan 0.5 0.2 0.2"), Error("a.txt:2 value 1", "expected a finite number")),
    (Yolo("0 0.5 0.5 inf 0.2"), Error("a.txt:2 value 3", "expected a finite number")),
    (Yolo("x 0.5 0.5 0.2 0.2"), Error("a.txt:2 class", "'x', expected a number")),
    (Yolo("1.5 0.5 0.5 0.2 0.2"), Error("a.txt:2 class", "1.5, expected a whole number >= 0")),
    (Yolo("-1 0.5 0.5 0.2 0.2"), Error("a.txt:2 class", "is -1, expected a whole number >= 0")),
    (Yolo("5 0.5 0.5 0.2 0.2"), Error("a.txt:2", "class index 5 is outside class_names")),
    (Yolo("0 0.5 0.5 0.2"), Error("a.txt:2", "expected 'class cx cy w h'")),
    (Yolo("0 0.1 0.1 0.2 0.2 0.3"), Error("a.txt:2", "expected 'class cx cy w h'")),
    (Yolo("0 0.5 0.5 0 0.2"), Skip(DEGENERATE, "a.txt:2")),
    (Yolo("0 0.5 0.5 -0.2 0.2"), Skip(DEGENERATE, "a.txt:2")),
    (Yolo("0 1.5 0.5 0.2 0.2"), Skip(OUTSIDE, "a.txt:2")),
    (Yolo("0 0.5 -0.2 0.2 0.2"), Skip(OUTSIDE, "a.txt:2")),
    (Yolo("0 32 24 10 10"), Skip(OUTSIDE, "a.txt:2")),  # pixels, not normalised
    (Yolo("0 0.999 0.5 0.004 0.2"), Skip("under 1 px inside the image", "a.txt:2")),
    # Half a pixel past the left edge: within tolerance, clipped.
    (Yolo(f"0 {1.5 / WIDTH} 0.5 {4 / WIDTH} 0.5"), Kept([GOOD, [0, 12, 3.5, 36]])),
    # VOC -------------------------------------------------------------------------------------
    (Voc(xmin="x"), Error("a.xml: object 2 (dog) xmin", "'x', expected a number")),
    (Voc(xmax="nan"), Error("a.xml: object 2 (dog) xmax", "expected a finite number")),
    (Voc(ymin="-inf"), Error("a.xml: object 2 (dog) ymin", "expected a finite number")),
    (Voc(ymax=None), Error("a.xml: object 2 (dog) ymax", "None, expected a number")),
    (Voc(size=("abc", "48")), Error("a.xml: size/width", "'abc', expected a number")),
    (Voc(size=("64", "-5")), Error("a.xml: size/height", "-5, expected a whole number >= 0")),
    (Voc(size=("64.5", "48")), Error("a.xml: size/width", "expected a whole number >= 0")),
    (Voc(difficult="2"), Error("a.xml: object 2 (dog) difficult", "'2', expected 0 or 1")),
    (Voc(difficult="yes"), Error("a.xml: object 2 (dog) difficult", "expected 0 or 1")),
    (Voc(xmin="40", xmax="30"), Skip(DEGENERATE, "a.xml: object 2 (dog)")),  # not sorted
    (Voc(ymin="15", ymax="15"), Skip(DEGENERATE, "a.xml: object 2 (dog)")),
    (Voc(xmin="50", ymin="40", xmax="90", ymax="70"), Skip(OUTSIDE, "a.xml: object 2 (dog)")),
    (Voc(xmin="-20"), Skip(OUTSIDE, "a.xml: object 2 (dog)")),
    (Voc(xmin="50", ymin="40", xmax="65", ymax="49"), Kept([GOOD, [50, 40, 64, 48]])),
    (Voc(size=("0", "0"), difficult=None), Kept([GOOD, [30, 5, 40, 15]])),  # size from image
    (Voc(difficult="True"), Kept([GOOD, [30, 5, 40, 15]])),
    # COCO ------------------------------------------------------------------------------------
    (
        Coco(("annotations", 1, "bbox", 0), "30"),
        Error("annotation id 11 (image 1) bbox[0]", "'30'"),
    ),
    (
        Coco(("annotations", 1, "bbox", 1), None),
        Error("annotation id 11 (image 1) bbox[1]", "None"),
    ),
    (
        Coco(("annotations", 1, "bbox", 2), True),
        Error("annotation id 11 (image 1) bbox[2]", "True"),
    ),
    (Coco(("annotations", 1, "bbox", 3), float("nan")), Error("annotation id 11", "finite")),
    (Coco(("annotations", 1, "bbox"), [30, 5, 10]), Error("annotation id 11", "[x, y, width")),
    (Coco(("annotations", 1, "area"), -1), Error("annotation id 11 (image 1) area", ">= 0")),
    (Coco(("annotations", 1, "area"), "100"), Error("annotation id 11 (image 1) area", "'100'")),
    (
        Coco(("annotations", 1, "iscrowd"), 2),
        Error("id 11 (image 1) iscrowd", "2, expected 0 or 1"),
    ),
    (
        Coco(("annotations", 1, "iscrowd"), None),
        Error("annotation id 11 (image 1) iscrowd", "None, expected 0 or 1"),
    ),
    (Coco(("annotations", 1, "category_id"), 2.0), Error("id 11 category_id", "an integer id")),
    (Coco(("annotations", 1, "image_id"), 9), Error("annotation id 11", "refers to image 9")),
    (Coco(("annotations", 1, "id"), 10), Error("annotation id 10", "appears twice")),
    (
        Coco(("annotations", 1, "id"), "11"),
        Error("annotation #2 id", "'11', expected an integer id"),
    ),
    (Coco(("images", 1, "id"), 1), Error("image id 1", "appears twice")),
    (Coco(("images", 1, "id"), True), Error("image #2 id", "True, expected an integer")),
    (Coco(("categories", 1, "id"), "2"), Error("category #2 id", "'2', expected an integer id")),
    (
        Coco(("images", 1, "width"), 0),
        Error("image id 2 width", "is 0, expected a whole number >= 1"),
    ),
    (Coco(("images", 1, "height"), -32), Error("image id 2 height", "a whole number >= 1")),
    (Coco(("images", 1, "width"), "32"), Error("image id 2 width", "'32', expected a number")),
    (Coco(("images", 1, "height"), float("inf")), Error("image id 2 height", "finite")),
    (Coco(("annotations", 1, "bbox"), [30, 5, 0, 10]), Skip(DEGENERATE, "annotation id 11")),
    (Coco(("annotations", 1, "bbox"), [30, 5, 10, -3]), Skip(DEGENERATE, "annotation id 11")),
    (Coco(("annotations", 1, "bbox"), [100, 5, 10, 10]), Skip(OUTSIDE, "annotation id 11")),
    (Coco(("annotations", 1, "bbox"), [63.5, 5, 10, 10]), Skip(OUTSIDE, "annotation id 11")),
    (Coco(("annotations", 1, "bbox"), [63.5, 5, 1, 10]), Skip("under 1 px", "annotation id 11")),
    (Coco(("annotations", 1, "bbox"), [60, 40, 5, 9]), Kept([GOOD, [60, 40, 64, 48]])),
    (Coco(("images", 0, "width"), DELETE), Kept([GOOD, [30, 5, 40, 15]])),  # header size
    (Coco(("annotations", 1, "id"), DELETE), Kept([GOOD, [30, 5, 40, 15]])),  # id assigned
]


def case_id(number: int, case: tuple) -> str:
    dataset, verdict = case
    return f"{number:02d}-{type(dataset).__name__.lower()}-{type(verdict).__name__.lower()}"


def boxes_of_a(source: DetectionSource) -> list[list[float]]:
    index = next(i for i in range(len(source)) if "a.png" in source.image_info(i).file_name)
    return source.load_annotation(index).boxes.tolist()


@pytest.mark.parametrize(
    ("dataset", "verdict"), CASES, ids=[case_id(n, c) for n, c in enumerate(CASES)]
)
def test_malformed_annotation(
    dataset: Yolo | Voc | Coco,
    verdict: Error | Skip | Kept,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if isinstance(verdict, Error):
        with pytest.raises(DatasetError) as err:
            dataset.load(tmp_path)
        message = str(err.value)
        assert "\n" not in message, message
        assert verdict.where in message and verdict.what in message, message
        return
    with caplog.at_level(logging.WARNING):
        source = dataset.load(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if isinstance(verdict, Skip):
        assert len(warnings) == 1, warnings
        assert "skipped 1 of 2 boxes: 1 " + verdict.reason in warnings[0], warnings
        assert verdict.example in warnings[0], warnings
        assert boxes_of_a(source) == [GOOD]
    else:
        assert warnings == []
        np.testing.assert_allclose(boxes_of_a(source), verdict.boxes, atol=1e-4)


def test_enough_cases_per_format() -> None:
    for kind in (Yolo, Voc, Coco):
        assert sum(isinstance(dataset, kind) for dataset, _ in CASES) >= 10


def test_coco_size_comes_from_the_image_when_absent(tmp_path: Path) -> None:
    source = Coco(("images", 0, "width"), DELETE).load(tmp_path)
    assert (source.image_info(0).width, source.image_info(0).height) == (WIDTH, HEIGHT)


def test_one_summary_for_many_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Skips across images and reasons give one warning with a count and example per reason."""
    write_png(tmp_path / "images" / "a.png", WIDTH, HEIGHT)
    write_png(tmp_path / "images" / "b.png", 32, 32)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0 0.1\n0 0.5 0.5 0.2 0.2\n0 3 0.5 0.1 0.1\n")
    (labels / "b.txt").write_text("1 0.5 0.5 0.1 -0.1\n")
    with caplog.at_level(logging.WARNING):
        source = YOLODetection(tmp_path, class_names=["cat", "dog"])
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skipped 3 of 4 boxes: 2 with zero or negative width or height" in warning
    assert f"(e.g. {labels / 'a.txt'}:1); 1 outside the image" in warning
    assert f"(e.g. {labels / 'a.txt'}:3)" in warning
    assert len(source.load_annotation(0).boxes) == 1 and len(source.load_annotation(1).boxes) == 0
