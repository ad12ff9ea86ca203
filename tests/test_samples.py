"""The sample grid written after training shows images from across the evaluation set."""

from __future__ import annotations

from pathlib import Path

from centerx.data.synthetic import SyntheticShapes
from centerx.engine.evaluate import torch_predictor
from centerx.engine.training import draw_samples
from centerx.model.centernet import build_model


def test_draw_samples_spreads_over_the_set_and_count_0_draws_nothing(
    tmp_path: Path, tiny_model_cfg
) -> None:
    # Real sets are often sorted by class (the fruits test set: apples first); the first
    # `count` images would all show one class.
    source = SyntheticShapes(num_images=20, seed=0, image_size=64)
    loaded: list[int] = []
    load_image = source.load_image
    source.load_image = lambda index: (loaded.append(index), load_image(index))[1]
    predictor = torch_predictor(build_model(tiny_model_cfg, source.num_classes).eval())

    draw_samples(predictor, source, 64, tmp_path / "grid.png", count=4)
    assert loaded == [0, 5, 10, 15]
    assert (tmp_path / "grid.png").stat().st_size > 0

    loaded.clear()
    draw_samples(predictor, source, 64, tmp_path / "none.png", count=0)
    assert loaded == [] and not (tmp_path / "none.png").exists()
