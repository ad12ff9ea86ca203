"""The training loop, shared by plain training and distillation.

What differs between them is the *objective* (batch -> named loss terms); the
trainer owns everything else: optimisation, schedule, EMA, NaN guard,
evaluation, checkpoints (atomic, exact resume) and logs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from centerx.engine import distributed as dist
from centerx.engine.ema import ModelEMA
from centerx.engine.optim import build_optimizer, build_scheduler
from centerx.model.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from centerx.objectives import Objective
from centerx.utils.metrics_log import MetricsLog
from centerx.utils.visualize import plot_curves

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Weighter(Protocol):
    may_skip_terms: bool  # whether a term can drop out of the graph in some steps

    def __call__(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={name} but no CUDA device is available; use train.device=cpu"
        )
    return torch.device(name)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        weighter: Weighter,
        train_loader: torch.utils.data.DataLoader,
        cfg: Any,  # the `train` config group
        run_dir: str | Path,
        checkpoint_meta: dict,  # class_names, model_config, image_size, config: stored in every checkpoint
        evaluate: Callable[[nn.Module], dict] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.objective = objective
        self.weighter = weighter
        self.loader = train_loader
        self.run_dir = Path(run_dir)
        self.meta = checkpoint_meta
        self.evaluate_fn = evaluate
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                "the training set gives no batches: is it empty, or batch_size too large with drop_last?"
            )
        total = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(
            instantiate(cfg.optimizer), self.model, cfg.lr, cfg.weight_decay
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            total,
            round(cfg.warmup_epochs * self.steps_per_epoch),
            cfg.schedule,
            cfg.milestones,
        )
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.wrapped: nn.Module = self.model
        if dist.is_distributed():
            self.wrapped = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # A term skipped on one rank only (e.g. no objects in its batch) leaves that
                # head's parameters without a gradient there; DDP must count them as zero.
                find_unused_parameters=weighter.may_skip_terms,
            )
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=dist.is_main())
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_ap = -1.0
        self.bad_steps = 0
        self.skipped_images = 0
        self.last_eval: dict | None = None

    # ----------------------------------------------------------------- state
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def _state(self) -> dict:
        return {
            **self.meta,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighter": self.weighter.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_ap": self.best_ap,
            "rng": _rng_state(),
            "metrics": self.last_eval,
        }

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        check_compatible(
            state, path, self.meta["model_config"]["backbone"], self.meta["class_names"]
        )
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"], state.get("ema_updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighter.load_state_dict(state.get("weighter", {}))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_ap = state.get("best_ap", -1.0)
        _set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.global_step)

    def _save(self, name: str) -> None:
        if dist.is_main():
            save_checkpoint(self.run_dir / "checkpoints" / name, self._state())
        # Other ranks read these files next (finish_run loads best.pt): wait until they exist.
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def _step(self, batch: dict) -> dict[str, float] | None:
        # The forward updates BatchNorm running statistics (to NaN/inf when activations
        # overflow); a skipped step restores them so it leaves the model exactly as it was.
        buffers = [b.clone() for b in self.model.buffers()]
        terms = self.objective(self.wrapped, batch)
        loss, logs = self.weighter(terms)
        has_graph = loss.requires_grad
        if self.weighter.may_skip_terms:  # only then can ranks differ: decide together
            has_graph = dist.all_true(has_graph)
        if not has_graph:
            return None  # every term was skipped by the weighter
        self.optimizer.zero_grad(set_to_none=True)
        # Under DDP every rank must skip together: one rank skipping backward while the
        # others wait in its gradient all-reduce would hang them all.
        finite = bool(torch.isfinite(loss.detach()))
        if not dist.all_true(finite):
            why = (
                f"non-finite loss {float(loss.detach())}"
                if not finite
                else "non-finite loss on another rank"
            )
            return self._bad_step(why, logs, buffers)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        )
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._bad_step(f"non-finite gradient norm {float(grad_norm)}", logs, buffers)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.bad_steps = 0
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **logs}

    def _bad_step(self, why: str, logs: dict, buffers: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for current, saved in zip(self.model.buffers(), buffers, strict=True):
                current.copy_(saved)
        self.bad_steps += 1
        tqdm.write(f"[centerx] step {self.global_step}: {why}; step skipped ({logs})")
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive non-finite steps; stopping. The last good checkpoint is "
                f"{self.run_dir / 'checkpoints' / 'last.pt'}. Try a lower train.lr or loss=adaptive."
            )
        # The scheduler still advances so the step count matches the data seen.
        self.scheduler.step()
        return None

    def _train_epoch(self) -> dict[str, float]:
        self.wrapped.train()
        self.loader.generator.manual_seed(self.cfg.seed * 100003 + self.epoch)
        if hasattr(self.loader.dataset, "epoch"):
            self.loader.dataset.epoch = self.epoch
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per key: a weighter may skip a term in some steps
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not (self.cfg.progress and dist.is_main()),
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            self.skipped_images += batch.get("num_skipped", 0)
            if "image" not in batch:
                continue
            lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (logged below)
            logs = self._step(self._to_device(batch))
            self.global_step += 1
            if logs is None:
                continue
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.2e}")
            if self.global_step % self.cfg.log_every == 0:
                self.metrics.write(
                    {
                        "kind": "step",
                        "step": self.global_step,
                        "epoch": self.epoch,
                        "lr": lr,
                        **logs,
                    }
                )
        return {key: value / counts[key] for key, value in sums.items()}

    def _maybe_evaluate(self) -> None:
        last = self.epoch == self.cfg.epochs
        if self.evaluate_fn is None or not (last or self.epoch % self.cfg.eval_every == 0):
            return
        # Every rank predicts a share of the images: all must use rank 0's (saved) model.
        dist.broadcast_buffers(self.eval_model)
        metrics = self.evaluate_fn(self.eval_model)
        self.last_eval = metrics
        self.metrics.write(
            {"kind": "eval", "epoch": self.epoch, "step": self.global_step, **metrics}
        )
        if dist.is_main():
            tqdm.write(
                f"[centerx] epoch {self.epoch}: AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}"
            )
        if metrics["AP"] > self.best_ap:
            self.best_ap = metrics["AP"]
            self._save("best.pt")

    def fit(self) -> dict | None:
        """Train to cfg.epochs; returns the last evaluation's metrics."""
        started = time.time()
        try:
            while self.epoch < self.cfg.epochs:
                means = self._train_epoch()
                self.epoch += 1
                self.metrics.write(
                    {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, **means}
                )
                self._maybe_evaluate()
                self._save("last.pt")
        except KeyboardInterrupt:
            tqdm.write(
                f"[centerx] interrupted in epoch {self.epoch + 1}; checkpoints/last.pt holds epoch "
                f"{self.epoch}. Resume with train.resume={self.run_dir / 'checkpoints' / 'last.pt'}"
            )
            raise
        finally:
            if dist.is_main() and (self.run_dir / "metrics.jsonl").is_file():
                plot_curves(
                    self.run_dir / "metrics.jsonl",
                    self.run_dir / "curves.png",
                    str(self.run_dir.name),
                )
        if self.skipped_images:
            log.warning("%d unreadable images were skipped during training", self.skipped_images)
        if self.best_ap < 0:  # no evaluation ran: best is the final model
            self._save("best.pt")
        log.info("trained %d epochs in %.1f s", self.cfg.epochs, time.time() - started)
        return self.last_eval
