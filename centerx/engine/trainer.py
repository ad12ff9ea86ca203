"""The training loop, shared by plain training and distillation.

What differs between them is the *objective* (batch -> named loss terms); the
trainer owns everything else: optimisation, schedule, EMA, NaN guard,
evaluation, checkpoints (atomic, exact resume) and logs.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from centerx.data.base import DatasetError
from centerx.data.pipeline import SUBSTITUTES
from centerx.engine import distributed as dist
from centerx.engine import interrupts
from centerx.engine.ema import ModelEMA
from centerx.engine.optim import build_optimizer, build_scheduler, lr_factor
from centerx.engine.precision import AutocastForward, autocast_dtype
from centerx.errors import CenterxError, ConfigError, Interrupted, check_number, signal_number
from centerx.model.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from centerx.objectives import Objective
from centerx.utils.metrics_log import MetricsLog
from centerx.utils.visualize import plot_curves

log = logging.getLogger(__name__)


class TrainingDiverged(CenterxError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# What resuming does with a setting that differs from the checkpoint's run (dotted config keys;
# a key also covers everything under it). Checked in this order.
# Followed without a word: where and how verbosely the run goes on.
RESUME_FOLLOWED = (
    "train.resume", "train.device", "train.progress", "train.num_threads", "train.log_every",
    "train.compile",
    "data.num_workers", "eval", "samples", "overwrite", "model.init_from", "model.pretrained",
    "main_job",
)  # fmt: skip
# Refused: the run's trajectory depends on them. The schedule counts steps (batch size, warm-up,
# milestones), the optimizer state belongs to its optimizer and weight decay (which
# load_state_dict would silently restore), the weights to their model, loss and objective.
RESUME_REFUSED = (
    "seed", "train.seed", "train.batch_size", "train.optimizer", "train.weight_decay",
    "train.schedule", "train.warmup_epochs", "train.milestones", "train.ema", "data.image_size",
    "model", "loss", "objective",
)  # fmt: skip
# Applied from the resumed step on, with a warning: train.lr rescales the schedule (its shape
# kept), train.epochs (more only) re-plans it to the new total; the others are read every step.
RESUME_APPLIED = (
    "train.lr", "train.epochs", "train.grad_clip", "train.max_bad_steps", "train.eval_every",
    "train.ema_decay",
)  # fmt: skip
# Anything else that changed (data paths, augmentation, ...) is applied and listed in a warning.


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
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"train.device={name!r} is not a device", "use cpu or cuda") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (device.index or 0):
            raise ConfigError(
                f"train.device={name} but {count or 'no'} CUDA device(s) are available",
                "use train.device=cpu",
            )
    return device


def check_train_config(cfg: Any) -> None:
    """The `train` settings, before any data is read (ConfigError naming the key)."""
    for key in ("epochs", "batch_size", "eval_every", "log_every", "max_bad_steps"):
        check_number(cfg, key, "train", integer=True, minimum=1)
    check_number(cfg, "lr", "train", above=0)
    check_number(cfg, "weight_decay", "train", minimum=0)
    check_number(cfg, "warmup_epochs", "train", minimum=0)
    check_number(cfg, "grad_clip", "train", above=0, optional=True)
    check_number(cfg, "ema_decay", "train", above=0, below=1)
    check_number(cfg, "num_threads", "train", integer=True, minimum=1, optional=True)
    if not all(isinstance(m, float | int) and 0 < m < 1 for m in cfg.milestones):
        raise ConfigError(f"train.milestones={list(cfg.milestones)} must be fractions in (0, 1)")
    lr_factor(0, 1, 0, cfg.schedule, cfg.milestones)  # an unknown schedule name
    world = dist.launched_world_size()
    if cfg.batch_size < world:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is the global batch: less than one image for "
            f"each of the {world} processes",
            f"use train.batch_size={world} or more",
        )
    autocast_dtype(cfg.get("amp"), resolve_device(cfg.device))  # checks train.amp too
    if cfg.resume and not Path(cfg.resume).is_file():
        what = "is a folder" if Path(cfg.resume).is_dir() else "does not exist"
        raise ConfigError(
            f"train.resume={cfg.resume} {what}",
            "give a checkpoint file, e.g. RUN/checkpoints/last.pt",
        )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _covers(prefixes: tuple[str, ...], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(saved: Mapping, current: Mapping) -> dict[str, list[str]]:
    """The settings of `current` (a run config) that differ from `saved` (the checkpoint's),
    as "key: old -> new" under "refused", "applied" and "other" (see RESUME_*)."""
    old, new = _flatten(saved), _flatten(current)
    changes: dict[str, list[str]] = {"refused": [], "applied": [], "other": []}
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or _covers(RESUME_FOLLOWED, key):
            continue
        kind = (
            "refused"
            if _covers(RESUME_REFUSED, key)
            else "applied"
            if _covers(RESUME_APPLIED, key)
            else "other"
        )
        changes[kind].append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes


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
        self.channels_last = bool(cfg.get("channels_last", False))
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        amp = autocast_dtype(cfg.get("amp"), self.device)
        # fp16 gradients underflow without a loss scale; disabled, the scaler passes through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)
        self.objective = objective
        self.weighter = weighter
        self.loader = train_loader
        self.run_dir = Path(run_dir)
        self.meta = checkpoint_meta
        self.evaluate_fn = evaluate
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise DatasetError("the training set is empty", "check the data settings")
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
        if amp is not None:
            self.wrapped = AutocastForward(self.wrapped, self.device.type, amp)
        if cfg.get("compile"):
            # Only the training forward: it shares the parameters, while evaluation, the EMA
            # and the checkpoints use `self.model` (no recompilation for eval mode, no
            # "_orig_mod." keys in checkpoints).
            self.wrapped = torch.compile(self.wrapped)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=dist.is_main())
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_ap = -1.0
        self.bad_steps = 0
        self.skipped_images = 0  # reads that failed (an unreadable image fails every epoch)
        self.unreadable_images: set[int] = set()  # which images (training set indices)
        self.last_eval: dict | None = None
        self.train_seconds = 0.0  # wall time in training epochs (evaluation excluded), resumed too
        self.saved: tuple[Path, int] | None = None  # the latest last.pt and the epoch it holds

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
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_ap": self.best_ap,
            "train_seconds": self.train_seconds,
            "rng": _rng_state(),
            "metrics": self.last_eval,
        }

    def resume(self, path: str | Path) -> None:
        """Continue the run of checkpoint `path`: refuse changed settings the trajectory depends
        on, apply the others (RESUME_*); in the same run directory, metrics.jsonl is cut back
        to the checkpoint's step, in a new one the run's best.pt comes along."""
        path = Path(path)
        state = load_checkpoint(path)
        check_compatible(
            state, path, self.meta["model_config"]["backbone"], self.meta["class_names"]
        )
        saved_config = state.get("config") or {}
        changes = resume_changes(saved_config, self.meta.get("config") or {})
        if changes["refused"]:
            raise ConfigError(
                f"cannot resume {path} with changed {'; '.join(changes['refused'])}",
                "resume with the checkpoint's settings, or start a new run from its weights "
                f"with model.init_from={path}",
            )
        if state["epoch"] >= self.cfg.epochs:
            raise ConfigError(
                f"{path} holds epoch {state['epoch']}: train.epochs={self.cfg.epochs} leaves "
                "nothing to train",
                f"raise train.epochs above {state['epoch']}; `eval checkpoint={path}` scores it",
            )
        self._load_state(state)
        if changes["applied"]:
            log.warning(
                "resuming with changed settings, applied: %s", "; ".join(changes["applied"])
            )
            self._replan_schedule(float(saved_config.get("train", {}).get("lr", self.cfg.lr)))
        if changes["other"]:
            log.warning("resuming with other changed settings: %s", "; ".join(changes["other"]))
        self.saved = (path, self.epoch)
        self.metrics.truncate(self.global_step)
        self._carry_best(path)
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.global_step)

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"], state.get("ema_updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighter.load_state_dict(state.get("weighter", {}))
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_ap = state.get("best_ap", -1.0)
        self.train_seconds = float(state.get("train_seconds", 0.0))
        _set_rng_state(state["rng"])

    def _replan_schedule(self, saved_lr: float) -> None:
        """The learning rate from the resumed step on, under this run's train.lr (the saved
        base rates rescaled) and train.epochs (the scheduler's total steps)."""
        factor = float(self.cfg.lr) / saved_lr
        scheduler = self.scheduler
        scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
        rates = [
            base * fn(scheduler.last_epoch)
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, base, rate in zip(
            self.optimizer.param_groups, scheduler.base_lrs, rates, strict=True
        ):
            group["initial_lr"], group["lr"] = base, rate
        scheduler._last_lr = rates

    def _carry_best(self, resumed: Path) -> None:
        """Resuming into another run directory: the run's best.pt (beside the resumed checkpoint)
        comes along, so the best model so far is kept even when no later epoch beats it."""
        own = self.run_dir / "checkpoints" / "best.pt"
        best = resumed.parent / "best.pt"
        if own.parent.resolve() == resumed.parent.resolve():
            return
        if not best.is_file():
            self.best_ap = -1.0  # the first evaluation here writes best.pt
            return
        if dist.is_main():
            own.parent.mkdir(parents=True, exist_ok=True)
            partial = own.with_name(own.name + ".tmp")
            shutil.copyfile(best, partial)
            os.replace(partial, own)
            log.info("copied the run's best.pt (AP %.3f) from %s", self.best_ap, best)
        dist.barrier()

    def _save(self, name: str) -> None:
        if dist.is_main():
            save_checkpoint(self.run_dir / "checkpoints" / name, self._state())
        if name == "last.pt":
            self.saved = (self.run_dir / "checkpoints" / name, self.epoch)
        # Other ranks read these files next (finish_run loads best.pt): wait until they exist.
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict) -> dict:
        batch = {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        if self.channels_last and "image" in batch:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

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
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        )
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: a lower loss scale for the next step
            return self._bad_step(f"non-finite gradient norm {float(grad_norm)}", logs, buffers)
        self.scaler.step(self.optimizer)
        self.scaler.update()
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
            last = self.saved[0] if self.saved else None
            hint = "try a lower train.lr, or loss=adaptive"
            if last:  # a changed lr is applied on resume
                hint = f"resume from it with a lower lr: train.resume={last} train.lr=...; {hint}"
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive non-finite steps; stopping. The last good "
                f"checkpoint is {last or 'none yet'}",
                hint,
            )
        # The scheduler still advances so the step count matches the data seen.
        self.scheduler.step()
        return None

    def _train_epoch(self) -> tuple[dict[str, float], int]:
        """One pass over the loader: the mean of each logged value, and the number of objects
        (boxes) the batches held."""
        self.wrapped.train()
        self.loader.generator.manual_seed(self.cfg.seed * 100003 + self.epoch)
        if hasattr(self.loader.dataset, "epoch"):
            self.loader.dataset.epoch = self.epoch
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per key: a weighter may skip a term in some steps
        objects = 0
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not dist.progress_bars(self.cfg.progress),
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            self.skipped_images += batch["num_skipped"]
            self.unreadable_images.update(batch.get("unreadable", ()))
            if "image" not in batch:  # no image of the batch, nor any substitute, was readable
                raise DatasetError(
                    f"{batch['num_skipped']} training images in a row could not be read (each "
                    f"image and the {SUBSTITUTES} after it)",
                    "the warnings above name the files: check data.root and the images",
                )
            objects += int(batch["mask"].sum()) if "mask" in batch else 0
            lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (logged below)
            logs = self._step(self._to_device(batch))
            interrupts.raise_if_requested()  # between steps, never mid-transfer or in a finaliser
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
        return {key: value / counts[key] for key, value in sums.items()}, objects

    def _maybe_evaluate(self) -> None:
        last = self.epoch == self.cfg.epochs
        if self.evaluate_fn is None or not (last or self.epoch % self.cfg.eval_every == 0):
            return
        # Every rank predicts a share of the images: all must use rank 0's (saved) model.
        dist.broadcast_buffers(self.eval_model)
        metrics = self.evaluate_fn(self.eval_model)
        self.last_eval = metrics
        self.metrics.write(
            {
                "kind": "eval",
                "epoch": self.epoch,
                "step": self.global_step,
                "train_seconds": round(self.train_seconds, 2),  # time to accuracy (scripts/)
                **metrics,
            }
        )
        if dist.is_main():
            tqdm.write(
                f"[centerx] epoch {self.epoch}: AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}"
            )
        if metrics["AP"] > self.best_ap:
            self.best_ap = metrics["AP"]
            self._save("best.pt")

    def _log_epoch(self, means: dict[str, float], objects: int, seconds: float) -> None:
        """One line per epoch (what a log file keeps; the bars are for terminals)."""
        if not dist.is_main():
            return
        loss = means.get("loss", math.nan)
        lr = self.optimizer.param_groups[0]["lr"]
        log.info(
            "epoch %d/%d: loss %.4f  lr %.2e  %.1f s",
            self.epoch,
            self.cfg.epochs,
            loss,
            lr,
            seconds,
        )
        if objects == 0:
            log.warning(
                "epoch %d: the training batches held no object of the classes %s: the model "
                "learns to detect nothing (check data.class_names against the dataset's)",
                self.epoch,
                self.meta.get("class_names"),
            )

    def _interrupted(self, interrupt: BaseException) -> Interrupted:
        """What was kept, and the command line that continues (in the same run directory)."""
        where = (
            f"interrupted in epoch {self.epoch + 1}"
            if self.epoch < self.cfg.epochs
            else "interrupted after the last epoch"
        )
        signum = signal_number(interrupt)
        if self.saved is None:
            return Interrupted(f"{where}, before the first checkpoint", "start again", signum)
        path, epoch = self.saved
        return Interrupted(
            f"{where}; checkpoints/{path.name} holds epoch {epoch}",
            f"resume with: train.resume={path} hydra.run.dir={self.run_dir}",
            signum,
        )

    def _run_epoch(self) -> None:
        epoch_started = time.time()
        means, objects = self._train_epoch()
        self.train_seconds += time.time() - epoch_started
        self.epoch += 1
        self.metrics.write(
            {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, **means}
        )
        self._log_epoch(means, objects, time.time() - epoch_started)
        self._maybe_evaluate()
        self._save("last.pt")

    def fit(self) -> dict | None:
        """Train to cfg.epochs; returns the last evaluation's metrics. Ctrl-C or SIGTERM stop
        the run after the current step and raise Interrupted (last.pt, written whole at each
        epoch's end, is kept)."""
        started = time.time()
        try:
            with interrupts.deferred():
                while self.epoch < self.cfg.epochs:
                    self._run_epoch()
        except KeyboardInterrupt as interrupt:
            raise self._interrupted(interrupt) from interrupt
        finally:
            if dist.is_main() and (self.run_dir / "metrics.jsonl").is_file():
                plot_curves(
                    self.run_dir / "metrics.jsonl",
                    self.run_dir / "curves.png",
                    str(self.run_dir.name),
                )
        if self.skipped_images:
            log.warning(
                "%d unreadable training images were skipped, %d times in all (each time "
                "replaced by the next readable image)",
                len(self.unreadable_images),
                self.skipped_images,
            )
        if not (self.run_dir / "checkpoints" / "best.pt").is_file():  # no evaluation ran
            self._save("best.pt")
        log.info("trained %d epochs in %.1f s", self.cfg.epochs, time.time() - started)
        return self.last_eval
