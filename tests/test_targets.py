"""CenterNet targets: the corrected Gaussian radius (proved against CornerNet's three IoU cases),
draw_heatmap against the whole-grid reference it replaced (equal output, memory bounded by the
boxes' windows), and build_targets' heatmap / wh / offset / index / mask, checked by hand."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from centerx.data.targets import build_targets, draw_heatmap, gaussian_kernel, gaussian_radius

# ------------------------------------------------------------------------- gaussian_radius


def iou_same_direction(h: float, w: float, r: float) -> float:
    """Case 1: the box shifted by r along both axes (both corners move the same way)."""
    inter = max(0.0, w - r) * max(0.0, h - r)
    return inter / (2 * w * h - inter)


def iou_inwards(h: float, w: float, r: float) -> float:
    """Case 2: both corners move inwards by r: a (w-2r)(h-2r) box inside the true one."""
    return max(0.0, w - 2 * r) * max(0.0, h - 2 * r) / (w * h)


def iou_outwards(h: float, w: float, r: float) -> float:
    """Case 3: both corners move outwards by r: the true box inside a (w+2r)(h+2r) one."""
    return w * h / ((w + 2 * r) * (h + 2 * r))


def case_ious(h: float, w: float, r: float) -> list[float]:
    return [iou_same_direction(h, w, r), iou_inwards(h, w, r), iou_outwards(h, w, r)]


def cornernet_published_roots(h: float, w: float, o: float) -> tuple[float, float, float]:
    """CornerNet's original code: (b + sqrt(D)) / 2 for every case (the over-estimate)."""
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return r1, r2, r3


RADIUS_CASES = [
    (10.0, 10.0, 0.7),
    (20.0, 20.0, 0.7),
    (4.0, 30.0, 0.7),
    (50.0, 7.0, 0.5),
    (3.0, 3.0, 0.9),
    (100.0, 60.0, 0.3),
    (1.0, 1.0, 0.7),
    (37.5, 12.25, 0.7),
]


@pytest.mark.parametrize("h,w,o", RADIUS_CASES)
def test_gaussian_radius_is_the_largest_displacement_keeping_iou(h: float, w: float, o: float):
    r = float(gaussian_radius(h, w, o))
    assert r > 0
    ious = case_ious(h, w, r)
    # Every case keeps IoU >= min_overlap ...
    assert min(ious) >= o - 1e-6, ious
    # ... and the binding case sits exactly on the bound, so r is the largest such radius.
    assert min(ious) == pytest.approx(o, abs=1e-6)
    assert min(case_ious(h, w, r + 1e-3)) < o


@pytest.mark.parametrize("h,w,o", RADIUS_CASES)
def test_cornernet_published_roots_violate_the_bound(h: float, w: float, o: float) -> None:
    r1, r2, r3 = cornernet_published_roots(h, w, o)
    assert iou_same_direction(h, w, r1) < o  # the buggy case-1 root breaks its own case
    assert iou_inwards(h, w, r2) < o
    buggy = min(r1, r2, r3)
    assert buggy > float(gaussian_radius(h, w, o))
    assert min(case_ious(h, w, buggy)) < o


def test_gaussian_radius_known_value() -> None:
    # 20x20 at 0.7: case 2 binds, 4r^2 - 80r + 120 = 0 -> r = (80 - sqrt(4480)) / 8.
    assert float(gaussian_radius(20.0, 20.0, 0.7)) == pytest.approx(
        (80 - math.sqrt(4480)) / 8, abs=1e-12
    )


def test_gaussian_radius_vectorised() -> None:
    heights = np.array([[10.0, 20.0, 4.0], [50.0, 3.0, 100.0]])
    widths = np.array([[10.0, 20.0, 30.0], [7.0, 3.0, 60.0]])
    radii = gaussian_radius(heights, widths, 0.6)
    assert radii.shape == (2, 3)
    expected = [
        float(gaussian_radius(h, w, 0.6))
        for h, w in zip(heights.ravel(), widths.ravel(), strict=True)
    ]
    np.testing.assert_allclose(radii.ravel(), expected, rtol=0, atol=0)
    # Monotone in size: a larger box tolerates a larger displacement.
    assert np.all(np.diff(gaussian_radius(np.arange(2.0, 60.0), np.arange(2.0, 60.0))) > 0)


# ----------------------------------------------------------------------------- draw_heatmap


def whole_grid_heatmap(center, wh, labels, num_classes, grid_size, min_overlap) -> np.ndarray:
    """The implementation draw_heatmap replaced, verbatim: every box evaluated over the whole
    grid ([N, H, W] at once), truncated at its radius, merged per class by max."""
    height, width = grid_size
    heatmap = np.zeros((num_classes, height, width), np.float32)
    if len(center) == 0:
        return heatmap
    radius = np.maximum(0, np.floor(gaussian_radius(wh[:, 1], wh[:, 0], min_overlap)))
    sigma = (2 * radius + 1) / 6
    dx = np.arange(width)[None, None, :] - center[:, 0, None, None]
    dy = np.arange(height)[None, :, None] - center[:, 1, None, None]
    r = radius[:, None, None]
    gauss = np.exp(-(dx**2 + dy**2) / (2 * sigma[:, None, None] ** 2))
    gauss = np.where((np.abs(dx) <= r) & (np.abs(dy) <= r), gauss, 0.0).astype(np.float32)
    np.maximum.at(heatmap, labels, gauss)
    return heatmap


def random_boxes(count: int, grid_size: tuple[int, int], seed: int):
    """Centre cells (some on the borders), sizes from sub-cell to larger than the grid, labels."""
    rng = np.random.default_rng(seed)
    height, width = grid_size
    center = np.floor(rng.uniform(0, [width, height], (count, 2)))
    center[::5] = [0, height - 1]  # windows cut by the left and bottom borders
    center[1::7] = [width - 1, 0]
    wh = np.exp(rng.uniform(np.log(0.5), np.log(2.5 * max(grid_size)), (count, 2)))
    return center, wh, rng.integers(0, 3, count)


@pytest.mark.parametrize("grid_size", [(80, 80), (24, 40), (128, 128), (256, 256)])
@pytest.mark.parametrize("count", [0, 1, 2, 17, 128, 256])
def test_draw_heatmap_equals_the_whole_grid_reference(grid_size, count) -> None:
    args = (*random_boxes(count, grid_size, seed=count), 3, grid_size, 0.3)
    heatmap = draw_heatmap(*args)
    assert heatmap.dtype == np.float32 and heatmap.shape == (3, *grid_size)
    np.testing.assert_array_equal(heatmap, whole_grid_heatmap(*args))


def test_draw_heatmap_memory_is_bounded_by_the_windows() -> None:
    """128 boxes on a 128x128 grid: the whole-grid version allocates [N, H, W] float64 arrays
    (tens of MiB); draw_heatmap allocates the heatmap and nothing grid-sized besides (its
    windows are views of the heatmap, the kernels cached)."""
    grid = (128, 128)
    args = (*random_boxes(128, grid, seed=1), 3, grid, 0.3)
    draw_heatmap(*args)  # the kernels are cached from here on

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn(*args)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    heatmap_bytes = 3 * 128 * 128 * 4
    assert peak(whole_grid_heatmap) > 50 * heatmap_bytes  # tracemalloc does see numpy buffers
    # The heatmap plus per-box bookkeeping (radii, Python ints): under 1 KiB a box.
    assert peak(draw_heatmap) < heatmap_bytes + 128 * 1024


def test_gaussian_kernel_is_cached_read_only_and_matches_its_formula() -> None:
    kernel = gaussian_kernel(3)
    assert kernel is gaussian_kernel(3) and not kernel.flags.writeable
    assert kernel.shape == (7, 7) and kernel.dtype == np.float32
    sigma = 7 / 6
    assert kernel[3, 3] == 1.0
    assert kernel[3, 0] == pytest.approx(math.exp(-9 / (2 * sigma**2)), rel=1e-6)
    np.testing.assert_array_equal(kernel, kernel.T)
    np.testing.assert_array_equal(gaussian_kernel(0), [[1.0]])


# ---------------------------------------------------------------------------- build_targets


def _targets(boxes, labels, num_classes=3, grid=(32, 32), max_objects=8, min_overlap=0.7):
    return build_targets(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        num_classes,
        grid,
        max_objects,
        min_overlap,
    )


def test_build_targets_values_by_hand() -> None:
    # Centres (4.75, 5.75) and (20.0, 13.5); grid 32 wide x 24 high.
    boxes = [[2.5, 3.0, 7.0, 8.5], [10.0, 3.5, 30.0, 23.5]]
    t = _targets(boxes, [2, 0], num_classes=3, grid=(24, 32), max_objects=4)
    assert t.heatmap.shape == (3, 24, 32) and t.heatmap.dtype == np.float32
    np.testing.assert_allclose(t.wh, [[4.5, 5.5], [20.0, 20.0], [0, 0], [0, 0]])
    np.testing.assert_allclose(t.offset, [[0.75, 0.75], [0.0, 0.5], [0, 0], [0, 0]])
    np.testing.assert_array_equal(t.index, [5 * 32 + 4, 13 * 32 + 20, 0, 0])
    np.testing.assert_array_equal(t.mask, [1, 1, 0, 0])
    assert t.index.dtype == np.int64 and t.mask.dtype == np.float32
    # Peaks: exactly 1 at the floor of each centre, in its own class only.
    assert t.heatmap[2, 5, 4] == 1.0 and t.heatmap[0, 5, 4] == 0 and t.heatmap[1, 5, 4] == 0
    assert t.heatmap[0, 13, 20] == 1.0 and t.heatmap[1, 13, 20] == 0 and t.heatmap[2, 13, 20] == 0
    assert t.heatmap.max() == 1.0 and (t.heatmap == 1.0).sum() == 2
    assert not t.heatmap[1].any()  # no box of class 1


def test_build_targets_gaussian_shape_by_hand() -> None:
    # A 20x20 box: radius floor(1.63) = 1, sigma = (2*1 + 1) / 6 = 0.5.
    t = _targets([[5.0, 5.0, 25.0, 25.0]], [1])
    peak_y, peak_x = 15, 15
    window = t.heatmap[1, peak_y - 2 : peak_y + 3, peak_x - 2 : peak_x + 3]
    e2, e4 = math.exp(-2.0), math.exp(-4.0)  # exp(-d^2 / (2 * 0.25)) for d^2 = 1, 2
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, e4, e2, e4, 0],
            [0, e2, 1, e2, 0],
            [0, e4, e2, e4, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_allclose(window, expected, rtol=1e-6, atol=0)
    assert np.count_nonzero(t.heatmap) == 9  # truncated at the radius


def test_build_targets_small_box_is_a_single_hot_cell() -> None:
    # 3x3 box: radius 0 -> just the centre cell.
    t = _targets([[10.0, 10.0, 13.0, 13.0]], [0])
    assert np.count_nonzero(t.heatmap) == 1 and t.heatmap[0, 11, 11] == 1.0


def test_build_targets_same_class_gaussians_merge_by_max() -> None:
    a, b = [0.0, 0.0, 30.0, 30.0], [4.0, 2.0, 32.0, 30.0]  # centres (15, 15), (18, 16)
    merged = _targets([a, b], [1, 1]).heatmap
    alone_a = _targets([a], [1]).heatmap
    alone_b = _targets([b], [1]).heatmap
    np.testing.assert_array_equal(merged, np.maximum(alone_a, alone_b))
    overlap = (alone_a > 0) & (alone_b > 0)
    assert overlap.any(), "the test boxes must have overlapping Gaussians"
    # Not a sum: no value above 1, and overlapping cells keep the larger one.
    assert merged.max() == 1.0
    assert np.all(merged[overlap] < alone_a[overlap] + alone_b[overlap])
    # Different classes do not merge.
    split = _targets([a, b], [1, 2]).heatmap
    np.testing.assert_array_equal(split[1], alone_a[1])
    np.testing.assert_array_equal(split[2], alone_b[1])


def test_build_targets_truncates_to_max_objects() -> None:
    boxes = [[x, 4.0, x + 3.0, 7.0] for x in (1.0, 6.0, 11.0, 16.0, 21.0)]
    t = _targets(boxes, [0, 1, 2, 0, 1], max_objects=3)
    assert t.wh.shape == (3, 2) and t.offset.shape == (3, 2)
    assert t.index.shape == (3,) and t.mask.shape == (3,)
    np.testing.assert_array_equal(t.mask, [1, 1, 1])
    np.testing.assert_array_equal(t.index, [5 * 32 + 2, 5 * 32 + 7, 5 * 32 + 12])
    # Only the first three are drawn: the 4th and 5th centres stay cold.
    assert (t.heatmap == 1.0).sum() == 3
    assert t.heatmap[0, 5, 17] == 0 and t.heatmap[1, 5, 22] == 0


def test_build_targets_empty_image_gives_zeros() -> None:
    t = _targets(np.zeros((0, 4)), np.zeros(0), num_classes=2, grid=(8, 16), max_objects=5)
    assert t.heatmap.shape == (2, 8, 16) and not t.heatmap.any()
    assert t.wh.shape == (5, 2) and not t.wh.any()
    assert not t.offset.any() and not t.index.any() and not t.mask.any()


def test_build_targets_centre_on_the_far_edge_stays_in_the_grid() -> None:
    # A box touching the right/bottom border: centre cell clipped into the grid.
    t = _targets([[28.0, 28.0, 32.0, 32.0]], [0], grid=(32, 32))
    assert t.heatmap[0, 30, 30] == 1.0
    assert t.index[0] == 30 * 32 + 30
    np.testing.assert_allclose(t.offset[0], [0.0, 0.0])
