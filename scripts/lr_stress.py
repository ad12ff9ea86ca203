"""Learning-rate stress test: fixed loss weights against the adaptive weighter at 10x the lr.

Three runs of the normal training command (`python -m centerx train`) on the synthetic data,
identical (seed, data, cosine schedule, optimizer) but for the learning rate and the weighting:

    default_lr_fixed     train.lr = the default,           loss=fixed
    high_lr_fixed        train.lr = factor x the default,  loss=fixed
    high_lr_adaptive     train.lr = factor x the default,  loss=adaptive, train.schedule=cosine

The default length is the learning test's (8 epochs of 2048 images, 1024 steps); the default
optimizer is SGD with momentum 0.9 at lr 0.02, the setting the fixed-magnitude weighter was
made for. `--optimizer adamw` runs the same comparison with the project's default optimizer,
where the weighter does not help (see OPTIMIZERS below).

Each run's metrics.jsonl gives the loss terms per step and the validation AP per evaluation;
the script writes lr_stress.png (raw focal/size/offset losses over steps, AP over epochs),
lr_stress.json and lr_stress.md into --out. A run that stops on non-finite losses counts as
diverged (its AP is taken as 0 from there).

    .venv/bin/python scripts/lr_stress.py --out docs/results/lr_stress [--optimizer adamw]

Claims checked (printed and in the summary): at factor x lr, fixed weights diverge or keep
less than half the default-lr final AP; the adaptive weighter with the cosine schedule ends
within --tolerance AP of the default-lr run (or above it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from centerx.errors import run_script

REPO = Path(__file__).resolve().parents[1]

RUNS = {
    "default_lr_fixed": {"lr_factor": 1.0, "loss": "fixed", "extra": []},
    "high_lr_fixed": {"lr_factor": None, "loss": "fixed", "extra": []},
    "high_lr_adaptive": {"lr_factor": None, "loss": "adaptive", "extra": ["train.schedule=cosine"]},
}


# The train config per optimizer (conf/train/*.yaml), whose lr is the default one. SGD is the
# script's default because loss weights only reach the step size through the gradient: Adam(W)
# divides each gradient by its own running RMS, so rescaling a loss term barely changes the
# update and no loss weighting can tame an Adam lr (measured: --optimizer adamw).
OPTIMIZERS = {"sgd": "sgd", "adamw": "default"}


def default_lr(optimizer: str) -> float:
    config = REPO / "conf" / "train" / f"{OPTIMIZERS[optimizer]}.yaml"
    return float(yaml.safe_load(config.read_text())["lr"])


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(name: str, overrides: list[str], out_dir: Path, log_file: Path) -> dict:
    command = [sys.executable, "-m", "centerx", "train", *overrides, f"hydra.run.dir={out_dir}"]
    print(f"[lr_stress] {name}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    with open(log_file, "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    text = log_file.read_text()
    return {
        "command": "bash run.sh train "
        + " ".join([*overrides, f"hydra.run.dir={os.path.relpath(out_dir, REPO)}"]),
        "exit_code": code,
        "diverged": code != 0 and "TrainingDiverged" in text,
        "failed": code != 0 and "TrainingDiverged" not in text,
        "seconds": round(seconds, 1),
        "skipped_steps": text.count("step skipped"),
    }


def summarise(name: str, info: dict, out_dir: Path, epochs: int) -> dict:
    records = read_metrics(out_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r for r in records if r.get("kind") == "step"]
    finished = bool(evals) and evals[-1]["epoch"] == epochs and info["exit_code"] == 0
    final = evals[-1] if finished else None
    non_finite = sum(1 for r in steps if r.get("loss") is None or not math.isfinite(r["loss"]))
    return {
        **info,
        "final_AP": final["AP"] if final else 0.0,
        "final_AP50": final["AP50"] if final else 0.0,
        "best_AP": max((r["AP"] for r in evals), default=0.0),
        "AP_by_epoch": {r["epoch"]: r["AP"] for r in evals},
        "finished": finished,
        "non_finite_logged_steps": non_finite,
        "last_raw_cls": steps[-1].get("raw/cls") if steps else None,
    }


def plot(results: dict, out_dir: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cls, ax_reg, ax_ap) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"default_lr_fixed": "tab:green", "high_lr_fixed": "tab:red"}
    colors["high_lr_adaptive"] = "tab:blue"
    for name, result in results.items():
        records = read_metrics(out_dir / name / "metrics.jsonl")
        steps = [r for r in records if r.get("kind") == "step"]
        evals = [r for r in records if r.get("kind") == "eval"]
        color = colors.get(name)
        label = f"{name} (lr {result['lr']:g}{', diverged' if result['diverged'] else ''})"

        def series(key: str, steps=steps) -> tuple[list, list]:
            pairs = [
                (r["step"], r[key])
                for r in steps
                if r.get(key) is not None and math.isfinite(r[key]) and r[key] > 0
            ]
            return [p[0] for p in pairs], [p[1] for p in pairs]

        ax_cls.plot(*series("raw/cls"), color=color, label=label)
        ax_reg.plot(*series("raw/wh"), color=color, label=f"{name} wh")
        ax_reg.plot(*series("raw/offset"), color=color, linestyle="--", label=f"{name} offset")
        xs = [0] + [r["epoch"] for r in evals]
        ys = [0.0] + [r["AP"] for r in evals]
        if result["diverged"] or not result["finished"]:
            xs.append(xs[-1])
            ys.append(0.0)
        ax_ap.plot(xs, ys, color=color, marker="o", label=label)
    ax_cls.set(xlabel="step", ylabel="raw focal loss (cls)", yscale="log", title="heatmap loss")
    ax_reg.set(xlabel="step", ylabel="raw L1", yscale="log", title="size (solid), offset (dashed)")
    ax_ap.set(xlabel="epoch", ylabel="val AP", ylim=(0, 1), title="validation AP")
    ax_cls.legend(fontsize=8)
    ax_ap.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "lr_stress.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/lr_stress", help="output folder")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: conf/train/default.yaml's"
    )
    parser.add_argument(
        "--factor", type=float, default=10.0, help="lr multiplier of the stress runs"
    )
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default lr; default: the lr of the optimizer's conf/train/*.yaml",
    )
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (+1 loader process); 0: torch's default",
    )
    parser.add_argument("--tolerance", type=float, default=0.05, help="'a few AP points'")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=list(RUNS),
        choices=list(RUNS),
        help="a subset of the runs (put Hydra overrides before this option)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_lr = args.lr if args.lr is not None else default_lr(args.optimizer)
    common = [
        f"train={OPTIMIZERS[args.optimizer]}",
        f"train.epochs={args.epochs}",
        *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
        f"train.eval_every={args.eval_every}",
        "train.progress=false",
        f"data.train.num_images={args.images}",
        f"data.val.num_images={args.val_images}",
        *([f"train.num_threads={args.threads}"] if args.threads else []),
        *args.overrides,
    ]
    results = {}
    started = time.time()
    for name in args.runs:
        spec = RUNS[name]
        lr = base_lr * (spec["lr_factor"] if spec["lr_factor"] is not None else args.factor)
        overrides = [f"loss={spec['loss']}", f"train.lr={lr:g}", *spec["extra"], *common]
        run_dir = out / name
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # a rerun starts a fresh log
        info = run_one(name, overrides, run_dir, out / f"{name}.log")
        results[name] = {
            "lr": lr,
            "loss": spec["loss"],
            **summarise(name, info, run_dir, args.epochs),
        }
        r = results[name]
        print(
            f"[lr_stress] {name}: final AP {r['final_AP']:.3f} (best {r['best_AP']:.3f})"
            f"{'  DIVERGED' if r['diverged'] else ''}{'  FAILED' if r['failed'] else ''}"
            f"  {r['seconds']:.0f} s",
            flush=True,
        )
    claims = {}
    if {"default_lr_fixed", "high_lr_fixed", "high_lr_adaptive"} <= set(results):
        base = results["default_lr_fixed"]["final_AP"]
        fixed = results["high_lr_fixed"]
        adaptive = results["high_lr_adaptive"]["final_AP"]
        claims = {
            "fixed_high_lr_diverges_or_loses_most": bool(
                fixed["diverged"] or fixed["final_AP"] < 0.5 * base
            ),
            "adaptive_high_lr_within_tolerance": bool(adaptive >= base - args.tolerance),
            "default_final_AP": base,
            "fixed_high_lr_final_AP": fixed["final_AP"],
            "adaptive_high_lr_final_AP": adaptive,
            "tolerance": args.tolerance,
        }
    title = (
        f"lr stress: {args.images} synthetic images, {args.epochs} epochs, {args.optimizer}, "
        f"default lr {base_lr:g}, x{args.factor:g}"
    )
    picture = plot(results, out, title)
    summary = {
        "optimizer": args.optimizer,
        "default_lr": base_lr,
        "factor": args.factor,
        "epochs": args.epochs,
        "images": args.images,
        "threads": args.threads or os.cpu_count(),
        "runs": results,
        "claims": claims,
        "plot": str(picture),
        "wall_time_s": round(time.time() - started, 1),
    }
    (out / "lr_stress.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Learning-rate stress",
        "",
        title + f"; wall time {summary['wall_time_s']:.0f} s.",
        "",
        "| run | lr | loss | final AP | final AP50 | best AP | diverged | skipped steps | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['lr']:g} | {r['loss']} | {r['final_AP']:.3f} | {r['final_AP50']:.3f} "
            f"| {r['best_AP']:.3f} | {r['diverged']} | {r['skipped_steps']} | {r['seconds']:.0f} |"
        )
    if claims:
        lines += [
            "",
            f"- fixed weights at x{args.factor:g} lr diverge or keep < 50% of the default-lr "
            f"final AP: **{'PASS' if claims['fixed_high_lr_diverges_or_loses_most'] else 'FAIL'}**",
            f"- adaptive + cosine at x{args.factor:g} lr ends within {args.tolerance:.2f} AP of "
            f"the default-lr run: **{'PASS' if claims['adaptive_high_lr_within_tolerance'] else 'FAIL'}**",
        ]
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results.values()]
    lines += ["", f"![loss and AP]({picture.name})", ""]
    (out / "lr_stress.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)
