"""A real learning test: the tiny CenterNet trained on synthetic shapes for a few CPU minutes
must detect held-out images (a different seed) at AP50 >= 0.9, scored by pycocotools.

The recipe is exactly `bash run.sh train`'s defaults; the run goes
through the CLI exactly as a user would start it, and its eval.json is read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The defaults of `bash run.sh train` (8 epochs of 2048 images, batch 16, AdamW 4e-3, cosine);
# only the progress bar and the intermediate evaluations are switched off.
LEARNING_OVERRIDES = ["train.progress=false", "train.eval_every=8"]


@pytest.mark.slow
def test_tiny_model_learns_synthetic_shapes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "centerx", "train", *LEARNING_OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # generous: ~100 s wall (185 s CPU) on an idle 2-core machine
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "eval.json").read_text())
    print(f"learning test: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f} in {elapsed:.0f} s")
    # Held out: the val split is rendered from another seed than the training images.
    config = (run_dir / "config.yaml").read_text()
    assert "seed: 1" in config and "seed: 0" in config
    assert metrics["AP50"] >= 0.9, metrics
    assert all(ap is not None and ap > 0.5 for ap in metrics["per_class_AP50"].values()), metrics
