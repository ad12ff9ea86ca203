"""Training throughput benchmark: `bash run.sh bench [options] [hydra overrides]`.

    bash run.sh bench                                           # the default (tiny) config
    bash run.sh bench model.backbone=resnet18 data.image_size=256 train.batch_size=8 --json out.json
    bash run.sh bench experiment=fruits data.root=../shared/datasets/fruits
    bash run.sh bench model.backbone=resnet18 --profile             # where a step's time goes

Measures, for the composed `train` config (conf/train.yaml + overrides), on one fixed augmented
batch:

* `centerx`: images/s of the full step the trainer runs (Trainer._step: forward, loss,
  backward, gradient clipping, optimizer and scheduler step, EMA when on, the NaN guard and its
  BatchNorm-buffer copy), as configured (train.amp, train.channels_last, ...);
* `grad_checkpoint`: the same with model.grad_checkpoint=true;
* `pytorch`: the same model trained by a plain PyTorch loop, written here (PlainLoop): model
  forward, the same CenterNet loss and term weights, loss.backward(), AdamW step. It lacks,
  against `centerx`: the NaN guard (finite checks, BatchNorm buffers copied each step), gradient
  clipping, the learning-rate schedule, EMA, and weight decay split by parameter kind (all of
  which cost centerx time); it runs in PyTorch's defaults: float32, NCHW (contiguous) layout,
  AdamW's per-tensor loop. So centerx can only be faster through what it is configured with:
  train.channels_last=true (NHWC convolutions and batch norms, faster on CPU too), a fused
  optimizer step (train.optimizer.fused, on by default: one kernel over all parameters instead
  of a Python loop over tensors, several times faster for AdamW on CPU), train.amp (bf16/fp16
  autocast: a GPU's or a bf16-capable CPU's gain), train.compile (torch.compile of the training
  forward: fused elementwise kernels; the compilation happens in the warm-up steps, and
  `--speed-only` skips the variants that would compile again);
* data-pipeline images/s of ONE worker: TrainingDataset.__getitem__ (read/render, augment,
  targets) + collate of one batch in this process, and its ratio to training throughput, per
  worker and for data.num_workers workers (>1: the loader keeps up; on CPU the workers also
  compete with training for cores).

  All are measured side by side: after a warm-up, each timed step of one is next to one of each
  other (rotating order); a repeat is `--steps` such rounds. Reported: the median over repeats
  of images/s, and ratios as the median over repeats of the ratio within each repeat (robust to
  load that changes between repeats: on a shared machine, trust the ratios more than the
  absolute numbers);
* peak memory of a training step, centerx with and without gradient checkpointing. CUDA:
  torch.cuda.max_memory_allocated. CPU: there is no allocator peak counter, and getrusage's
  ru_maxrss is process-wide, only grows, and on Linux even survives fork+exec (a child reports
  at least its parent's size). So each variant runs in a fresh subprocess that resets its peak
  RSS (VmHWM, via /proc/self/clear_refs) right before 3 training steps and reports how far it
  rose above the RSS at that point: what training adds (activations, gradients, optimizer
  state). Twice: with glibc's heap told to hand every freed block of 128 KiB or more back to
  the system (MALLOC_MMAP_THRESHOLD_), so the RSS peak is what the tensors need, like
  max_memory_allocated on CUDA; and with glibc's default heap, whose dynamic threshold keeps
  freed blocks up to 32 MiB for reuse (for ResNet-18 at 256 px, batch 8: ~250 MiB more RSS,
  the same with and without checkpointing, which dilutes the relative saving).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.pipeline import TrainingDataset, collate
from centerx.engine import training
from centerx.engine.build import build_sources, build_training_dataset
from centerx.engine.trainer import Trainer, seed_everything
from centerx.errors import run_script
from centerx.model.centernet import build_model

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {"centerx": False, "grad_checkpoint": True}  # Trainer runs: model.grad_checkpoint
PLAIN = "pytorch"
PIPELINE = "pipeline"
# CenterNet's own weights, for a loss config without fixed ones (loss=adaptive).
CENTERNET_WEIGHTS = {"cls": 1.0, "wh": 0.1, "offset": 1.0}
# glibc: allocations from this size on are mmapped and unmapped on free (see the docstring).
HEAPS = {"returned": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}, "default": {}}


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        return compose(config_name="train", overrides=overrides)


def training_dataset(cfg: DictConfig) -> TrainingDataset:
    """The run's training set, augmented as the trainer's loader does it."""
    return build_training_dataset(cfg.data, instantiate(cfg.data.train), cfg.seed)


def build_trainer(cfg: DictConfig, grad_checkpoint: bool, run_dir: Path) -> Trainer:
    """The real Trainer (objective, optimizer, schedule, EMA, NaN guard) around a fresh model,
    built as `bash run.sh train` builds it."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.grad_checkpoint = grad_checkpoint
    train_source, val_source = build_sources(cfg.data)
    return training.build_trainer(cfg, train_source, val_source, run_dir)


class PlainLoop:
    """The same model and loss trained the way a plain PyTorch script does it (see the module
    docstring for what it lacks against the Trainer)."""

    def __init__(self, cfg: DictConfig, num_classes: int) -> None:
        seed_everything(cfg.seed)
        self.device = torch.device(cfg.train.device)
        model_cfg = OmegaConf.merge(cfg.model, {"grad_checkpoint": False})
        self.model = build_model(model_cfg, num_classes).to(self.device).train()
        self.criterion = instantiate(cfg.loss.criterion)
        self.weights = dict(cfg.loss.weighter.get("weights") or CENTERNET_WEIGHTS)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )

    def step(self, batch: dict) -> float:
        terms = self.criterion(self.model(batch["image"]), batch)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def plain_loop_beside(
    trainer: Trainer, cfg: DictConfig, dataset: TrainingDataset
) -> tuple[dict, PlainLoop, dict]:
    """The fixed batch as the trainer takes it, the plain loop of the same model, and the batch
    as the plain loop takes it (on its device, in PyTorch's default contiguous layout)."""
    batch = trainer._to_device(fixed_batch(dataset, int(cfg.train.batch_size)))
    plain = PlainLoop(cfg, len(trainer.meta["class_names"]))
    plain_batch = {k: v.to(plain.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    plain_batch["image"] = plain_batch["image"].contiguous()
    return batch, plain, plain_batch


def fixed_batch(dataset: TrainingDataset, batch_size: int) -> dict:
    """The first `batch_size` samples (repeated if the dataset is smaller), collated."""
    return collate([dataset[i % len(dataset)] for i in range(batch_size)])


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


def run_plain_steps(loop: PlainLoop, batch: dict, steps: int) -> tuple[float, int]:
    """Seconds for `steps` plain-loop steps; and how many had a non-finite loss."""
    skipped = 0
    synchronize(loop.device)
    start = time.perf_counter()
    for _ in range(steps):
        skipped += not torch.isfinite(torch.tensor(loop.step(batch)))
    synchronize(loop.device)
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
        dataset = training_dataset(cfg)
        batch = trainer._to_device(fixed_batch(dataset, int(cfg.train.batch_size)))
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


def probe_in_subprocess(variant: str, heap: str, overrides: list[str], steps: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", variant]
    command += ["--steps", str(steps), *overrides]
    env = {**os.environ, **HEAPS[heap]}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {variant} ({heap} heap) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(overrides: list[str], trainers: dict, batch: dict, steps: int) -> dict:
    """Per variant: {"cuda": {...}} on CUDA, else {heap: probe result} for each of HEAPS."""
    results = {}
    for variant, trainer in trainers.items():
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
            run_steps(trainer, batch, steps)
            peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20
            results[variant] = {"cuda": {"max_memory_allocated_mb": peak}}
        else:
            results[variant] = {
                heap: probe_in_subprocess(variant, heap, overrides, steps) for heap in HEAPS
            }
    return results


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed_rounds(
    runners: dict[str, Callable[[int], tuple[float, int]]], steps: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per repeat of each runner (runner(k) times one step or batch, k counts calls),
    interleaved at the finest grain: every timed call of one runner sits next to one of each
    other (order rotating), so a burst of load from other processes hits all alike."""
    names = list(runners)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    skipped = dict.fromkeys(names, 0)
    for repeat in range(repeats):
        totals = dict.fromkeys(names, 0.0)
        for step in range(steps):
            k = repeat * steps + step
            shift = k % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed, bad = runners[name](k)
                totals[name] += elapsed
                skipped[name] += bad
        for name in names:
            seconds[name].append(totals[name])
    return seconds, skipped


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_config(args.overrides)
    if cfg.train.get("num_threads"):
        torch.set_num_threads(int(cfg.train.num_threads))
    batch_size = int(cfg.train.batch_size)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        variants = {"centerx": False} if args.speed_only else VARIANTS
        trainers = {name: build_trainer(cfg, flag, Path(tmp)) for name, flag in variants.items()}
        reference = trainers["centerx"]
        dataset = training_dataset(cfg)
        batch, plain, plain_batch = plain_loop_beside(reference, cfg, dataset)

        runners: dict[str, Callable[[int], tuple[float, int]]] = {
            name: (lambda k, t=trainer: run_steps(t, batch, 1))
            for name, trainer in trainers.items()
        }
        runners[PLAIN] = lambda k: run_plain_steps(plain, plain_batch, 1)
        runners[PIPELINE] = lambda k: (
            pipeline_seconds(dataset, batch_size, batch_size, offset=(k + 1) * batch_size),
            0,
        )
        for name, runner in runners.items():  # allocator, kernel caches, optimizer state
            for k in range(args.warmup if name != PIPELINE else 1):
                runner(-1 - k)
        seconds, skipped = timed_rounds(runners, args.steps, args.repeats)
        memory = {} if args.speed_only else measure_memory(args.overrides, trainers, batch, 3)

    rates = {
        name: [args.steps * batch_size / s for s in values] for name, values in seconds.items()
    }

    def paired(numerator: str, denominator: str) -> float:
        """Median over repeats of the speed ratio measured within each repeat."""
        pairs = zip(rates[numerator], rates[denominator], strict=True)
        return median([a / b for a, b in pairs])

    workers = int(cfg.data.num_workers)
    return {
        "config": {
            "overrides": args.overrides,
            "backbone": cfg.model.backbone,
            "image_size": int(cfg.data.image_size),
            "batch_size": batch_size,
            "device": str(reference.device),
            "torch_threads": torch.get_num_threads(),
            "num_workers": workers,
            "ema": bool(cfg.train.ema),
            "amp": cfg.train.get("amp"),
            "channels_last": bool(cfg.train.get("channels_last", False)),
            "compile": bool(cfg.train.get("compile", False)),
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "training": {
            name: {
                "images_per_s_median": median(rates[name]),
                "step_ms_median": 1000 * batch_size / median(rates[name]),
                "images_per_s_repeats": rates[name],
                "skipped_steps": skipped[name],
                **({"memory": memory[name]} if name in memory else {}),
            }
            for name in (*trainers, PLAIN)
        },
        "speed_ratio": {
            "centerx_vs_pytorch": paired("centerx", PLAIN),
            **(
                {"grad_checkpoint_vs_centerx": paired("grad_checkpoint", "centerx")}
                if "grad_checkpoint" in trainers
                else {}
            ),
        },
        "memory_ratio": memory_ratios(memory) if memory else {},
        "pipeline": {
            "images_per_s_per_worker_median": median(rates[PIPELINE]),
            "images_per_s_repeats": rates[PIPELINE],
        },
        "pipeline_to_training_ratio": {
            "per_worker": paired(PIPELINE, "centerx"),
            "configured_workers": max(1, workers) * paired(PIPELINE, "centerx"),
        },
    }


def memory_ratios(memory: dict) -> dict[str, float]:
    """grad_checkpoint's peak over centerx's, per measurement (cuda, or each heap)."""
    ratios = {}
    for kind, plain in memory["centerx"].items():
        checkpointed = memory["grad_checkpoint"][kind]
        key = "max_memory_allocated_mb" if kind == "cuda" else "training_adds_mb"
        ratios[kind] = checkpointed[key] / plain[key]
    return ratios


def _memory_text(memory: dict) -> str:
    if "cuda" in memory:
        return f"{memory['cuda']['max_memory_allocated_mb']:.0f} MiB (cuda max allocated)"
    parts = [
        f"+{probe['training_adds_mb']:.0f} MiB ({heap} heap)" for heap, probe in memory.items()
    ]
    return ", ".join(parts)


def report(result: dict) -> str:
    c = result["config"]
    lines = [
        f"centerx training benchmark: backbone={c['backbone']} image_size={c['image_size']} "
        f"batch_size={c['batch_size']} device={c['device']} threads={c['torch_threads']} "
        f"ema={c['ema']} amp={c['amp']} channels_last={c['channels_last']} "
        f"compile={c['compile']} torch={c['torch']}",
        f"  {c['steps']} steps x {c['repeats']} repeats (interleaved), {c['warmup']} warm-up "
        f"steps; load average before/after: "
        + " / ".join(f"{v[0]:.1f}" for v in result["load_average"].values()),
        "",
        f"  {'training step':<24}{'images/s':>10}{'ms/step':>10}   peak memory (RSS training adds)",
    ]
    for name, t in result["training"].items():
        memory = _memory_text(t["memory"]) if "memory" in t else "-"
        lines.append(
            f"  {name:<24}{t['images_per_s_median']:>10.1f}{t['step_ms_median']:>10.0f}   {memory}"
        )
        spread = ", ".join(f"{v:.1f}" for v in t["images_per_s_repeats"])
        skipped = f"; {t['skipped_steps']} skipped" if t["skipped_steps"] else ""
        lines.append(f"  {'':<24}repeats: {spread}{skipped}")
    speed, mem = result["speed_ratio"], result["memory_ratio"]
    memory_change = ", ".join(f"{100 * (r - 1):+.0f}% ({kind})" for kind, r in mem.items())
    lines += ["", f"  centerx / plain PyTorch loop speed: {speed['centerx_vs_pytorch']:.2f}x"]
    if "grad_checkpoint_vs_centerx" in speed:
        lines.append(
            f"  grad_checkpoint vs centerx: step time "
            f"{100 * (1 / speed['grad_checkpoint_vs_centerx'] - 1):+.0f}%, "
            f"peak memory {memory_change}"
        )
    p = result["pipeline"]
    ratio = result["pipeline_to_training_ratio"]
    lines += [
        "",
        f"  data pipeline, 1 worker:  {p['images_per_s_per_worker_median']:.1f} images/s "
        f"(repeats: {', '.join(f'{v:.1f}' for v in p['images_per_s_repeats'])})",
        f"  pipeline / training (centerx): {ratio['per_worker']:.2f}x per worker, "
        f"{ratio['configured_workers']:.2f}x with data.num_workers={c['num_workers']}"
        + ("" if ratio["configured_workers"] > 1 else "   <-- the data loader is the bottleneck"),
    ]
    return "\n".join(lines)


def profile_steps(args: argparse.Namespace, steps: int = 2) -> str:
    """Where a step's time goes: torch.profiler over `steps` steps of centerx and of the plain
    loop (after a warm-up), the convolutions' share of the self CPU time and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    cfg = compose_config(args.overrides)
    if cfg.train.get("num_threads"):
        torch.set_num_threads(int(cfg.train.num_threads))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, False, Path(tmp))
        dataset = training_dataset(cfg)
        batch, plain, plain_batch = plain_loop_beside(trainer, cfg, dataset)
        runners = {"centerx": lambda: trainer._step(batch), PLAIN: lambda: plain.step(plain_batch)}
        for name, run in runners.items():
            for _ in range(args.warmup):
                run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    run()
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ops)
            conv = sum(e.self_cpu_time_total for e in ops if "conv" in e.key)
            lines.append(
                f"  {name}: {total / steps / 1e3:.0f} ms of self CPU time per step, "
                f"{conv / total:.0%} in convolution ops; top ops:"
            )
            lines += [f"    {e.self_cpu_time_total / total:6.1%}  {e.key}" for e in ops[:8]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only centerx against the plain loop: no gradient-checkpointing variant, no "
        "memory probes (each would compile again under train.compile=true)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: where the time of a centerx and of a plain-loop step goes (torch.profiler)",
    )
    parser.add_argument("--memory-probe", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)

    if args.memory_probe:  # the fresh subprocess of measure_memory
        cfg = compose_config(args.overrides)
        if cfg.train.get("num_threads"):
            torch.set_num_threads(int(cfg.train.num_threads))
        print(json.dumps(memory_probe(cfg, args.memory_probe, args.steps)))
        return

    if args.profile:
        print(profile_steps(args))
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
    run_script(main)
