"""Run a centerx ONNX model with numpy, OpenCV and onnxruntime only (no torch, no centerx).

This file is self-contained: copy it next to `model.onnx` on a device and run

    python predictor.py --model model.onnx --input IMAGE_OR_FOLDER --out DIR --score-threshold 0.3

which writes `<stem>_pred.png` (detections drawn) and `predictions.json` (boxes in
original-image pixels). From Python:

    detector = OnnxDetector("model.onnx")
    boxes, scores, classes = detector.predict(rgb_image, score_threshold=0.3)

Everything the host needs is read from the model's metadata (written at export):
class names, input size and dtype, output mode, stride. The letterbox is the same
affine as training's evaluation transform (`centerx.data.transforms.letterbox_matrix`,
checked equal in tests/test_export.py), so boxes map back exactly.

Output modes (see export/README.md):
- `detections`: the graph returns boxes [B,K,4] (letterbox px), scores [B,K], classes [B,K];
  the host only thresholds.
- `heatmap`: the graph returns the peak-masked class heatmap [B,C,H/4,W/4] (non-peaks are 0),
  wh and offset [B,2,H/4,W/4]; the host takes the top-K here with the same tie rule as
  ONNX TopK (equal scores: lower flat index first), so both modes give identical detections.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("centerx_export.predictor")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
PAD_VALUE = 114  # letterbox border, as in training (centerx.data.transforms.warp_image)
METADATA_FORMAT = 1
REQUIRED_METADATA = ("mode", "class_names", "image_size")


class ImageReadError(RuntimeError):
    """An image file is missing, empty or cannot be decoded."""


class ModelError(ValueError):
    """The ONNX file is missing, unreadable, or not a centerx export."""


# ---------------------------------------------------------------------------------------------
# Images and geometry (identical to centerx.data.transforms / centerx.engine.evaluate)
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


def letterbox_matrix(width: int, height: int, out_size: int) -> np.ndarray:
    """2x3 affine: the whole image, centred, longer side fitted to out_size (no flip)."""
    center_x, center_y = width / 2, height / 2
    scale = out_size / max(width, height)
    return np.array(
        [
            [scale, 0.0, out_size / 2 - scale * center_x],
            [0.0, scale, out_size / 2 - scale * center_y],
        ],
        dtype=np.float64,
    )


def letterbox(image: np.ndarray, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB HxWx3 -> (letterboxed out_size x out_size x 3, the 2x3 matrix used)."""
    height, width = image.shape[:2]
    matrix = letterbox_matrix(width, height, out_size)
    warped = cv2.warpAffine(
        image,
        matrix,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    return warped, matrix


def to_original(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Letterbox-pixel xyxy boxes -> original-image pixels (inverse affine), clipped to the image."""
    inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 4, 2)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    out = np.concatenate([mapped.min(1), mapped.max(1)], axis=1).astype(np.float32)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


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
# Drawing (centerx.utils.visualize draws with these too)
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
) -> np.ndarray:
    """A copy of an RGB image with labelled boxes."""
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
    return canvas


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")


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
    import onnxruntime as ort  # here, not at the top: the drawing/file helpers need no runtime

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
        height, width = image.shape[:2]
        warped, matrix = letterbox(image, self.image_size)
        boxes, scores, classes = (
            a[0] for a in self.predict_letterboxed(warped.transpose(2, 0, 1)[None])
        )
        keep = scores >= score_threshold
        return to_original(boxes[keep], matrix, width, height), scores[keep], classes[keep]


# ---------------------------------------------------------------------------------------------
# Files (centerx.engine's prediction lists images with list_images) and the command line
# ---------------------------------------------------------------------------------------------


def list_images(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files and folders (searched recursively, sorted) -> image paths; clear error if none."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str | Path) else inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not paths:
        raise FileNotFoundError(
            f"no images found in {inputs} (looked for {sorted(IMAGE_SUFFIXES)})"
        )
    return paths


def predict_files(
    detector: OnnxDetector,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = 0.3,
    draw: bool = True,
) -> dict:
    """Predict on image files: `<stem>_pred.png` per image and predictions.json (boxes in
    original pixels) in out_dir. Unreadable files are skipped, logged and listed under "skipped"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    started = time.perf_counter()
    for path in list_images(inputs):
        try:
            image = read_image(path)
        except ImageReadError as err:
            log.warning("skipping: %s", err)
            skipped.append({"image": str(path), "error": str(err)})
            continue
        boxes, scores, classes = detector.predict(image, score_threshold)
        results.append(
            {
                "image": str(path),
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "detections": [
                    {
                        "box": [round(float(v), 2) for v in box],
                        "score": round(float(s), 4),
                        "class": detector.class_names[int(c)],
                    }
                    for box, s, c in zip(boxes, scores, classes, strict=True)
                ],
            }
        )
        if draw:
            save_rgb(
                out_dir / f"{path.stem}_pred.png",
                draw_detections(image, boxes, scores, classes, detector.class_names),
            )
    summary = {
        "model": str(detector.path),
        "mode": detector.mode,
        "score_threshold": score_threshold,
        "images": results,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Detect objects with a centerx ONNX model (numpy + OpenCV + onnxruntime)."
    )
    parser.add_argument("--model", required=True, help="model.onnx written by `run.sh export`")
    parser.add_argument("--input", required=True, nargs="+", help="image files and/or folders")
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
            detector, args.input, args.out, args.score_threshold, draw=not args.no_draw
        )
    except (ModelError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    count = sum(len(item["detections"]) for item in summary["images"])
    print(
        f"{count} detections in {len(summary['images'])} images "
        f"({len(summary['skipped'])} unreadable) -> {args.out}"
    )
    if not summary["images"]:
        print("error: no input image could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
