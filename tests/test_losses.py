"""Loss functions against hand computations: focal loss, masked L1, the CenterNet objective,
the heatmap KD losses."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from centerx.losses import distill
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.distill import heatmap_kd_focal, heatmap_kd_mse, teacher_peak_mass
from centerx.losses.focal import focal_loss
from centerx.losses.regression import masked_l1

pytestmark = pytest.mark.usefixtures("single_thread")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def focal_term(logit: float, target: float, alpha: float = 2.0, beta: float = 4.0) -> float:
    """One pixel of the docstring formula, in plain float64 math (positive: target == 1)."""
    p = _sigmoid(logit)
    if target == 1.0:
        return -((1 - p) ** alpha) * math.log(p)
    return -((1 - target) ** beta) * p**alpha * math.log(1 - p)


# ------------------------------------------------------------------------------ focal loss


def test_focal_loss_hand_computed_three_pixels() -> None:
    """One positive, one near-positive negative (target 0.5), one far negative (target 0)."""
    logits = torch.tensor([2.0, -1.0, 0.5]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    p0, p1, p2 = _sigmoid(2.0), _sigmoid(-1.0), _sigmoid(0.5)
    positive = -((1 - p0) ** 2) * math.log(p0)
    near = -((1 - 0.5) ** 4) * p1**2 * math.log(1 - p1)  # penalty-reduced by (1-0.5)^4
    far = -((1 - 0.0) ** 4) * p2**2 * math.log(1 - p2)
    expected = (positive + near + far) / 1  # one positive
    assert float(focal_loss(logits, target, alpha=2.0, beta=4.0)) == pytest.approx(
        expected, abs=1e-6
    )
    # The near-positive negative really is down-weighted: 0.5^4 = 1/16 of a far one's weight.
    assert near == pytest.approx(p1**2 * -math.log(1 - p1) / 16)


@pytest.mark.parametrize("alpha,beta", [(2.0, 4.0), (1.0, 2.0), (3.0, 1.0)])
def test_focal_loss_matches_formula_and_normalises_by_positives(alpha: float, beta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen) * 3
    target = torch.rand(2, 3, 4, 5, generator=gen) * 0.99
    positives = [(0, 0, 1, 1), (0, 2, 3, 4), (1, 1, 0, 0)]
    for b, c, y, x in positives:
        target[b, c, y, x] = 1.0
    total = sum(
        focal_term(float(lo), float(t), alpha, beta)
        for lo, t in zip(logits.flatten(), target.flatten(), strict=True)
    )
    loss = focal_loss(logits, target, alpha=alpha, beta=beta)
    assert float(loss) == pytest.approx(total / len(positives), rel=1e-5)


def test_focal_loss_without_positives_divides_by_one() -> None:
    logits = torch.tensor([[-0.3, 1.2], [0.7, -2.0]]).view(1, 1, 2, 2)
    target = torch.tensor([[0.0, 0.9], [0.25, 0.0]]).view(1, 1, 2, 2)
    expected = sum(
        focal_term(float(lo), float(t))
        for lo, t in zip(logits.flatten(), target.flatten(), strict=True)
    )
    assert float(focal_loss(logits, target)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_focal_loss_is_numerically_safe_for_extreme_logits(magnitude: float) -> None:
    logits = torch.tensor([magnitude, -magnitude, magnitude, -magnitude, magnitude, -magnitude])
    logits = logits.view(1, 1, 2, 3).requires_grad_(True)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5]).view(1, 1, 2, 3)
    loss = focal_loss(logits, target)
    loss.backward()
    loss = loss.detach()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # Two positives. Confidently wrong pixels cost |logit| each (exact log-sigmoid, no 1e-4
    # clamp): the missed positive (-m) and the confident far negative (+m) give m each, the
    # confident near-negative (+m, target 0.5) gives m / 16; the right ones cost ~0.
    expected = (magnitude + magnitude + magnitude / 16) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Gradients point the right way: raise the missed positive, lower the false positives.
    grad = logits.grad.flatten()
    assert grad[1] < 0 and grad[2] > 0 and grad[4] > 0


def test_focal_loss_negative_weight_switches_off_a_class_negatives() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 3, 3, generator=gen)
    target = torch.rand(2, 2, 3, 3, generator=gen) * 0.9
    target[0, 0, 1, 1] = 1.0
    target[1, 1, 2, 0] = 1.0  # a positive of the class whose negatives are switched off
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0]])

    def terms(select) -> float:
        return sum(
            focal_term(float(logits[idx]), float(target[idx]))
            for idx in itertools.product(*(range(s) for s in logits.shape))
            if select(idx, float(target[idx]))
        )

    positives = terms(lambda idx, t: t == 1.0)
    class0_negatives = terms(lambda idx, t: t < 1.0 and idx[1] == 0)
    class1_negatives = terms(lambda idx, t: t < 1.0 and idx[1] == 1)
    assert class1_negatives > 0.1
    weighted = focal_loss(logits, target, negative_weight=weight)
    assert float(weighted) == pytest.approx((positives + class0_negatives) / 2, rel=1e-5)
    unweighted = focal_loss(logits, target)
    assert float(unweighted) == pytest.approx(
        (positives + class0_negatives + class1_negatives) / 2, rel=1e-5
    )
    # Per sample: switching class 1 off for sample 0 only leaves sample 1's class-1 negatives.
    per_sample = focal_loss(logits, target, negative_weight=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    sample1_class1 = terms(lambda idx, t: t < 1.0 and idx[1] == 1 and idx[0] == 1)
    assert float(per_sample) == pytest.approx(
        (positives + class0_negatives + sample1_class1) / 2, rel=1e-5
    )


# ------------------------------------------------------------------------------ masked L1


def _regression_case() -> tuple[torch.Tensor, ...]:
    # prediction [1,2,2,3]: channel 0 = cell index, channel 1 = 10 + cell index.
    cells = torch.arange(6, dtype=torch.float32).view(2, 3)
    prediction = torch.stack([cells, cells + 10]).unsqueeze(0)
    index = torch.tensor([[4, 1, 0, 5]])
    target = torch.tensor([[[2.5, 16.0], [2.0, 10.0], [0.5, 4.0], [100.0, -100.0]]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last slot is padding
    return prediction, index, target, mask


def test_masked_l1_absolute_by_hand() -> None:
    prediction, index, target, mask = _regression_case()
    # cell 4 -> (4, 14), cell 1 -> (1, 11), cell 0 -> (0, 10); padding slot ignored.
    errors = [abs(4 - 2.5), abs(14 - 16.0), abs(1 - 2.0), abs(11 - 10.0), abs(0 - 0.5), abs(10 - 4)]
    expected = sum(errors) / 6
    assert float(masked_l1(prediction, index, target, mask)) == pytest.approx(expected, rel=1e-4)


def test_masked_l1_relative_divides_by_target() -> None:
    prediction, index, target, mask = _regression_case()
    # Each error divided by its target, targets below 1 divided by 1.
    errors = [1.5 / 2.5, 2.0 / 16.0, 1.0 / 2.0, 1.0 / 10.0, 0.5 / 1.0, 6.0 / 4.0]
    expected = sum(errors) / 6
    loss = masked_l1(prediction, index, target, mask, relative=True)
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_masked_l1_ignores_masked_slots_entirely() -> None:
    prediction, index, target, mask = _regression_case()
    prediction.requires_grad_(True)
    base = masked_l1(prediction, index, target, mask)
    changed = target.clone()
    changed[0, 3] = torch.tensor([1e6, 1e6])
    assert float(masked_l1(prediction.detach(), index, changed, mask)) == float(base.detach())
    base.backward()
    # Only the three real cells (4, 1, 0) receive gradient; cell 5 (padding) gets none.
    touched = prediction.grad.abs().sum(1).flatten().nonzero().flatten().tolist()
    assert sorted(touched) == [0, 1, 4]


def test_masked_l1_no_objects_is_zero() -> None:
    prediction, index, target, _ = _regression_case()
    assert float(masked_l1(prediction, index, target, torch.zeros(1, 4))) == 0.0


# ------------------------------------------------------------------------------ CenterNetLoss


def _batch_and_outputs() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(2)
    b, c, h, w, m = 2, 3, 4, 4, 5
    heatmap = torch.rand(b, c, h, w, generator=gen) * 0.9
    heatmap[0, 1, 2, 2] = 1.0
    batch = {
        "heatmap": heatmap,
        "wh": torch.rand(b, m, 2, generator=gen) * 5,
        "offset": torch.rand(b, m, 2, generator=gen),
        "index": torch.randint(0, h * w, (b, m), generator=gen),
        "mask": torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 0, 0]]),
        "labeled": torch.tensor([[True, False, True], [True, True, True]]),
    }
    outputs = {
        "heatmap": torch.randn(b, c, h, w, generator=gen),
        "wh": torch.randn(b, 2, h, w, generator=gen),
        "offset": torch.randn(b, 2, h, w, generator=gen),
    }
    return outputs, batch


@pytest.mark.parametrize("wh_relative", [False, True])
@pytest.mark.parametrize("ignore_unlabelled", [False, True])
def test_centernet_loss_terms(wh_relative: bool, ignore_unlabelled: bool) -> None:
    outputs, batch = _batch_and_outputs()
    terms = CenterNetLoss(wh_relative=wh_relative, ignore_unlabelled=ignore_unlabelled)(
        outputs, batch
    )
    assert list(terms) == ["cls", "wh", "offset"]
    weight = batch["labeled"].float() if ignore_unlabelled else None
    expected_cls = focal_loss(outputs["heatmap"], batch["heatmap"], negative_weight=weight)
    assert float(terms["cls"]) == pytest.approx(float(expected_cls), rel=1e-6)
    expected_wh = masked_l1(outputs["wh"], batch["index"], batch["wh"], batch["mask"], wh_relative)
    assert float(terms["wh"]) == pytest.approx(float(expected_wh), rel=1e-6)
    expected_offset = masked_l1(outputs["offset"], batch["index"], batch["offset"], batch["mask"])
    assert float(terms["offset"]) == pytest.approx(float(expected_offset), rel=1e-6)
    # ignore_unlabelled really changes the class term (sample 0 does not label class 1).
    other = CenterNetLoss(wh_relative=wh_relative, ignore_unlabelled=not ignore_unlabelled)
    assert float(other(outputs, batch)["cls"]) != pytest.approx(float(terms["cls"]), rel=1e-3)


# ------------------------------------------------------------------------------ heatmap KD


def _kd_case(seed: int = 0, shape: tuple[int, ...] = (2, 3, 16, 16)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3, torch.rand(shape, generator=gen)


def test_heatmap_kd_focal_hand_computed_and_normalised_by_teacher_peak_mass() -> None:
    logits = [1.0, -2.0, -4.0, 3.0, 0.0]
    teacher = [0.9, 0.1, 0.8, 0.0, 0.3]  # local maxima 0.9, 0.8 and 0.3: peak mass 2.0
    expected = 0.0
    for logit, q in zip(logits, teacher, strict=True):
        p = _sigmoid(logit)
        expected += (q - p) ** 2 * -(q * math.log(p) + (1 - q) * math.log(1 - p))
    value = heatmap_kd_focal(
        torch.tensor(logits).view(1, 1, 1, 5),
        torch.tensor(teacher).view(1, 1, 1, 5),
        relative_pull=False,
    )
    assert float(value) == pytest.approx(expected / 2.0, rel=1e-5)


def test_heatmap_kd_focal_is_zero_only_when_student_equals_teacher() -> None:
    logits, _ = _kd_case()
    assert float(heatmap_kd_focal(logits, torch.sigmoid(logits))) == 0.0
    probs = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    assert float(heatmap_kd_focal(torch.logit(probs), probs)) < 1e-6
    assert float(heatmap_kd_focal(logits + 0.1, torch.sigmoid(logits))) > 1e-6


def test_heatmap_kd_focal_is_finite_and_points_the_right_way_for_extreme_logits() -> None:
    logits = torch.tensor([-30.0, 30.0, 30.0, -30.0, 30.0, -30.0]).view(1, 1, 1, 6)
    teacher = torch.tensor([0.7, 0.0, 1.0, 0.0, 0.7, 1e-3]).view(1, 1, 1, 6)
    logits.requires_grad_(True)
    loss = heatmap_kd_focal(logits, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    grad = logits.grad.flatten()
    assert grad[0] < 0  # a missed peak is pulled up, with no vanishing factor
    assert grad[1] > 0 and grad[4] > 0  # confident false positives are pushed down
    assert float(loss.detach()) > 30 * 0.7**3  # the missed peak alone: |0.7 - 0|^2 * 30 * 0.7


def test_relative_pull_pulls_a_missed_faint_detection_as_hard_as_a_sure_one() -> None:
    """(|q - p| / m)^2 where the student is below a detection of height m: the pull at a
    missed faint face (q 0.33) is ~(1 / 0.33)^2 = 9x the plain focal KD's; the background,
    cells above the teacher, and the fixed point p = q are unchanged."""
    teacher = torch.zeros(1, 1, 9, 30)
    teacher[0, 0, 4, 4], teacher[0, 0, 4, 15] = 0.33, 0.9  # a faint and a sure detection
    logits = torch.full_like(teacher, -4.6)  # a flat student, p ~ 0.01
    logits[0, 0, 0, 25] = 2.0  # a false positive far from both
    grads = {}
    for relative in (False, True):
        z = logits.clone().requires_grad_(True)
        heatmap_kd_focal(z, teacher, relative_pull=relative).backward()
        grads[relative] = z.grad[0, 0]
    faint, sure, false_positive = (4, 4), (4, 15), (0, 25)
    assert grads[True][faint] / grads[False][faint] == pytest.approx((1 / 0.33) ** 2, rel=0.05)
    assert grads[True][sure] / grads[False][sure] == pytest.approx((1 / 0.9) ** 2, rel=0.05)
    assert grads[True][false_positive] == grads[False][false_positive]  # background as before
    probs = torch.rand(1, 2, 8, 8) ** 4
    at_teacher = heatmap_kd_focal(
        torch.logit(probs.clamp(1e-4, 1 - 1e-4)), probs, relative_pull=True
    )
    assert float(at_teacher) < 1e-6


@pytest.mark.parametrize(
    "loss", [heatmap_kd_focal, partial(heatmap_kd_focal, relative_pull=True), heatmap_kd_mse]
)
def test_heatmap_kd_gradient_matches_finite_differences(loss) -> None:
    logits, teacher = _kd_case(1, (1, 2, 3, 3))
    logits = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, teacher.double()), (logits,))


def test_heatmap_kd_focal_does_not_depend_on_map_size_or_batch_copies() -> None:
    logits, teacher = _kd_case(2, (1, 2, 8, 8))
    small = heatmap_kd_focal(logits, teacher)
    # The same content inside a 4x larger map whose extra background the student gets right.
    big_teacher = torch.full((1, 2, 32, 32), 1e-3)
    big_logits = torch.logit(big_teacher)
    big_teacher[..., :8, :8], big_logits[..., :8, :8] = teacher, logits
    # (the border's flat 1e-3 is a plateau of local maxima, all below 0.1: they do not count)
    assert float(heatmap_kd_focal(big_logits, big_teacher)) == pytest.approx(float(small), rel=1e-4)
    doubled = heatmap_kd_focal(logits.repeat(2, 1, 1, 1), teacher.repeat(2, 1, 1, 1))
    assert float(doubled) == pytest.approx(float(small), rel=1e-6)


def test_heatmap_kd_mse_is_the_mean_squared_probability_error() -> None:
    logits, teacher = _kd_case(3)
    expected = ((torch.sigmoid(logits) - teacher) ** 2).mean()
    assert float(heatmap_kd_mse(logits, teacher)) == pytest.approx(float(expected), rel=1e-6)
    assert float(heatmap_kd_mse(logits, torch.sigmoid(logits))) == 0.0


@pytest.mark.parametrize("name", ["heatmap_kd_focal", "heatmap_kd_mse"])
def test_heatmap_kd_losses_are_selected_by_target_and_share_one_signature(name: str) -> None:
    loss = instantiate({"_target_": f"centerx.losses.distill.{name}", "_partial_": True})
    logits, teacher = _kd_case(4)
    value = loss(logits.half(), teacher)  # fp16 logits are computed in fp32
    assert value.dtype == torch.float32 and value.ndim == 0
    assert float(value) == pytest.approx(float(getattr(distill, name)(logits, teacher)), rel=1e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        loss(logits, teacher[:, :2])


def test_heatmap_kd_focal_beta_is_configurable() -> None:
    loss = instantiate(
        {"_target_": "centerx.losses.distill.heatmap_kd_focal", "_partial_": True, "beta": 1.0}
    )
    logits, teacher = _kd_case(5)
    assert float(loss(logits, teacher)) == pytest.approx(
        float(heatmap_kd_focal(logits, teacher, beta=1.0)), rel=1e-6
    )
    assert float(loss(logits, teacher)) != pytest.approx(float(heatmap_kd_focal(logits, teacher)))


def test_teacher_peak_mass_counts_peaks_from_the_prior_up_and_at_least_one() -> None:
    teacher = torch.full((2, 1, 20, 20), 1e-3)  # a flat background: every cell a local maximum
    assert float(teacher_peak_mass(teacher)) == 1.0
    teacher[0, 0, 5, 5], teacher[0, 0, 15, 15], teacher[1, 0, 10, 10] = 0.7, 0.6, 0.9
    teacher[1, 0, 10, 11] = 0.8  # a shoulder, not a peak
    assert float(teacher_peak_mass(teacher)) == pytest.approx(0.7 + 0.6 + 0.9)
