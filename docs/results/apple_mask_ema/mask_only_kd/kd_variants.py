"""Heatmap-KD variants measured in this folder and not adopted (not part of centerx).

Used as `objective.heatmap_loss._target_=kd_variants.NAME` with this folder on PYTHONPATH.
"""

import torch

from centerx.losses.distill import heatmap_kd_focal, teacher_peak_mass


def logit_shift_1_4(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The focal KD towards the teacher's probabilities shifted up by +1.4 in logit space
    (a face at 0.33 becomes 0.67, a background cell at 0.005 becomes 0.02): the same ranking,
    a stronger pull at faint peaks."""
    target = torch.sigmoid(torch.logit(teacher_probs.clamp(1e-6, 1 - 1e-6)) + 1.4)
    return heatmap_kd_focal(student_logits, target)


def peak_sqrt(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The focal KD towards the teacher's map with each detection's height m (its 7x7 local
    maximum, when >= 0.1) raised to sqrt(m) and its shape kept (q * m^-0.5): a face at 0.33
    becomes 0.57, a sure one at 0.81 becomes 0.9, the background (local maxima below 0.1)
    stays as it is. The ranking between detections is kept."""
    local_max = torch.nn.functional.max_pool2d(teacher_probs, 7, stride=1, padding=3)
    scale = torch.where(local_max >= 0.1, local_max.clamp(min=1e-6).rsqrt(), 1.0)
    return heatmap_kd_focal(student_logits, (teacher_probs * scale).clamp(max=1.0))


def relative_pull(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The focal KD with the same fixed point (p = q) and a pull measured relative to the
    teacher's detection: where the student is below the teacher near a detection of height
    m >= 0.1 (its 7x7 local maximum), the focal factor is (|q - p| / m)^2 instead of
    |q - p|^2, so a missed faint face (q = 0.33, p ~ 0) pulls with weight ~1, as a
    ground-truth centre does in CenterNet's focal loss, not 0.11. Background cells and cells
    where the student is above the teacher keep |q - p|^2."""
    logits = student_logits.float()
    target = teacher_probs.detach().float()
    prob = torch.sigmoid(logits)
    local_max = torch.nn.functional.max_pool2d(target, 7, stride=1, padding=3)
    below = (prob < target) & (local_max >= 0.1)
    scale = torch.where(below, local_max, torch.ones_like(local_max))
    focal = ((target - prob).abs() / scale).pow(2)
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, reduction="none"
    )
    return (focal * cross_entropy).sum() / teacher_peak_mass(target)
