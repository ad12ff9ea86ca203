"""Built-in synthetic shapes: deterministic, generated on the fly, no files needed.

Each image is a cluttered background (gradient, noise, distractor strokes) with
a few filled shapes of varied size, colour and aspect that may overlap. The same
seed and index always give the same image, so train/val splits are just seeds.

A *partial-label view* presents the same images with only some classes
annotated, which is the data the distillation scenario is built on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo

SHAPES = ("circle", "square", "triangle", "star", "cross")


def _shape_polygon(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Outline points of a shape inscribed in a w x h box centred at (cx, cy)."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        unit = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    elif kind == "square":
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif kind == "triangle":
        unit = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif kind == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        unit = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    elif kind == "cross":
        a, b = 0.5, 0.16
        unit = np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
    else:
        raise DatasetError(f"unknown synthetic shape {kind!r}; known: {SHAPES}")
    # A small rotation only for non-circles keeps boxes tight around the drawn pixels.
    c, s = np.cos(angle), np.sin(angle)
    points = unit @ np.array([[c, s], [-s, c]])
    return points * np.array([w, h]) + np.array([cx, cy])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
    ramp = ramp[None, :, None] if ramp.size == width else ramp[:, None, None]
    image = low + (high - low) * ramp
    image = np.broadcast_to(image, (height, width, 3)).astype(np.float32)
    image = image + rng.normal(0, rng.uniform(4, 18), (height, width, 3)).astype(np.float32)
    image = image.clip(0, 255).astype(np.uint8)
    # Distractors: lines and hollow outlines the detector must learn to ignore.
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        p0 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        if rng.random() < 0.6:
            cv2.line(image, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            axes = tuple(int(v) for v in rng.integers(3, max(4, min(width, height) // 5), 2))
            cv2.ellipse(image, p0, axes, float(rng.uniform(0, 180)), 0, 360, color, 1, cv2.LINE_AA)
    return image


def _overlap_with(box: np.ndarray, boxes: list[np.ndarray]) -> float:
    """Largest intersection over the smaller box's area: unlike IoU, this also catches a
    small shape hidden under a big one (IoU stays low when one box contains the other)."""
    if not boxes:
        return 0.0
    others = np.stack(boxes)
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod((rb - lt).clip(0), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return float((inter / np.minimum(area, areas)).max())


def _image_width(rng: np.random.Generator, image_size: int) -> int:
    """The first draw of every image: its width (varied aspect exercises the letterbox)."""
    return int(image_size * rng.uniform(0.8, 1.25))


def render_sample(
    seed: int,
    index: int,
    class_names: Sequence[str],
    image_size: int,
    max_objects: int,
    size_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image; returns (RGB uint8 image, boxes xyxy float32, labels int64)."""
    rng = np.random.default_rng([seed, index])
    width, height = _image_width(rng, image_size), image_size
    image = _background(rng, height, width)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            side = rng.uniform(*size_range) * min(width, height)
            aspect = np.exp(rng.uniform(-0.45, 0.45))
            w, h = side * aspect, side / aspect
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            label = int(rng.integers(len(class_names)))
            angle = 0.0 if class_names[label] == "circle" else rng.uniform(-0.15, 0.15)
            polygon = _shape_polygon(class_names[label], cx, cy, w, h, angle)
            box = np.concatenate([polygon.min(0), polygon.max(0)]).clip(0, [width, height] * 2)
            # Overlap is allowed but bounded, so every object stays mostly visible.
            if _overlap_with(box, boxes) < 0.3:
                break
        else:
            continue
        color = rng.integers(0, 256, 3)
        cv2.fillPoly(
            image,
            [np.round(polygon * 16).astype(np.int32)],
            tuple(int(v) for v in color),
            cv2.LINE_AA,
            shift=4,
        )
        boxes.append(box)
        labels.append(label)
    return (
        image,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int64),
    )


class SyntheticShapes(DetectionSource):
    """Shapes on clutter. `labeled_class_names` makes a partial-label view of the same images."""

    def __init__(
        self,
        num_images: int = 1000,
        seed: int = 0,
        class_names: Sequence[str] = ("circle", "square", "triangle"),
        image_size: int = 128,
        max_objects: int = 6,
        size_range: Sequence[float] = (0.12, 0.45),
        labeled_class_names: Sequence[str] | None = None,
    ) -> None:
        unknown = [name for name in class_names if name not in SHAPES]
        if unknown:
            raise DatasetError(f"synthetic classes {unknown} are not shapes; choose from {SHAPES}")
        if num_images < 1:
            raise DatasetError(f"num_images must be >= 1, got {num_images}")
        self.class_names = list(class_names)
        self.category_ids = list(range(1, len(self.class_names) + 1))
        self.num_images, self.seed = int(num_images), int(seed)
        self.image_size, self.max_objects = int(image_size), int(max_objects)
        self.size_range = (float(size_range[0]), float(size_range[1]))
        labeled = self.class_names if labeled_class_names is None else list(labeled_class_names)
        missing = [name for name in labeled if name not in self.class_names]
        if missing:
            raise DatasetError(
                f"labeled_class_names {missing} not in class_names {self.class_names}"
            )
        self._labeled = np.array([name in labeled for name in self.class_names])

    def __len__(self) -> int:
        return self.num_images

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return render_sample(
            self.seed, index, self.class_names, self.image_size, self.max_objects, self.size_range
        )

    def image_info(self, index: int) -> ImageInfo:
        width = _image_width(np.random.default_rng([self.seed, index]), self.image_size)
        return ImageInfo(index + 1, f"{self.seed}_{index:06d}.png", width, self.image_size)

    def load_image(self, index: int) -> np.ndarray:
        return self._render(index)[0]

    def load_annotation(self, index: int) -> Annotation:
        return self.load(index)[1]

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        image, boxes, labels = self._render(index)
        keep = self._labeled[labels]
        return image, Annotation(boxes[keep], labels[keep])

    def labeled_classes(self, index: int) -> np.ndarray:
        return self._labeled.copy()

    def write_coco(self, out_dir: str | Path) -> Path:
        """Write the images as PNG and the annotations as COCO JSON; returns the JSON path."""
        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        for index in range(len(self)):
            image = self.load_image(index)
            name = self.image_info(index).file_name
            cv2.imwrite(str(out_dir / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        path = out_dir / "annotations.json"
        path.write_text(json.dumps(self.to_coco()))
        return path
