"""`python -m centerx ...` fails fast, with a non-zero exit and a message that names the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Small, quick runs: 64 px images, no loader workers, one torch thread.
FAST = [
    "train.progress=false",
    "train.num_threads=1",
    "data.num_workers=0",
    "data.image_size=64",
    "data.train.image_size=64",
    "data.val.image_size=64",
    "data.train.num_images=16",
    "data.val.num_images=8",
    "samples.count=1",
]


def run_cli(repo_root: Path, run_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI in a subprocess; returns (exit code, stdout + stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    done = subprocess.run(
        [sys.executable, "-m", "centerx", *args, f"hydra.run.dir={run_dir}"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def test_unknown_override_key(repo_root: Path, tmp_path: Path) -> None:
    code, output = run_cli(repo_root, tmp_path / "run", "train", "train.epochz=3", timeout=60)
    assert code != 0
    assert "Could not override 'train.epochz'" in output
    assert "Key 'epochz' is not in struct" in output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_subcommand(repo_root: Path, tmp_path: Path) -> None:
    code, output = run_cli(repo_root, tmp_path / "run", "trian", "train.epochs=1", timeout=60)
    assert code != 0
    assert "unknown subcommand 'trian'" in output
    for name in ("train", "eval", "predict", "export"):
        assert name in output


def test_missing_data_root(repo_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_voc"
    code, output = run_cli(
        repo_root, tmp_path / "run", "train", "data=voc", f"data.root={missing}", timeout=60
    )
    assert code != 0
    assert f"VOC root {missing} is not a folder" in output


def test_missing_eval_checkpoint(repo_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.pt"
    code, output = run_cli(repo_root, tmp_path / "run", "eval", f"checkpoint={missing}", timeout=60)
    assert code != 0
    assert f"checkpoint not found: {missing}" in output


def test_unknown_backbone_lists_backbones(repo_root: Path, tmp_path: Path) -> None:
    code, output = run_cli(
        repo_root, tmp_path / "run", "train", "model.backbone=nope", *FAST, timeout=60
    )
    assert code != 0
    assert "unknown model.backbone='nope'" in output
    for name in ("tiny", "resnet18", "resnet34", "resnet50", "efficientnet_lite0"):
        assert f"'{name}'" in output


@pytest.fixture(scope="module")
def two_class_checkpoint(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.pt of a tiny one-epoch run on [circle, square]."""
    run_dir = tmp_path_factory.mktemp("two_class") / "run"
    code, output = run_cli(
        repo_root,
        run_dir,
        "train",
        "data.class_names=[circle,square]",
        "train.epochs=1",
        *FAST,
        timeout=180,
    )
    assert code == 0, output[-3000:]
    path = run_dir / "checkpoints" / "last.pt"
    assert path.is_file()
    return path


def test_resume_with_other_classes_names_both_lists(
    repo_root: Path, tmp_path: Path, two_class_checkpoint: Path
) -> None:
    state = torch.load(two_class_checkpoint, map_location="cpu", weights_only=True)
    assert state["class_names"] == ["circle", "square"] and state["epoch"] == 1
    code, output = run_cli(
        repo_root,
        tmp_path / "run",
        "train",
        f"train.resume={two_class_checkpoint}",
        "train.epochs=2",
        *FAST,
        timeout=90,
    )
    assert code != 0
    assert str(two_class_checkpoint) in output
    assert "['circle', 'square']" in output
    assert "['circle', 'square', 'triangle']" in output
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
