"""Dataset loaders: hand-made quirky fixtures (always run) and the real sets in ../shared/datasets."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centerx.data.base import DatasetError, DetectionSource, ImageReadError, read_image
from centerx.data.coco import COCODetection
from centerx.data.files import image_size
from centerx.data.voc import VOCDetection
from centerx.data.yolo import YOLODetection

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


# ---------------------------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------------------------


def write_image(path: Path, width: int, height: int, fmt: str = ".jpg") -> None:
    """An image of the given size encoded as `fmt`, whatever the file name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    path.write_bytes(cv2.imencode(fmt, pixels)[1].tobytes())


def write_xml(path: Path, filename: str, size: tuple[int, int], objects: list[tuple]) -> None:
    """objects: (name, x0, y0, x1, y1[, difficult])."""
    body = []
    for name, x0, y0, x1, y1, *rest in objects:
        body.append(
            f"<object><name>{name}</name><difficult>{rest[0] if rest else 0}</difficult>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
            "</bndbox></object>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{''.join(body)}</annotation>"
    )


@pytest.fixture
def flat_voc(tmp_path: Path) -> Path:
    """A LabelImg-style train/ folder with the quirks of the real fruits set."""
    d = tmp_path / "train"
    write_image(d / "a.jpg", 64, 48)
    write_xml(
        d / "a.xml",
        "a.jpg",
        (64, 48),
        # 1 px past the edge (VOC is 1-based): clipped; zero width: skipped and counted.
        [("apple", 10, 10, 30, 30), ("pear", 50, 40, 65, 49), ("apple", 20, 5, 20, 25)],
    )
    write_image(d / "b.jpg", 40, 30, fmt=".png")  # PNG data behind a .jpg name
    write_xml(d / "b.xml", "b.jpg", (0, 0), [("pear", 5, 5, 35, 25)])  # size 0 in the XML
    write_image(d / "c.jpg", 32, 32)
    write_xml(d / "c.xml", "c.jpg", (32, 32), [])  # no objects
    return tmp_path


def ann(ann_id: int | None, image_id: int, category_id: int, bbox: list, **extra) -> dict:
    a = {"image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}
    return a | ({"id": ann_id} if ann_id else {}) | {"area": bbox[2] * bbox[3]} | extra


def coco_dict() -> dict:
    """Non-contiguous category ids listed out of order, original image ids, a crowd region."""
    return {
        "images": [
            {"id": 42, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 7, "file_name": "b.jpg", "width": 40, "height": 30},
            {"id": 9, "file_name": "c.jpg", "width": 32, "height": 32},  # no annotations
        ],
        "categories": [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            ann(1, 42, 3, [10, 5, 20, 15], area=250),  # a mask area, smaller than w*h
            ann(2, 42, 17, [30, 20, 30, 20]),
            ann(3, 7, 17, [0, 0, 40, 30], iscrowd=1),
            ann(None, 7, 3, [5, 5, 10, 10]),  # hand-written files may omit the id
        ],
    }


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_mini.json").write_text(json.dumps(coco_dict()))
    write_image(tmp_path / "mini" / "a.jpg", 64, 48)
    write_image(tmp_path / "mini" / "b.jpg", 40, 30)
    write_image(tmp_path / "mini" / "c.jpg", 32, 32)
    return tmp_path


def coco_index(d: dict) -> COCO:
    c = COCO()
    c.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def self_ap(gt: COCO, source: DetectionSource) -> float:
    """COCO AP of the source's own boxes fed back as score-1 detections against `gt`."""
    dets = []
    for i in range(len(source)):
        info, ann = source.image_info(i), source.load_annotation(i)
        for (x0, y0, x1, y1), label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True):
            dets.append(
                {
                    "image_id": info.image_id,
                    "category_id": source.category_ids[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": 1.0,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


# ---------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------


def test_voc_flat_folder_quirks(flat_voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection(str(flat_voc), split="train")
    assert len(ds) == 3
    assert ds.class_names == ["apple", "pear"] and ds.category_ids == [1, 2]
    assert [ds.image_info(i).image_id for i in range(3)] == [1, 2, 3]
    a, b, c = (ds.load_annotation(i) for i in range(3))
    # The box just past the edge is clipped; the degenerate (x1 == x0) one is skipped, once.
    np.testing.assert_allclose(a.boxes, [[10, 10, 30, 30], [50, 40, 64, 48]])
    assert a.labels.tolist() == [0, 1]
    skips = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skips) == 1 and "skipped 1 of 4 boxes: 1 with zero or negative" in skips[0]
    assert "a.xml: object 3 (apple)" in skips[0]
    # Size 0 in the XML: taken from the (PNG-behind-.jpg) image.
    info = ds.image_info(1)
    assert (info.width, info.height) == (40, 30)
    assert ds.load_image(1).shape == (30, 40, 3)
    assert b.labels.tolist() == [1]
    # The image without objects is kept.
    assert c.boxes.shape == (0, 4) and c.labels.shape == (0,)
    assert ds.load_image(2).shape == (32, 32, 3)


def test_voc_annotations_are_cached_copies(flat_voc: Path) -> None:
    ds = VOCDetection(flat_voc, split="train")
    ds.load_annotation(0).boxes[:] = -1
    assert ds.load_annotation(0).boxes.min() >= 0


def test_voc_unknown_class(flat_voc: Path) -> None:
    with pytest.raises(DatasetError, match=r"'pear'.*a\.xml.*\['apple'\]"):
        VOCDetection(flat_voc, split="train", class_names=["apple"])
    ds = VOCDetection(flat_voc, split="train", class_names=["apple"], ignore_unknown_classes=True)
    assert ds.class_names == ["apple"]
    assert ds.load_annotation(0).labels.tolist() == [0]
    assert len(ds.load_annotation(1).boxes) == 0


def test_voc_malformed_xml_names_file(flat_voc: Path) -> None:
    (flat_voc / "train" / "broken.xml").write_text("<annotation><object><name>apple</name>")
    with pytest.raises(DatasetError, match=r"broken\.xml"):
        VOCDetection(flat_voc, split="train")


def test_voc_bad_coordinate_names_file(flat_voc: Path) -> None:
    write_xml(flat_voc / "train" / "d.xml", "d.jpg", (10, 10), [("apple", "x", 1, 5, 5)])
    with pytest.raises(DatasetError, match=r"d\.xml.*xmin"):
        VOCDetection(flat_voc, split="train")


def test_voc_wrong_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        VOCDetection(tmp_path / "nowhere")
    (tmp_path / "photos").mkdir()
    with pytest.raises(DatasetError, match=r"Annotations.*contains: photos/"):
        VOCDetection(tmp_path)


def test_voc_corrupt_and_missing_images(flat_voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    (flat_voc / "train" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (flat_voc / "train" / "c.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection(flat_voc, split="train")  # construction survives
    assert any("2 of 3 images are missing" in r.message for r in caplog.records)
    assert ds.image_info(0).width == 64  # falls back to the XML size
    with pytest.raises(ImageReadError, match=r"a\.jpg"):
        ds.load_image(0)
    with pytest.raises(ImageReadError, match=r"c\.jpg"):
        ds.load_image(2)
    assert ds.load_image(1).shape == (30, 40, 3)


def make_standard_voc(root: Path, split_dir: str) -> None:
    for stem, objects in (
        ("000001", [("dog", 1, 1, 20, 20)]),
        ("000002", [("cat", 2, 2, 9, 9, 1)]),
    ):
        write_image(root / "JPEGImages" / f"{stem}.jpg", 24, 24)
        # The real mask set writes a bogus <filename>; the XML stem finds the image.
        write_xml(root / "Annotations" / f"{stem}.xml", f"{stem}.txt", (24, 24), objects)
    (root / split_dir).mkdir(parents=True)
    (root / split_dir / "train.txt").write_text("000001\n")
    (root / split_dir / "val.txt").write_text("000002\n\n")


@pytest.mark.parametrize("split_dir", ["ImageSets/Main", "ImageSets"])
def test_voc_standard_layout(tmp_path: Path, split_dir: str) -> None:
    make_standard_voc(tmp_path, split_dir)
    assert len(VOCDetection(tmp_path)) == 2
    train = VOCDetection(tmp_path, split="train")
    assert len(train) == 1 and train.class_names == ["dog"]
    assert train.image_info(0).file_name == "JPEGImages/000001.jpg"
    assert train.load_image(0).shape == (24, 24, 3)
    with pytest.raises(DatasetError, match=r"'test'.*available splits: \['train', 'val'\]"):
        VOCDetection(tmp_path, split="test")


def test_voc_skip_difficult_keeps_ignore_region(tmp_path: Path) -> None:
    make_standard_voc(tmp_path, "ImageSets/Main")
    kept = VOCDetection(tmp_path, split="val").load_annotation(0)
    assert len(kept.boxes) == 1 and len(kept.crowd_boxes) == 0
    skipped = VOCDetection(tmp_path, split="val", skip_difficult=True).load_annotation(0)
    assert len(skipped.boxes) == 0 and len(skipped.crowd_boxes) == 1


def test_image_size_follows_exif_rotation(tmp_path: Path) -> None:
    # cv2 rotates by EXIF orientation when decoding; the header size must agree with it.
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "r.jpg") == (20, 40)
    assert read_image(tmp_path / "r.jpg").shape[:2] == (40, 20)
    assert image_size(tmp_path / "missing.jpg") is None


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def test_coco_ids_crowd_and_round_trip(coco_root: Path) -> None:
    ds = COCODetection(str(coco_root), "annotations/instances_mini.json")
    assert ds.image_dir == coco_root / "mini"  # derived from the file name
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [3, 17]
    assert [ds.image_info(i).image_id for i in range(3)] == [42, 7, 9]
    a, b, c = (ds.load_annotation(i) for i in range(3))
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 20], [30, 20, 60, 40]])  # xywh -> xyxy
    assert a.labels.tolist() == [0, 1]
    np.testing.assert_allclose(b.crowd_boxes, [[0, 0, 40, 30]])
    assert b.crowd_labels.tolist() == [1] and b.labels.tolist() == [0]
    assert len(c.boxes) == 0
    assert ds.load_image(0).shape == (48, 64, 3)

    exported = ds.to_coco()
    assert exported["annotations"][0]["area"] == 250  # COCO's own (mask) area, not w*h
    assert len({a["id"] for a in exported["annotations"]}) == 4  # the id-less one got an id
    gt = coco_index(exported)
    assert sorted(gt.getCatIds()) == [3, 17]
    assert {a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[7], iscrowd=True))} == {17}
    assert self_ap(gt, ds) == pytest.approx(1.0)
    assert self_ap(ds.coco, ds) == pytest.approx(1.0)  # against the original JSON's index


def test_coco_class_subset(coco_root: Path) -> None:
    ds = COCODetection(coco_root, "annotations/instances_mini.json", class_names=["dog"])
    assert ds.category_ids == [17]
    assert ds.load_annotation(0).labels.tolist() == [0]
    assert len(ds.load_annotation(1).boxes) == 0
    with pytest.raises(DatasetError, match=r"\['bird'\].*available: \['cat', 'dog'\]"):
        COCODetection(coco_root, "annotations/instances_mini.json", class_names=["bird"])


def test_coco_bad_files(coco_root: Path) -> None:
    bad = coco_root / "annotations" / "instances_bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances_bad\.json"):
        COCODetection(coco_root, "annotations/instances_bad.json", image_dir="mini")
    with pytest.raises(DatasetError, match=r"not found.*annotations/instances_mini\.json"):
        COCODetection(coco_root, "instances_nope.json")
    d = coco_dict()
    d["annotations"][0]["category_id"] = 99
    bad.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="category 99"):
        COCODetection(coco_root, bad)


# ---------------------------------------------------------------------------------------------
# YOLO
# ---------------------------------------------------------------------------------------------


def test_yolo(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "train" / "a.jpg", 100, 50)
    write_image(tmp_path / "images" / "train" / "b.jpg", 20, 20, fmt=".png")  # no label file
    (tmp_path / "labels" / "train").mkdir(parents=True)
    # The second box ends half a pixel past the right edge: within tolerance, clipped.
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.955 0.5 0.1 0.2\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ds = YOLODetection(tmp_path, split="train")
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2
    ann = ds.load_annotation(0)
    np.testing.assert_allclose(ann.boxes, [[40, 15, 60, 35], [90.5, 20, 100, 30]], atol=1e-4)
    assert ann.labels.tolist() == [1, 0]
    assert len(ds.load_annotation(1).boxes) == 0 and ds.load_image(1).shape == (20, 20, 3)
    (tmp_path / "labels" / "train" / "a.txt").write_text("5 0.5 0.5 0.2 0.4\n")
    with pytest.raises(DatasetError, match=r"a\.txt.*class index 5"):
        YOLODetection(tmp_path, split="train")
    assert (
        len(YOLODetection(tmp_path, "train", ignore_unknown_classes=True).load_annotation(0).boxes)
        == 0
    )
    with pytest.raises(DatasetError, match="images"):
        YOLODetection(tmp_path, split="val")


# ---------------------------------------------------------------------------------------------
# Real data (../shared/datasets)
# ---------------------------------------------------------------------------------------------


def real(sub: str) -> Path:
    path = DATASETS / sub
    if not path.exists():
        pytest.skip(
            f"real dataset {path} not found (it lives in ../shared/datasets, beside the repo)"
        )
    return path


def assert_boxes_inside(ds: DetectionSource) -> None:
    for i in range(len(ds)):
        info, ann = ds.image_info(i), ds.load_annotation(i)
        assert info.width > 0 and info.height > 0, info
        for boxes in (ann.boxes, ann.crowd_boxes):
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= info.width).all(), info
            assert (boxes[:, 3] <= info.height).all(), info
            assert (boxes[:, 2:] > boxes[:, :2]).all(), info


@pytest.mark.realdata
@pytest.mark.parametrize(("split", "count"), [("train", 240), ("test", 60)])
def test_real_fruits(split: str, count: int) -> None:
    start = time.perf_counter()
    ds = VOCDetection(real("fruits"), split=split)
    assert time.perf_counter() - start < 2.0
    assert len(ds) == count
    assert ds.class_names == ["apple", "banana", "orange"]
    assert_boxes_inside(ds)
    pngs = [i for i in range(len(ds)) if ds.image_path(i).read_bytes()[:4] == b"\x89PNG"]
    assert pngs, "the fruits set has PNG data behind .jpg names"
    for i in pngs:
        info = ds.image_info(i)
        assert ds.load_image(i).shape == (info.height, info.width, 3)


@pytest.mark.realdata
def test_real_mask_voc2007() -> None:
    root = real("mask/VOC2007")
    splits = {s: VOCDetection(root, split=s) for s in ("train", "val", "test")}
    assert sum(len(ds) for ds in splits.values()) == len(VOCDetection(root)) == 149
    val = splits["val"]
    assert val.class_names == ["mask", "no-mask"]
    assert_boxes_inside(val)
    crowded = next(i for i in range(len(val)) if val.image_path(i).stem == "000039")
    # 113 boxes in the XML, one of them zero-sized (179,205,179,205) and dropped.
    assert len(val.load_annotation(crowded).boxes) == 112
    info = val.image_info(crowded)
    assert val.load_image(crowded).shape == (info.height, info.width, 3)


@pytest.mark.realdata
@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_real_coco_tiny(split: str) -> None:
    root = real("coco_tiny")
    ann_file = root / "annotations" / f"instances_{split}.json"
    ds = COCODetection(root, f"annotations/instances_{split}.json")
    data = json.loads(ann_file.read_text())
    assert ds.category_ids == sorted(c["id"] for c in data["categories"])
    assert len(ds.category_ids) == 80 and ds.category_ids[-1] == 90  # non-contiguous
    assert [ds.image_info(i).image_id for i in range(len(ds))] == [i["id"] for i in data["images"]]
    crowd = sum(len(ds.load_annotation(i).crowd_boxes) for i in range(len(ds)))
    assert crowd == sum(a["iscrowd"] for a in data["annotations"]) > 0
    assert_boxes_inside(ds)
    assert ds.load_image(0).shape == (ds.image_info(0).height, ds.image_info(0).width, 3)
    assert self_ap(coco_index(ds.to_coco()), ds) == pytest.approx(1.0)
    assert self_ap(coco_index(data), ds) > 0.999  # ids and boxes match the original JSON
