"""Run a centerx ONNX model with numpy, OpenCV and onnxruntime only (no torch, no centerx).

The deployment kit is this file and `imaging.py`: copy both next to `model.onnx` on a device
and run

    python predictor.py --model model.onnx --input IMAGES_FOLDERS_OR_VIDEOS --out DIR

which writes `<stem>_pred.png` per image, `<stem>_pred.<ext>` per video (detections drawn) and
`predictions.json` (boxes in original pixels; the schema is `image_record` and
`predictions_summary` below, documented in export/README.md). From Python:

    detector = OnnxDetector("model.onnx")
    boxes, scores, classes = detector.predict(rgb_image, score_threshold=0.3)

Everything the host needs is read from the model's metadata (written at export): class names,
input size and dtype, output mode, stride. The letterbox is `imaging.letterbox`, the same
function centerx's evaluation uses, so boxes map back exactly.

Output modes (see export/README.md):
- `detections`: the graph returns boxes [B,K,4] (letterbox px), scores [B,K], classes [B,K];
  the host only thresholds.
- `heatmap`: the graph returns the peak-masked class heatmap [B,C,H/4,W/4] (non-peaks are 0),
  wh and offset [B,2,H/4,W/4] (in the order of the export's `layout`; decoded by name); the
  host takes the top-K here with the same tie rule as ONNX TopK (equal scores: lower flat index
  first), so both modes give identical detections.

The predict-on-files loop (`predict_files`) is the one both `run.sh predict` backends use: it
takes any `DetectionModel`, i.e. a callable `letterboxed uint8 batch [B,3,S,S] -> (boxes,
scores, classes)` with its class names and input size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from centerx_export import imaging
except ImportError:  # predictor.py and imaging.py copied side by side onto a device
    import imaging  # type: ignore[no-redef]

log = logging.getLogger("centerx_export.predictor")

METADATA_FORMAT = 1
REQUIRED_METADATA = ("mode", "class_names", "image_size")
PREDICTIONS_FORMAT = "centerx-predictions/1"
DEFAULT_FPS = 25.0  # written into an annotated video when the input declares no frame rate


class ModelError(ValueError):
    """The ONNX file is missing, unreadable, or not a centerx export."""


class NoReadableInputError(ValueError):
    """Prediction was asked for, but not one input image or video could be read."""


# ---------------------------------------------------------------------------------------------
# Host-side decoding for `heatmap` mode
# ---------------------------------------------------------------------------------------------


def topk_rows(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of [B,N], sorted by value descending; equal values by lower index first
    (the ONNX TopK rule, so host and graph top-K agree element for element)."""
    batch, count = values.shape
    k = min(k, count)
    scores = np.empty((batch, k), values.dtype)
    index = np.empty((batch, k), np.int64)
    for b in range(batch):
        row = values[b]
        positive = np.flatnonzero(row > 0)
        # A peak-masked map is mostly zeros: when k peaks exist, the top k are among them.
        candidates = positive if positive.size >= k else np.arange(count)
        sub = row[candidates]
        if sub.size > k:
            kth = sub[np.argpartition(sub, sub.size - k)[sub.size - k :]].min()
            above = candidates[sub > kth]
            ties = candidates[sub == kth][: k - above.size]  # ascending index: lowest first
            chosen = np.concatenate([above, ties])
        else:
            chosen = candidates
        chosen = chosen[np.lexsort((chosen, -row[chosen]))]
        scores[b], index[b] = row[chosen], chosen
    return scores, index


def decode_heatmap(
    heatmap: np.ndarray, wh: np.ndarray, offset: np.ndarray, k: int = 100, stride: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peak-masked probabilities [B,C,H,W], wh and offset [B,2,H,W] -> boxes [B,K,4] (input px),
    scores [B,K], classes [B,K]: the same arithmetic as centerx.model.decode.decode."""
    batch, _, height, width = heatmap.shape
    scores, flat = topk_rows(heatmap.reshape(batch, -1), k)
    area = height * width
    classes = flat // area
    cell = flat - classes * area
    ys = cell // width
    xs = cell - ys * width
    size = np.take_along_axis(wh.reshape(batch, 2, -1), cell[:, None, :], axis=2)
    shift = np.take_along_axis(offset.reshape(batch, 2, -1), cell[:, None, :], axis=2)
    cx = xs.astype(np.float32) + shift[:, 0]
    cy = ys.astype(np.float32) + shift[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1) * stride
    return boxes.astype(np.float32), scores.astype(np.float32), classes


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------


def parse_metadata(raw: dict[str, str]) -> dict:
    """ONNX metadata_props (strings) -> values: JSON where it parses, else the string."""
    parsed = {}
    for key, value in raw.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    import onnxruntime as ort  # here, not at the top: importing the kit loads no runtime

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxDetector:
    """A centerx ONNX export (either mode) as a predictor.

    `predict_letterboxed(images uint8 [B,3,S,S]) -> (boxes [B,K,4] letterbox px, scores [B,K],
    classes [B,K])` is the interface centerx's COCO evaluator takes; `predict(rgb_image)` does
    the letterbox and maps boxes back to the original image.
    """

    def __init__(
        self,
        path: str | Path,
        top_k: int = 100,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"ONNX model not found: {self.path}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(providers or default_providers())
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load ONNX model {self.path}: {err}") from err
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        missing = [key for key in REQUIRED_METADATA if key not in self.metadata]
        if missing:
            raise ModelError(
                f"{self.path} is not a centerx export: metadata lacks {missing} "
                "(export checkpoints with `run.sh export checkpoint=PATH`)"
            )
        self.mode: str = self.metadata["mode"]
        if self.mode not in ("detections", "heatmap"):
            raise ModelError(f"{self.path}: unknown output mode {self.mode!r} in its metadata")
        self.class_names: list[str] = list(self.metadata["class_names"])
        self.image_size: int = int(self.metadata["image_size"])
        self.stride: int = int(self.metadata.get("stride", 32))
        self.output_stride: int = int(self.metadata.get("output_stride", 4))
        self.top_k = int(top_k)
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape: list = list(model_input.shape)
        self.input_dtype = np.uint8 if model_input.type == "tensor(uint8)" else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __repr__(self) -> str:
        return (
            f"OnnxDetector({str(self.path)!r}, mode={self.mode}, size={self.image_size}, "
            f"classes={self.class_names}, input={np.dtype(self.input_dtype).name})"
        )

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(
                f"expected RGB images as an array [B,3,H,W], got shape {tuple(batch.shape)}"
            )
        for axis, name in ((2, "height"), (3, "width")):
            fixed = self.input_shape[axis]
            size = batch.shape[axis]
            if isinstance(fixed, int) and size != fixed:
                raise ValueError(
                    f"input {name} {size} differs from the exported {fixed} "
                    f"(letterbox to {self.image_size} first, or export with dynamic_hw=true)"
                )
            if size % self.stride:
                raise ValueError(f"input {name} {size} is not a multiple of {self.stride}")
            low, high = self.metadata.get("min_side"), self.metadata.get("max_side")
            if (low and size < low) or (high and size > high):
                raise ValueError(f"input {name} {size} is outside the exported range {low}..{high}")
        if self.input_dtype == np.uint8 and batch.dtype != np.uint8:
            batch = np.clip(np.rint(batch), 0, 255)
        return np.ascontiguousarray(batch, dtype=self.input_dtype)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The model's raw outputs by name."""
        outputs = self.session.run(None, {self.input_name: self._prepare(images)})
        return dict(zip(self.output_names, outputs, strict=True))

    def predict_letterboxed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Letterboxed RGB batch [B,3,H,W] (uint8 0..255) -> boxes [B,K,4] in those pixels,
        scores [B,K] (descending), classes [B,K] (int64)."""
        outputs = self.run(images)
        return self.decode(outputs)

    def decode(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs -> (boxes, scores, classes): the host-side post-processing of each mode."""
        if self.mode == "detections":
            k = min(self.top_k, outputs["scores"].shape[1])
            return (
                outputs["boxes"][:, :k].astype(np.float32, copy=False),
                outputs["scores"][:, :k].astype(np.float32, copy=False),
                outputs["classes"][:, :k].astype(np.int64, copy=False),
            )
        return decode_heatmap(
            outputs["heatmap"], outputs["wh"], outputs["offset"], self.top_k, self.output_stride
        )

    def predict(
        self, image: np.ndarray, score_threshold: float = 0.3
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One RGB uint8 image HxWx3 -> boxes [N,4] xyxy in its pixels, scores [N], classes [N]."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(
                f"expected an RGB uint8 image HxWx3, got {image.dtype} array of shape {image.shape}"
            )
        return detect(self.predict_letterboxed, image, self.image_size, score_threshold)

    def as_model(self) -> DetectionModel:
        """What `predict_files` takes (the PyTorch model is wrapped the same way)."""
        return DetectionModel(
            self.predict_letterboxed, self.class_names, self.image_size, str(self.path)
        )


# ---------------------------------------------------------------------------------------------
# Predicting on files: one loop for every backend (onnxruntime here, PyTorch in centerx)
# ---------------------------------------------------------------------------------------------

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [.., 4] xyxy, scores, classes
BatchPredictor = Callable[[np.ndarray], tuple]  # letterboxed uint8 [B,3,S,S] -> Detections [B,..]


@dataclass(frozen=True)
class DetectionModel:
    """What predicting on files needs from a backend."""

    predict: BatchPredictor  # boxes [B,K,4] in letterbox pixels, scores [B,K], classes [B,K]
    class_names: list[str]
    image_size: int  # the letterbox side S
    name: str  # the model file, recorded in predictions.json


def detect(
    predict: BatchPredictor, image: np.ndarray, image_size: int, score_threshold: float
) -> Detections:
    """One RGB uint8 image -> the detections above the threshold, boxes in its own pixels."""
    height, width = image.shape[:2]
    warped, matrix = imaging.letterbox(image, image_size)
    batch = np.ascontiguousarray(warped.transpose(2, 0, 1)[None])
    boxes, scores, classes = (np.asarray(a)[0] for a in predict(batch))
    keep = scores >= score_threshold
    return imaging.to_original(boxes[keep], matrix, width, height), scores[keep], classes[keep]


def image_record(
    path: str | Path,
    image: np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
    frame: int | None = None,
    timestamp: float | None = None,
) -> dict:
    """One entry of predictions.json "images": an image file, or one frame of a video."""
    boxes, scores, classes = detections
    record: dict = {"image": str(path)}
    if frame is not None:
        record |= {"frame": int(frame), "timestamp": timestamp}
    return record | {
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "detections": [
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(float(score), 4),
                "class": class_names[int(cls)],
                "class_id": int(cls),
            }
            for box, score, cls in zip(boxes, scores, classes, strict=True)
        ],
    }


def predictions_summary(
    model: DetectionModel,
    score_threshold: float,
    images: list[dict],
    videos: list[dict],
    skipped: list[dict],
    seconds: float,
) -> dict:
    """predictions.json: the same schema for every backend (export/README.md documents it)."""
    return {
        "format": PREDICTIONS_FORMAT,
        "model": model.name,
        "class_names": list(model.class_names),
        "image_size": int(model.image_size),
        "score_threshold": float(score_threshold),
        "images": images,
        "videos": videos,
        "skipped": skipped,
        "seconds": round(seconds, 3),
    }


def describe(summary: dict, out_dir: str | Path) -> str:
    """One line for the console: what was predicted, and where it went."""
    count = sum(len(item["detections"]) for item in summary["images"])
    frames = sum(video["frames"] for video in summary["videos"])
    files = len(summary["images"]) - frames
    parts = [f"{count} detections in {files} images"]
    if summary["videos"]:
        parts.append(f"{len(summary['videos'])} videos ({frames} frames)")
    if summary["skipped"]:
        parts.append(f"{len(summary['skipped'])} unreadable")
    return f"{', '.join(parts)} -> {out_dir}"


def _progress(items: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    """A tqdm progress bar where tqdm is installed (it is optional on a device), and only when
    stderr is a terminal: a log file would fill with its redraws."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    enabled = enabled and sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, disable=not enabled, leave=False)


def predict_video(
    model: DetectionModel,
    path: Path,
    out_dir: Path,
    score_threshold: float = 0.3,
    draw: bool = True,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Every frame of a video: (one record per frame, the video's entry); with `draw`, the
    annotated video `<stem>_pred<suffix>` in out_dir (same container, same frame rate)."""
    reader = imaging.VideoReader(path)
    info = reader.info
    output = out_dir / f"{path.stem}_pred{path.suffix.lower()}"
    writer = (
        imaging.VideoWriter(output, info.fps or DEFAULT_FPS, info.width, info.height)
        if draw
        else None
    )
    records = []
    try:
        for index, frame in _progress(reader, info.frame_count or None, path.name, progress):
            detections = detect(model.predict, frame, model.image_size, score_threshold)
            timestamp = round(index / info.fps, 3) if info.fps > 0 else None
            records.append(
                image_record(path, frame, detections, model.class_names, index, timestamp)
            )
            if writer is not None:
                writer.write(imaging.draw_detections(frame, *detections, model.class_names))
    finally:
        if writer is not None:
            writer.close()
    entry = {
        "video": str(path),
        "output": str(output) if draw else None,
        "frames": len(records),
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
    }
    return records, entry


def predict_files(
    model: DetectionModel,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = 0.3,
    draw: bool = True,
    progress: bool = True,
) -> dict:
    """Predict on images and videos (files, and folders searched recursively): predictions.json
    in out_dir, and with `draw` `<stem>_pred.png` per image and `<stem>_pred<suffix>` per video.
    Unreadable inputs are skipped, logged and listed under "skipped"; when none could be read,
    NoReadableInputError (after writing predictions.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = imaging.list_inputs(inputs, imaging.IMAGE_SUFFIXES | imaging.VIDEO_SUFFIXES)
    images, videos, skipped = [], [], []
    started = time.perf_counter()
    for path in _progress(paths, len(paths), "predict", progress and len(paths) > 1):
        try:
            if imaging.is_video(path):
                records, entry = predict_video(
                    model, path, out_dir, score_threshold, draw, progress
                )
                images += records
                videos.append(entry)
                continue
            image = imaging.read_image(path)
        except (imaging.ImageReadError, imaging.VideoError) as err:
            log.warning("skipping: %s", err)
            skipped.append({"image": str(path), "error": str(err)})
            continue
        detections = detect(model.predict, image, model.image_size, score_threshold)
        images.append(image_record(path, image, detections, model.class_names))
        if draw:
            imaging.save_rgb(
                out_dir / f"{path.stem}_pred.png",
                imaging.draw_detections(image, *detections, model.class_names),
            )
    seconds = time.perf_counter() - started
    summary = predictions_summary(model, score_threshold, images, videos, skipped, seconds)
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=1))
    if skipped and not images and not videos:
        first = skipped[0]["error"]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise NoReadableInputError(f"no input could be read: {first}{more}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Detect objects with a centerx ONNX model (numpy + OpenCV + onnxruntime)."
    )
    parser.add_argument("--model", required=True, help="model.onnx written by `run.sh export`")
    parser.add_argument("--input", required=True, nargs="+", help="images, videos and/or folders")
    parser.add_argument("--out", default="predictions", help="output folder")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    parser.add_argument("--providers", nargs="*", default=None, help="onnxruntime providers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        detector = OnnxDetector(args.model, top_k=args.top_k, providers=args.providers)
        summary = predict_files(
            detector.as_model(), args.input, args.out, args.score_threshold, not args.no_draw
        )
    except (ModelError, FileNotFoundError, ValueError, imaging.VideoError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(describe(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
