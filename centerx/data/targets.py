"""CenterNet training targets: Gaussian class heatmaps, box sizes, centre offsets.

All boxes here are already in output-grid units (input pixels / stride).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def gaussian_radius(height: np.ndarray, width: np.ndarray, min_overlap: float = 0.3) -> np.ndarray:
    """Largest corner displacement r keeping IoU >= min_overlap with the true box.

    CornerNet's three cases, each a quadratic in r, smallest root taken:
      1. both corners shift the same way:  (w-r)(h-r) / (2wh - (w-r)(h-r)) = o
      2. both corners move inwards:         (w-2r)(h-2r) / (wh) = o
      3. both corners move outwards:        wh / ((w+2r)(h+2r)) = o
    CornerNet's published code solved cases 1 and 2 with (b + sqrt(D)) / 2 instead of
    (b - sqrt(D)) / (2a), which over-estimates the radius (mmdetection documents the fix).
    We use the corrected roots, with min_overlap=0.3 by default (mmdetection's pairing).
    CenterNet's 0.7 only works with the buggy roots: corrected, 0.7 gives radius 0 for
    every box under ~10 output cells, so the heatmap target degenerates to single hot
    pixels, the focal loss's penalty reduction never applies, and small models learn
    several times slower. At 0.3 an 8x8-cell box gets radius 1 (a 3x3 Gaussian), close
    to what CenterNet's buggy 0.7 gives (2), and still far from merging neighbours.
    """
    h = np.asarray(height, np.float64)
    w = np.asarray(width, np.float64)
    o = min_overlap
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 - np.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 - np.sqrt(b2**2 - 16 * c2)) / 8
    a3, b3, c3 = 4 * o, 2 * o * (h + w), (o - 1) * w * h
    r3 = (-b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / (2 * a3)
    return np.minimum(np.minimum(r1, r2), r3)


@functools.lru_cache(maxsize=64)
def gaussian_kernel(radius: int) -> np.ndarray:
    """The (2r+1)^2 truncated Gaussian stamped at each centre cell, sigma = (2r+1) / 6 (float32,
    read-only: cached and shared by every box with this radius)."""
    offset = np.arange(-radius, radius + 1, dtype=np.float64)
    sigma = (2 * radius + 1) / 6
    kernel = np.exp(-(offset[None, :] ** 2 + offset[:, None] ** 2) / (2 * sigma**2))
    kernel = kernel.astype(np.float32)
    kernel.flags.writeable = False
    return kernel


def draw_heatmap(
    center: np.ndarray,
    wh: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    grid_size: tuple[int, int],
    min_overlap: float,
) -> np.ndarray:
    """Per-class max of truncated Gaussians at integer centre cells (float32 [C, H, W]).

    Each box touches only its (2r+1)^2 window: the cached kernel for its radius is max-ed into
    that slice of the heatmap in place, so no memory beyond the heatmap and the kernels. This is
    CenterNet's per-box loop without its per-box Gaussian evaluation (1.5x as fast with one box,
    7-10x with 64-256). A loop over boxes on purpose: a slice maximum costs a few microseconds
    per box, while scattering every window cell at once (np.maximum.at over index arrays) pays
    more per cell: it is slower with fewer than ~32 boxes or with large boxes, and saves at
    most ~1 ms per image with hundreds of small ones (scripts/benchmark_targets.py measures
    all three).
    """
    height, width = grid_size
    heatmap = np.zeros((num_classes, height, width), np.float32)
    if len(center) == 0:
        return heatmap
    radii = np.maximum(0, np.floor(gaussian_radius(wh[:, 1], wh[:, 0], min_overlap)))
    cells = center.astype(np.int64).tolist()
    for (x, y), r, label in zip(
        cells, radii.astype(np.int64).tolist(), labels.tolist(), strict=True
    ):
        x0, x1 = max(x - r, 0), min(x + r + 1, width)
        y0, y1 = max(y - r, 0), min(y + r + 1, height)
        window = heatmap[label, y0:y1, x0:x1]
        kernel = gaussian_kernel(r)[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
        np.maximum(window, kernel, out=window)
    return heatmap


@dataclass
class Targets:
    heatmap: np.ndarray  # float32 [C, H, W]
    wh: np.ndarray  # float32 [M, 2] box width/height in grid units
    offset: np.ndarray  # float32 [M, 2] centre minus its integer cell
    index: np.ndarray  # int64 [M] flat cell index y * W + x
    mask: np.ndarray  # float32 [M] 1 for real objects


def build_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    grid_size: tuple[int, int],
    max_objects: int,
    min_overlap: float = 0.3,
) -> Targets:
    """Targets for one image; boxes are xyxy in grid units inside the grid."""
    height, width = grid_size
    boxes, labels = boxes[:max_objects], labels[:max_objects]
    n = len(boxes)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell = np.floor(center).clip(0, [width - 1, height - 1])
    wh = boxes[:, 2:] - boxes[:, :2]
    targets = Targets(
        heatmap=draw_heatmap(cell, wh, labels, num_classes, grid_size, min_overlap),
        wh=np.zeros((max_objects, 2), np.float32),
        offset=np.zeros((max_objects, 2), np.float32),
        index=np.zeros(max_objects, np.int64),
        mask=np.zeros(max_objects, np.float32),
    )
    targets.wh[:n] = wh
    targets.offset[:n] = center - cell
    targets.index[:n] = cell[:, 1] * width + cell[:, 0]
    targets.mask[:n] = 1
    return targets
