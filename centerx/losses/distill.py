"""Knowledge-distillation losses between a student CenterNet and a frozen teacher.

Pure functions on tensors; the channel bookkeeping (which student class a teacher
owns, under which name) lives in the distillation objective. Every function here
expects the *owned* channels already gathered, student and teacher in the same order.

Heatmap: a quality focal loss on the student's logits (`heatmap_kd_focal`, the default),
or the MSE on probabilities that centerX uses (`heatmap_kd_mse`, kept for comparison).
Both take (student logits [B,K,H,W], teacher probabilities [B,K,H,W]) -> scalar, so the
objective's `heatmap_loss` picks one by `_target_`.
    * The focal loss is Generalized Focal Loss's quality focal loss with the teacher's
      probability q as the soft target, summed over cells and divided by the teacher's
      peak mass:

          sum |q - p|^beta * BCE(p, q)  /  max(1, sum of q at its 3x3 local maxima >= 0.1)

      p = sigmoid(student logit); BCE is computed from the logits (the log-sum-exp form of
      `binary_cross_entropy_with_logits`), so it is finite for any logit.
    * Why not MSE: its gradient on a logit, 2 (p - q) p (1 - p), vanishes as p -> 0. Once the
      ~99 % background has pushed a channel to p ~ 0.01, the pull at the teacher's peak is
      ~50x weaker than a cross-entropy's, so that channel's share of the gradient on the
      shared features is negligible next to the other classes' and terms', and those features
      never learn it. On real photos (80x80 maps, one object) a student class stayed at
      p ~ 0.01 for a third of training.
    * Why not plain BCE, or KL (BCE minus the teacher's entropy): the gradient, p - q, does
      not vanish, but while a channel is flat it weighs peak against background cells just as
      MSE does (MSE only multiplies every cell by the same p(1-p)), so the thousands of
      background cells still dominate. The focal factor |q - p|^beta silences the background
      the student already gets right (gradient there ~(beta + 1) p^(beta + 1)), while the
      pull at a missed peak tends to q^(beta + 1) as p -> 0, not 0. Plain BCE also bottoms
      out at the teacher's entropy, not 0; this loss is exactly 0 when the student equals
      the teacher, which the adaptive weighter (it divides each term by its value) needs.
    * Measured on a toy that reproduces the stall (scripts/kd_stall.py: an 80x80 map, one
      0.7 peak of class A, a second class sharing the hidden features, AdamW, 6 seeds): from
      the 0.1 prior the class-A channel reaches 0.5 at the peak within 22-76 steps under this
      loss (21-70 with the relative pull below); under MSE it first sinks to ~0.001-0.06
      and 5 of 6 seeds never get there in 300 steps (the sixth after 159; KL: 2 of 6
      never, the others after 157-261). Without the second class MSE gets there in 120-280
      steps (this loss: 21-68): the competition for shared features is what turns slow into
      stalled.
    * The relative pull (`relative_pull=True`; objective=distill_relative): the focal factor
      |q - p|^beta makes a missed detection of height m pull with about m^(beta + 1), so a
      teacher that is faint at its objects (median 0.33 at the mask set's faces) teaches
      them ~20x more weakly than a sure one, and on real photos such a channel still stalled
      on one seed of three. Where the student is below the teacher near a detection, the
      factor is measured relative to the detection's height, (|q - p| / m)^beta, so every
      missed detection pulls like a labelled centre in CenterNet's focal loss. The fixed
      point p = q stays. Measured on the mask set, three seeds: no stall, and with the
      teacher's boxes the student's heatmap keeps 92% of the teacher's AP50 against 64%
      (docs/results/apple_mask_ema/mask_only_kd/README.md). Not the default: it pulls a
      teacher's faint false detections just as hard, and on the synthetic main job, whose
      one-class teachers fire faintly on the other part's shapes, it cost the student 0.04
      AP on circles (docs/results/apple_mask_ema/kd_options/README.md).
    * Normalising by the teacher's peak mass, like CenterNet's focal loss divides by the
      number of objects, makes the value independent of the map size and of how much of it
      is background. Only peaks of at least the heads' prior (0.1) count: a trained teacher's
      background has a local maximum every few cells, and at 1e-3 each they would add about
      as much as one object per 80x80 map. A teacher with nothing to show counts 1.
    * `heatmap_kd_mse` is the mean over every element of (p - q)^2: bounded, 0 when they
      agree, but prone to the stall above.

wh and offset: L1 at every pixel, weighted by the teacher's peak-masked heatmap.
    * A teacher's wh/offset outputs mean something only at its own object centres:
      the supervised loss trains them at ground-truth centres only, so everywhere
      else they are unconstrained garbage. Copying them densely would teach noise.
    * The weight is the teacher's heatmap kept only at its 3x3 local maxima (the same
      `peak_mask` decoding uses) that reach the heads' prior (0.1), max over the classes the
      teacher owns: each detection of the teacher weighs by its confidence, so a sure centre
      teaches its box fully, a faint one a little, and non-peaks (a peak's shoulders) not
      at all.
    * Why the 0.1 floor: a trained teacher's background is not ~0 but a field of faint local
      maxima, one every ~9 cells. Measured on the apple_mask teachers (24 training images
      per set, 256 px, scripts/kd_peak_weight.py): peaks below 0.1 carried 89% of the weight
      on fruits photos (teacher_fruits) and 64% on mask photos (teacher_mask), so most of
      the wh/offset KD copied the sizes the teacher outputs where it sees nothing, while at
      ground-truth centres its probability reaches 0.1 for 10 of 10 apples, 100 of 104 faces.
      Classes the teacher does not own for this student add no weight (their boxes
      belong to another teacher or to ground truth).
    * The sum is normalised by the weight sum (times the channel count), i.e. it is a
      confidence-weighted mean error per peak: independent of image size, of how many
      objects there are and of how confident the teacher is overall, like the
      supervised `masked_l1` which averages over objects.
    * `relative=True` divides the error by the teacher's size (at least one cell), as
      the supervised `wh_relative`: a 2-cell error on a 4-cell box counts as much as a
      10-cell error on a 20-cell box, so large boxes do not dominate.
    * `spread_to_window` (objective.box_window) also teaches each detection's box at the
      cells around its peak: the student's own peak often lands a cell away from the
      teacher's, and decoding reads its box there, where a peak-only KD never trained it.
      Each cell in a peak's kxk window gets that peak's size, and the offset that points at
      the same centre (offset + peak cell - own cell), weighted by the peak's height.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from centerx.model.decode import peak_mask
from centerx.model.heads import HEATMAP_PRIOR

EPS = 1e-6


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape"
        )


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (the losses sum thousands of cells); fp64 stays fp64 (gradcheck)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def teacher_detections(
    teacher_probs: torch.Tensor, min_peak: float = HEATMAP_PRIOR, kernel: int = 3
) -> torch.Tensor:
    """The teacher's probabilities kept at its kxk local maxima scoring >= `min_peak`, zero
    elsewhere (same shape): what it would detect. Without `min_peak` the background would
    count: a flat or noisy 1e-3 background has a local maximum every few cells, as much mass
    per 80x80 map as an object."""
    peaks = peak_mask(teacher_probs.detach(), kernel)
    return torch.where(peaks >= min_peak, peaks, torch.zeros_like(peaks))


def teacher_peak_mass(
    teacher_probs: torch.Tensor, min_peak: float = HEATMAP_PRIOR, kernel: int = 3
) -> torch.Tensor:
    """Sum of `teacher_detections`, at least 1: the soft number of objects the teacher sees
    in the batch (all classes), a heatmap loss's normaliser."""
    return teacher_detections(teacher_probs, min_peak, kernel).sum().clamp(min=1.0)


def heatmap_kd_focal(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    beta: float = 2.0,
    relative_pull: bool = False,
) -> torch.Tensor:
    """Quality focal loss towards the teacher's probabilities, per teacher peak:

        sum |q - p|^beta * BCE(p, q) / max(1, peak mass of q)

    student_logits: [B,K,H,W] logits; teacher_probs: [B,K,H,W] probabilities q (no gradient);
    p = sigmoid(logits). Exactly 0 when p == q, positive otherwise; finite for any logit.
    Computed in fp32 at least. `beta` >= 1 keeps the gradient continuous at p == q.

    `relative_pull`: where the student is below the teacher near a detection of height m
    (the 7x7 local maximum of q, at least the heads' prior), the focal factor is
    (|q - p| / m)^beta: a missed faint detection (q = 0.33) pulls as hard as a missed sure
    one, as every labelled centre does in CenterNet's focal loss, instead of q^beta times
    less. Same fixed point (p = q); the background and cells above the teacher are unchanged.
    """
    _check_same_shape(student_logits, teacher_probs, "heatmap_kd_focal")
    logits = _at_least_fp32(student_logits)
    target = teacher_probs.detach().to(logits.dtype)
    prob = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    gap = (target - prob).abs()
    if relative_pull:
        height = F.max_pool2d(target, 7, stride=1, padding=3)
        below = (prob.detach() < target) & (height >= HEATMAP_PRIOR)
        gap = gap / torch.where(below, height, torch.ones_like(height))
    return (gap.pow(beta) * cross_entropy).sum() / teacher_peak_mass(target)


def heatmap_kd_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """centerX's heatmap KD: mean over every element of (sigmoid(logits) - q)^2.

    student_logits, teacher_probs: [B,K,H,W]. Kept for comparison: it stalls on sparse maps
    (see the module docstring).
    """
    _check_same_shape(student_logits, teacher_probs, "heatmap_kd_mse")
    student_probs = torch.sigmoid(_at_least_fp32(student_logits))
    return F.mse_loss(student_probs, teacher_probs.detach().to(student_probs.dtype))


def teacher_peak_weight(
    teacher_probs: torch.Tensor, min_peak: float = HEATMAP_PRIOR, kernel: int = 3
) -> torch.Tensor:
    """[B,K,H,W] probabilities of the teacher's owned classes -> weight [B,1,H,W]:
    max over those classes of `teacher_detections` (peaks >= `min_peak`, zero elsewhere)."""
    if teacher_probs.ndim != 4 or teacher_probs.shape[1] == 0:
        raise ValueError(
            f"teacher_peak_weight expects [B,K,H,W] with K >= 1, got {tuple(teacher_probs.shape)}"
        )
    return teacher_detections(teacher_probs.float(), min_peak, kernel).amax(dim=1, keepdim=True)


def check_box_window(window: object) -> None:
    """ValueError unless `window` is a positive odd int (cells, centred on a peak)."""
    if not (isinstance(window, int) and window >= 1 and window % 2):
        raise ValueError(f"box window must be a positive odd number of cells, got {window!r}")


def spread_to_window(
    weight: torch.Tensor, wh: torch.Tensor, offset: torch.Tensor, window: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Peak weights [B,1,H,W] and the teacher's wh/offset [B,2,H,W] -> the same three with
    every cell within a `window` x `window` square of a peak taught that peak's box: weight
    and size of the strongest peak in its window, offset to that peak's centre (grid units).
    `window` 1 returns the inputs unchanged."""
    check_box_window(window)
    if window == 1:
        return weight, wh, offset
    batch, _, height, width = weight.shape
    spread, source = F.max_pool2d(
        weight, window, stride=1, padding=window // 2, return_indices=True
    )
    source = source.flatten(1)  # [B, H*W]: flat index of the peak each cell takes its box from
    take = lambda field: field.flatten(2).gather(2, source[:, None].expand(-1, 2, -1))  # noqa: E731
    cells = torch.arange(height * width, device=weight.device)
    # Where the peak lies relative to each cell, (x, y) in cells; 0 at the peak itself.
    delta = torch.stack([source % width - cells % width, source // width - cells // width], 1)
    return (
        spread,
        take(wh).view_as(wh),
        (take(offset) + delta.to(offset.dtype)).view(batch, 2, height, width),
    )


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
