"""Predict on image files: drawn detections and a JSON of boxes in original pixels."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from centerx.data.base import ImageReadError, read_image
from centerx.data.transforms import letterbox_matrix, warp_image
from centerx.engine.evaluate import Predictor, to_original
from centerx.utils.visualize import draw_detections, save_rgb

log = logging.getLogger(__name__)


def predict_image(
    predictor: Predictor, image: np.ndarray, image_size: int, score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (original pixels), scores and classes above the threshold for one RGB image."""
    height, width = image.shape[:2]
    matrix = letterbox_matrix(width, height, image_size)
    batch = torch.from_numpy(
        np.ascontiguousarray(warp_image(image, matrix, image_size).transpose(2, 0, 1))
    )[None]
    boxes, scores, classes = (
        np.asarray(t.cpu() if torch.is_tensor(t) else t)[0] for t in predictor(batch)
    )
    keep = scores >= score_threshold
    return to_original(boxes[keep], matrix, width, height), scores[keep], classes[keep]


def predict_files(
    predictor: Predictor,
    paths: Sequence[Path],
    class_names: Sequence[str],
    image_size: int,
    out_dir: str | Path,
    score_threshold: float = 0.3,
    draw: bool = True,
) -> dict:
    """Write drawn images and predictions.json into out_dir; unreadable files are skipped."""
    out_dir = Path(out_dir)
    results, skipped = [], []
    for path in tqdm(paths, desc="predict"):
        try:
            image = read_image(path)
        except ImageReadError as err:
            log.warning("skipping %s", err)
            skipped.append(str(path))
            continue
        boxes, scores, classes = predict_image(predictor, image, image_size, score_threshold)
        detections = [
            {
                "box": [round(v, 2) for v in box],
                "score": round(float(s), 4),
                "class": class_names[int(c)],
            }
            for box, s, c in zip(boxes.tolist(), scores, classes, strict=True)
        ]
        results.append({"image": str(path), "detections": detections})
        if draw:
            save_rgb(
                out_dir / f"{path.stem}_pred.png",
                draw_detections(image, boxes, scores, classes, class_names),
            )
    summary = {"images": results, "skipped": skipped, "score_threshold": score_threshold}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=1))
    return summary
