"""model.init_from: start training from an earlier centerx checkpoint with another class list."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from centerx.model.centernet import build_model
from centerx.model.checkpoint import (
    CheckpointError,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from centerx.model.heads import HEATMAP_BIAS

FRUITS = ["apple", "banana", "orange"]
FIVE = ["apple", "mask", "banana", "no-mask", "orange"]


def fruits_checkpoint(path: Path, model_cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_cfg, len(FRUITS))
    with torch.no_grad():  # make every tensor distinguishable from a fresh init
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))
    meta = {
        "class_names": FRUITS,
        "model_config": OmegaConf.to_container(model_cfg),
        "image_size": 64,
    }
    save_checkpoint(path, {**meta, "model": model.state_dict(), "ema": None})
    return model


def test_three_class_checkpoint_seeds_a_five_class_model(tmp_path: Path, tiny_model_cfg) -> None:
    fruits = fruits_checkpoint(tmp_path / "fruits.pt", tiny_model_cfg)
    torch.manual_seed(1)
    model = build_model(tiny_model_cfg, len(FIVE))
    loaded = init_from_checkpoint(model, FIVE, tmp_path / "fruits.pt")
    assert loaded == {"classes_loaded": ["apple", "banana", "orange"], "classes_new": ["mask", "no-mask"],
                      "head_layers_skipped": []}  # fmt: skip
    theirs, ours = fruits.state_dict(), model.state_dict()
    for key, value in ours.items():
        if key.startswith("heads.heatmap.2."):
            continue
        assert torch.equal(value, theirs[key]), (
            key
        )  # backbone, neck, hidden head layers, wh, offset
    for name in FRUITS:  # heatmap output channels follow the class names
        for part in ("weight", "bias"):
            key = f"heads.heatmap.2.{part}"
            assert torch.equal(ours[key][FIVE.index(name)], theirs[key][FRUITS.index(name)])
    bias = ours["heads.heatmap.2.bias"]
    assert bias[FIVE.index("mask")] == pytest.approx(HEATMAP_BIAS)  # new classes: prior init
    assert bias[FIVE.index("no-mask")] == pytest.approx(HEATMAP_BIAS)


def test_another_backbone_is_refused(tmp_path: Path, tiny_model_cfg) -> None:
    fruits_checkpoint(tmp_path / "fruits.pt", tiny_model_cfg)
    tiny_model_cfg.backbones.tiny.module.width = 8
    with pytest.raises(CheckpointError, match="does not fit"):
        init_from_checkpoint(build_model(tiny_model_cfg, 5), FIVE, tmp_path / "fruits.pt")


@pytest.mark.slow
def test_cli_train_with_init_from(tmp_path: Path, tiny_model_cfg, run_ok) -> None:
    tiny_model_cfg.backbones.tiny.module.width = 16
    fruits_checkpoint(tmp_path / "fruits.pt", tiny_model_cfg)
    run = tmp_path / "run"
    done = run_ok(
        [sys.executable, "-m", "centerx", "train", f"model.init_from={tmp_path / 'fruits.pt'}",
         "data.class_names=[circle,square]", "data.image_size=64", "data.train.image_size=64",
         "data.val.image_size=64", "data.train.num_images=8", "data.val.num_images=4",
         "data.num_workers=0", "train.epochs=1", "train.progress=false", "samples.count=0",
         f"hydra.run.dir={run}"],
        300,
    )  # fmt: skip
    assert (
        "init_from" in done.stdout + done.stderr
        and "new (prior init) for ['circle', 'square']" in (done.stdout + done.stderr)
    )
    assert load_checkpoint(run / "checkpoints" / "best.pt")["class_names"] == ["circle", "square"]
