"""Exact resume through the real CLI, and the checkpoint file contract.

Train 3 epochs straight; separately train the same 3-epoch run, kill it (SIGTERM, as a job
scheduler would) while it is in epoch 3, and resume it from checkpoints/last.pt: the final
weights, optimizer state, schedule, RNG state, epoch-3 loss and evaluation are bit-identical.

The interrupted run is configured with epochs=3 from the start: the learning-rate schedule
depends on the total number of steps, so "2 epochs, then resume to 3" would be a different run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from centerx.engine.build import model_from_checkpoint
from centerx.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

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

    # A graceful stop: the trainer says where to resume from, and last.pt is whole.
    assert process.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1), output[-3000:]
    assert "interrupted in epoch 3; checkpoints/last.pt holds epoch 2" in output, output[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    interrupted = torch.load(last, map_location="cpu", weights_only=True)
    assert (interrupted["epoch"], interrupted["global_step"]) == (2, 8)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    # Resume in the same run directory (metrics.jsonl is appended to).
    finish(start(run_dir, f"data.num_workers={num_workers}", f"train.resume={last}"))

    reference_dir = straight_run()
    reference = torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (EPOCHS, 12)
    # Everything but the run config (which differs in train.resume / num_workers).
    for key in sorted(set(reference) - {"config"}):
        assert_same_state(resumed[key], reference[key], key)
    assert resumed["config"]["train"]["resume"] == str(last)

    # The epoch-3 training loss and the final evaluation agree too.
    def epoch_records(path: Path) -> dict[int, dict]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return {r["epoch"]: r for r in map(json.loads, lines) if r["kind"] == "epoch"}

    assert epoch_records(run_dir)[3] == epoch_records(reference_dir)[3]
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
