"""CenterNet augmentation: one affine (scale + shift + flip) crop, and colour jitter.

Every geometric change is a single 2x3 affine matrix, so the image is warped
once and the same matrix (inverted) maps predictions back to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.6, 1.4)  # crop side relative to the longer image side
    shift: float = 0.2  # max centre shift as a fraction of the image size
    flip: float = 0.5  # probability of a horizontal flip
    color: float = 0.3  # brightness/contrast/saturation jitter strength (0 disables)


def affine_matrix(
    center: tuple[float, float], crop_side: float, out_size: int, flip: bool = False
) -> np.ndarray:
    """2x3 matrix mapping a square of side `crop_side` around `center` onto out_size x out_size."""
    s = out_size / crop_side
    sx = -s if flip else s
    cx, cy = center
    return np.array(
        [[sx, 0.0, out_size / 2 - sx * cx], [0.0, s, out_size / 2 - s * cy]], dtype=np.float64
    )


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, np.float64))


def letterbox_matrix(width: int, height: int, out_size: int) -> np.ndarray:
    """Evaluation transform: the whole image, centred, longer side fitted, no flip."""
    return affine_matrix((width / 2, height / 2), max(width, height), out_size)


def random_affine(
    rng: np.random.Generator, width: int, height: int, out_size: int, config: AugmentConfig
) -> np.ndarray:
    crop_side = max(width, height) * rng.uniform(*config.scale)
    center = (
        width / 2 + rng.uniform(-config.shift, config.shift) * width,
        height / 2 + rng.uniform(-config.shift, config.shift) * height,
    )
    return affine_matrix(center, crop_side, out_size, flip=bool(rng.random() < config.flip))


def warp_image(image: np.ndarray, matrix: np.ndarray, out_size: int) -> np.ndarray:
    return cv2.warpAffine(
        image,
        matrix,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(114, 114, 114),
    )


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an affine to xyxy boxes (exact for scale/shift/flip: corners stay corners)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 4, 2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    return np.concatenate([mapped.min(1), mapped.max(1)], axis=1).astype(np.float32)


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
