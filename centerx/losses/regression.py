"""L1 losses on box size and centre offset, read at the object centres only."""

from __future__ import annotations

import torch

from centerx.model.decode import gather_cells


def masked_l1(
    prediction: torch.Tensor,
    index: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    relative: bool = False,
) -> torch.Tensor:
    """Mean L1 over real objects. prediction [B,2,H,W]; index/mask [B,M]; target [B,M,2].

    `relative=True` divides each error by the target size, so a 2-cell error counts the
    same on a 4-cell box as 10 on a 20-cell box (large boxes no longer dominate).
    """
    picked = gather_cells(prediction, index)
    error = (picked - target).abs()
    if relative:
        error = error / target.clamp(min=1.0)
    weight = mask.unsqueeze(-1).expand_as(error)
    return (error * weight).sum() / (weight.sum() + 1e-4)
