"""Augmentation geometry: boxes map back exactly, the warped image moves content where the
matrix says (flip included), letterbox, colour jitter, and a full TrainingDataset sample."""

from __future__ import annotations

import numpy as np
import pytest

from centerx.data.pipeline import STRIDE, TrainingDataset
from centerx.data.synthetic import SyntheticShapes
from centerx.data.transforms import (
    AugmentConfig,
    affine_matrix,
    clip_boxes,
    color_jitter,
    invert_affine,
    letterbox_matrix,
    mosaic,
    random_affine,
    transform_boxes,
    warp_image,
)


def apply(matrix: np.ndarray, x: float, y: float) -> np.ndarray:
    return matrix[:, :2] @ np.array([x, y]) + matrix[:, 2]


# ------------------------------------------------------------------------ matrices and boxes


@pytest.mark.parametrize("flip", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_random_affine_boxes_round_trip(seed: int, flip: float) -> None:
    rng = np.random.default_rng(seed)
    config = AugmentConfig(scale=(0.5, 1.5), shift=0.3, flip=flip)
    for _ in range(20):
        width, height = (int(v) for v in rng.integers(40, 400, 2))
        xy0 = rng.uniform(0, [width, height], (5, 2))
        xy1 = xy0 + rng.uniform(1, 80, (5, 2))  # may leave the image: nothing is clipped
        boxes = np.concatenate([xy0, xy1], 1)
        matrix = random_affine(rng, width, height, 256, config)
        mapped = transform_boxes(boxes, matrix)
        assert np.all(mapped[:, 2:] > mapped[:, :2])  # corners re-ordered under flip
        back = transform_boxes(mapped, invert_affine(matrix))
        np.testing.assert_allclose(back, boxes, atol=1e-3, rtol=0)


def test_random_affine_ranges_and_flip_probability() -> None:
    rng = np.random.default_rng(0)
    config = AugmentConfig(scale=(0.6, 1.4), shift=0.2, flip=0.5)
    width, height, out = 200, 100, 128
    flips = 0
    for _ in range(400):
        m = random_affine(rng, width, height, out, config)
        scale = abs(m[0, 0])
        assert m[1, 1] == pytest.approx(scale) and m[0, 1] == 0 and m[1, 0] == 0
        crop_side = out / scale
        assert 0.6 * 200 - 1e-9 <= crop_side <= 1.4 * 200 + 1e-9
        # The crop centre (what lands on the output centre) is within the shift range.
        cx, cy = apply(invert_affine(m), out / 2, out / 2)
        assert abs(cx - width / 2) <= 0.2 * width + 1e-9
        assert abs(cy - height / 2) <= 0.2 * height + 1e-9
        flips += m[0, 0] < 0
    assert 150 < flips < 250
    never = AugmentConfig(flip=0.0)
    always = AugmentConfig(flip=1.0)
    assert all(random_affine(rng, 50, 60, 64, never)[0, 0] > 0 for _ in range(50))
    assert all(random_affine(rng, 50, 60, 64, always)[0, 0] < 0 for _ in range(50))


def test_transform_boxes_flip_by_hand() -> None:
    # Crop side 100 around (50, 50) onto 200 px, mirrored: x -> -2x + 200, y -> 2y.
    matrix = affine_matrix((50.0, 50.0), 100.0, 200, flip=True)
    np.testing.assert_allclose(matrix, [[-2.0, 0.0, 200.0], [0.0, 2.0, 0.0]])
    mapped = transform_boxes(np.array([[10.0, 20.0, 30.0, 60.0]]), matrix)
    np.testing.assert_allclose(mapped, [[140.0, 40.0, 180.0, 120.0]])


@pytest.mark.parametrize(
    "width,height,expected",
    [(200, 100, [0.0, 32.0, 128.0, 96.0]), (90, 180, [32.0, 0.0, 96.0, 128.0])],
)
def test_letterbox_fits_longer_side_and_centres(width, height, expected) -> None:
    matrix = letterbox_matrix(width, height, 128)
    whole = transform_boxes(np.array([[0.0, 0.0, width, height]]), matrix)
    np.testing.assert_allclose(whole[0], expected, atol=1e-5)
    np.testing.assert_allclose(apply(matrix, width / 2, height / 2), [64.0, 64.0])
    assert matrix[0, 0] == pytest.approx(128 / max(width, height)) and matrix[0, 0] > 0
    # The warped image: content in the middle, padding (114) in the bars.
    image = np.full((height, width, 3), 7, np.uint8)
    warped = warp_image(image, matrix, 128)
    assert warped.shape == (128, 128, 3) and warped.dtype == np.uint8
    x0, y0, x1, y1 = (int(v) for v in expected)
    assert np.all(warped[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] == 7)
    bars = np.ones((128, 128), bool)
    bars[y0:y1, x0:x1] = False
    assert bars.any() and np.all(warped[bars] == 114)


def test_clip_boxes_drops_boxes_that_left() -> None:
    boxes = np.array([[-10.0, 5, 20, 30], [120, 120, 140, 150], [127.5, 0, 140, 10], [3, 4, 5, 6]])
    kept, labels = clip_boxes(boxes, np.array([0, 1, 2, 3]), 128)
    np.testing.assert_allclose(kept, [[0, 5, 20, 30], [120, 120, 128, 128], [3, 4, 5, 6]])
    assert labels.tolist() == [0, 1, 3]


# ------------------------------------------------------------------------ the warped image


def _block_image(
    height: int = 120, width: int = 160
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Black image with a bright rectangle covering pixel rows 40..49 and columns 30..44."""
    image = np.zeros((height, width, 3), np.uint8)
    rows, cols = (40, 50), (30, 45)
    image[rows[0] : rows[1], cols[0] : cols[1]] = 255
    return image, (*cols, *rows)


@pytest.mark.parametrize(
    "center,crop_side,flip",
    [
        ((80.0, 60.0), 160.0, False),  # letterbox-like, downscale
        ((80.0, 60.0), 160.0, True),  # mirrored
        ((50.0, 50.0), 64.0, False),  # zoom in, shifted
        ((45.0, 40.0), 90.0, True),  # zoom in + mirror
        ((100.0, 70.0), 250.0, True),  # zoom out, off-centre
    ],
)
def test_warp_moves_content_where_the_matrix_says(center, crop_side, flip) -> None:
    image, (c0, c1, r0, r1) = _block_image()
    out = 128
    matrix = affine_matrix(center, crop_side, out, flip=flip)
    # cv2 convention: pixel (i, j) has its centre at coordinate (j, i).
    block_centre = ((c0 + c1 - 1) / 2, (r0 + r1 - 1) / 2)
    predicted = apply(matrix, *block_centre)
    # Warping is linear in the image: subtracting the warp of the blank image removes the
    # border fill and leaves exactly the warped block.
    warped = warp_image(image, matrix, out).astype(np.float64)
    blank = warp_image(np.zeros_like(image), matrix, out).astype(np.float64)
    block = (warped - blank)[..., 0]
    assert block.sum() > 0, "the block must land inside the output"
    ys, xs = np.mgrid[0:out, 0:out]
    centroid = np.array([(block * xs).sum(), (block * ys).sum()]) / block.sum()
    np.testing.assert_allclose(centroid, predicted, atol=0.6)
    # Every bright pixel lies in the transformed box (pixel-centre convention), +-1 px.
    box = transform_boxes(np.array([[c0 - 0.5, r0 - 0.5, c1 - 0.5, r1 - 0.5]]), matrix)[0]
    bright_y, bright_x = np.nonzero(block > 127)
    assert len(bright_x) > 0
    assert box[0] - 1 <= bright_x.min() and bright_x.max() <= box[2] + 1
    assert box[1] - 1 <= bright_y.min() and bright_y.max() <= box[3] + 1


def test_flip_really_mirrors_the_image() -> None:
    image, _ = _block_image()
    matrix = affine_matrix((80.0, 60.0), 160.0, 160, flip=True)  # scale 1, mirrored
    warped = warp_image(image, matrix, 160)
    # Column j moves to 160 - j (cv2 pixel-centre coordinates), rows stay (offset by 20).
    np.testing.assert_array_equal(warped[60:70, 160 - 44 : 160 - 29, 0], 255)
    assert warped[60:70, 1:, 0].astype(int).sum() == 255 * 10 * 15
    np.testing.assert_array_equal(warped[:, 0], 114)  # column 0 samples x = 160: outside
    np.testing.assert_array_equal(warped[20:140, 1:][:, ::-1], image[:, 1:])


# ------------------------------------------------------------------------ colour jitter


def test_color_jitter_strength_zero_is_identity() -> None:
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    copy = image.copy()
    out = color_jitter(image, np.random.default_rng(1), 0.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, copy)


def test_color_jitter_changes_colours_keeps_dtype_shape_and_is_seeded() -> None:
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    a = color_jitter(image, np.random.default_rng(5), 0.5)
    b = color_jitter(image, np.random.default_rng(5), 0.5)
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image)
    # A grey image stays grey (saturation acts on colour only).
    grey = np.full((4, 4, 3), 100, np.uint8)
    jittered = color_jitter(grey, np.random.default_rng(2), 0.5)
    assert np.all(jittered == jittered[..., :1])


def _jitter_step_by_step(image: np.ndarray, rng: np.random.Generator, strength: float):
    """The definition: brightness, then contrast towards the mean grey, then saturation
    towards each pixel's grey, in float64."""
    x = image.astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    brightness, contrast, saturation = 1.0 + rng.uniform(-strength, strength, 3)
    x = x * brightness
    mean = (x @ luma).mean()
    x = (x - mean) * contrast + mean
    grey = (x @ luma)[..., None]
    return (x - grey) * saturation + grey


def test_color_jitter_matches_the_step_by_step_definition() -> None:
    image = np.random.default_rng(0).integers(0, 256, (31, 29, 3), dtype=np.uint8)
    for seed in range(5):
        expected = _jitter_step_by_step(image, np.random.default_rng(seed), 0.5)
        out = color_jitter(image, np.random.default_rng(seed), 0.5)
        inside = (expected > 0.5) & (expected < 254.5)  # away from the uint8 saturation
        assert np.abs(out[inside] - expected[inside]).max() <= 1.0  # uint8 rounding
        np.testing.assert_array_equal(out[expected <= -0.5], 0)
        np.testing.assert_array_equal(out[expected >= 255.5], 255)


# ------------------------------------------------------------------------ TrainingDataset


@pytest.mark.parametrize(
    "augment",
    [None, AugmentConfig(flip=1.0, color=0.0), AugmentConfig(scale=(0.8, 1.2), flip=0.0)],
    ids=["letterbox", "flip", "jitter"],
)
@pytest.mark.parametrize("index", [0, 3])
def test_training_sample_peaks_land_on_transformed_centres(augment, index: int) -> None:
    source = SyntheticShapes(num_images=4, seed=3, image_size=96, max_objects=5)
    size, seed, epoch = 128, 11, 2
    dataset = TrainingDataset(source, size, augment=augment, max_objects=16, seed=seed)
    dataset.epoch = epoch
    sample = dataset[index]

    image, ann = source.load(index)
    height, width = image.shape[:2]
    if augment is None:
        matrix = letterbox_matrix(width, height, size)
    else:  # the dataset's documented per-(seed, epoch, index) draw
        rng = np.random.default_rng([seed, epoch, index])
        matrix = random_affine(rng, width, height, size, augment)
    boxes, labels = clip_boxes(transform_boxes(ann.boxes, matrix), ann.labels, size)
    assert len(boxes) > 0

    grid = size // STRIDE
    n = int(sample["mask"].sum())
    assert n == len(boxes) and sample["mask"][:n].all()
    cells = sample["index"][:n]
    xs, ys = cells % grid, cells // grid
    centres = (np.stack([xs, ys], 1) + sample["offset"][:n]) * STRIDE
    np.testing.assert_allclose(centres, (boxes[:, :2] + boxes[:, 2:]) / 2, atol=1e-4)
    np.testing.assert_allclose(sample["wh"][:n] * STRIDE, boxes[:, 2:] - boxes[:, :2], atol=1e-4)
    np.testing.assert_array_equal(sample["heatmap"][labels, ys, xs], 1.0)
    peaks = set(zip(labels.tolist(), ys.tolist(), xs.tolist(), strict=True))
    assert (sample["heatmap"] == 1.0).sum() == len(peaks)

    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == np.uint8
    if augment is None or augment.color == 0:
        warped = warp_image(image, matrix, size)
        np.testing.assert_array_equal(sample["image"], warped.transpose(2, 0, 1))
    np.testing.assert_array_equal(sample["labeled"], [True, True, True])


def test_mosaic_places_four_images_and_cuts_boxes_at_their_quadrant() -> None:
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    samples = [
        (np.full((50, 80, 3), colour, np.uint8), np.array([[0, 0, 80, 50], [70, 40, 80, 50]], np.float32),
         np.array([k, k]))
        for k, colour in enumerate(colours)
    ]  # fmt: skip
    canvas, boxes, labels = mosaic(
        rng, samples, 128, AugmentConfig(flip=0.0, mosaic_scale=(0.5, 0.5))
    )
    assert canvas.shape == (128, 128, 3)
    for k, colour in enumerate(colours):  # each whole-image box covers its own colour
        x0, y0, x1, y1 = boxes[labels == k][0]
        patch = canvas[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1].reshape(-1, 3)
        assert len(patch) and (patch == colour).all(), k
    # the quadrants meet at one centre: the boxes of the top-left and bottom-right touch it
    top_left, bottom_right = boxes[labels == 0][0], boxes[labels == 3][0]
    assert top_left[2:] == pytest.approx(bottom_right[:2])
    # a box cut to under a quarter of its area by its quadrant's edge is dropped: none here is
    assert len(boxes) <= 8 and (boxes[:, 2:] > boxes[:, :2]).all()


def test_mosaic_partners_share_the_labelled_classes() -> None:
    from centerx.data.partial import Relabeled, SourceUnion

    names = ["circle", "square"]
    union = SourceUnion(
        [Relabeled(SyntheticShapes(6, seed=s, class_names=names, image_size=64), names, [c])
         for s, c in ((1, "circle"), (2, "square"))],
        ["a", "b"],
    )  # fmt: skip
    dataset = TrainingDataset(union, 64, augment=AugmentConfig(mosaic=1.0), seed=0)
    for index in range(len(union)):
        sample = dataset[index]
        labelled = sample["labeled"].tolist()
        assert labelled == ([True, False] if index < 6 else [False, True])
        square = sample["heatmap"][1].max()  # part a leaves squares unlabelled: no square targets
        assert (square == 0) if index < 6 else True
    again = TrainingDataset(union, 64, augment=AugmentConfig(mosaic=1.0), seed=0)
    assert np.array_equal(again[3]["image"], dataset[3]["image"])  # deterministic per index
