"""SyntheticShapes: determinism, boxes that fit the drawn shapes, the partial-label view,
and the COCO export (pycocotools-valid, and loadable back through COCODetection)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centerx.data import synthetic
from centerx.data.base import DatasetError, read_image
from centerx.data.coco import COCODetection
from centerx.data.synthetic import SHAPES, SyntheticShapes


def test_same_seed_and_index_give_identical_samples() -> None:
    a = SyntheticShapes(num_images=5, seed=7)
    b = SyntheticShapes(num_images=50, seed=7)  # the dataset size does not change a sample
    for index in (0, 4, 2):  # any access order
        image_a, ann_a = a.load(index)
        image_b, ann_b = b.load(index)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(ann_a.boxes, ann_b.boxes)
        np.testing.assert_array_equal(ann_a.labels, ann_b.labels)
        np.testing.assert_array_equal(a.load_image(index), image_a)  # repeatable
    assert a.image_info(3) == b.image_info(3)


def test_different_seeds_and_indices_differ() -> None:
    a, b = SyntheticShapes(num_images=3, seed=0), SyntheticShapes(num_images=3, seed=1)
    for index in range(3):
        image_a, image_b = a.load_image(index), b.load_image(index)
        assert image_a.shape != image_b.shape or not np.array_equal(image_a, image_b)
    first, second = a.load(0), a.load(1)
    assert first[0].shape != second[0].shape or not np.array_equal(first[0], second[0])


@pytest.mark.parametrize("seed", [0, 5])
def test_boxes_inside_image_and_info_consistent(seed: int) -> None:
    source = SyntheticShapes(num_images=12, seed=seed, image_size=96, max_objects=6)
    for index in range(len(source)):
        image, ann = source.load(index)
        info = source.image_info(index)
        height, width = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert (info.width, info.height) == (width, height) and info.image_id == index + 1
        assert 1 <= len(ann.boxes) <= 6 and ann.boxes.dtype == np.float32
        assert ann.labels.dtype == np.int64 and set(ann.labels.tolist()) <= {0, 1, 2}
        assert np.all(ann.boxes[:, :2] >= 0)
        assert np.all(ann.boxes[:, 2] <= width) and np.all(ann.boxes[:, 3] <= height)
        sizes = ann.boxes[:, 2:] - ann.boxes[:, :2]
        assert np.all(sizes >= 4)  # objects are real, not slivers


@pytest.fixture
def black_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes drawn on pure black, so every non-black pixel belongs to a shape."""
    monkeypatch.setattr(
        synthetic, "_background", lambda rng, height, width: np.zeros((height, width, 3), np.uint8)
    )


@pytest.mark.usefixtures("black_background")
@pytest.mark.parametrize("shape", SHAPES)
def test_box_is_tight_around_the_drawn_shape(shape: str) -> None:
    source = SyntheticShapes(num_images=6, seed=2, class_names=[shape], max_objects=1)
    for index in range(len(source)):
        image, ann = source.load(index)
        assert len(ann.boxes) == 1
        intensity = image.max(2).astype(np.float64)
        if intensity.max() < 30:  # a (rare) near-black fill: nothing to measure
            continue
        # Pixels at least half as bright as the fill (cv2's anti-aliasing bleeds faint
        # pixels up to ~2.5 px out of sharp star tips; those do not count).
        ys, xs = np.nonzero(intensity >= intensity.max() / 2)
        x0, y0, x1, y1 = ann.boxes[0]
        # Pixel-centre coordinates: the drawn extent matches the box on all four sides.
        np.testing.assert_allclose([xs.min(), ys.min()], [x0, y0], atol=1.25)
        np.testing.assert_allclose([xs.max(), ys.max()], [x1, y1], atol=1.25)


@pytest.mark.usefixtures("black_background")
def test_every_drawn_pixel_is_inside_some_box() -> None:
    source = SyntheticShapes(num_images=8, seed=4, max_objects=6)
    for index in range(len(source)):
        image, ann = source.load(index)
        drawn = image.max(2) > 0
        covered = np.zeros_like(drawn)
        margin = 3  # faint anti-aliasing bleed, see above
        for x0, y0, x1, y1 in ann.boxes:
            covered[
                max(0, int(np.floor(y0)) - margin) : int(np.ceil(y1)) + margin + 1,
                max(0, int(np.floor(x0)) - margin) : int(np.ceil(x1)) + margin + 1,
            ] = True
        assert drawn.any()
        assert not (drawn & ~covered).any()


def test_box_centres_show_the_shape_not_the_background() -> None:
    """On the real cluttered background: shapes are filled flat, the background is noisy
    (sigma >= 4), so the 3x3 patch at a box centre is (near-)uniform, unlike background
    patches outside every box."""

    def spread(patch: np.ndarray) -> int:
        return int(np.ptp(patch.astype(int), axis=(0, 1)).max())  # per channel

    source = SyntheticShapes(num_images=10, seed=9, max_objects=3)
    centre_spread, background_spread = [], []
    rng = np.random.default_rng(0)
    for index in range(len(source)):
        image, ann = source.load(index)
        height, width = image.shape[:2]
        inside = np.zeros((height, width), bool)
        for x0, y0, x1, y1 in ann.boxes:
            inside[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
        for x0, y0, x1, y1 in ann.boxes:
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            centre_spread.append(spread(image[cy - 1 : cy + 2, cx - 1 : cx + 2]))
        ys, xs = np.nonzero(~inside[1:-1, 1:-1])
        for k in rng.choice(len(xs), 20):
            y, x = ys[k] + 1, xs[k] + 1
            background_spread.append(spread(image[y - 1 : y + 2, x - 1 : x + 2]))
    # Shapes are filled flat; the background is noisy.
    assert np.mean(np.array(centre_spread) <= 2) >= 0.9
    assert np.median(background_spread) > 2


# ------------------------------------------------------------------------ partial labels


def test_partial_label_view() -> None:
    names = ["circle", "square", "triangle"]
    full = SyntheticShapes(num_images=8, seed=3, class_names=names)
    partial = SyntheticShapes(
        num_images=8, seed=3, class_names=names, labeled_class_names=["square", "circle"]
    )
    assert partial.class_names == names  # same classes, same indices
    seen_hidden = 0
    for index in range(len(full)):
        image_full, ann_full = full.load(index)
        image_partial, ann_partial = partial.load(index)
        np.testing.assert_array_equal(image_full, image_partial)
        keep = ann_full.labels != 2
        np.testing.assert_array_equal(ann_partial.boxes, ann_full.boxes[keep])
        np.testing.assert_array_equal(ann_partial.labels, ann_full.labels[keep])
        np.testing.assert_array_equal(partial.load_annotation(index).boxes, ann_full.boxes[keep])
        np.testing.assert_array_equal(partial.labeled_classes(index), [True, True, False])
        np.testing.assert_array_equal(full.labeled_classes(index), [True, True, True])
        seen_hidden += int((~keep).sum())
    assert seen_hidden > 0, "the test needs some hidden triangles"
    # to_coco of the partial view has no triangle annotations.
    coco = partial.to_coco()
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"class_names": ["circle", "hexagon"]},
        {"labeled_class_names": ["star"]},  # not among the default class_names
        {"num_images": 0},
    ],
)
def test_bad_arguments_raise_dataset_error(kwargs: dict) -> None:
    with pytest.raises(DatasetError) as info:
        SyntheticShapes(**kwargs)
    bad = next(iter(kwargs.values()))
    named = bad[-1] if isinstance(bad, list) else str(bad)
    assert named in str(info.value)


def test_index_out_of_range() -> None:
    source = SyntheticShapes(num_images=2)
    with pytest.raises(IndexError):
        source.load(2)


# ------------------------------------------------------------------------ COCO export


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_to_coco_is_valid_for_pycocotools() -> None:
    source = SyntheticShapes(num_images=6, seed=1, class_names=["circle", "star"])
    data = source.to_coco()
    assert [c["name"] for c in data["categories"]] == ["circle", "star"]
    assert len(data["images"]) == 6
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    gt = COCO()
    gt.dataset = data
    _quiet(gt.createIndex)
    for index in range(len(source)):
        info, ann = source.image_info(index), source.load_annotation(index)
        records = gt.loadAnns(gt.getAnnIds(imgIds=[info.image_id]))
        xywh = np.array([r["bbox"] for r in records]).reshape(-1, 4)
        np.testing.assert_allclose(xywh[:, :2], ann.boxes[:, :2], atol=1e-4)
        np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], ann.boxes[:, 2:], atol=1e-4)
    # The ground truth fed back as detections scores a perfect AP.
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in data["annotations"]
    ]
    evaluator = COCOeval(gt, _quiet(gt.loadRes, detections), "bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_write_coco_round_trips_through_coco_detection(tmp_path: Path) -> None:
    source = SyntheticShapes(num_images=5, seed=2, image_size=64, class_names=["square", "cross"])
    json_path = source.write_coco(tmp_path / "export")
    assert json_path == tmp_path / "export" / "annotations.json"
    assert json.loads(json_path.read_text())["categories"][1]["name"] == "cross"
    loaded = COCODetection(tmp_path / "export", "annotations.json", image_dir="images")
    assert loaded.class_names == ["square", "cross"]
    assert len(loaded) == len(source)
    for index in range(len(source)):
        info = source.image_info(index)
        assert loaded.image_info(index) == info
        png = read_image(tmp_path / "export" / "images" / info.file_name)
        np.testing.assert_array_equal(png, source.load_image(index))  # PNG: lossless, RGB
        np.testing.assert_array_equal(loaded.load_image(index), png)
        expected = source.load_annotation(index)
        got = loaded.load_annotation(index)
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-4)
        np.testing.assert_array_equal(got.labels, expected.labels)
