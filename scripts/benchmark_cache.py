"""Training loader with and without the decoded-image cache (centerx.data.cache.CachedImages).

    .venv/bin/python scripts/benchmark_cache.py experiment=fruits data.root=../shared/datasets/fruits
    .venv/bin/python scripts/benchmark_cache.py --workers 0 1 2 --rounds 3 --json out.json [overrides]

For each worker count: one epoch of the training loader as the trainer builds it (the real
pipeline: decode or cached pixels, augmentation, targets, collate; workers forked per epoch),
with and without the cache, alternating, `--rounds` times; medians reported. Per epoch:

* images/s of the loader alone (an upper bound on what it can feed the training step);
* CPU seconds per image, summed over the main process and its workers: on a 2-core machine
  this is the CPU the loader takes away from the training step, which is what the cache saves;
* each worker's private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup,
  Linux) in the middle of the epoch: the cached pixels stay shared with the parent, so it does
  not grow with the cache.

Also the cache's own cost: MiB held and seconds to fill it (once, at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from centerx.data.base import DetectionSource
from centerx.data.cache import CachedImages
from centerx.engine.build import build_sources, build_train_loader
from centerx.errors import run_script

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        return compose(config_name="train", overrides=overrides)


def private_mib(pid: int) -> float | None:
    """Memory only this process holds (not shared with its parent), from smaps_rollup."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    kib = sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))
    return kib / 1024


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the epoch's joined workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def one_epoch(cfg: DictConfig, source: DetectionSource, workers: int, epoch: int) -> dict:
    cfg.data.num_workers = workers
    loader = build_train_loader(cfg.data, source, cfg.train.batch_size, cfg.seed)
    loader.dataset.epoch = epoch
    images, worker_mib = 0, []
    cpu_before, start = cpu_seconds(), time.perf_counter()
    iterator = iter(loader)
    for step, batch in enumerate(iterator):
        images += len(batch.get("image", ()))
        if step == len(loader) // 2 and workers:
            worker_mib = [private_mib(w.pid) for w in iterator._workers]  # private API
    del iterator  # joins the workers, so their CPU time is counted
    seconds = time.perf_counter() - start
    return {
        "images_per_s": images / seconds,
        "cpu_ms_per_image": 1000 * (cpu_seconds() - cpu_before) / images,
        "worker_private_mib": worker_mib,
    }


def run(args: argparse.Namespace) -> dict:
    cfg = compose_config(args.overrides)
    source, _ = build_sources(cfg.data)
    cached = CachedImages(source, args.cache_mib)
    sources = {"decode": source, "cache": cached}
    results: dict = {
        "config": {"overrides": args.overrides, "batch_size": int(cfg.train.batch_size)},
        "cache": {
            "images": len(cached.images),
            "of_images": len(source),
            "mib": cached.nbytes / 2**20,
            "fill_seconds": cached.fill_seconds,
        },
        "epochs": {},
    }
    for workers in args.workers:
        runs: dict[str, list[dict]] = {name: [] for name in sources}
        for round_index in range(args.rounds):
            order = list(sources) if round_index % 2 == 0 else list(sources)[::-1]
            for name in order:
                runs[name].append(one_epoch(cfg, sources[name], workers, round_index))
        results["epochs"][str(workers)] = {
            name: {
                "images_per_s": statistics.median(r["images_per_s"] for r in epochs),
                "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in epochs),
                "worker_private_mib": epochs[-1]["worker_private_mib"],
            }
            for name, epochs in runs.items()
        }
    return results


def report(results: dict) -> str:
    c = results["cache"]
    lines = [
        f"cache: {c['images']} of {c['of_images']} images, {c['mib']:.0f} MiB, filled in "
        f"{c['fill_seconds']:.1f} s",
        "",
        f"{'workers':>8}{'source':>8}{'images/s':>10}{'CPU ms/image':>14}   worker private MiB",
    ]
    for workers, by_source in results["epochs"].items():
        for name, r in by_source.items():
            private = ", ".join(f"{m:.0f}" for m in r["worker_private_mib"] if m is not None)
            lines.append(
                f"{workers:>8}{name:>8}{r['images_per_s']:>10.1f}{r['cpu_ms_per_image']:>14.1f}"
                f"   {private or '-'}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="epochs per variant (median)")
    parser.add_argument("--cache-mib", type=float, default=4096, help="the cache's budget")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_intermixed_args(argv)
    results = run(args)
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"-> {args.json}")


if __name__ == "__main__":
    run_script(main)
