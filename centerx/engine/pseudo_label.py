"""`run.sh pseudo_label`: a trained model's detections on a dataset, saved as ground truth.

The output is a COCO instances JSON (images by file name, the data's class names, one box per
detection above the threshold). A union part that leaves those classes unlabelled can take it
back as boxes (`data.pseudo_labels=[FILE]`, centerx.data.partial.PseudoLabeled): the
pseudo-label baseline of the main job, or a way to label a folder with a teacher.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from centerx.data.base import DatasetError, DetectionSource
from centerx.engine import run_directory
from centerx.engine.build import run_dir
from centerx.engine.evaluate import Predictor, predict_source, torch_predictor
from centerx.model.checkpoint import model_from_checkpoint

log = logging.getLogger(__name__)


def class_index_map(
    model_classes: list[str], data_classes: list[str], classes: Mapping[str, str] | None
) -> np.ndarray:
    """model class index -> data class index (-1: not wanted). `classes` maps data class ->
    model class; None takes the model's classes that the data has, by name."""
    if classes is None:
        classes = {name: name for name in model_classes if name in data_classes}
    to_data = np.full(len(model_classes), -1, np.int64)
    for data_name, model_name in classes.items():
        if data_name not in data_classes:
            raise DatasetError(f"pseudo-labels: class {data_name!r} is not in {data_classes}")
        if model_name not in model_classes:
            raise DatasetError(
                f"pseudo-labels: the model has no class {model_name!r} ({model_classes})"
            )
        to_data[model_classes.index(model_name)] = data_classes.index(data_name)
    if (to_data < 0).all():
        raise DatasetError(
            f"pseudo-labels: none of the model's classes {model_classes} is a data class "
            f"{data_classes}; map them with classes={{data_class: model_class}}"
        )
    return to_data


def remapped(predictor: Predictor, to_data: np.ndarray) -> Predictor:
    """`predictor` with classes as data class indices; unwanted classes score 0."""
    table = torch.as_tensor(to_data)

    def predict(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, classes = predictor(images)
        mapped = table.to(classes.device)[classes]
        return (
            boxes,
            torch.where(mapped >= 0, scores, torch.zeros_like(scores)),
            mapped.clamp(min=0),
        )

    return predict


def pseudo_label(
    source: DetectionSource,
    checkpoint: str | Path,
    threshold: float,
    classes: Mapping[str, str] | None = None,
    batch_size: int = 32,
) -> dict:
    """The checkpoint's detections >= threshold on every image of `source`, as a COCO
    instances dict whose categories are the data classes they label."""
    model, state = model_from_checkpoint(checkpoint)
    to_data = class_index_map(list(state["class_names"]), list(source.class_names), classes)
    predictor = remapped(torch_predictor(model), to_data)
    detections = predict_source(
        predictor,
        source,
        int(state["image_size"]),
        batch_size=batch_size,
        score_threshold=threshold,
        progress=False,
    )
    filled = sorted({int(i) for i in to_data if i >= 0})
    images = [source.image_info(i) for i in range(len(source))]
    return {
        "images": [
            {"id": i.image_id, "file_name": i.file_name, "width": i.width, "height": i.height}
            for i in images
        ],
        "categories": [
            {"id": source.category_ids[i], "name": source.class_names[i]} for i in filled
        ],
        "annotations": [
            {**d, "id": n + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
            for n, d in enumerate(detections)
        ],
    }


def pseudo_label_task(cfg: DictConfig) -> dict:
    """Label `data.<split>` with `checkpoint`'s detections into pseudo_labels.json."""
    if not cfg.get("checkpoint"):
        raise DatasetError("say which model labels the data: checkpoint=PATH.pt")
    source = instantiate(cfg.data[cfg.split])
    classes = None if cfg.get("classes") is None else dict(cfg.classes)
    labels = pseudo_label(
        source, cfg.checkpoint, float(cfg.threshold), classes, cfg.eval.batch_size
    )
    out = Path(cfg.out) if cfg.get("out") else run_dir() / "pseudo_labels.json"
    with run_directory.claim(out.parent, overwrite=bool(cfg.overwrite), outputs=(out.name,)):
        out.write_text(json.dumps(labels))
    log.info(
        "pseudo-labels: %d boxes of %s on %d images (score >= %.2f) -> %s",
        len(labels["annotations"]),
        [c["name"] for c in labels["categories"]],
        len(labels["images"]),
        float(cfg.threshold),
        out,
    )
    return {"boxes": len(labels["annotations"]), "file": str(out)}
