"""Exact resume through the real CLI, and the checkpoint file contract.

Train 3 epochs straight; separately train the same 3-epoch run, kill it (SIGTERM, as a job
scheduler would) while it is in epoch 3, and resume it from checkpoints/last.pt: the final
weights, optimizer state, schedule, RNG state, epoch-3 loss and evaluation are bit-identical.

The interrupted run is configured with epochs=3 from the start: the learning-rate schedule
depends on the total number of steps, so "2 epochs, then resume to 3" would be a different run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.optim import lr_factor
from centerx.engine.trainer import Trainer, resume_changes
from centerx.errors import ConfigError
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.weighting import FixedWeights
from centerx.model.centernet import build_model
from centerx.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    to_plain,
)
from centerx.objectives.supervised import SupervisedObjective
from centerx.utils.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
TINY = [
    f"train.epochs={EPOCHS}",
    "data.train.num_images=32",  # 4 steps of 8 per epoch
    "data.val.num_images=8",
    "train.batch_size=8",
    "train.progress=false",
    "train.num_threads=1",
    "train.log_every=1",
]
RUN_TIMEOUT_S = 180


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "centerx", "train", *TINY, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output[-5000:]
    return output


def saved_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


def kill_in_epoch_3(run_dir: Path, num_workers: int) -> tuple[subprocess.Popen, str] | None:
    """Start the 3-epoch run, SIGTERM it once last.pt holds epoch 2; None if it won the race
    (finished epoch 3 before the signal landed; epochs take ~1 s, polling 20 ms)."""
    process = start(run_dir, f"data.num_workers={num_workers}")
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen_mtime = None
    while process.poll() is None and time.monotonic() < deadline:
        mtime = last.stat().st_mtime_ns if last.is_file() else None
        if mtime is not None and mtime != seen_mtime:
            seen_mtime = mtime
            # os.replace makes the new file appear whole: no partial reads.
            if saved_epoch(last) == 2:
                process.send_signal(signal.SIGTERM)
                break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    if process.returncode == 0:
        return None
    return process, output


def assert_same_state(ours: dict, theirs: dict, path: str = "") -> None:
    """Bit-identical nested checkpoint contents (tensors with torch.equal)."""
    if torch.is_tensor(ours):
        assert torch.is_tensor(theirs) and torch.equal(ours, theirs), path
    elif isinstance(ours, dict):
        assert set(ours) == set(theirs), f"{path}: keys {set(ours) ^ set(theirs)}"
        for key in ours:
            assert_same_state(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(ours, list | tuple):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_state(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


class Background:
    """A run started now and waited for on first use (it overlaps the interrupted run)."""

    def __init__(self, run_dir: Path, *overrides: str) -> None:
        self.run_dir = run_dir
        self.process: subprocess.Popen | None = start(run_dir, *overrides)

    def __call__(self) -> Path:
        if self.process is not None:
            process, self.process = self.process, None
            finish(process)
        return self.run_dir


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The reference: 3 epochs in one go (num_workers=0). Call it to wait for the result."""
    background = Background(tmp_path_factory.mktemp("straight") / "run", "data.num_workers=0")
    yield background
    if background.process is not None:
        background.process.kill()
        background.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_killed_and_resumed_run_equals_straight_run(
    straight_run: Background, tmp_path: Path, num_workers: int
) -> None:
    """num_workers=1 is compared with the same num_workers=0 reference: a sample depends only
    on (seed, epoch, index) and the order only on the loader's generator, so the number of
    loader processes must not change the result either."""
    run_dir = tmp_path / "run"
    for _attempt in range(2):
        killed = kill_in_epoch_3(run_dir, num_workers)
        if killed is not None:
            break
        run_dir = tmp_path / "run_retry"  # lost the race; very unlikely twice
    else:
        pytest.fail("the run finished before it could be interrupted in epoch 3, twice")
    process, output = killed

    # A graceful stop: one line says where to resume from (no traceback), last.pt is whole.
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert (
        f"centerx: error: interrupted in epoch 3; checkpoints/last.pt holds epoch 2 (resume "
        f"with: train.resume={run_dir / 'checkpoints' / 'last.pt'} hydra.run.dir={run_dir})"
    ) in output, output[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    interrupted = torch.load(last, map_location="cpu", weights_only=True)
    assert (interrupted["epoch"], interrupted["global_step"]) == (2, 8)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    # Resume in the same run directory: metrics.jsonl is cut back to last.pt's step first.
    finish(start(run_dir, f"data.num_workers={num_workers}", f"train.resume={last}"))

    reference_dir = straight_run()
    reference = torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (EPOCHS, 12)
    # Everything but the run config (which differs in train.resume / num_workers) and the
    # wall-clock training time (which only has to keep counting across the restart).
    for key in sorted(set(reference) - {"config", "train_seconds"}):
        assert_same_state(resumed[key], reference[key], key)
    assert resumed["train_seconds"] > interrupted["train_seconds"] > 0
    assert resumed["config"]["train"]["resume"] == str(last)

    # The epoch-3 training loss and the final evaluation agree too.
    def epoch_records(path: Path) -> dict[int, dict]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return {r["epoch"]: r for r in map(json.loads, lines) if r["kind"] == "epoch"}

    assert epoch_records(run_dir)[3] == epoch_records(reference_dir)[3]

    # ... and the resumed run's log is the straight run's: no record twice.
    def kinds_and_steps(path: Path) -> list[tuple[str, int]]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [(r["kind"], r["step"]) for r in map(json.loads, lines)]

    assert kinds_and_steps(run_dir) == kinds_and_steps(reference_dir)
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads(
        (reference_dir / "eval.json").read_text()
    )


@pytest.mark.slow
def test_checkpoint_is_plain_and_self_describing(straight_run: Background) -> None:
    """weights_only=True loads it (no pickled classes), and it carries what is needed to
    rebuild the model without the original config files."""
    run_dir = straight_run()
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)

    def assert_plain(value, path="") -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str | int), f"{path}: key {key!r}"
                assert_plain(item, f"{path}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                assert_plain(item, f"{path}[{i}]")
        else:
            allowed = (str, int, float, bool, type(None), torch.Tensor)
            assert isinstance(value, allowed), f"{path}: {type(value).__name__}"

    assert_plain(state)
    assert state["class_names"] == ["circle", "square", "triangle"]
    assert type(state["model_config"]) is dict and state["model_config"]["backbone"] == "tiny"
    assert type(state["config"]) is dict
    assert state["config"]["train"]["epochs"] == EPOCHS
    assert state["config"]["model"] == state["model_config"]
    assert state["image_size"] == 128
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "global_step", "metrics"):
        assert key in state
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert not model.training and model.num_classes == 3


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path: Path) -> None:
    """Truncated, empty, foreign and missing files: CheckpointError naming the file."""
    good = tmp_path / "good.pt"
    save_checkpoint(
        good,
        {
            "model": {"w": torch.randn(64, 64)},
            "model_config": {"backbone": "tiny"},
            "class_names": ["a"],
        },
    )
    assert load_checkpoint(good)["class_names"] == ["a"]
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "cut_at_end.pt": data[:-10],
        "empty.pt": b"",
        "text.pt": b"not a checkpoint\n",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    for name in [*cases, "foreign.pt", "missing.pt"]:
        with pytest.raises(CheckpointError, match=re.escape(name)):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match=re.escape("truncated.pt")):
        model_from_checkpoint(tmp_path / "truncated.pt")


# ---------------------------------------------------------------------------------------------
# Resuming with other settings, into the same or another run directory (Trainer, in-process)
# ---------------------------------------------------------------------------------------------


def tiny_trainer(run_dir: Path, **train_overrides) -> Trainer:
    """A 2-steps-per-epoch Trainer whose checkpoints record its `train` config."""
    torch.set_num_threads(1)
    cfg = OmegaConf.load(REPO / "conf" / "train" / "default.yaml")
    cfg.seed = 0
    cfg.merge_with(
        {"epochs": 2, "progress": False, "warmup_epochs": 0, "batch_size": 4, "log_every": 1}
    )
    cfg.merge_with(train_overrides)
    source = SyntheticShapes(num_images=8, seed=0, image_size=64)
    loader = build_loader(
        TrainingDataset(source, 64, augment=None), 4, shuffle=True, drop_last=True
    )
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "centernet.yaml")
    torch.manual_seed(0)
    meta = to_plain(
        {
            "class_names": source.class_names,
            "model_config": model_cfg,
            "image_size": 64,
            "config": {"train": cfg},
        }
    )
    weights = OmegaConf.load(REPO / "conf" / "loss" / "fixed.yaml").weighter.weights
    return Trainer(
        build_model(model_cfg, source.num_classes),
        SupervisedObjective(CenterNetLoss()),
        FixedWeights(dict(weights)),
        loader,
        cfg,
        run_dir,
        meta,
        evaluate=lambda model: {"AP": 0.5, "AP50": 0.6},
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run directory after 2 epochs (last.pt, best.pt, metrics.jsonl)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    tiny_trainer(run_dir).fit()
    return run_dir


def test_resume_classifies_changed_settings() -> None:
    saved = {"train": {"lr": 0.004, "batch_size": 8, "device": "cpu"}, "data": {"root": "a"}}
    current = {"train": {"lr": 0.001, "batch_size": 8, "device": "cuda"}, "data": {"root": "b"}}
    assert resume_changes(saved, current) == {
        "refused": [],
        "applied": ["train.lr: 0.004 -> 0.001"],
        "other": ["data.root: 'a' -> 'b'"],  # train.device: followed without a word
    }
    current["train"]["batch_size"] = 4
    current["model"] = saved["model"] = {"backbone": "tiny", "init_from": None}
    current["model"]["init_from"] = "x.pt"  # fine-tuning source: irrelevant once resumed
    assert resume_changes(saved, current)["refused"] == ["train.batch_size: 8 -> 4"]


def test_resume_applies_a_new_lr_and_more_epochs(finished_run: Path, tmp_path: Path, caplog):
    """train.lr and train.epochs may change: the lr from the resumed step on is the new base
    rate times the schedule re-planned for the new total (before: the new lr was ignored)."""
    trainer = tiny_trainer(finished_run, lr=0.001, epochs=4)
    with caplog.at_level(logging.WARNING):
        trainer.resume(finished_run / "checkpoints" / "last.pt")
    assert "train.epochs: 2 -> 4; train.lr: 0.004 -> 0.001" in caplog.text
    step = trainer.global_step
    assert step == 4
    expected = 0.001 * lr_factor(step, 4 * 2, 0, "cosine")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.001)
    trainer.scheduler.step()  # the schedule goes on from there
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.001 * lr_factor(step + 1, 8, 0, "cosine"), rel=1e-12
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 8}, r"changed train\.batch_size: 4 -> 8"),
        ({"weight_decay": 0.1}, r"changed train\.weight_decay"),
        ({"epochs": 2}, r"holds epoch 2: train\.epochs=2 leaves nothing to train"),
    ],
)
def test_resume_refuses_settings_the_run_depends_on(finished_run: Path, overrides, message):
    trainer = tiny_trainer(finished_run, **{"epochs": 3, **overrides})
    with pytest.raises(ConfigError, match=message):
        trainer.resume(finished_run / "checkpoints" / "last.pt")


def test_resume_into_the_same_dir_cuts_the_log_back(finished_run: Path, tmp_path: Path) -> None:
    """Records after the checkpoint's step (a run killed in epoch 3 logged them) are dropped, so
    the resumed run does not write them twice."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"kind": "step", "step": 5, "epoch": 2, "loss": 1.0}) + "\n")
    before = read_metrics(run_dir / "metrics.jsonl")
    trainer = tiny_trainer(run_dir, epochs=3)
    trainer.resume(run_dir / "checkpoints" / "last.pt")
    assert read_metrics(run_dir / "metrics.jsonl") == before[:-1]
    trainer.fit()
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_resume_into_a_new_dir_brings_best_pt(finished_run: Path, tmp_path: Path) -> None:
    """The stored best AP (0.5) is never beaten after resuming (0.5 again): best.pt must still
    be there at the end (before: never written, then "checkpoint not found")."""
    run_dir = tmp_path / "new_run"
    trainer = tiny_trainer(run_dir, epochs=3)
    trainer.resume(finished_run / "checkpoints" / "last.pt")
    trainer.fit()
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert (best["epoch"], best["best_ap"]) == (
        load_checkpoint(finished_run / "checkpoints" / "best.pt")["epoch"],
        0.5,
    )
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 3
