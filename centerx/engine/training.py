"""The one training path: `train` and `distill` (conf/train.yaml, conf/distill.yaml).

A run is data + model + objective + weighter, each built from its own sub-config, handed to the
Trainer. Plain training and distillation differ only in the objective (`objective=supervised`
or `objective=distill`); everything else is this code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from centerx.data.base import DetectionSource, ImageReadError
from centerx.data.pipeline import check_data_config
from centerx.engine import distributed as dist
from centerx.engine import run_directory
from centerx.engine.build import (
    build_sources,
    build_train_loader,
    check_eval_config,
    checkpoint_meta,
    make_evaluator,
    run_dir,
    save_config,
    setup_process,
)
from centerx.engine.evaluate import Predictor, predict_source, torch_predictor, write_evaluation
from centerx.engine.predict import predict_image
from centerx.engine.trainer import (
    Trainer,
    check_train_config,
    resolve_device,
    seed_everything,
)
from centerx.errors import ConfigError, check_number
from centerx.model.centernet import CenterNet, build_model, check_model_config
from centerx.model.checkpoint import init_from_checkpoint, model_from_checkpoint
from centerx.objectives import Objective, ObjectiveContext
from centerx.utils.visualize import draw_detections, image_grid, save_rgb

log = logging.getLogger(__name__)


def build_objective(objective_cfg: DictConfig, context: ObjectiveContext) -> Objective:
    """conf/objective/<name>.yaml's `_target_`, called with the run's context."""
    return instantiate(objective_cfg, _partial_=True)(context=context)


def check_weighter_covers(weighter: Any, term_names: Sequence[str]) -> None:
    """Fail before training when the weighter has no target/weight for a term (by exact name)."""
    table = getattr(weighter, "targets", None)
    if table is None:
        table = getattr(weighter, "weights", None)
    if not isinstance(table, Mapping):
        return
    missing = [name for name in term_names if name not in table]
    if missing:
        key = "targets" if hasattr(weighter, "targets") else "weights"
        raise ConfigError(
            f"the loss weighter {type(weighter).__name__} has no entry for loss term(s) "
            f"{missing} (configured: {sorted(table)})",
            f"use loss=adaptive or add them, e.g. +loss.weighter.{key}.{missing[0]}=1.0",
        )


def build_student(model_cfg: DictConfig, class_names: list[str]) -> CenterNet:
    """The model to train; `model.init_from` seeds it from an earlier centerx checkpoint."""
    model = build_model(model_cfg, len(class_names))
    if model_cfg.get("init_from"):
        loaded = init_from_checkpoint(model, class_names, model_cfg.init_from)
        log.info(
            "init_from %s: backbone and neck loaded; heatmap channels loaded for %s, new "
            "(prior init) for %s; head layers not loaded (shapes differ): %s",
            model_cfg.init_from,
            loaded["classes_loaded"],
            loaded["classes_new"],
            loaded["head_layers_skipped"] or "none",
        )
    return model


def build_trainer(
    cfg: DictConfig, train_source: DetectionSource, val_source: DetectionSource, out_dir: Path
) -> Trainer:
    """Objective (teachers load here), weighter, model and loader; every configuration error is
    raised before the first step."""
    class_names = list(train_source.class_names)
    device = resolve_device(cfg.train.device)
    context = ObjectiveContext(class_names, int(cfg.data.image_size), device, train_source)
    objective = build_objective(cfg.objective, context)
    weighter = instantiate(cfg.loss.weighter)
    check_weighter_covers(weighter, objective.term_names)
    seed_everything(cfg.seed)  # after the teachers: the model's init does not depend on them
    model = build_student(cfg.model, class_names)
    return Trainer(
        model,
        objective,
        weighter,
        build_train_loader(
            cfg.data,
            train_source,
            cfg.train.batch_size,
            cfg.seed,
            pin_memory=device.type == "cuda",
        ),
        cfg.train,
        out_dir,
        checkpoint_meta(cfg, class_names),
        evaluate=make_evaluator(val_source, cfg.data.image_size, cfg.eval, cfg.train.progress),
    )


def train_model(
    cfg: DictConfig, train_source: DetectionSource, val_source: DetectionSource, out_dir: Path
) -> Trainer:
    """Build, resume when asked, and train; checkpoints land in out_dir/checkpoints."""
    trainer = build_trainer(cfg, train_source, val_source, out_dir)
    if cfg.train.resume:
        trainer.resume(cfg.train.resume)
    trainer.fit()
    return trainer


def draw_samples(
    predictor: Predictor,
    source: DetectionSource,
    image_size: int,
    out_path: Path,
    count: int = 8,
    score_threshold: float = 0.3,
) -> None:
    """A grid of `count` images spread evenly over `source` (sorted sets vary by class);
    `count` 0 draws nothing."""
    if count <= 0 or len(source) == 0:
        return
    tiles = []
    for index in range(0, len(source), max(1, len(source) // count))[:count]:
        try:
            image = source.load_image(index)
        except ImageReadError as err:  # evaluation skipped it too
            log.warning("samples.png: skipping unreadable image: %s", err)
            continue
        boxes, scores, classes = predict_image(predictor, image, image_size, score_threshold)
        tiles.append(draw_detections(image, boxes, scores, classes, source.class_names))
    if not tiles:
        return
    per_row = 4
    save_rgb(out_path, image_grid([tiles[i : i + per_row] for i in range(0, len(tiles), per_row)]))


def finish_run(cfg: DictConfig, out_dir: Path, val_source: DetectionSource) -> dict:
    """Evaluate checkpoints/best.pt into eval.json, detections.json and pr_curves.png, print the
    table, draw sample detections."""
    model, _ = model_from_checkpoint(out_dir / "checkpoints" / "best.pt")
    predictor = torch_predictor(model, k=cfg.eval.top_k, flip=cfg.eval.flip)
    detections = predict_source(
        predictor,
        val_source,
        cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        progress=cfg.train.progress,
    )
    metrics = write_evaluation(val_source, detections, out_dir, f"{out_dir.name} (best.pt)")
    if dist.is_main():
        draw_samples(
            predictor,
            val_source,
            cfg.data.image_size,
            out_dir / "samples.png",
            cfg.samples.count,
            cfg.samples.score_threshold,
        )
    return metrics


def check_config(cfg: DictConfig) -> None:
    """Every sub-config a training run uses, before any data is read or anything is written
    (each check lives beside the code that uses its settings)."""
    check_train_config(cfg.train)
    check_data_config(cfg.data)
    check_model_config(cfg.model)
    check_eval_config(cfg.eval)
    check_number(cfg.samples, "count", "samples", integer=True, minimum=0)
    check_number(cfg.samples, "score_threshold", "samples", minimum=0, below=1)
    if not isinstance(cfg.get("overwrite"), bool):
        raise ConfigError(f"overwrite={cfg.get('overwrite')!r} must be true or false")


@contextlib.contextmanager
def claim_run_dir(
    cfg: DictConfig, out_dir: Path, resuming: bool, resume_with: str
) -> Iterator[None]:
    """Hold the run directory (centerx.engine.run_directory) and record the config in it."""
    overwrite = bool(cfg.overwrite)
    with run_directory.claim(
        out_dir, resuming=resuming, overwrite=overwrite, resume_with=resume_with
    ):
        save_config(cfg, out_dir)
        yield


def train_task(cfg: DictConfig) -> dict:
    """`run.sh train` and `run.sh distill`: train, evaluate best.pt, draw samples."""
    check_config(cfg)
    setup_process(cfg.train)
    out_dir = run_dir()
    resuming = run_directory.resumes_into(cfg.train.resume, out_dir)
    with claim_run_dir(cfg, out_dir, resuming, f"train.resume={out_dir}/checkpoints/last.pt"):
        train_source, val_source = build_sources(cfg.data)
        log.info(
            "train: %d images, val: %d images, classes %s",
            len(train_source),
            len(val_source),
            train_source.class_names,
        )
        train_model(cfg, train_source, val_source, out_dir)
        metrics = finish_run(cfg, out_dir, val_source)
    dist.shutdown()
    return {key: metrics[key] for key in ("AP", "AP50")} | {"run_dir": str(out_dir)}
