"""Images, videos, letterbox geometry and drawing: numpy and OpenCV only (no torch, no centerx).

The bottom layer of the project: centerx's data pipeline, evaluator and pictures use these
functions too (one implementation), so the deployed predictor letterboxes, maps boxes back and
draws exactly as training and evaluation do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v"}
# What an annotated video is written with: the input's container, a codec OpenCV can write to it.
VIDEO_CODECS = {".avi": "MJPG"}
DEFAULT_VIDEO_CODEC = "mp4v"
PAD_VALUE = 114  # letterbox border (training, evaluation and deployment alike)


class ImageReadError(RuntimeError):
    """An image file is missing, empty or cannot be decoded."""


class VideoError(RuntimeError):
    """A video file cannot be opened or an annotated video cannot be written."""


# ---------------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (format sniffed from the bytes); clear error if not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from err
    if not data:
        raise ImageReadError(f"cannot read image {path}: file is empty")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageReadError(f"cannot read image {path}: not a decodable image file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def list_inputs(
    inputs: str | Path | Sequence[str | Path], suffixes: set[str] = IMAGE_SUFFIXES
) -> list[Path]:
    """Files and folders (searched recursively for `suffixes`, sorted) -> paths; clear error if
    none. Files named explicitly are kept whatever their suffix (reading them says if they fail)."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str | Path) else inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not paths:
        raise FileNotFoundError(f"no input files found in {inputs} (looked for {sorted(suffixes)})")
    return paths


def list_images(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of `inputs` (files, and folders searched recursively)."""
    return list_inputs(inputs, IMAGE_SUFFIXES)


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Geometry: one 2x3 affine per image, inverted to map boxes back
# ---------------------------------------------------------------------------------------------


def affine_matrix(
    center: tuple[float, float], crop_side: float, out_size: int, flip: bool = False
) -> np.ndarray:
    """2x3 matrix mapping a square of side `crop_side` around `center` onto out_size x out_size."""
    scale = out_size / crop_side
    scale_x = -scale if flip else scale
    cx, cy = center
    return np.array(
        [[scale_x, 0.0, out_size / 2 - scale_x * cx], [0.0, scale, out_size / 2 - scale * cy]],
        dtype=np.float64,
    )


def letterbox_matrix(width: int, height: int, out_size: int) -> np.ndarray:
    """The evaluation and deployment transform: the whole image, centred, longer side fitted,
    no flip."""
    return affine_matrix((width / 2, height / 2), max(width, height), out_size)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, np.float64))


def warp_image(image: np.ndarray, matrix: np.ndarray, out_size: int) -> np.ndarray:
    """Warp an image into out_size x out_size: bilinear, border PAD_VALUE."""
    return cv2.warpAffine(
        image,
        matrix,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )


def letterbox(image: np.ndarray, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB HxWx3 -> (letterboxed out_size x out_size x 3, the 2x3 matrix used)."""
    height, width = image.shape[:2]
    matrix = letterbox_matrix(width, height, out_size)
    return warp_image(image, matrix, out_size), matrix


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an affine to xyxy boxes (exact for scale/shift/flip: corners stay corners)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 4, 2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    return np.concatenate([mapped.min(1), mapped.max(1)], axis=1).astype(np.float32)


def to_original(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Letterbox-pixel xyxy boxes -> original-image pixels (inverse affine), clipped to the image."""
    original = transform_boxes(boxes, invert_affine(matrix))
    original[:, [0, 2]] = original[:, [0, 2]].clip(0, width)
    original[:, [1, 3]] = original[:, [1, 3]].clip(0, height)
    return original


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per class (golden-ratio hue steps)."""
    hue = int((index * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    title: str | None = None,
) -> np.ndarray:
    """A copy of an RGB image with labelled boxes (and a title bar above it, if given)."""
    canvas = np.ascontiguousarray(image.copy())
    scale = max(0.35, min(canvas.shape[:2]) / 600)
    thickness = max(1, round(scale * 2))
    for box, score, cls in zip(
        np.asarray(boxes), np.asarray(scores), np.asarray(classes), strict=True
    ):
        color = class_color(int(cls))
        x0, y0, x1, y1 = np.round(np.asarray(box)).astype(int).tolist()
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
        label = f"{class_names[int(cls)]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + 2, y0)
        cv2.rectangle(canvas, (x0, ty - th - 2), (x0 + tw + 2, ty), color, -1)
        cv2.putText(
            canvas,
            label,
            (x0 + 1, ty - 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    if title:
        bar = np.full((22, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        canvas = np.concatenate([bar, canvas], 0)
    return canvas


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float  # as the container declares it (0 when unknown)
    frame_count: int  # as the container declares it (an estimate for some formats)
    width: int
    height: int


class VideoReader:
    """Iterate the frames of a video file as (index, RGB uint8 frame); clear error if OpenCV
    cannot open it."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise VideoError(f"cannot open video {path}: no such file")
        self.capture = cv2.VideoCapture(str(path))
        if not self.capture.isOpened():
            raise VideoError(
                f"cannot open video {path}: OpenCV cannot decode it (unsupported codec or "
                "damaged file; convert it to H.264 .mp4, or extract its frames as images)"
            )
        self.info = VideoInfo(
            path,
            float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0),
            int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
            int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        index = 0
        try:
            while True:
                ok, frame = self.capture.read()
                if not ok:
                    return
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            self.capture.release()


class VideoWriter:
    """Write RGB frames to a video with the container of `path` (mp4v codec; MJPG in .avi)."""

    def __init__(self, path: str | Path, fps: float, width: int, height: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        codec = VIDEO_CODECS.get(self.path.suffix.lower(), DEFAULT_VIDEO_CODEC)
        self.writer = cv2.VideoWriter(
            str(self.path), cv2.VideoWriter_fourcc(*codec), fps, (width, height)
        )
        if not self.writer.isOpened():
            raise VideoError(f"OpenCV cannot write a {codec} video to {self.path}")

    def write(self, frame: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()
