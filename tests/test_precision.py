"""train.amp and train.channels_last through the real training path (tiny synthetic data, CPU):
bf16 autocast trains with finite float32 losses, channels_last gives the contiguous run's
outputs, gradients and checkpoints to float tolerance, and fp16 off CUDA or an unknown precision
is a configuration error, and bf16 on a CPU that would emulate it warns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from centerx.engine import precision, training
from centerx.engine.build import build_sources
from centerx.engine.precision import AutocastForward
from centerx.engine.trainer import Trainer, check_train_config
from centerx.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=64",
    "data.train.image_size=64",
    "data.train.num_images=8",
    "data.val.image_size=64",
    "data.val.num_images=2",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.progress=false",
]

pytestmark = pytest.mark.usefixtures("single_thread")


def train_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


def build(run_dir: Path, *overrides: str) -> Trainer:
    cfg = train_config(*overrides)
    train_source, val_source = build_sources(cfg.data)
    return training.build_trainer(cfg, train_source, val_source, run_dir)


def first_batch(trainer: Trainer) -> dict:
    return trainer._to_device(next(iter(trainer.loader)))


def assert_same_gradients(reference: tuple[Trainer, dict], other: tuple[Trainer, dict]) -> None:
    """One training loss's gradients, to float tolerance. (After Adam steps the weights would
    not be comparable: Adam turns rounding differences in near-zero gradients into full-size
    updates.)"""
    for trainer, batch in (reference, other):
        trainer.model.train()
        loss, _ = trainer.weighter(trainer.objective(trainer.wrapped, batch))
        loss.backward()
    expected, got = reference[0].model, other[0].model
    scale = max(float(p.grad.abs().max()) for p in expected.parameters())
    for (name, a), b in zip(expected.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * scale, rtol=1e-3, msg=name)


def test_bf16_autocast_trains_with_a_float32_loss(tmp_path: Path) -> None:
    trainer = build(tmp_path, "train.amp=bf16")
    assert isinstance(trainer.wrapped, AutocastForward)
    assert not trainer.scaler.is_enabled()  # bf16 needs no loss scale
    batch = first_batch(trainer)
    conv_dtypes: list[torch.dtype] = []
    trainer.model.heads.heatmap[0].register_forward_hook(
        lambda module, inputs, output: conv_dtypes.append(output.dtype)
    )
    terms = trainer.objective(trainer.wrapped, batch)
    loss, _ = trainer.weighter(terms)
    assert conv_dtypes == [torch.bfloat16]  # the forward ran in bf16 ...
    assert all(term.dtype == torch.float32 for term in terms.values())  # ... the loss did not
    assert loss.dtype == torch.float32

    before = [p.detach().clone() for p in trainer.model.parameters()]
    logs = [trainer._step(batch) for _ in range(3)]
    assert all(entry is not None and torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_channels_last_matches_contiguous(tmp_path: Path) -> None:
    contiguous = build(tmp_path / "nchw")
    nhwc = build(tmp_path / "nhwc", "train.channels_last=true")
    stem_weight = nhwc.model.backbone.stem[0].weight
    assert stem_weight.is_contiguous(memory_format=torch.channels_last)
    assert not stem_weight.is_contiguous()
    for a, b in zip(contiguous.model.parameters(), nhwc.model.parameters(), strict=True):
        assert torch.equal(a, b)  # same initial weights, different layout

    batch = next(iter(contiguous.loader))
    plain_batch, nhwc_batch = contiguous._to_device(batch), nhwc._to_device(batch)
    assert nhwc_batch["image"].is_contiguous(memory_format=torch.channels_last)
    for trainer in (contiguous, nhwc):
        trainer.model.eval()
    with torch.no_grad():
        expected = contiguous.model(plain_batch["image"])
        outputs = nhwc.model(nhwc_batch["image"])
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], atol=1e-4, rtol=1e-4)

    assert_same_gradients((contiguous, plain_batch), (nhwc, nhwc_batch))
    assert nhwc._step(nhwc_batch) is not None

    # A channels_last checkpoint loads into a default (contiguous) model unchanged.
    nhwc._save("last.pt")
    state = torch.load(tmp_path / "nhwc" / "checkpoints" / "last.pt", weights_only=True)
    contiguous.model.load_state_dict(state["model"])
    for a, b in zip(
        contiguous.model.state_dict().values(), nhwc.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_compiled_training_forward_matches_eager(tmp_path: Path) -> None:
    """train.compile: the compiled training forward gives the eager gradients, trains, and
    leaves evaluation and checkpoints on the plain module (no "_orig_mod." keys)."""
    eager = build(tmp_path / "eager")
    compiled = build(tmp_path / "compiled", "train.compile=true")
    assert compiled.wrapped is not compiled.model
    batch = eager._to_device(next(iter(eager.loader)))
    assert_same_gradients((eager, batch), (compiled, batch))
    before = [p.detach().clone() for p in compiled.model.parameters()]
    assert compiled._step(batch) is not None
    assert any(
        not torch.equal(a, b) for a, b in zip(before, compiled.model.parameters(), strict=True)
    )
    compiled._save("last.pt")
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"].keys() == eager.model.state_dict().keys()


@pytest.mark.parametrize(
    "amp,message", [("fp16", "fp16 needs a CUDA device"), ("int8", "is not a precision")]
)
def test_unusable_precision_is_a_config_error(amp: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_train_config(train_config(f"train.amp={amp}").train)


def test_emulated_bf16_warns_once_and_native_bf16_does_not(monkeypatch, caplog) -> None:
    cpu = torch.device("cpu")
    for native, expected in ((True, 0), (None, 0), (False, 1)):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        precision._warn_emulated_bf16.cache_clear()
        caplog.clear()
        for _ in range(2):  # the trainer checks the config twice
            assert precision.autocast_dtype("bf16", cpu) is torch.bfloat16
        warnings = [r for r in caplog.records if "emulated" in r.getMessage()]
        assert len(warnings) == expected, native
