"""Heatmap target building: centerx's draw_heatmap against CenterNet's per-box window loop.

    .venv/bin/python scripts/benchmark_targets.py                       # table on stdout
    .venv/bin/python scripts/benchmark_targets.py --json targets.json   # and the raw figures

Three implementations draw the same heatmap (checked equal before timing):

* `centerx`: centerx.data.targets.draw_heatmap (per-box slice maximum with a cached kernel);
* `centernet`: CenterNet's loop as published (src/lib/utils/image.py, draw_umich_gaussian): per
  box, evaluate a fresh (2r+1)^2 Gaussian and max it into the box's window; our radius, so
  all three draw identical maps;
* `scatter`: the vectorised alternative: every box's window cells as one index array, then one
  np.maximum.at. Kept here as the measured reason draw_heatmap loops over boxes.

Box layouts, per grid size (output cells) and box count:
* `crowded`: box sides ~ grid / sqrt(count) (x0.3..1.2), the way crowded photos have small
  objects (the mask set: 113 faces in one image);
* `mixed`: sides log-uniform from 2 cells to half the grid whatever the count (the worst case
  for window sizes: many large boxes).

Timing: for each case the three run in rotating order, `--repeats` rounds of `--number` calls
each; reported is the median seconds per call over rounds, and the peak memory one call
allocates (tracemalloc sees numpy's buffers), heatmap included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from centerx.data.targets import draw_heatmap, gaussian_radius
from centerx.errors import run_script

NUM_CLASSES = 3
MIN_OVERLAP = 0.3


def centernet_gaussian2d(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """CenterNet's gaussian2D, verbatim apart from names."""
    m, n = [(side - 1.0) / 2.0 for side in shape]
    y, x = np.ogrid[-m : m + 1, -n : n + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def centernet_loop(center, wh, labels, num_classes, grid_size, min_overlap) -> np.ndarray:
    """CenterNet's per-box draw_umich_gaussian over a zero heatmap."""
    height, width = grid_size
    heatmap = np.zeros((num_classes, height, width), np.float32)
    radii = np.maximum(0, np.floor(gaussian_radius(wh[:, 1], wh[:, 0], min_overlap)))
    for (x, y), r, label in zip(
        center.astype(int).tolist(), radii.astype(int).tolist(), labels.tolist(), strict=True
    ):
        diameter = 2 * r + 1
        gaussian = centernet_gaussian2d((diameter, diameter), sigma=diameter / 6)
        left, right = min(x, r), min(width - x, r + 1)
        top, bottom = min(y, r), min(height - y, r + 1)
        masked_heatmap = heatmap[label, y - top : y + bottom, x - left : x + right]
        masked_gaussian = gaussian[r - top : r + bottom, r - left : r + right]
        np.maximum(masked_heatmap, masked_gaussian, out=masked_heatmap)
    return heatmap


def scatter_all(center, wh, labels, num_classes, grid_size, min_overlap) -> np.ndarray:
    """Every window cell of every box as one flat index array, then a single maximum.at."""
    height, width = grid_size
    heatmap = np.zeros((num_classes, height, width), np.float32)
    radius = np.maximum(0, np.floor(gaussian_radius(wh[:, 1], wh[:, 0], min_overlap)))
    radius = radius.astype(np.int64)
    side = 2 * radius + 1
    cells_per_box = side * side
    box = np.repeat(np.arange(len(side)), cells_per_box)
    first = np.cumsum(cells_per_box) - cells_per_box
    local = np.arange(cells_per_box.sum()) - first[box]
    dy = local // side[box] - radius[box]
    dx = local % side[box] - radius[box]
    cells = center.astype(np.int64)
    x, y = cells[box, 0] + dx, cells[box, 1] + dy
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    sigma = (2 * radius + 1) / 6
    value = np.exp(-(dx.astype(np.float64) ** 2 + dy**2) / (2 * sigma[box] ** 2))
    flat = (labels[box] * height + y) * width + x
    np.maximum.at(heatmap.reshape(-1), flat[inside], value[inside].astype(np.float32))
    return heatmap


IMPLEMENTATIONS: dict[str, Callable[..., np.ndarray]] = {
    "centerx": draw_heatmap,
    "centernet": centernet_loop,
    "scatter": scatter_all,
}


def make_boxes(
    layout: str, count: int, grid: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre cells [N, 2], box sizes [N, 2] and labels [N] in grid units."""
    if layout == "crowded":
        sides = grid / np.sqrt(count) * rng.uniform(0.3, 1.2, (count, 2))
    else:
        sides = np.exp(rng.uniform(np.log(2), np.log(grid / 2), (count, 2)))
    sides = sides.clip(1, grid)
    center = np.floor(rng.uniform(0, grid, (count, 2))).clip(0, grid - 1)
    return center, sides, rng.integers(0, NUM_CLASSES, count)


def peak_bytes(fn: Callable[..., np.ndarray], args: tuple) -> int:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure_case(args: tuple, repeats: int, number: int) -> dict[str, dict[str, float]]:
    reference = centernet_loop(*args)
    for name, fn in IMPLEMENTATIONS.items():
        if not np.array_equal(fn(*args), reference):  # also warms the kernel cache
            raise AssertionError(f"{name} draws a different heatmap")
    seconds: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    names = list(IMPLEMENTATIONS)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = IMPLEMENTATIONS[name]
            start = time.perf_counter()
            for _ in range(number):
                fn(*args)
            seconds[name].append((time.perf_counter() - start) / number)
    return {
        name: {
            "median_ms": 1000 * statistics.median(values),
            "peak_mib": peak_bytes(IMPLEMENTATIONS[name], args) / 2**20,
        }
        for name, values in seconds.items()
    }


def run(grids: list[int], counts: list[int], layouts: list[str], repeats: int, number: int):
    rng = np.random.default_rng(0)
    results = []
    for layout in layouts:
        for grid in grids:
            for count in counts:
                center, wh, labels = make_boxes(layout, count, grid, rng)
                args = (center, wh, labels, NUM_CLASSES, (grid, grid), MIN_OVERLAP)
                window_cells = int(
                    (
                        (2 * np.floor(gaussian_radius(wh[:, 1], wh[:, 0], MIN_OVERLAP)) + 1) ** 2
                    ).sum()
                )
                timings = measure_case(args, repeats, number)
                results.append(
                    {
                        "layout": layout,
                        "grid": grid,
                        "boxes": count,
                        "window_cells": window_cells,
                        **timings,
                    }
                )
    return results


def table(results: list[dict]) -> str:
    names = list(IMPLEMENTATIONS)
    header = f"{'layout':<8}{'grid':>5}{'boxes':>6}{'cells':>9}" + "".join(
        f"{name + ' ms':>13}" for name in names
    )
    header += f"{'centernet/centerx':>19}" + "".join(f"{name + ' MiB':>15}" for name in names)
    lines = [header]
    for r in results:
        line = f"{r['layout']:<8}{r['grid']:>5}{r['boxes']:>6}{r['window_cells']:>9}"
        line += "".join(f"{r[name]['median_ms']:>13.3f}" for name in names)
        line += f"{r['centernet']['median_ms'] / r['centerx']['median_ms']:>18.1f}x"
        line += "".join(f"{r[name]['peak_mib']:>15.2f}" for name in names)
        lines.append(line)
    slowest = min(results, key=lambda r: r["centernet"]["median_ms"] / r["centerx"]["median_ms"])
    ratio = slowest["centernet"]["median_ms"] / slowest["centerx"]["median_ms"]
    lines.append(
        f"\ncenterx vs CenterNet's loop: worst case {ratio:.1f}x as fast "
        f"({slowest['layout']}, grid {slowest['grid']}, {slowest['boxes']} boxes)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[80, 128, 256])
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument(
        "--layouts", nargs="+", choices=["crowded", "mixed"], default=["crowded", "mixed"]
    )
    parser.add_argument("--repeats", type=int, default=7, help="rounds per case (median)")
    parser.add_argument("--number", type=int, default=5, help="calls per round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.grids, args.boxes, args.layouts, args.repeats, args.number)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"-> {args.json}")


if __name__ == "__main__":
    run_script(main)
