"""Pictures: detections drawn on images, image grids, and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from centerx.utils.metrics_log import read_metrics

# One implementation of the drawing shared with deployment: the kit is the bottom layer
# (numpy/OpenCV only), so centerx imports from it, never the other way round.
from centerx_export.imaging import class_color, draw_detections, save_rgb

__all__ = ["class_color", "draw_detections", "image_grid", "plot_curves", "save_rgb"]


def image_grid(rows: Sequence[Sequence[np.ndarray]], cell: int = 256, pad: int = 4) -> np.ndarray:
    """Tile RGB images (each fitted into cell x cell+title) into one picture."""
    tiles = []
    for row in rows:
        fitted = []
        for image in row:
            h, w = image.shape[:2]
            s = cell / max(h, w)
            resized = cv2.resize(
                image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
            )
            tile = np.full((cell + 22, cell, 3), 255, np.uint8)
            tile[: resized.shape[0], : resized.shape[1]] = resized
            fitted.append(np.pad(tile, ((pad, pad), (pad, pad), (0, 0)), constant_values=255))
        tiles.append(np.concatenate(fitted, 1))
    width = max(t.shape[1] for t in tiles)
    tiles = [
        np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles
    ]
    return np.concatenate(tiles, 0)


def plot_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> None:
    """Loss terms per step (raw) and AP per evaluation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({k for r in steps for k in r if k.startswith("raw/")})
    for name in names:
        xs = [r["step"] for r in steps if r.get(name) is not None]
        ax_loss.plot(xs, [r[name] for r in steps if r.get(name) is not None], label=name[4:])
    ax_loss.set(xlabel="step", ylabel="raw loss term", yscale="log", title="loss")
    if names:
        ax_loss.legend()
    for key in ("AP", "AP50"):
        ax_ap.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    ax_ap.set(xlabel="epoch", ylabel="COCO metric", ylim=(0, 1), title="validation")
    ax_ap.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
