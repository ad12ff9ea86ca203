"""Build the pieces of a run, each from its own sub-config (`_target_` instantiation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DatasetError, DetectionSource
from centerx.data.cache import CachedImages
from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.data.sampling import BalancedGroupSampler
from centerx.engine import distributed as dist
from centerx.engine.evaluate import evaluate_predictor, torch_predictor
from centerx.errors import check_number
from centerx.model.checkpoint import to_plain

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """Hydra's run directory (Hydra 1.3 does not chdir; everything is written here)."""
    return Path(HydraConfig.get().runtime.output_dir)


def save_config(cfg: DictConfig, directory: Path) -> None:
    if dist.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def setup_process(train_cfg: DictConfig) -> None:
    """Threads and (under torchrun) the process group."""
    if train_cfg.get("num_threads"):
        torch.set_num_threads(int(train_cfg.num_threads))
    # Well-classified background gives subnormal gradients under the focal losses; on CPU those
    # are several times slower to compute and change nothing measurable.
    torch.set_flush_denormal(True)
    dist.init_from_env(train_cfg.device)


def build_sources(data_cfg: DictConfig) -> tuple[DetectionSource, DetectionSource]:
    """Train and val sources; val takes the class list train discovered or was given. With
    `data.cache` (MiB) both keep their decoded images in RAM, filled here, in the main process,
    so that the loader workers forked from it share them."""
    train = instantiate(data_cfg.train)
    val = build_eval_source(data_cfg, "val", list(train.class_names))
    if data_cfg.get("cache"):
        train, val = CachedImages(train, data_cfg.cache), CachedImages(val, data_cfg.cache)
    return train, val


def build_eval_source(data_cfg: DictConfig, split: str, class_names: list[str]) -> DetectionSource:
    """The `val` or `test` source of a data config (`test` falls back to `val`)."""
    node = data_cfg.get(split) if split == "test" else None
    return instantiate(node if node is not None else data_cfg.val, class_names=class_names)


def build_training_dataset(
    data_cfg: DictConfig, source: DetectionSource, seed: int
) -> TrainingDataset:
    """`source` with the data config's augmentation and CenterNet targets."""
    return TrainingDataset(
        source,
        data_cfg.image_size,
        augment=instantiate(data_cfg.augment),
        max_objects=data_cfg.max_objects,
        min_overlap=data_cfg.min_overlap,
        seed=seed,
    )


def build_train_loader(
    data_cfg: DictConfig,
    source: DetectionSource,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    dataset = build_training_dataset(data_cfg, source, seed)
    per_rank = max(1, batch_size // dist.world_size())
    return build_loader(
        dataset,
        per_rank,
        shuffle=True,
        num_workers=data_cfg.num_workers,
        seed=seed,
        distributed=dist.is_distributed(),
        drop_last=len(dataset) > per_rank,
        pin_memory=pin_memory,
        sampler=balanced_sampler(dataset, seed) if data_cfg.get("balance_parts") else None,
    )


def balanced_sampler(dataset: TrainingDataset, seed: int) -> BalancedGroupSampler:
    """`data.balance_parts`: each part (images labelling the same classes) drawn equally often."""
    groups = list(dataset.label_groups().values())
    sampler = BalancedGroupSampler(groups, seed, dist.world_size(), dist.rank())
    log.info(
        "balanced parts: %s images drawn %s times per epoch",
        [len(group) for group in groups],
        sampler.draws_per_group(),
    )
    return sampler


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


def check_eval_config(eval_cfg: DictConfig) -> None:
    """The `eval` settings (shared by every subcommand that scores or predicts)."""
    check_number(eval_cfg, "batch_size", "eval", integer=True, minimum=1)
    check_number(eval_cfg, "top_k", "eval", integer=True, minimum=1)
    check_number(eval_cfg, "num_workers", "eval", integer=True, minimum=0)


def check_ground_truth(source: DetectionSource, ground_truth: dict) -> None:
    """AP needs boxes: none at all is an error, none for some classes a warning (their AP is
    n/a, not 0)."""
    boxed = {a["category_id"] for a in ground_truth["annotations"] if not a.get("iscrowd")}
    empty = [
        n for n, c in zip(source.class_names, source.category_ids, strict=True) if c not in boxed
    ]
    if len(empty) == len(source.class_names):
        raise DatasetError(
            f"the validation set ({len(source)} images) holds no box of the classes {empty}",
            "check data.class_names against the dataset's classes, and the val split",
        )
    if empty:
        log.warning("the validation set holds no box of %s: their AP is n/a", empty)


def make_evaluator(source: DetectionSource, image_size: int, eval_cfg: DictConfig, progress: bool):
    """A callable model -> COCO metrics on `source`, as the trainer's periodic evaluation."""
    ground_truth = source.to_coco()
    check_ground_truth(source, ground_truth)

    def evaluate(model: torch.nn.Module) -> dict:
        was_training = model.training
        model.eval()
        predictor = torch_predictor(model, k=eval_cfg.top_k, flip=eval_cfg.flip)
        metrics = evaluate_predictor(
            predictor,
            source,
            image_size,
            batch_size=eval_cfg.batch_size,
            num_workers=eval_cfg.num_workers,
            ground_truth=ground_truth,
            progress=progress,
        )
        model.train(was_training)
        return metrics

    return evaluate
