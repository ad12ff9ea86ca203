"""CenterNet augmentation: one affine (scale + shift + flip) crop, and colour jitter.

Every geometric change is a single 2x3 affine matrix, so the image is warped
once and the same matrix (inverted) maps predictions back to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The geometry of one affine per image lives in the deployment kit (the bottom layer), so
# training, evaluation and the deployed predictor letterbox and map boxes back identically.
from centerx_export.imaging import affine_matrix as affine_matrix
from centerx_export.imaging import invert_affine as invert_affine
from centerx_export.imaging import letterbox_matrix as letterbox_matrix
from centerx_export.imaging import transform_boxes as transform_boxes
from centerx_export.imaging import warp_image as warp_image


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.6, 1.4)  # crop side relative to the longer image side
    shift: float = 0.2  # max centre shift as a fraction of the image size
    flip: float = 0.5  # probability of a horizontal flip
    color: float = 0.3  # brightness/contrast/saturation jitter strength (0 disables)


def random_affine(
    rng: np.random.Generator, width: int, height: int, out_size: int, config: AugmentConfig
) -> np.ndarray:
    crop_side = max(width, height) * rng.uniform(*config.scale)
    center = (
        width / 2 + rng.uniform(-config.shift, config.shift) * width,
        height / 2 + rng.uniform(-config.shift, config.shift) * height,
    )
    return affine_matrix(center, crop_side, out_size, flip=bool(rng.random() < config.flip))


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: int, min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the output square and drop boxes that (nearly) left it."""
    boxes = boxes.clip(0, size)
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh >= min_size).all(1)
    return boxes[keep], labels[keep]


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation jitter on a uint8 RGB image (vectorised)."""
    if strength <= 0:
        return image
    x = image.astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    brightness, contrast, saturation = 1.0 + rng.uniform(-strength, strength, 3)
    x, gray = x * brightness, gray * brightness
    mean = gray.mean()
    x, gray = (x - mean) * contrast + mean, (gray - mean) * contrast + mean
    x = (x - gray[..., None]) * saturation + gray[..., None]
    return x.clip(0, 255).astype(np.uint8)
