"""The train, eval and predict subcommands (the Hydra configs are conf/{train,eval,predict}.yaml)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DetectionSource
from centerx.engine import distributed as dist
from centerx.engine.build import (
    build_sources,
    build_train_loader,
    checkpoint_meta,
    make_evaluator,
    model_from_checkpoint,
    run_dir,
    save_config,
    setup_process,
)
from centerx.engine.evaluate import Predictor, evaluate_predictor, format_table, torch_predictor
from centerx.engine.predict import predict_files, predict_image
from centerx.engine.trainer import SupervisedObjective, Trainer, seed_everything
from centerx.model.centernet import build_model
from centerx.utils.visualize import draw_detections, image_grid, save_rgb
from centerx_export.predictor import list_images

log = logging.getLogger(__name__)


def write_json(path: Path, value: dict) -> None:
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1))


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
        image = source.load_image(index)
        boxes, scores, classes = predict_image(predictor, image, image_size, score_threshold)
        tiles.append(draw_detections(image, boxes, scores, classes, source.class_names))
    per_row = 4
    save_rgb(out_path, image_grid([tiles[i : i + per_row] for i in range(0, len(tiles), per_row)]))


def train_model(
    cfg: DictConfig, train_source: DetectionSource, val_source: DetectionSource, out_dir: Path
) -> Trainer:
    """Train a CenterNet with the supervised objective; the building block of every recipe."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model, train_source.num_classes)
    trainer = Trainer(
        model,
        SupervisedObjective(instantiate(cfg.loss.criterion)),
        instantiate(cfg.loss.weighter),
        build_train_loader(cfg, train_source),
        cfg.train,
        out_dir,
        checkpoint_meta(cfg, train_source.class_names),
        evaluate=make_evaluator(cfg, val_source),
    )
    if cfg.train.resume:
        trainer.resume(cfg.train.resume)
    trainer.fit()
    return trainer


def finish_run(cfg: DictConfig, out_dir: Path, val_source: DetectionSource) -> dict:
    """Evaluate checkpoints/best.pt into eval.json, print the table, draw sample detections."""
    model, _ = model_from_checkpoint(out_dir / "checkpoints" / "best.pt")
    predictor = torch_predictor(model, k=cfg.eval.top_k, flip=cfg.eval.flip)
    metrics = evaluate_predictor(
        predictor,
        val_source,
        cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        progress=cfg.train.progress,
    )
    if dist.is_main():
        write_json(out_dir / "eval.json", metrics)
        print(format_table(metrics, title=f"{out_dir.name} (best.pt)"))
        draw_samples(
            predictor,
            val_source,
            cfg.data.image_size,
            out_dir / "samples.png",
            cfg.samples.count,
            cfg.samples.score_threshold,
        )
    return metrics


def train_task(cfg: DictConfig) -> dict:
    setup_process(cfg)
    out_dir = run_dir()
    save_config(cfg, out_dir)
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


@dataclass
class LoadedModel:
    predictor: Predictor
    class_names: list[str]
    image_size: int
    config: dict  # the training run's resolved config (its data section is the default eval data)


def load_for_inference(cfg: DictConfig) -> LoadedModel:
    """`checkpoint=PATH.pt` (PyTorch) or `model=PATH.onnx|PATH.pt`; sizes default to the model's own."""
    path = cfg.get("model") or cfg.get("checkpoint")
    if not path:
        raise ValueError("say which model to use: checkpoint=PATH.pt or model=PATH.onnx")
    path = Path(path)
    if path.suffix == ".onnx":
        from centerx_export.predictor import OnnxDetector

        detector = OnnxDetector(path, top_k=cfg.eval.top_k)
        size = int(cfg.get("image_size") or detector.image_size)
        return LoadedModel(
            detector.predict_letterboxed,
            detector.class_names,
            size,
            detector.metadata.get("config", {}),
        )
    model, state = model_from_checkpoint(path)
    size = int(cfg.get("image_size") or state["image_size"])
    predictor = torch_predictor(model, k=cfg.eval.top_k, flip=cfg.eval.flip)
    return LoadedModel(predictor, list(state["class_names"]), size, state.get("config", {}))


def eval_task(cfg: DictConfig) -> dict:
    loaded = load_for_inference(cfg)
    data_cfg = (
        cfg.data if cfg.get("data") is not None else OmegaConf.create(loaded.config.get("data"))
    )
    if data_cfg is None:
        raise ValueError(
            "the model carries no data config; choose one with data=synthetic|voc|coco"
        )
    _, val_source = build_sources(data_cfg)
    if list(val_source.class_names) != loaded.class_names:
        raise ValueError(
            f"model classes {loaded.class_names} differ from the data's {val_source.class_names}"
        )
    metrics = evaluate_predictor(
        loaded.predictor, val_source, loaded.image_size, batch_size=cfg.eval.batch_size
    )
    out_dir = run_dir()
    write_json(out_dir / "eval.json", metrics)
    print(format_table(metrics, title=str(cfg.get("model") or cfg.get("checkpoint"))))
    return {key: metrics[key] for key in ("AP", "AP50")} | {"run_dir": str(out_dir)}


def predict_task(cfg: DictConfig) -> dict:
    if not cfg.get("input"):
        raise ValueError("say what to predict on: input=IMAGE_OR_FOLDER")
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else run_dir()
    path = str(cfg.get("model") or cfg.get("checkpoint") or "")
    if path.endswith(".onnx"):
        # The torch-free deployment predictor does the whole job (read, letterbox, run, draw).
        from centerx_export.predictor import OnnxDetector
        from centerx_export.predictor import predict_files as predict_onnx_files

        detector = OnnxDetector(path, top_k=cfg.eval.top_k)
        if cfg.get("image_size"):
            detector.image_size = int(cfg.image_size)
        summary = predict_onnx_files(detector, cfg.input, out_dir, cfg.score_threshold)
    else:
        loaded = load_for_inference(cfg)
        summary = predict_files(
            loaded.predictor,
            list_images(cfg.input),
            loaded.class_names,
            loaded.image_size,
            out_dir,
            cfg.score_threshold,
        )
    count = sum(len(item["detections"]) for item in summary["images"])
    print(f"{count} detections in {len(summary['images'])} images -> {out_dir}")
    return {
        "images": len(summary["images"]),
        "detections": count,
        "skipped": len(summary["skipped"]),
    }
