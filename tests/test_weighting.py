"""Loss weighters: adaptive fixed magnitudes (targets by name) and fixed weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.weighting import AdaptiveMagnitudeWeights, FixedWeights

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGETS = {"cls": 1.5, "wh": 0.3, "offset": 0.1, "kd_heatmap": 1.5, "kd_wh": 0.3, "kd_offset": 0.1}


def leaf(value: float) -> torch.Tensor:
    return torch.tensor(value, requires_grad=True)


def test_each_term_equals_its_target_after_weighting() -> None:
    weighter = AdaptiveMagnitudeWeights(TARGETS)
    raw = {
        "cls": 3.7,
        "wh": 12.0,
        "offset": 0.02,
        "kd_heatmap": 4e-4,
        "kd_wh": 2.5,
        "kd_offset": 0.4,
    }
    for step in range(3):  # every step, whatever the values do
        terms = {name: leaf(value * (step + 1)) for name, value in raw.items()}
        total, logs = weighter(terms)
        for name, value in raw.items():
            assert logs[f"raw/{name}"] == pytest.approx(value * (step + 1))
            assert logs[f"weighted/{name}"] == pytest.approx(TARGETS[name])
            assert logs[f"scale/{name}"] == pytest.approx(TARGETS[name] / (value * (step + 1)))
        assert float(total.detach()) == pytest.approx(sum(TARGETS.values()))
        assert total.requires_grad


def test_gradients_are_scaled_by_target_over_value() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    cls = (x**2).sum() * 3  # value 15, d/dx = 6x
    wh = x.sum() * 10  # value 30, d/dx = 10
    total, _ = AdaptiveMagnitudeWeights(TARGETS)({"cls": cls, "wh": wh})
    total.backward()
    expected = 1.5 / 15 * 6 * x.detach() + 0.3 / 30 * 10
    assert torch.allclose(x.grad, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, 1e-12])
def test_non_finite_and_zero_terms_are_skipped_and_logged(bad: float, caplog) -> None:
    weighter = AdaptiveMagnitudeWeights(TARGETS)
    weighter({"cls": leaf(2.0), "wh": leaf(4.0)})
    with caplog.at_level(logging.DEBUG, logger="centerx.losses.weighting"):
        total, logs = weighter({"cls": leaf(3.0), "wh": leaf(bad)})
    assert logs["skipped/wh"] == 1.0
    assert "weighted/wh" not in logs and "skipped/cls" not in logs
    assert logs["raw/wh"] == pytest.approx(bad, nan_ok=True)
    assert float(total.detach()) == pytest.approx(1.5)  # only cls, at its target
    assert math.isfinite(float(total.detach()))
    assert weighter.magnitudes["wh"] == 4.0  # a skipped term does not move its magnitude
    assert "skipped wh" in caplog.text


def test_all_terms_skipped_gives_a_constant_zero() -> None:
    total, logs = AdaptiveMagnitudeWeights(TARGETS)({"cls": leaf(float("nan")), "wh": leaf(0.0)})
    assert float(total.detach()) == 0.0 and not total.requires_grad  # the trainer skips the step
    assert logs["skipped/cls"] == logs["skipped/wh"] == 1.0


def test_works_with_one_term() -> None:
    weighter = AdaptiveMagnitudeWeights({"kd_heatmap": 2.0})
    value = leaf(0.004)
    total, logs = weighter({"kd_heatmap": value})
    assert float(total.detach()) == pytest.approx(2.0)
    assert set(logs) == {"raw/kd_heatmap", "weighted/kd_heatmap", "scale/kd_heatmap"}
    total.backward()
    assert float(value.grad) == pytest.approx(2.0 / 0.004)


def test_momentum_smooths_magnitudes_as_an_ema() -> None:
    weighter = AdaptiveMagnitudeWeights({"wh": 0.3}, momentum=0.75)
    magnitude = None
    for value in (4.0, 2.0, 8.0, 1.0):
        _, logs = weighter({"wh": leaf(value)})
        magnitude = value if magnitude is None else 0.75 * magnitude + 0.25 * value
        assert weighter.magnitudes["wh"] == pytest.approx(magnitude)
        assert logs["scale/wh"] == pytest.approx(0.3 / magnitude)
        assert logs["weighted/wh"] == pytest.approx(value * 0.3 / magnitude)
    with pytest.raises(ValueError, match="momentum"):
        AdaptiveMagnitudeWeights(TARGETS, momentum=1.0)


def test_a_term_without_target_raises_naming_it() -> None:
    with pytest.raises(KeyError, match="kd_extra") as err:
        AdaptiveMagnitudeWeights(TARGETS)({"cls": leaf(1.0), "kd_extra": leaf(1.0)})
    assert "kd_heatmap" in str(err.value)  # lists what is configured
    # matched by exact name, never by substring: "kd_wh_x" is not "kd_wh"
    with pytest.raises(KeyError, match="kd_wh_x"):
        AdaptiveMagnitudeWeights(TARGETS)({"kd_wh_x": leaf(1.0)})
    with pytest.raises(KeyError, match="kd_wh"):
        FixedWeights({"cls": 1.0})({"kd_wh": leaf(1.0)})


def test_state_dict_round_trip() -> None:
    weighter = AdaptiveMagnitudeWeights(TARGETS, momentum=0.9)
    for value in (5.0, 3.0, 7.0):
        weighter({"cls": leaf(value), "wh": leaf(value / 2)})
    restored = AdaptiveMagnitudeWeights(TARGETS, momentum=0.9)
    restored.load_state_dict(weighter.state_dict())
    assert restored.magnitudes == weighter.magnitudes
    assert restored({"cls": leaf(2.0)})[1] == weighter({"cls": leaf(2.0)})[1]
    # an old checkpoint without weighter state starts fresh
    fresh = AdaptiveMagnitudeWeights(TARGETS)
    fresh.load_state_dict({})
    assert fresh.magnitudes == {}


def test_fixed_weights() -> None:
    total, logs = FixedWeights({"cls": 1.0, "wh": 0.1})({"cls": leaf(2.0), "wh": leaf(5.0)})
    assert float(total.detach()) == pytest.approx(2.5)
    assert logs == {"raw/cls": 2.0, "weighted/cls": 2.0, "raw/wh": 5.0, "weighted/wh": 0.5}


def test_adaptive_config_names_every_term_of_both_objectives() -> None:
    """conf/loss/adaptive.yaml: the CenterNet terms and the KD terms, by name, with the defaults."""
    weighter = instantiate(OmegaConf.load(CONF / "loss" / "adaptive.yaml").weighter)
    assert isinstance(weighter, AdaptiveMagnitudeWeights)
    assert weighter.targets["cls"] == 1.5 and weighter.targets["wh"] == 0.3
    assert weighter.targets["offset"] == 0.1
    assert {"kd_heatmap", "kd_wh", "kd_offset"} <= set(weighter.targets)
    # plain training: the supervised loss's terms go straight in
    logits = torch.zeros(1, 2, 8, 8, requires_grad=True)
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 3, 3] = 1.0
    outputs = {"heatmap": logits, "wh": torch.ones(1, 2, 8, 8), "offset": torch.zeros(1, 2, 8, 8)}
    batch = {
        "heatmap": target,
        "index": torch.tensor([[27]]),
        "wh": torch.tensor([[[3.0, 2.0]]]),
        "offset": torch.tensor([[[0.5, 0.5]]]),
        "mask": torch.ones(1, 1),
        "labeled": torch.ones(1, 2, dtype=torch.bool),
    }
    total, logs = weighter(CenterNetLoss()(outputs, batch))
    assert float(total.detach()) == pytest.approx(1.9)
    assert logs["weighted/cls"] == pytest.approx(1.5)
    assert logs["weighted/wh"] == pytest.approx(0.3) and logs["weighted/offset"] == pytest.approx(
        0.1
    )
