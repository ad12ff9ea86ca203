"""Time to accuracy: held-out AP50 (and AP) against training seconds, one curve per recipe variant.

    python scripts/time_to_accuracy.py --out docs/results/time_to_accuracy/fruits \\
        --variant old experiment=fruits train.eval_every=4 \\
        --variant new experiment=fruits_fast \\
        -- data.root=../shared/datasets/fruits

Each `--variant NAME OVERRIDES...` is one `bash run.sh train` with the overrides after `--` and
its own; `--parallel 2` (default) runs two side by side with one torch thread each, so the
variants of a pair see the same machine load (on 2 cores, two one-thread runs use the machine
as well as one two-thread run). Training seconds exclude evaluation (the trainer logs them with
every evaluation in metrics.jsonl), so a variant that evaluates more often is not penalised.
A variant whose run directory already holds eval.json is not re-run; `--collect-only` re-runs
nothing and plots what the run directories hold (a stopped run counts as far as it got).

Writes OUT/time_to_accuracy.png (AP50 and AP against seconds), OUT/time_to_accuracy.md and .json
(per variant: each evaluation, the best AP50, and the first time AP50 reached each threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from centerx.errors import run_script

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9)


def start(name: str, overrides: Sequence[str], out: Path, threads: int) -> subprocess.Popen | None:
    run = out / name
    if (run / "eval.json").is_file():
        print(f"[tta] {name}: done before, reusing {run}", flush=True)
        return None
    # The runner's thread count first: a variant's own train.num_threads (later) wins.
    args = [sys.executable, "-m", "centerx", "train", f"train.num_threads={threads}", *overrides,
            "train.progress=false", f"hydra.run.dir={run}", "overwrite=true"]  # fmt: skip
    print(f"[tta] {name}: {' '.join(shlex.quote(a) for a in args[3:])}", flush=True)
    log = (out / f"{name}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(
    variants: list[tuple[str, list[str]]], common: list[str], out: Path, parallel: int
) -> None:
    """Run the variants, `parallel` at a time, each with cores/parallel torch threads."""
    threads = max(1, (os.cpu_count() or 2) // parallel)
    queue, running = list(variants), []
    while queue or running:
        while queue and len(running) < parallel:
            name, own = queue.pop(0)
            process = start(name, [*common, *own], out, threads)
            if process is not None:
                running.append((name, process))
        time.sleep(2)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                if process.returncode:
                    sys.exit(
                        f"[tta] {name} failed (exit {process.returncode}); see {out / name}.log"
                    )


def curve(run: Path) -> list[dict]:
    """The evaluations of a run: training seconds, epoch, AP50, AP."""
    records = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line
    ]
    return [
        {"seconds": r["train_seconds"], "epoch": r["epoch"], "AP50": r["AP50"], "AP": r["AP"]}
        for r in records
        if r.get("kind") == "eval"
    ]


def summary(points: list[dict]) -> dict:
    best = max(points, key=lambda p: p["AP50"])
    reached = {
        f"{t:g}": next((p["seconds"] for p in points if p["AP50"] >= t), None) for t in THRESHOLDS
    }
    return {"final": points[-1], "best_AP50": best, "seconds_to_AP50": reached}


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("AP50", "AP"), strict=True):
        for name, points in curves.items():
            ax.plot(
                [p["seconds"] / 60 for p in points],
                [p[metric] for p in points],
                marker="o",
                label=name,
            )
        ax.set(xlabel="training minutes", ylabel=f"held-out {metric}", ylim=(0, 1), title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(results: dict, command: str) -> str:
    heads = " | ".join(f"AP50 ≥ {t:g}" for t in THRESHOLDS)
    lines = [f"`{command}`", "", f"| variant | final AP50 | final AP | minutes | best AP50 (epoch) | {heads} |",
             "|---|---|---|---|---|" + "---|" * len(THRESHOLDS)]  # fmt: skip
    for name, item in results.items():
        s = item["summary"]
        reach = " | ".join(
            "-" if v is None else f"{v / 60:.1f} min" for v in s["seconds_to_AP50"].values()
        )
        label = name if item["finished"] else f"{name} (stopped)"
        lines.append(
            f"| {label} | {s['final']['AP50']:.3f} | {s['final']['AP']:.3f} | {s['final']['seconds'] / 60:.1f} "
            f"| {s['best_AP50']['AP50']:.3f} ({s['best_AP50']['epoch']}) | {reach} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE")
    )
    parser.add_argument("--parallel", type=int, default=2, help="variants run side by side")
    parser.add_argument(
        "--collect-only", action="store_true", help="run nothing; plot the existing run dirs"
    )
    return parser.parse_args(argv), common


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, common = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [(name, list(overrides)) for name, *overrides in args.variant]
    if not args.collect_only:
        run_all(variants, common, args.out, args.parallel)
    curves = {name: curve(args.out / name) for name, _ in variants}
    results = {name: {"overrides": own, "evaluations": curves[name], "summary": summary(curves[name]),
                      "finished": (args.out / name / "eval.json").is_file()}
               for name, own in variants}  # fmt: skip
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/time_to_accuracy.py", *argv])
    payload = {"command": command, "common": common, "cpus": os.cpu_count(), "variants": results}
    (args.out / "time_to_accuracy.json").write_text(json.dumps(payload, indent=1))
    (args.out / "time_to_accuracy.md").write_text(markdown(results, command))
    plot(curves, args.out / "time_to_accuracy.png", f"time to accuracy ({os.cpu_count()} CPUs)")
    print(markdown(results, command))


if __name__ == "__main__":
    run_script(main)
