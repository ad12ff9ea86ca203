"""The Trainer's guarantees, in-process on tiny synthetic data (64 px, a handful of images).

NaN/inf guard, divergence stop, unreadable images, EMA evaluation and best.pt, atomic
checkpoints, metrics.jsonl and curves.png, and the learning-rate schedule.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import cv2
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from centerx.data.base import DatasetError, ImageReadError
from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.optim import lr_factor
from centerx.engine.trainer import Trainer, TrainingDiverged
from centerx.errors import Interrupted
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.weighting import FixedWeights
from centerx.model import checkpoint as checkpoint_module
from centerx.model.checkpoint import (
    inference_weights,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    to_plain,
)
from centerx.objectives.supervised import SupervisedObjective

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
SIZE = 64
LR = 0.002


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UnreadableAt(SyntheticShapes):
    """Synthetic images, except that `bad` indices fail to read like a corrupt file."""

    def __init__(self, bad: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def load(self, index: int):
        if index in self.bad:
            raise ImageReadError(f"broken_{index}.jpg: not a decodable image")
        return super().load(index)


class Scripted:
    """The supervised objective with injected faults at given calls (1-based):
    "nan" / "inf": the loss is non-finite; "nan_grad": the loss is finite (0 added) but its
    gradient is NaN. Records, per call, the lr the optimizer is about to use and the model
    state (parameters and buffers) before the step."""

    def __init__(self, faults: dict[int, str] | None = None) -> None:
        self.inner = SupervisedObjective(CenterNetLoss())
        self.faults = faults or {}
        self.trainer: Trainer | None = None
        self.calls = 0
        self.lrs: list[float] = []
        self.weights: list[torch.Tensor] = []
        self.batch_sizes: list[int] = []

    def __call__(self, model, batch):
        self.calls += 1
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])
        self.weights.append(flat_weights(model))
        self.batch_sizes.append(len(batch["image"]))
        terms = self.inner(model, batch)
        fault = self.faults.get(self.calls)
        if fault in ("nan", "inf"):
            terms["cls"] = terms["cls"] * float(fault)
        elif fault in ("sigint_in_finaliser", "sigterm"):
            deliver_signal(signal.SIGINT if fault == "sigint_in_finaliser" else signal.SIGTERM)
        elif fault == "nan_grad":
            weight = next(model.parameters())
            zero = (weight - weight.detach()).pow(2).sum()  # value 0, d sqrt(z)/dz at 0: inf
            terms["cls"] = terms["cls"] + torch.sqrt(zero)
        return terms


class SignalsWhenCollected:
    """Sends a signal from its finaliser: Python drops an exception raised there, which is how
    a Ctrl-C that lands in any `__del__` (a loader iterator's, a tensor's) used to be lost."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)


def deliver_signal(signum: int) -> None:
    SignalsWhenCollected(signum)  # collected at once: the signal arrives inside __del__


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    """Parameters and buffers (BatchNorm running statistics): the whole model state."""
    state = model.state_dict().values()
    return torch.cat([v.detach().flatten().double() for v in state]).clone()


def model_cfg():
    cfg = OmegaConf.load(REPO / "conf" / "model" / "centernet.yaml")
    cfg.backbone = "tiny"
    return cfg


def make_trainer(
    run_dir: Path,
    objective: Scripted | None = None,
    source=None,
    evaluate=None,
    num_images: int = 8,
    batch_size: int = 4,
    **overrides,
) -> Trainer:
    from centerx.model.centernet import build_model

    cfg = OmegaConf.load(REPO / "conf" / "train" / "default.yaml")
    cfg.seed = 0  # `${seed}` points at the root config, absent here
    cfg.merge_with(
        {"epochs": 2, "lr": LR, "progress": False, "log_every": 1, "eval_every": 1, **overrides}
    )
    source = source or SyntheticShapes(
        num_images=num_images, seed=0, class_names=CLASSES, image_size=SIZE
    )
    loader = build_loader(
        TrainingDataset(source, SIZE, augment=None), batch_size, shuffle=True, drop_last=True
    )
    torch.manual_seed(0)
    objective = objective or Scripted()
    meta = to_plain(
        {"class_names": CLASSES, "model_config": model_cfg(), "image_size": SIZE, "config": {}}
    )
    weights = OmegaConf.load(REPO / "conf" / "loss" / "fixed.yaml").weighter.weights
    trainer = Trainer(
        build_model(model_cfg(), len(CLASSES)),
        objective,
        FixedWeights(weights),
        loader,
        cfg,
        run_dir,
        meta,
        evaluate=evaluate,
    )
    objective.trainer = trainer
    return trainer


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# NaN / inf guard
# ---------------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped(tmp_path: Path, capsys) -> None:
    """A NaN loss, an inf loss and a NaN gradient each skip their step: weights, BatchNorm
    running statistics (updated by the step's forward, restored), optimizer moments and EMA
    are untouched, a message names the step, and training goes on (the bad
    steps are not consecutive enough to reach max_bad_steps). The schedule still advances."""
    objective = Scripted({2: "nan", 4: "nan_grad", 5: "inf"})
    # 12 images / 4 = 3 steps per epoch, 2 epochs: 6 steps, 3 of them bad.
    trainer = make_trainer(tmp_path, objective, num_images=12, max_bad_steps=3, ema=True)
    trainer.fit()
    assert objective.calls == 6 and trainer.global_step == 6
    after = [*objective.weights[1:], flat_weights(trainer.model)]
    for call, (before, then) in enumerate(zip(objective.weights, after, strict=True), start=1):
        if call in objective.faults:
            assert torch.equal(before, then), f"bad step {call} changed the weights"
        else:
            assert not torch.equal(before, then), f"good step {call} did not train"
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {3}  # Adam's own step count: 6 - 3 skipped
    assert trainer.ema.updates == 3
    out = capsys.readouterr().out
    assert "step 1: non-finite loss nan; step skipped" in out
    assert "step 3: non-finite gradient norm nan; step skipped" in out
    assert "step 4: non-finite loss inf; step skipped" in out
    # The lr follows the schedule by step index, bad steps included (warm-up 1 epoch = 3).
    expected = [LR * lr_factor(step, 6, 3, "cosine") for step in range(6)]
    assert objective.lrs == pytest.approx(expected, rel=1e-12)
    # Only good steps are logged.
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "step"] == [1, 3, 6]


def test_consecutive_bad_steps_stop_training(tmp_path: Path) -> None:
    """max_bad_steps consecutive non-finite steps raise TrainingDiverged; last.pt still holds
    the previous epoch, whole, and it equals the weights (no bad step changed them)."""
    objective = Scripted({call: "nan" for call in range(3, 100)})  # all of epoch 2 onwards
    trainer = make_trainer(tmp_path, objective, epochs=3, max_bad_steps=2)
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite steps.*last\.pt"):
        trainer.fit()
    assert objective.calls == 4  # 2 good steps (epoch 1), 2 bad ones (epoch 2)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (last["epoch"], last["global_step"]) == (1, 2)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(last["model"][name], value), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    assert (tmp_path / "curves.png").is_file()  # drawn on the way out too
    assert [r["epoch"] for r in records(tmp_path) if r["kind"] == "epoch"] == [1]


# ---------------------------------------------------------------------------------------------
# Unreadable images
# ---------------------------------------------------------------------------------------------


def test_unreadable_images_are_replaced_and_counted(tmp_path: Path, caplog) -> None:
    """An unreadable image is replaced by the next readable one: every batch stays full (under
    DDP every rank takes the same steps); the skips are counted and the files named."""
    source = UnreadableAt({1, 5}, num_images=8, seed=0, class_names=CLASSES, image_size=SIZE)
    objective = Scripted()
    trainer = make_trainer(tmp_path, objective, source=source)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert trainer.skipped_images == 4 and trainer.unreadable_images == {1, 5}  # 2 per epoch
    assert objective.batch_sizes == [4, 4, 4, 4]  # 2 epochs x 2 full batches
    assert "2 unreadable training images were skipped, 4 times in all" in caplog.text
    assert "broken_1.jpg" in caplog.text and "broken_5.jpg" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_no_readable_substitute_is_an_error(tmp_path: Path) -> None:
    """A batch whose images and all their substitutes are unreadable stops the run with a
    DatasetError (before: 0 steps, and "trained 2 epochs")."""
    source = UnreadableAt(set(range(8)), num_images=8, seed=0, class_names=CLASSES, image_size=SIZE)
    trainer = make_trainer(tmp_path, source=source)
    with pytest.raises(DatasetError, match="training images in a row could not be read"):
        trainer.fit()
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------
# EMA, best.pt / last.pt, logs
# ---------------------------------------------------------------------------------------------


def test_ema_best_checkpoint_and_logs(tmp_path: Path) -> None:
    """With EMA on, evaluation sees the EMA copy, best.pt holds those EMA weights (what
    inference loads), checkpoints are written atomically, and the logs are complete."""
    evaluated = []

    def evaluate(model: torch.nn.Module) -> dict:
        evaluated.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        ap = [0.5, 0.3][len(evaluated) - 1]  # epoch 1 is the best
        return {"AP": ap, "AP50": ap + 0.1}

    trainer = make_trainer(tmp_path, evaluate=evaluate, ema=True, ema_decay=0.9)
    trainer.fit()
    assert [model for model, _ in evaluated] == [trainer.ema.module] * 2

    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (best["epoch"], best["best_ap"], last["epoch"]) == (1, 0.5, 2)
    assert best["metrics"]["AP"] == 0.5 and last["metrics"]["AP"] == 0.3
    for checkpoint, seen in ((best, evaluated[0][1]), (last, evaluated[1][1])):
        for name, value in seen.items():
            assert torch.equal(checkpoint["ema"][name], value), name
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["model"])
    assert inference_weights(best) is best["ema"]
    model, _ = model_from_checkpoint(tmp_path / "checkpoints" / "best.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, evaluated[0][1][name]), name

    # Atomic writes leave nothing else behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    log = records(tmp_path)
    assert [(r["kind"], r["epoch"], r["step"]) for r in log] == [
        ("step", 0, 1),
        ("step", 0, 2),
        ("epoch", 1, 2),
        ("eval", 1, 2),
        ("step", 1, 3),
        ("step", 1, 4),
        ("epoch", 2, 4),
        ("eval", 2, 4),
    ]
    for record in log:
        if record["kind"] == "step":  # the lr the logged step used: warm-up over epoch 1
            assert record["lr"] == pytest.approx(LR * lr_factor(record["step"] - 1, 4, 2, "cosine"))
            assert math.isfinite(record["loss"]) and "raw/cls" in record
    assert [r["AP"] for r in log if r["kind"] == "eval"] == [0.5, 0.3]
    image = cv2.imread(str(tmp_path / "curves.png"))
    assert image is not None and image.shape[0] > 100


@pytest.mark.parametrize(("fault", "exit_code"), [("sigint_in_finaliser", 130), ("sigterm", 143)])
def test_a_signal_stops_training_after_the_step(tmp_path: Path, fault: str, exit_code: int) -> None:
    """Ctrl-C (even one that lands inside a finaliser, where Python would drop it) or SIGTERM
    in the first step of epoch 2 ends the run after that step, with epoch 1's last.pt kept,
    and the previous signal handlers back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    objective = Scripted({3: fault})  # 2 steps per epoch: call 3 opens epoch 2
    trainer = make_trainer(tmp_path, objective, epochs=4)
    with pytest.raises(
        Interrupted, match=r"interrupted in epoch 2; checkpoints/last\.pt holds epoch 1"
    ) as raised:
        trainer.fit()
    assert raised.value.exit_code == exit_code
    assert objective.calls == 3 and trainer.epoch == 1
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    """A kill in the middle of torch.save leaves the previous checkpoint whole and no .tmp."""
    path = tmp_path / "last.pt"
    old = {"model": {"w": torch.ones(3)}, "model_config": {"backbone": "tiny"}, "epoch": 1}
    save_checkpoint(path, old)

    def killed_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**old, "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and per-epoch data
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_values_by_hand() -> None:
    # Linear warm-up over 4 steps: (step + 1) / 4.
    assert [lr_factor(s, 20, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine from 1 to min_factor 0.01 over the 16 steps after warm-up.
    assert lr_factor(4, 20, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 20, 4, "cosine") == pytest.approx(0.01 + 0.99 * 0.5)  # half-way
    assert lr_factor(8, 20, 4, "cosine") == pytest.approx(0.01 + 0.99 * 0.5 * (1 + 0.5**0.5))
    assert lr_factor(20, 20, 4, "cosine") == pytest.approx(0.01)
    assert lr_factor(25, 20, 4, "cosine") == pytest.approx(0.01)  # clamped past the end
    # Multistep: x0.1 at 70 % and again at 90 % of the 20 steps (after a 2-step warm-up).
    steps = [lr_factor(s, 20, 2, "multistep") for s in (0, 1, 2, 13, 14, 17, 18, 19)]
    assert steps == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(0, 20, 0, "constant") == lr_factor(19, 20, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 20, 0, "linear")


class EpochProbe(Dataset):
    """Reports the `epoch` attribute each sample was produced with."""

    epoch = 0

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "epoch": self.epoch}


def test_each_epoch_reaches_loader_workers() -> None:
    """The trainer sets dataset.epoch (fresh augmentations) and reseeds the loader each epoch;
    loader worker processes must see both, with the same order as loading in-process."""
    seen = {}
    for workers in (0, 1):
        dataset = EpochProbe()
        loader = build_loader(dataset, 4, shuffle=True, num_workers=workers, drop_last=True)
        for epoch in range(3):  # what Trainer._train_epoch does
            loader.generator.manual_seed(epoch)
            dataset.epoch = epoch
            batches = list(loader)
            assert all(b["epoch"].tolist() == [epoch] * 4 for b in batches), (workers, epoch)
            seen[workers, epoch] = [b["index"].tolist() for b in batches]
    assert all(seen[0, e] == seen[1, e] for e in range(3))
