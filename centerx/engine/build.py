"""Build the pieces of a run from the composed Hydra config (all via `_target_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DetectionSource
from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.engine import distributed as dist
from centerx.engine.checkpoint import inference_weights, load_checkpoint, to_plain
from centerx.engine.evaluate import evaluate_predictor, torch_predictor
from centerx.model.centernet import CenterNet, build_model


def run_dir() -> Path:
    """Hydra's run directory (Hydra 1.3 does not chdir; everything is written here)."""
    return Path(HydraConfig.get().runtime.output_dir)


def save_config(cfg: DictConfig, directory: Path) -> None:
    if dist.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def setup_process(cfg: DictConfig) -> None:
    """Threads, determinism and (under torchrun) the process group."""
    if cfg.train.get("num_threads"):
        torch.set_num_threads(int(cfg.train.num_threads))
    dist.init_from_env(cfg.train.device)


def build_sources(data_cfg: DictConfig) -> tuple[DetectionSource, DetectionSource]:
    """Train and val sources; val inherits the class list train discovered or was given."""
    train = instantiate(data_cfg.train)
    val = instantiate(data_cfg.val, class_names=list(train.class_names))
    return train, val


def build_train_loader(
    cfg: DictConfig, source: DetectionSource, augment: bool = True
) -> torch.utils.data.DataLoader:
    data = cfg.data
    dataset = TrainingDataset(
        source,
        data.image_size,
        augment=instantiate(data.augment) if augment else None,
        max_objects=data.max_objects,
        min_overlap=data.min_overlap,
        seed=cfg.seed,
    )
    per_rank = max(1, cfg.train.batch_size // dist.world_size())
    return build_loader(
        dataset,
        per_rank,
        shuffle=True,
        num_workers=data.num_workers,
        seed=cfg.seed,
        distributed=dist.is_distributed(),
        drop_last=len(dataset) > per_rank,
    )


def checkpoint_meta(cfg: DictConfig, class_names: list[str]) -> dict[str, Any]:
    """What every checkpoint carries so it can be rebuilt without the original config."""
    return to_plain(
        {
            "class_names": list(class_names),
            "model_config": cfg.model,
            "image_size": int(cfg.data.image_size),
            "config": cfg,
        }
    )


def model_from_checkpoint(path: str | Path) -> tuple[CenterNet, dict]:
    """Rebuild a model (architecture and classes from the checkpoint) with its weights, in eval mode."""
    state = load_checkpoint(path)
    model = build_model(state["model_config"], len(state["class_names"]), pretrained=False)
    model.load_state_dict(inference_weights(state))
    return model.eval(), state


def make_evaluator(cfg: DictConfig, source: DetectionSource):
    """A callable model -> COCO metrics on `source`, as the trainer's periodic evaluation."""
    ground_truth = source.to_coco()

    def evaluate(model: torch.nn.Module) -> dict:
        was_training = model.training
        model.eval()
        predictor = torch_predictor(model, k=cfg.eval.top_k, flip=cfg.eval.flip)
        metrics = evaluate_predictor(
            predictor,
            source,
            cfg.data.image_size,
            batch_size=cfg.eval.batch_size,
            ground_truth=ground_truth,
            progress=cfg.train.progress,
        )
        model.train(was_training)
        return metrics

    return evaluate
