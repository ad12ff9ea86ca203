"""Knowledge-distillation losses between a student CenterNet and a frozen teacher.

Pure functions on tensors; the channel bookkeeping (which student class a teacher
owns, under which name) lives in `centerx.engine.distill`. Every function here
expects the *owned* channels already gathered, student and teacher in the same order.

Heatmap: MSE between probabilities (sigmoid), not logits, and not focal loss or BCE.
    * The teacher's heatmap is a soft target (peaks of 0.6, Gaussian shoulders, a
      background near 0). The focal loss needs exact 1s to find its positives and a
      soft map has almost none. BCE towards soft targets bottoms out at the teacher's
      entropy, not at 0, so its value does not measure the gap; the fixed-magnitude
      weighter divides each term by its value, and a constant floor would make it
      scale the real signal by an arbitrary amount. MSE is 0 exactly when they agree
      (a student identical to its teacher scores exactly zero).
    * Probabilities are what decoding reads. On logits, MSE would make the student
      copy arbitrarily negative background logits (-12 against -9: no visible
      difference, yet a large loss that would dominate the term); on probabilities
      the background where both are ~0 costs ~0 and the gradient w.r.t. the logit,
      2 (p - q) p (1 - p), is tiny there, so the ~99 % background pixels do not swamp
      the few that matter (objects, and false positives of either net).
    * It is bounded (<= 1 per pixel), so one confident disagreement cannot blow up a step.

wh and offset: L1 at every pixel, weighted by the teacher's peak-masked heatmap.
    * A teacher's wh/offset outputs mean something only at its own object centres:
      the supervised loss trains them at ground-truth centres only, so everywhere
      else they are unconstrained garbage. Copying them densely would teach noise.
    * The weight is the teacher's heatmap kept only at its 3x3 local maxima (the same
      `peak_mask` decoding uses), max over the classes the teacher owns: each would-be
      detection of the teacher weighs by its confidence, so a sure centre teaches its
      box fully, a faint one a little, and non-peaks (a peak's shoulders) not at all.
      Local maxima of the background count too, but only by their probability, which is
      ~0 for a trained teacher.
      Classes the teacher does not own for this student add no weight (their boxes
      belong to another teacher or to ground truth).
    * The sum is normalised by the weight sum (times the channel count), i.e. it is a
      confidence-weighted mean error per peak: independent of image size, of how many
      objects there are and of how confident the teacher is overall, like the
      supervised `masked_l1` which averages over objects.
    * `relative=True` divides the error by the teacher's size (at least one cell), as
      the supervised `wh_relative`: a 2-cell error on a 4-cell box counts as much as a
      10-cell error on a 20-cell box, so large boxes do not dominate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from centerx.model.decode import peak_mask

EPS = 1e-6


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape"
        )


def heatmap_kd(
    student: torch.Tensor, teacher_probs: torch.Tensor, student_is_logits: bool = True
) -> torch.Tensor:
    """Mean squared error between student and teacher heatmap probabilities.

    student: [B,K,H,W] logits (sigmoid applied here) or probabilities when
    `student_is_logits=False`; teacher_probs: [B,K,H,W] probabilities (no gradient).
    The mean is over every element, so the value does not depend on the batch or grid size.
    """
    _check_same_shape(student, teacher_probs, "heatmap_kd")
    student_probs = torch.sigmoid(student.float()) if student_is_logits else student.float()
    return F.mse_loss(student_probs, teacher_probs.detach().float())


def teacher_peak_weight(teacher_probs: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """[B,K,H,W] probabilities of the teacher's owned classes -> weight [B,1,H,W]:
    max over those classes of the probabilities kept at 3x3 peaks (zero elsewhere)."""
    if teacher_probs.ndim != 4 or teacher_probs.shape[1] == 0:
        raise ValueError(
            f"teacher_peak_weight expects [B,K,H,W] with K >= 1, got {tuple(teacher_probs.shape)}"
        )
    return peak_mask(teacher_probs.detach().float(), kernel).amax(dim=1, keepdim=True)


def masked_dense_l1(
    student_map: torch.Tensor,
    teacher_map: torch.Tensor,
    weight: torch.Tensor,
    relative: bool = False,
) -> torch.Tensor:
    """sum(|s - t| * w) / (sum(w) * channels + eps).

    student_map, teacher_map: [B,D,H,W] (wh or offset, D = 2); weight: [B,1,H,W] (or
    broadcastable), e.g. `teacher_peak_weight`. `relative=True` divides each error by
    |teacher| (at least 1), for sizes. Zero weight everywhere gives 0.
    """
    _check_same_shape(student_map, teacher_map, "masked_dense_l1")
    teacher_map = teacher_map.detach().float()
    weight = weight.detach().float()
    error = (student_map.float() - teacher_map).abs()
    if relative:
        error = error / teacher_map.abs().clamp(min=1.0)
    # sum(w) * channels for a [B,1,H,W] weight: the weight summed as broadcast over channels.
    weight = weight.expand_as(error)
    return (error * weight).sum() / (weight.sum() + EPS)
