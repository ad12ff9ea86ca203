"""Heatmap-KD variants measured in this folder and not adopted (not part of centerx).

Used as `objective.heatmap_loss._target_=kd_variants.NAME` with this folder on PYTHONPATH.
"""

import torch

from centerx.losses.distill import heatmap_kd_focal


def logit_shift_1_4(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The focal KD towards the teacher's probabilities shifted up by +1.4 in logit space
    (a face at 0.33 becomes 0.67, a background cell at 0.005 becomes 0.02): the same ranking,
    a stronger pull at faint peaks."""
    target = torch.sigmoid(torch.logit(teacher_probs.clamp(1e-6, 1 - 1e-6)) + 1.4)
    return heatmap_kd_focal(student_logits, target)
