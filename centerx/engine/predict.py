"""Predict with a PyTorch model through the deployment kit's one predict-on-files loop.

The kit (`centerx_export.predictor`) letterboxes, maps boxes back, draws, reads videos and
writes predictions.json; a backend only supplies `letterboxed uint8 batch -> (boxes, scores,
classes)`. Here that is centerx's Predictor (`centerx.engine.evaluate.torch_predictor`, or an
ONNX detector's `predict_letterboxed`), wrapped to take and return numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from centerx.engine.evaluate import Predictor
from centerx_export.predictor import BatchPredictor, DetectionModel, Detections, detect
from centerx_export.predictor import predict_files as predict_with_model


def numpy_predictor(predictor: Predictor) -> BatchPredictor:
    """A centerx Predictor (torch uint8 batch in; torch or numpy out) as numpy in, numpy out."""

    def predict(images: np.ndarray) -> Detections:
        outputs = predictor(torch.from_numpy(images))
        return tuple(np.asarray(t.cpu() if torch.is_tensor(t) else t) for t in outputs)

    return predict


def predict_image(
    predictor: Predictor, image: np.ndarray, image_size: int, score_threshold: float
) -> Detections:
    """Boxes (original pixels), scores and classes above the threshold for one RGB image."""
    return detect(numpy_predictor(predictor), image, image_size, score_threshold)


def predict_files(
    predictor: Predictor,
    inputs: str | Path | Sequence[str | Path],
    class_names: Sequence[str],
    image_size: int,
    out_dir: str | Path,
    score_threshold: float = 0.3,
    draw: bool = True,
    model_name: str = "",
) -> dict:
    """Images and videos -> drawn outputs and predictions.json in out_dir (the kit's schema);
    raises centerx_export.predictor.NoReadableInputError when no input could be read."""
    model = DetectionModel(numpy_predictor(predictor), list(class_names), image_size, model_name)
    return predict_with_model(model, inputs, out_dir, score_threshold, draw)
