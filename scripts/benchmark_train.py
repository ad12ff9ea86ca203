"""Training throughput benchmark: `bash run.sh bench [options] [hydra overrides]`.

    bash run.sh bench                                           # the default (tiny) config
    bash run.sh bench model.backbone=resnet18 data.image_size=256 train.batch_size=8 --json out.json

Measures, for the composed `train` config (conf/train.yaml + overrides):

* training images/s of the full step the trainer runs (Trainer._step: forward, loss, backward,
  gradient clipping, optimizer and scheduler step, EMA when on) on one fixed augmented batch,
  with and without gradient checkpointing (model.grad_checkpoint);
* data-pipeline images/s of ONE worker: TrainingDataset.__getitem__ (read/render, augment,
  targets) + collate of one batch in this process;
* the ratio of pipeline to training throughput, per worker and for data.num_workers workers
  (>1 means the loader keeps up; on CPU the workers also compete with training for cores);

  All three are measured side by side: after a warm-up, each timed training step of one
  variant is next to one of the other and to one pipeline batch (rotating order); a repeat is
  `--steps` such rounds. Reported: the median over repeats of images/s, and ratios as the
  median over repeats of the ratio within each repeat (robust to load that changes between
  repeats: on a shared machine, trust the ratios more than the absolute numbers);
* peak memory of a training step. CUDA: torch.cuda.max_memory_allocated. CPU: there is no
  allocator peak counter, and getrusage's ru_maxrss is process-wide, only grows, and on Linux
  even survives fork+exec (a child reports at least its parent's size). So each variant runs
  in a fresh subprocess that resets its peak RSS (VmHWM, via /proc/self/clear_refs) right
  before 3 training steps and reports how far it rose above the RSS at that point: what
  training adds (activations, gradients, optimizer state). RSS over-counts live tensors (malloc
  keeps freed pages) but both variants are measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.pipeline import TrainingDataset, collate
from centerx.engine.build import build_train_loader
from centerx.engine.trainer import SupervisedObjective, Trainer, seed_everything
from centerx.model.centernet import build_model

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {"plain": False, "grad_checkpoint": True}


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        return compose(config_name="train", overrides=overrides)


def training_dataset(cfg: DictConfig, source) -> TrainingDataset:
    return TrainingDataset(
        source,
        cfg.data.image_size,
        augment=instantiate(cfg.data.augment),
        max_objects=cfg.data.max_objects,
        min_overlap=cfg.data.min_overlap,
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, grad_checkpoint: bool, run_dir: Path) -> Trainer:
    """The real Trainer (optimizer, schedule, EMA, NaN guard) around a fresh model."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.grad_checkpoint = grad_checkpoint
    seed_everything(cfg.seed)
    source = instantiate(cfg.data.train)
    model = build_model(cfg.model, source.num_classes)
    return Trainer(
        model,
        SupervisedObjective(instantiate(cfg.loss.criterion)),
        instantiate(cfg.loss.weighter),
        build_train_loader(cfg, source),  # only its length is used (the schedule)
        cfg.train,
        run_dir,
        checkpoint_meta={},
        evaluate=None,
    )


def fixed_batch(cfg: DictConfig) -> dict:
    dataset = training_dataset(cfg, instantiate(cfg.data.train))
    return collate([dataset[i % len(dataset)] for i in range(cfg.train.batch_size)])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, batch: dict, steps: int) -> tuple[float, int]:
    """Seconds for `steps` full training steps; and how many were skipped (non-finite)."""
    trainer.wrapped.train()
    skipped = 0
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        skipped += trainer._step(batch) is None
    synchronize(trainer.device)
    return time.perf_counter() - start, skipped


def pipeline_seconds(dataset: TrainingDataset, batch_size: int, images: int, offset: int) -> float:
    """Seconds to produce `images` samples (in batches) in this process: one worker's work."""
    start = time.perf_counter()
    for first in range(0, images, batch_size):
        count = min(batch_size, images - first)
        collate([dataset[(offset + first + i) % len(dataset)] for i in range(count)])
    return time.perf_counter() - start


def _proc_status_mb(key: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


def _ru_maxrss_mb() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _reset_peak_rss() -> float | None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); the current RSS, None where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


def memory_probe(cfg: DictConfig, variant: str, steps: int) -> dict:
    """Run in a fresh process: how far the resident set size peaks above its pre-training level
    during `steps` training steps.

    Linux: the peak RSS of this process's memory map (VmHWM), reset to the current RSS just
    before the steps (/proc/self/clear_refs "5"), so neither the imports' transient peaks nor
    the parent's size leak in. (getrusage's ru_maxrss would not do: on Linux it survives
    fork+exec, so a child reports at least its parent's size.) Elsewhere: ru_maxrss."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, VARIANTS[variant], Path(tmp))
        batch = trainer._to_device(fixed_batch(cfg))
        before = _reset_peak_rss()
        method = "ru_maxrss" if before is None else "VmHWM"
        if before is None:
            before = _ru_maxrss_mb()
        run_steps(trainer, batch, steps)
        after = _ru_maxrss_mb() if method == "ru_maxrss" else _proc_status_mb("VmHWM")
    return {
        "method": method,
        "peak_rss_mb": after,
        "before_steps_mb": before,
        "training_adds_mb": after - before,
    }


def measure_memory(cfg: DictConfig, overrides: list[str], trainers: dict, batch: dict, steps: int):
    device = next(iter(trainers.values())).device
    results = {}
    for variant, trainer in trainers.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run_steps(trainer, batch, steps)
            results[variant] = {
                "max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20
            }
            continue
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-probe",
            variant,
            "--steps",
            str(steps),
            *overrides,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_config(args.overrides)
    if cfg.train.get("num_threads"):
        torch.set_num_threads(int(cfg.train.num_threads))
    batch_size = int(cfg.train.batch_size)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: build_trainer(cfg, flag, Path(tmp)) for name, flag in VARIANTS.items()}
        device = trainers["plain"].device
        batch = trainers["plain"]._to_device(fixed_batch(cfg))
        dataset = training_dataset(cfg, instantiate(cfg.data.train))

        for trainer in trainers.values():  # allocator, kernel caches, optimizer state
            run_steps(trainer, batch, args.warmup)
        pipeline_seconds(dataset, batch_size, batch_size, offset=0)

        # Interleaved at the finest grain: every timed step of one variant sits next to one
        # of the other and to one pipeline batch (order rotating), so a burst of load from
        # other processes hits all three alike. A repeat = `steps` such rounds.
        names = [*VARIANTS, "pipeline"]
        rates: dict[str, list[float]] = {name: [] for name in names}
        skipped = dict.fromkeys(VARIANTS, 0)
        for repeat in range(args.repeats):
            totals = dict.fromkeys(names, 0.0)
            for step in range(args.steps):
                k = repeat * args.steps + step
                for name in names[k % 3 :] + names[: k % 3]:
                    if name == "pipeline":
                        offset = (k + 1) * batch_size  # new images each time
                        totals[name] += pipeline_seconds(dataset, batch_size, batch_size, offset)
                    else:
                        seconds, bad = run_steps(trainers[name], batch, 1)
                        totals[name] += seconds
                        skipped[name] += bad
            for name in names:
                rates[name].append(args.steps * batch_size / totals[name])

        memory = measure_memory(cfg, args.overrides, trainers, batch, steps=3)

    def paired(numerator: str) -> float:
        """Median over repeats of the ratio measured within each repeat."""
        return median([a / b for a, b in zip(rates[numerator], rates["plain"], strict=True)])

    workers = int(cfg.data.num_workers)
    train_median = {name: median(rates[name]) for name in VARIANTS}
    pipe_median = median(rates["pipeline"])
    return {
        "config": {
            "overrides": args.overrides,
            "backbone": cfg.model.backbone,
            "image_size": int(cfg.data.image_size),
            "batch_size": batch_size,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "num_workers": workers,
            "ema": bool(cfg.train.ema),
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "training": {
            name: {
                "images_per_s_median": train_median[name],
                "step_ms_median": 1000 * batch_size / train_median[name],
                "images_per_s_repeats": rates[name],
                "skipped_steps": skipped[name],
                "memory": memory[name],
            }
            for name in VARIANTS
        },
        "grad_checkpoint_speed_ratio": paired("grad_checkpoint"),
        "pipeline": {
            "images_per_s_per_worker_median": pipe_median,
            "images_per_s_repeats": rates["pipeline"],
        },
        "pipeline_to_training_ratio": {
            "per_worker": paired("pipeline"),
            "configured_workers": max(1, workers) * paired("pipeline"),
        },
    }


def report(result: dict) -> str:
    c = result["config"]
    lines = [
        f"centerx training benchmark: backbone={c['backbone']} image_size={c['image_size']} "
        f"batch_size={c['batch_size']} device={c['device']} threads={c['torch_threads']} "
        f"ema={c['ema']} torch={c['torch']}",
        f"  {c['steps']} steps x {c['repeats']} repeats (interleaved), {c['warmup']} warm-up "
        f"steps; load average before/after: "
        + " / ".join(f"{v[0]:.1f}" for v in result["load_average"].values()),
        "",
        f"  {'training (full step)':<24}{'images/s':>10}{'ms/step':>10}   peak memory",
    ]
    for name, t in result["training"].items():
        mem = t["memory"]
        if "max_memory_allocated_mb" in mem:
            memory = f"{mem['max_memory_allocated_mb']:.0f} MiB (cuda max allocated)"
        else:
            memory = (
                f"+{mem['training_adds_mb']:.0f} MiB over {mem['before_steps_mb']:.0f} "
                f"(peak RSS {mem['peak_rss_mb']:.0f} MiB, {mem['method']})"
            )
        spread = ", ".join(f"{v:.1f}" for v in t["images_per_s_repeats"])
        lines.append(
            f"  {name:<24}{t['images_per_s_median']:>10.1f}{t['step_ms_median']:>10.0f}   {memory}"
        )
        lines.append(
            f"  {'':<24}repeats: {spread}"
            + (f"; {t['skipped_steps']} skipped" if t["skipped_steps"] else "")
        )
    p = result["pipeline"]
    ratio = result["pipeline_to_training_ratio"]
    lines += [
        f"  grad_checkpoint / plain speed: {result['grad_checkpoint_speed_ratio']:.2f}x",
        "",
        f"  data pipeline, 1 worker:  {p['images_per_s_per_worker_median']:.1f} images/s "
        f"(repeats: {', '.join(f'{v:.1f}' for v in p['images_per_s_repeats'])})",
        f"  pipeline / training (plain): {ratio['per_worker']:.2f}x per worker, "
        f"{ratio['configured_workers']:.2f}x with data.num_workers={c['num_workers']}"
        + ("" if ratio["configured_workers"] > 1 else "   <-- the data loader is the bottleneck"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-probe", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)

    if args.memory_probe:  # the fresh subprocess of measure_memory
        cfg = compose_config(args.overrides)
        if cfg.train.get("num_threads"):
            torch.set_num_threads(int(cfg.train.num_threads))
        print(json.dumps(memory_probe(cfg, args.memory_probe, args.steps)))
        return

    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if load > cores:
        print(
            f"warning: load average {load:.1f} on {cores} cores: other processes compete for the "
            "CPU. Ratios (measured side by side) hold up; absolute numbers do not. Multi-threaded "
            "torch suffers most when oversubscribed: consider train.num_threads=1.",
            file=sys.stderr,
        )
    result = benchmark(args)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"  -> {args.json}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
