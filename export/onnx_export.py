"""Checkpoint -> ONNX with the post-processing in the graph (`run.sh export checkpoint=PATH`).

The exported graph takes RGB images 0..255 (uint8 or float32) [B,3,H,W] and normalises inside.
Two output modes, both built from `centerx.model.decode` (one implementation of the peak mask
and of the decode, shared with the PyTorch evaluator):

- `detections`: boxes [B,K,4] (input pixels, xyxy), scores [B,K], classes [B,K] (int64):
  sigmoid, exact 3x3 peak mask, TopK with a constant K, index split and gathers in the graph.
- `heatmap` (centerX-compatible): the peak-masked class probabilities [B,C,H/4,W/4] (non-peaks
  are exactly 0), wh [B,2,H/4,W/4] and offset [B,2,H/4,W/4] (output-grid units).

Exporter: torch.onnx.export with the default dynamo exporter (torch.export + onnxscript), at
opset 17 (the exporter emits 18 and converts down; 17 is what TensorRT 8.5/8.6 parse, and
TensorRT 10 reads it too). Then onnxslim, onnx.checker, one self-contained file
(external_data=False). Why each choice is safe for TensorRT 8 and 10 is in export/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from centerx.model.decode import decode, peak_mask

log = logging.getLogger(__name__)

OPSET = 17
MODES = ("detections", "heatmap")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
INPUT_MULTIPLE = 32  # the backbone stride: input height and width must be multiples of it
OUTPUT_NAMES = {
    "detections": ["boxes", "scores", "classes"],
    "heatmap": ["heatmap", "wh", "offset"],
}
POSTPROCESS_PREFIX = "postprocess/"
METADATA_FORMAT = 1
FLOAT_INDEX_LIMIT = 2**24  # the exporter splits flat indices with float Div+Floor: exact below this


class ExportError(ValueError):
    """An export option or input is invalid (unknown mode, bad size, ...)."""


# ---------------------------------------------------------------------------------------------
# The exported module
# ---------------------------------------------------------------------------------------------


def _cast_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: floating inputs take the dtype of the module's own weights."""
    own = next(
        t
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        if t.is_floating_point()
    )
    return tuple(
        a.to(own.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
    )


def half_precision(model: nn.Module) -> nn.Module:
    """A copy of a CenterNet whose layers run in FP16 while the input normalisation stays FP32.

    Every module holding weights casts its floating inputs to its own dtype, so the model's
    forward (whatever its stages and skips) runs unchanged: no copy of its code to drift."""
    half = copy.deepcopy(model).half()
    for name in ("input_mean", "input_std"):
        if hasattr(half, name):
            setattr(half, name, getattr(half, name).float())
    for module in half.modules():
        if module is half:
            continue
        own = [
            t
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
            if t.is_floating_point()
        ]
        if own:
            module.register_forward_pre_hook(_cast_to_own_dtype)
    return half


class ExportWrapper(nn.Module):
    """CenterNet + post-processing, the module that is exported.

    FP16 runs the network in half precision and the post-processing in FP32 (heads cast up
    before the sigmoid): outputs keep one dtype for both precisions, boxes keep FP32 accuracy,
    and the peak mask is exact in either precision anyway (tests/test_export.py)."""

    def __init__(
        self, model: nn.Module, mode: str = "detections", top_k: int = 100, fp16: bool = False
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ExportError(f"unknown export mode {mode!r}; choose one of {list(MODES)}")
        self.model = half_precision(model) if fp16 else model
        self.mode, self.top_k, self.fp16 = mode, int(top_k), fp16
        self.stride = int(getattr(model, "stride", 4))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        heatmap = outputs["heatmap"].float().sigmoid()
        wh, offset = outputs["wh"].float(), outputs["offset"].float()
        if self.mode == "heatmap":
            return peak_mask(heatmap), wh, offset
        return decode(heatmap, wh, offset, k=self.top_k, stride=self.stride)


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------


def check_options(
    mode: str, input_dtype: str, image_size: int | tuple[int, int], top_k: int, opset: int
) -> tuple[int, int]:
    """Validate export options with messages that say what to change; returns (height, width)."""
    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}; choose mode=detections or mode=heatmap")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(
            f"unknown input_dtype {input_dtype!r}; choose input_dtype=uint8 or input_dtype=float32"
        )
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0 or value % INPUT_MULTIPLE:
            raise ExportError(
                f"image_size {name} {value} is not a positive multiple of {INPUT_MULTIPLE} "
                f"(the backbone stride); use e.g. {max(1, round(value / INPUT_MULTIPLE)) * INPUT_MULTIPLE}"
            )
    if int(top_k) < 1:
        raise ExportError(f"top_k must be >= 1, got {top_k}")
    if int(opset) < 17:
        raise ExportError(
            f"opset {opset} is not supported: the exporter cannot go below 17 (use opset=17)"
        )
    return int(height), int(width)


def _tag_postprocess(proto: onnx.ModelProto) -> int:
    """Name every node downstream of the heatmap sigmoid `postprocess/...`: the part a TensorRT
    FP16 build must keep in FP32 (tensorrt.py passes these names to --layerPrecisions)."""
    nodes = list(proto.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    frontier = [i for i, n in enumerate(nodes) if n.op_type == "Sigmoid"]
    seen: set[int] = set()
    while frontier:
        i = frontier.pop()
        if i in seen:
            continue
        seen.add(i)
        for out in nodes[i].output:
            frontier.extend(consumers.get(out, []))
    for i in sorted(seen):
        nodes[i].name = f"{POSTPROCESS_PREFIX}{nodes[i].op_type}_{i}"
    return len(seen)


def graph_summary(proto: onnx.ModelProto) -> dict:
    """Op counts, inputs/outputs (shape and dtype), opset, and the TopK K values."""

    def spec(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim],
        }

    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    topk = [
        initializers[n.input[1]].ravel().tolist() if n.input[1] in initializers else "dynamic"
        for n in proto.graph.node
        if n.op_type == "TopK"
    ]
    return {
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
        "inputs": [spec(v) for v in proto.graph.input],
        "outputs": [spec(v) for v in proto.graph.output],
        "ops": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "topk_k": topk,
    }


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings; keep the run log readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [
            logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
        ]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | tuple[int, int],
    mode: str = "detections",
    top_k: int = 100,
    fp16: bool = False,
    input_dtype: str = "uint8",
    dynamic_hw: bool = False,
    opset: int = OPSET,
    metadata: dict[str, Any] | None = None,
    slim: bool = True,
) -> dict:
    """Export `model` (a CenterNet in eval mode) to one self-contained ONNX file.

    Dynamic batch always; dynamic height/width (multiples of 32) with `dynamic_hw`. Returns a
    summary (graph_summary + file size, sha256, seconds). `metadata` goes into metadata_props
    (non-string values as JSON) for the predictor."""
    height, width = check_options(mode, input_dtype, image_size, top_k, opset)
    num_classes = int(getattr(model, "num_classes", 1))
    if not dynamic_hw and (num_classes + 1) * (height // 4) * (width // 4) > FLOAT_INDEX_LIMIT:
        raise ExportError(
            f"{num_classes} classes at {height}x{width} exceed the exact index range of the "
            "exported top-K decode (2^24 cells); export a smaller image_size"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model.eval(), mode, top_k, fp16).eval()
    dtype = INPUT_DTYPES[input_dtype]
    # Batch 2 in the example: torch.export specialises sizes 0 and 1.
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, height, width), generator=generator).to(dtype)
    axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    min_side = max_side = 1
    if dynamic_hw:
        # K is a constant: the smallest input must still hold top_k cells (C * H/4 * W/4 >= K);
        # the largest must keep the float index split exact ((C+1) * H/4 * W/4 <= 2^24).
        min_side = max(1, math.ceil(math.sqrt(top_k / (64 * num_classes))))
        max_side = min(256, math.floor(math.sqrt(FLOAT_INDEX_LIMIT / (num_classes + 1)) / 8))
        if max_side < max(min_side, height // INPUT_MULTIPLE, width // INPUT_MULTIPLE):
            raise ExportError(f"{num_classes} classes leave no valid dynamic size range")
        axes[2] = INPUT_MULTIPLE * torch.export.Dim("height_32", min=min_side, max=max_side)
        axes[3] = INPUT_MULTIPLE * torch.export.Dim("width_32", min=min_side, max=max_side)
    started = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=["images"],
            output_names=OUTPUT_NAMES[mode],
            dynamic_shapes={"images": axes},
            verbose=False,
        )
    proto = program.model_proto
    if slim:
        import onnxslim

        with _quiet_exporter():
            proto = onnxslim.slim(proto)
    tagged = _tag_postprocess(proto)
    props = {
        "centerx_format": METADATA_FORMAT,
        "mode": mode,
        "image_size": height if height == width else [height, width],
        "input_dtype": input_dtype,
        "input_range": "0..255 RGB, normalised in the graph",
        "stride": INPUT_MULTIPLE,
        "output_stride": wrapper.stride,
        "top_k": top_k,
        "fp16": fp16,
        "dynamic_hw": dynamic_hw,
        "min_side": min_side * INPUT_MULTIPLE if dynamic_hw else None,
        "max_side": max_side * INPUT_MULTIPLE if dynamic_hw else None,
        "opset": opset,
        "outputs": OUTPUT_NAMES[mode],
        **(metadata or {}),
    }
    onnx.helper.set_model_props(
        proto,
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items() if v is not None},
    )
    proto.doc_string = f"centerx CenterNet, {mode} mode, post-processing in the graph"
    summary = graph_summary(proto)
    if summary["opset"] != opset:
        raise ExportError(
            f"the exporter produced opset {summary['opset']}, not the requested {opset}"
        )
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    data = path.read_bytes()
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "seconds": round(time.perf_counter() - started, 2),
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}, onnx {onnx.__version__}",
        "slimmed": slim,
        "postprocess_nodes": tagged,
        **summary,
    }


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int,
    mode: str = "detections",
    top_k: int = 100,
    input_dtype: str = "uint8",
    batch: int = 1,
    metadata: dict[str, Any] | None = None,
) -> dict:
    """The same wrapper as TorchScript (FP32, fixed shape [batch,3,S,S]) for libtorch users;
    metadata in the archive's extra file `centerx.json`.

    Traced from the torch.export program rather than from the module: tracing the module
    directly turns the model's shape arithmetic (stride bookkeeping of the skips) into tensors.
    A traced graph also fixes the batch size. TorchScript is deprecated in torch 2.13 but runs."""
    height, width = check_options(mode, input_dtype, image_size, top_k, OPSET)
    wrapper = ExportWrapper(model.eval(), mode, top_k).eval()
    example = torch.zeros(batch, 3, height, width, dtype=INPUT_DTYPES[input_dtype])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (example,))
        traced = torch.jit.trace(program.module(), (example,), check_trace=False)
        extra = {
            "centerx.json": json.dumps(
                {
                    "mode": mode,
                    "top_k": top_k,
                    "input_shape": list(example.shape),
                    **(metadata or {}),
                }
            )
        }
        torch.jit.save(traced, str(path), _extra_files=extra)
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "input_shape": list(example.shape),
    }


# ---------------------------------------------------------------------------------------------
# Parity: the exported model against PyTorch
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def torch_reference(
    model: nn.Module, images: np.ndarray, top_k: int = 100, scores: bool = False
) -> tuple:
    """PyTorch FP32 eager, as the evaluator: ((boxes, scores, classes), peak-masked heatmap)
    (+ the unmasked heatmap probabilities with scores=True)."""
    outputs = model.eval()(torch.as_tensor(images))
    heatmap = outputs["heatmap"].float().sigmoid()
    detections = decode(heatmap, outputs["wh"], outputs["offset"], k=top_k, stride=model.stride)
    result = (tuple(t.numpy() for t in detections), peak_mask(heatmap).numpy())
    return (*result, heatmap.numpy()) if scores else result


SCORE_REL_FLOOR = 0.01  # relative score errors are measured against max(score, this)


def compare_detections(
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    score_threshold: float = 0.0,
    band: float = 0.0,
    match_px: float = 0.5,
    reference_scores: np.ndarray | None = None,
    stride: int = 4,
) -> dict:
    """Match two predictors' detections per image as sets: same class and box within `match_px`
    (one to one, by descending reference score). Compared: detections with a score >= the
    threshold (and > 0). Box error is relative to max(|ref|, 1 px), score error to
    max(ref, 0.01): onnxruntime's sigmoid is accurate to ~1e-7 absolute, not relative, so a
    0.001 score may differ by 4e-4 relative (`max_score_rel_unfloored` reports that figure).

    Not counted as missing/extra:
    - `excused_near_ties`: detections within `band` of the threshold, or (full top-K lists)
      within `band` of the list's last score, where a near-tie may swap an element in or out;
    - `near_tie_flips` (given the reference's unmasked heatmap [B,C,H,W]): detections at a cell
      (floor of the box centre / stride) whose reference score is within `band` of one of its 8
      neighbours: where two cells tie within the precision (FP16 rounds scores ~1e-3 apart to
      one value), the peak may legitimately sit on either, or on both."""
    ref_boxes, ref_scores, ref_classes = (np.asarray(a) for a in reference)
    test_boxes, test_scores, test_classes = (np.asarray(a) for a in test)
    figures: Counter = Counter()
    box_abs, box_rel, score_abs, score_rel, score_rel_raw = [0.0], [0.0], [0.0], [0.0], [0.0]
    tied = near_ties(reference_scores, band) if reference_scores is not None else None

    def selected(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = (scores >= score_threshold) & (scores > 0)
        edge = np.zeros_like(keep)
        if score_threshold > 0:
            edge |= np.abs(scores - score_threshold) <= band
        if scores.size and scores.min() > 0:  # a full list: its tail may swap on near-ties
            edge |= scores <= scores.min() + band
        return np.flatnonzero(keep), edge

    def flipped(b: int, box: np.ndarray, cls: int) -> bool:
        if tied is None:
            return False
        height, width = tied.shape[2:]
        x = int(np.clip(np.floor((box[0] + box[2]) / 2 / stride), 0, width - 1))
        y = int(np.clip(np.floor((box[1] + box[3]) / 2 / stride), 0, height - 1))
        return bool(tied[b, int(cls), y, x])

    for b in range(ref_scores.shape[0]):
        r_idx, r_edge = selected(ref_scores[b])
        t_idx, t_edge = selected(test_scores[b])
        figures["reference"] += r_idx.size
        figures["test"] += t_idx.size
        distance = np.abs(ref_boxes[b][r_idx, None, :] - test_boxes[b][None, t_idx, :]).max(-1)
        distance[ref_classes[b][r_idx, None] != test_classes[b][None, t_idx]] = np.inf
        used = np.zeros(t_idx.size, bool)
        for row, i in enumerate(r_idx):
            candidates = np.where(used, np.inf, distance[row])
            col = int(np.argmin(candidates)) if candidates.size else -1
            if col < 0 or candidates[col] > match_px:
                if r_edge[i]:
                    figures["excused"] += 1
                elif flipped(b, ref_boxes[b][i], ref_classes[b][i]):
                    figures["flips"] += 1
                else:
                    figures["missing"] += 1
                continue
            used[col] = True
            j = t_idx[col]
            figures["matched"] += 1
            diff = np.abs(ref_boxes[b][i] - test_boxes[b][j])
            box_abs.append(float(diff.max()))
            box_rel.append(float((diff / np.maximum(np.abs(ref_boxes[b][i]), 1.0)).max()))
            delta = abs(float(ref_scores[b][i]) - float(test_scores[b][j]))
            score_abs.append(delta)
            score_rel.append(delta / max(float(ref_scores[b][i]), SCORE_REL_FLOOR))
            score_rel_raw.append(delta / float(ref_scores[b][i]))
        for j in t_idx[~used]:
            if t_edge[j]:
                figures["excused"] += 1
            elif flipped(b, test_boxes[b][j], test_classes[b][j]):
                figures["flips"] += 1
            else:
                figures["extra"] += 1
    return {
        "images": int(ref_scores.shape[0]),
        "reference": figures["reference"],
        "test": figures["test"],
        "matched": figures["matched"],
        "missing": figures["missing"],
        "extra": figures["extra"],
        "excused_near_ties": figures["excused"],
        "near_tie_flips": figures["flips"],
        "max_box_abs_px": max(box_abs),
        "max_box_rel": max(box_rel),
        "max_score_abs": max(score_abs),
        "max_score_rel": max(score_rel),
        "max_score_rel_unfloored": max(score_rel_raw),
    }


def near_ties(scores: np.ndarray, tie: float) -> np.ndarray:
    """Cells of [B,C,H,W] whose score is within `tie` of the best of their 8 neighbours."""
    padded = np.pad(scores, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    height, width = scores.shape[2:]
    neighbours = np.full(scores.shape, -np.inf, scores.dtype)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                window = padded[:, :, dy : dy + height, dx : dx + width]
                neighbours = np.maximum(neighbours, window)
    return np.abs(scores - neighbours) <= tie


def compare_peaks(
    reference: np.ndarray,
    test: np.ndarray,
    score_threshold: float = 0.0,
    band: float = 0.0,
    reference_scores: np.ndarray | None = None,
) -> dict:
    """Peak-masked heatmaps [B,C,H,W]: do the same cells (class and position) hold a peak
    (value > threshold)? Not counted as mismatches: cells within `band` of the threshold and,
    given the unmasked reference scores, cells within `band` of a neighbour (near-tie flips)."""
    ref_on, test_on = reference > score_threshold, test > score_threshold
    differ = ref_on != test_on
    excused = np.zeros_like(differ)
    if band > 0:
        excused |= (np.abs(reference - score_threshold) <= band) | (
            np.abs(test - score_threshold) <= band
        )
        if reference_scores is not None:
            excused |= near_ties(reference_scores, band)
    both = ref_on & test_on
    delta = np.abs(reference - test)[both]
    return {
        "reference_peaks": int(ref_on.sum()),
        "test_peaks": int(test_on.sum()),
        "mismatched_cells": int((differ & ~excused).sum()),
        "near_tie_flips": int((differ & excused).sum()),
        "max_score_abs": float(delta.max()) if delta.size else 0.0,
        "max_score_rel": float((delta / np.maximum(reference[both], SCORE_REL_FLOOR)).max())
        if delta.size
        else 0.0,
    }


FP32_TOLERANCE = 1e-4  # boxes and scores, relative
FP16_SCORE_TOLERANCE = 1e-2  # absolute, above the threshold
FP16_BAND = 1e-2  # detections this close to the threshold may fall on either side in FP16


def compare_fp16(
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    score_threshold: float,
    reference_scores: np.ndarray | None = None,
    stride: int = 4,
) -> dict:
    """FP16 against FP32: detections above the threshold as sets (same class, box within 2 px,
    i.e. the same cell); a peak may differ only at FP32 near-ties (within FP16_BAND)."""
    return compare_detections(
        reference,
        test,
        score_threshold=score_threshold,
        band=FP16_BAND,
        match_px=2.0,
        reference_scores=reference_scores,
        stride=stride,
    )


def fp16_passed(figures: dict, max_flip_fraction: float = 0.02) -> bool:
    return (
        figures["missing"] == 0
        and figures["extra"] == 0
        and figures["near_tie_flips"] <= max_flip_fraction * max(figures["reference"], 1)
        and figures["max_score_abs"] <= FP16_SCORE_TOLERANCE
    )


def verify_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    images: np.ndarray,
    *,
    top_k: int = 100,
    score_threshold: float = 0.3,
) -> dict:
    """Parity of an exported model (either mode, FP32 or FP16) with PyTorch FP32 eager on the
    same letterboxed images [N,3,S,S] uint8; `passed` applies the criteria of the issue:
    FP32: same detections (positions, classes) and scores/boxes within 1e-4 relative;
    FP16: detections above the threshold match as sets, scores within 1e-2."""
    from centerx_export.predictor import OnnxDetector

    detector = OnnxDetector(onnx_path, top_k=top_k, providers=["CPUExecutionProvider"])
    fp16 = bool(detector.metadata.get("fp16", False))
    ref_dets, ref_peaks, ref_scores = torch_reference(model, images, top_k, scores=True)
    raw = detector.run(images)
    test_dets = detector.decode(raw)
    result: dict[str, Any] = {
        "images": int(images.shape[0]),
        "image_size": list(images.shape[2:]),
        "precision": "fp16" if fp16 else "fp32",
        "mode": detector.mode,
        "runtime": "onnxruntime CPUExecutionProvider",
    }
    if not fp16:
        dets = compare_detections(ref_dets, test_dets, band=1e-5)
        result["detections_top_k"] = dets
        passed = (
            dets["missing"] == 0
            and dets["extra"] == 0
            and dets["max_box_rel"] <= FP32_TOLERANCE
            and dets["max_score_rel"] <= FP32_TOLERANCE
        )
        if detector.mode == "heatmap":
            peaks = compare_peaks(ref_peaks, raw["heatmap"])
            result["peaks_all"] = peaks
            passed &= peaks["mismatched_cells"] == 0 and peaks["max_score_rel"] <= FP32_TOLERANCE
    else:
        dets = compare_fp16(ref_dets, test_dets, score_threshold, ref_scores, model.stride)
        result["score_threshold"] = score_threshold
        result["detections_above_threshold"] = dets
        passed = fp16_passed(dets)
        if detector.mode == "heatmap":
            peaks = compare_peaks(
                ref_peaks, raw["heatmap"], score_threshold, FP16_BAND, reference_scores=ref_scores
            )
            result["peaks_above_threshold"] = peaks
            passed &= peaks["mismatched_cells"] == 0
    result["passed"] = bool(passed)
    return result


@torch.no_grad()
def verify_torchscript(
    model: nn.Module, path: str | Path, images: np.ndarray, *, mode: str, top_k: int = 100
) -> dict:
    """Parity of a batch-1 TorchScript file with PyTorch eager (FP32 criteria), image by image."""
    from centerx_export.predictor import decode_heatmap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.load(str(path))
    per_image = [
        [t.numpy() for t in traced(torch.as_tensor(images[i : i + 1]))] for i in range(len(images))
    ]
    outputs = [np.concatenate(parts) for parts in zip(*per_image, strict=True)]
    if mode == "heatmap":
        outputs = decode_heatmap(*outputs, k=top_k, stride=int(getattr(model, "stride", 4)))
    reference, _ = torch_reference(model, images, top_k)
    dets = compare_detections(reference, tuple(outputs), band=1e-5)
    passed = (
        dets["missing"] == 0
        and dets["extra"] == 0
        and dets["max_box_rel"] <= FP32_TOLERANCE
        and dets["max_score_rel"] <= FP32_TOLERANCE
    )
    return {"detections_top_k": dets, "passed": bool(passed)}


def sample_images(data_cfg: dict | None, image_size: int, count: int) -> tuple[np.ndarray, str]:
    """Letterboxed uint8 images [N,3,S,S] from the checkpoint's validation data (what the
    evaluator sees); random images when that data cannot be built here."""
    if data_cfg and count > 0:
        try:
            from centerx.data.transforms import letterbox_matrix, warp_image
            from centerx.engine.build import build_sources

            _, val = build_sources(OmegaConf.create(data_cfg))
            batch = []
            for index in range(min(count, len(val))):
                image = val.load_image(index)
                matrix = letterbox_matrix(image.shape[1], image.shape[0], image_size)
                batch.append(warp_image(image, matrix, image_size).transpose(2, 0, 1))
            return np.ascontiguousarray(np.stack(batch)), f"validation data ({len(batch)} images)"
        except Exception as err:  # any data problem: fall back rather than fail the export
            log.warning(
                "cannot load validation images for the parity check (%s); using random", err
            )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(count, 1), 3, image_size, image_size), dtype=np.uint8)
    return images, f"random images ({len(images)})"


# ---------------------------------------------------------------------------------------------
# The `export` subcommand
# ---------------------------------------------------------------------------------------------


def export_task(cfg: DictConfig) -> dict:
    """conf/export.yaml: checkpoint -> out_dir/model.onnx (+ model.torchscript.pt) + export.json."""
    from centerx.engine.build import model_from_checkpoint, run_dir

    if not cfg.get("checkpoint"):
        raise ExportError("say which checkpoint to export: checkpoint=PATH.pt")
    mode, input_dtype = str(cfg.mode), str(cfg.input_dtype)
    top_k, opset = int(cfg.top_k), int(cfg.opset)
    check_options(mode, input_dtype, int(cfg.image_size or 32), top_k, opset)  # before loading
    model, state = model_from_checkpoint(cfg.checkpoint)
    image_size = int(cfg.image_size or state["image_size"])
    check_options(mode, input_dtype, image_size, top_k, opset)
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else run_dir()
    config = state.get("config") or {}
    metadata = {
        "class_names": list(state["class_names"]),
        "config": {"data": config.get("data")},
        "model_config": state.get("model_config"),
        "checkpoint": str(cfg.checkpoint),
        "epoch": state.get("epoch"),
    }
    report: dict[str, Any] = {
        "checkpoint": str(cfg.checkpoint),
        "options": OmegaConf.to_container(cfg, resolve=True),
        "class_names": metadata["class_names"],
    }
    onnx_path = out_dir / "model.onnx"
    report["onnx"] = export_onnx(
        model,
        onnx_path,
        image_size=image_size,
        mode=mode,
        top_k=top_k,
        fp16=bool(cfg.fp16),
        input_dtype=input_dtype,
        dynamic_hw=bool(cfg.dynamic_hw),
        opset=opset,
        metadata=metadata,
    )
    log.info("wrote %s (%.1f MB)", onnx_path, report["onnx"]["bytes"] / 1e6)
    if cfg.verify:
        images, where = sample_images(config.get("data"), image_size, int(cfg.verify_images))
        parity = verify_onnx(
            model, onnx_path, images, top_k=top_k, score_threshold=float(cfg.score_threshold)
        )
        parity["inputs"] = where
        report["parity"] = parity
        (log.info if parity["passed"] else log.error)(
            "parity with PyTorch (%s, %s): %s", parity["precision"], where, _parity_line(parity)
        )
    if cfg.torchscript:
        report["torchscript"] = export_torchscript(
            model,
            out_dir / "model.torchscript.pt",
            image_size=image_size,
            mode=mode,
            top_k=top_k,
            input_dtype=input_dtype,
            metadata={"class_names": metadata["class_names"], "image_size": image_size},
        )
        if cfg.verify:
            report["torchscript"]["parity"] = verify_torchscript(
                model, report["torchscript"]["path"], images, mode=mode, top_k=top_k
            )
    (out_dir / "export.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"exported {onnx_path} ({mode}, {'fp16' if cfg.fp16 else 'fp32'}, {input_dtype} input)")
    if "parity" in report:
        print(f"parity vs PyTorch: {_parity_line(report['parity'])}")
    return {
        "onnx": str(onnx_path),
        "parity_passed": report.get("parity", {}).get("passed"),
        "run_dir": str(out_dir),
    }


def _parity_line(parity: dict) -> str:
    dets = parity.get("detections_top_k") or parity.get("detections_above_threshold") or {}
    return (
        f"{'PASSED' if parity['passed'] else 'FAILED'}: matched {dets.get('matched')}/"
        f"{dets.get('reference')}, missing {dets.get('missing')}, extra {dets.get('extra')}, "
        f"max box rel {dets.get('max_box_rel', 0):.2e}, max score abs {dets.get('max_score_abs', 0):.2e}"
    )
