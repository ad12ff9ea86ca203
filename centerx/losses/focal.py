"""CenterNet's penalty-reduced focal loss on Gaussian heatmaps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    negative_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over pixels of

        pos (target == 1):  -(1 - p)^alpha * log(p)
        neg (elsewhere):    -(1 - target)^beta * p^alpha * log(1 - p)

    divided by the number of positives (by 1 when there are none).

    logits, target: [B,C,H,W]. log(p) and log(1-p) come from logsigmoid, so the loss stays
    finite for any logit (no 1e-4 clamp needed). `negative_weight` [B,C] (or broadcastable)
    scales the negative term per class: 0 switches negatives off for classes a sample's source
    does not label (the ignore-unlabelled baseline).
    """
    logits = logits.float()
    prob = torch.sigmoid(logits)
    positive = target.eq(1).float()
    pos_term = (1 - prob).pow(alpha) * F.logsigmoid(logits) * positive
    neg_term = (1 - target).pow(beta) * prob.pow(alpha) * F.logsigmoid(-logits) * (1 - positive)
    if negative_weight is not None:
        neg_term = neg_term * negative_weight.reshape(*negative_weight.shape[:2], 1, 1).to(neg_term)
    num_pos = positive.sum().clamp(min=1.0)
    return -(pos_term.sum() + neg_term.sum()) / num_pos
