"""Parity of an exported model with PyTorch: what "the same detections" means, measured.

FP32: the same detections (positions, classes), scores and boxes within 1e-4 relative.
FP16: detections above a threshold match as sets, scores within 1e-2; near-ties (two cells
within the FP16 rounding of each other) may put a peak on either cell and are counted apart.
export/README.md ("Parity") gives the reasons for each rule.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from centerx.model.decode import decode, peak_mask
from centerx_export.predictor import OnnxDetector, decode_heatmap


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


@dataclass
class _Tally:
    """Counts and worst errors of a detection comparison, accumulated image by image."""

    counts: Counter = field(default_factory=Counter)
    box_abs: list[float] = field(default_factory=lambda: [0.0])
    box_rel: list[float] = field(default_factory=lambda: [0.0])
    score_abs: list[float] = field(default_factory=lambda: [0.0])
    score_rel: list[float] = field(default_factory=lambda: [0.0])
    score_rel_raw: list[float] = field(default_factory=lambda: [0.0])

    def matched(self, ref_box, test_box, ref_score: float, test_score: float) -> None:
        self.counts["matched"] += 1
        diff = np.abs(ref_box - test_box)
        self.box_abs.append(float(diff.max()))
        self.box_rel.append(float((diff / np.maximum(np.abs(ref_box), 1.0)).max()))
        delta = abs(ref_score - test_score)
        self.score_abs.append(delta)
        self.score_rel.append(delta / max(ref_score, SCORE_REL_FLOOR))
        self.score_rel_raw.append(delta / ref_score)

    def figures(self, images: int) -> dict:
        counts = self.counts
        return {
            "images": images,
            "reference": counts["reference"],
            "test": counts["test"],
            "matched": counts["matched"],
            "missing": counts["missing"],
            "extra": counts["extra"],
            "excused_near_ties": counts["excused"],
            "near_tie_flips": counts["flips"],
            "max_box_abs_px": max(self.box_abs),
            "max_box_rel": max(self.box_rel),
            "max_score_abs": max(self.score_abs),
            "max_score_rel": max(self.score_rel),
            "max_score_rel_unfloored": max(self.score_rel_raw),
        }


def _selected(scores: np.ndarray, threshold: float, band: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices compared (score >= threshold and > 0), and which detections sit on an edge where a
    near-tie may swap them in or out: near the threshold, or the tail of a full top-K list."""
    keep = (scores >= threshold) & (scores > 0)
    edge = np.zeros_like(keep)
    if threshold > 0:
        edge |= np.abs(scores - threshold) <= band
    if scores.size and scores.min() > 0:
        edge |= scores <= scores.min() + band
    return np.flatnonzero(keep), edge


def _on_tied_cell(tied: np.ndarray | None, box: np.ndarray, cls: int, stride: int) -> bool:
    """Does the box centre's cell tie (within the band) with a neighbour in the reference?"""
    if tied is None:
        return False
    height, width = tied.shape[1:]
    x = int(np.clip(np.floor((box[0] + box[2]) / 2 / stride), 0, width - 1))
    y = int(np.clip(np.floor((box[1] + box[3]) / 2 / stride), 0, height - 1))
    return bool(tied[int(cls), y, x])


def _unmatched(tally: _Tally, on_edge: bool, on_tie: bool, otherwise: str) -> None:
    tally.counts["excused" if on_edge else "flips" if on_tie else otherwise] += 1


@dataclass(frozen=True)
class _MatchRules:
    score_threshold: float
    band: float
    match_px: float
    stride: int


def _compare_image(
    tally: _Tally, ref: tuple, test: tuple, tied: np.ndarray | None, rules: _MatchRules
) -> None:
    """Greedy one-to-one matching of one image's detections (reference order: descending score)."""
    (ref_boxes, ref_scores, ref_classes), (test_boxes, test_scores, test_classes) = ref, test
    r_idx, r_edge = _selected(ref_scores, rules.score_threshold, rules.band)
    t_idx, t_edge = _selected(test_scores, rules.score_threshold, rules.band)
    tally.counts["reference"] += r_idx.size
    tally.counts["test"] += t_idx.size
    distance = np.abs(ref_boxes[r_idx, None, :] - test_boxes[None, t_idx, :]).max(-1)
    distance[ref_classes[r_idx, None] != test_classes[None, t_idx]] = np.inf
    used = np.zeros(t_idx.size, bool)
    stride = rules.stride
    for row, i in enumerate(r_idx):
        candidates = np.where(used, np.inf, distance[row])
        col = int(np.argmin(candidates)) if candidates.size else -1
        if col < 0 or candidates[col] > rules.match_px:
            tied_here = _on_tied_cell(tied, ref_boxes[i], ref_classes[i], stride)
            _unmatched(tally, bool(r_edge[i]), tied_here, "missing")
            continue
        used[col] = True
        j = t_idx[col]
        tally.matched(ref_boxes[i], test_boxes[j], float(ref_scores[i]), float(test_scores[j]))
    for j in t_idx[~used]:
        tied_here = _on_tied_cell(tied, test_boxes[j], test_classes[j], stride)
        _unmatched(tally, bool(t_edge[j]), tied_here, "extra")


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
    reference = tuple(np.asarray(a) for a in reference)
    test = tuple(np.asarray(a) for a in test)
    tied = near_ties(reference_scores, band) if reference_scores is not None else None
    rules = _MatchRules(score_threshold, band, match_px, stride)
    tally = _Tally()
    images = reference[1].shape[0]
    for b in range(images):
        _compare_image(
            tally,
            tuple(a[b] for a in reference),
            tuple(a[b] for a in test),
            None if tied is None else tied[b],
            rules,
        )
    return tally.figures(int(images))


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


def fp32_passed(figures: dict) -> bool:
    return (
        figures["missing"] == 0
        and figures["extra"] == 0
        and figures["max_box_rel"] <= FP32_TOLERANCE
        and figures["max_score_rel"] <= FP32_TOLERANCE
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
        passed = fp32_passed(dets)
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
    model: nn.Module, path: str | Path, images: np.ndarray, *, names: list[str], top_k: int = 100
) -> dict:
    """Parity of a batch-1 TorchScript file (outputs `names`, in order) with PyTorch eager (FP32
    criteria), image by image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.load(str(path))
    per_image = [
        [t.numpy() for t in traced(torch.as_tensor(images[i : i + 1]))] for i in range(len(images))
    ]
    outputs = dict(
        zip(names, (np.concatenate(parts) for parts in zip(*per_image, strict=True)), strict=True)
    )
    if "heatmap" in outputs:
        stride = int(getattr(model, "stride", 4))
        test = decode_heatmap(outputs["heatmap"], outputs["wh"], outputs["offset"], top_k, stride)
    else:
        test = (outputs["boxes"], outputs["scores"], outputs["classes"])
    reference, _ = torch_reference(model, images, top_k)
    dets = compare_detections(reference, test, band=1e-5)
    return {"detections_top_k": dets, "passed": fp32_passed(dets)}
