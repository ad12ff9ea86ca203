"""Detections from CenterNet outputs: 3x3 max-pool peaks, top-K, no NMS.

Written with ops that export cleanly to ONNX and TensorRT 8/10: the peak mask is
an exact equality test (no epsilon arithmetic), the index split uses integer
division and subtraction (TensorRT 8 has no Mod), and K is a Python constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def peak_mask(scores: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Keep a score iff it equals the max of its kxk neighbourhood; zero elsewhere.

    Exact in FP32 and FP16: max-pool returns one of its inputs bit for bit, so
    equality holds exactly at peaks (plateaus keep every tied cell, as CenterNet does).
    """
    pooled = F.max_pool2d(scores, kernel, stride=1, padding=(kernel - 1) // 2)
    return torch.where(pooled == scores, scores, torch.zeros_like(scores))


def topk_peaks(
    scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K over classes and positions of peak-masked scores [B,C,H,W].

    Returns scores [B,K], classes [B,K], ys [B,K], xs [B,K] (integer cells).
    """
    batch, _, height, width = scores.shape
    k = min(k, scores.shape[1] * height * width)
    top_scores, flat = torch.topk(scores.reshape(batch, -1), k)
    area = height * width
    classes = torch.div(flat, area, rounding_mode="floor")
    cell = flat - classes * area
    ys = torch.div(cell, width, rounding_mode="floor")
    xs = cell - ys * width
    return top_scores, classes, ys, xs


def gather_cells(feature: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """feature [B,D,H,W], flat cell index [B,K] -> [B,K,D]."""
    batch, depth = feature.shape[:2]
    flat = feature.reshape(batch, depth, -1)
    return torch.gather(flat, 2, index.unsqueeze(1).expand(batch, depth, index.shape[1])).transpose(
        1, 2
    )


def decode(
    heatmap: torch.Tensor,
    wh: torch.Tensor,
    offset: torch.Tensor,
    k: int = 100,
    stride: int = 4,
    scores_are_peaks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """heatmap: probabilities [B,C,H,W] (sigmoid applied). Returns boxes [B,K,4] xyxy in
    input pixels, scores [B,K], classes [B,K] (int64)."""
    peaks = heatmap if scores_are_peaks else peak_mask(heatmap)
    scores, classes, ys, xs = topk_peaks(peaks, k)
    width = heatmap.shape[3]
    cell = ys * width + xs
    size = gather_cells(wh, cell)
    shift = gather_cells(offset, cell)
    cx = xs.to(wh.dtype) + shift[..., 0]
    cy = ys.to(wh.dtype) + shift[..., 1]
    half_w, half_h = size[..., 0] / 2, size[..., 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1) * stride
    return boxes, scores, classes


def flip_merge(
    outputs: dict[str, torch.Tensor], flipped: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Flip test-time augmentation: average probabilities and sizes with the mirrored pass.

    Offsets are not mirror-symmetric, so they come from the plain pass only (as in CenterNet).
    Expects `heatmap` already as probabilities.
    """
    return {
        "heatmap": (outputs["heatmap"] + flipped["heatmap"].flip(3)) / 2,
        "wh": (outputs["wh"] + flipped["wh"].flip(3)) / 2,
        "offset": outputs["offset"],
    }
