"""Shared fixtures for the test suite (kept small: other test modules define their own)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds conf/ and centerx/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def run_ok(repo_root: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a command from the repository root; the test fails, showing the tail of the
    command's output, unless it exits 0."""

    def run(
        command: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    return run


@pytest.fixture
def tiny_model_cfg(repo_root: Path) -> DictConfig:
    """The real `model` config group with the tiny backbone (a fresh copy per test)."""
    cfg = OmegaConf.load(repo_root / "conf" / "model" / "centernet.yaml")
    cfg.backbone = "tiny"
    return cfg


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for small CPU workloads (faster on a shared 2-core machine); restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
