"""The eval and predict subcommands (conf/eval.yaml, conf/predict.yaml); training is
centerx/engine/training.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DetectionSource
from centerx.engine import run_directory
from centerx.engine.build import build_eval_source, run_dir
from centerx.engine.evaluate import (
    Predictor,
    load_results,
    predict_source,
    torch_predictor,
    write_evaluation,
)
from centerx.engine.predict import predict_files
from centerx.errors import ConfigError
from centerx.model.checkpoint import model_from_checkpoint
from centerx_export.predictor import describe

log = logging.getLogger(__name__)

# What eval writes: a second eval into the same directory is refused (or overwrite=true).
EVAL_OUTPUTS = ("eval.json", "detections.json", "pr_curves.png")


@dataclass
class LoadedModel:
    predictor: Predictor
    class_names: list[str]
    image_size: int
    config: dict  # the training run's resolved config (its data section is the default eval data)


def load_for_inference(cfg: DictConfig) -> LoadedModel:
    """`checkpoint=PATH.pt` (PyTorch) or `checkpoint=PATH.onnx`; sizes default to the model's own."""
    if not cfg.get("checkpoint"):
        raise ConfigError("say which model to use: checkpoint=PATH.pt or checkpoint=PATH.onnx")
    path = Path(cfg.checkpoint)
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


def _model_detections(cfg: DictConfig, split: str) -> tuple[DetectionSource, list[dict], str]:
    """`checkpoint=`: the model's detections on its own data (or `data=`)."""
    loaded = load_for_inference(cfg)
    data_cfg = (
        cfg.data if cfg.get("data") is not None else OmegaConf.create(loaded.config.get("data"))
    )
    if not data_cfg:
        raise ConfigError(
            "the model carries no data config; choose one with data=synthetic|voc|coco"
        )
    source = build_eval_source(data_cfg, split, loaded.class_names)
    if list(source.class_names) != loaded.class_names:
        raise ConfigError(
            f"model classes {loaded.class_names} differ from the data's {source.class_names}"
        )
    detections = predict_source(
        loaded.predictor,
        source,
        loaded.image_size,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
    )
    return source, detections, str(cfg.checkpoint)


def eval_task(cfg: DictConfig) -> dict:
    """`eval checkpoint=PATH.pt|PATH.onnx` scores a model; `eval results=PATH.json data=...`
    scores a COCO results file made elsewhere (no model). Either way eval.json, detections.json
    and pr_curves.png (centerx.engine.evaluate.write_evaluation)."""
    split = cfg.get("split") or "val"
    if cfg.get("results"):
        if cfg.get("data") is None:
            raise ConfigError("results= needs the data it was made on: add data=synthetic|voc|coco")
        source = build_eval_source(cfg.data, split, cfg.data.get("class_names"))
        detections, title = load_results(cfg.results, source), str(cfg.results)
    else:
        source, detections, title = _model_detections(cfg, split)
    out_dir = run_dir()
    with run_directory.claim(out_dir, overwrite=bool(cfg.overwrite), outputs=EVAL_OUTPUTS):
        metrics = write_evaluation(source, detections, out_dir, title, cfg.eval.get("backend"))
    return {key: metrics[key] for key in ("AP", "AP50")} | {"run_dir": str(out_dir)}


def predict_task(cfg: DictConfig) -> dict:
    """Images, folders and videos through the deployment kit's one predict loop, with either
    model (the JSON schema is the same; export/README.md documents it)."""
    if not cfg.get("input"):
        raise ConfigError("say what to predict on: input=IMAGE_FOLDER_OR_VIDEO")
    loaded = load_for_inference(cfg)
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else run_dir()
    with run_directory.claim(out_dir, overwrite=bool(cfg.overwrite), outputs=("predictions.json",)):
        summary = predict_files(
            loaded.predictor,
            cfg.input,
            loaded.class_names,
            loaded.image_size,
            out_dir,
            cfg.score_threshold,
            model_name=str(cfg.checkpoint),
        )
    print(describe(summary, out_dir))
    return {"images": len(summary["images"]), "skipped": len(summary["skipped"])}
