"""The main job over several seeds, with student variants, and the spread of every figure.

    python scripts/main_job_seeds.py --out docs/results/main_job_seeds --seeds 0 1 2
    python scripts/main_job_seeds.py --out docs/results/mask_halves --seeds 0 1 2 \\
        --variant kd_mse objective.heatmap_loss._target_=centerx.losses.distill.heatmap_kd_mse \\
        -- experiment=mask_halves data.root=../shared/datasets/mask/VOC2007

Everything after `--` goes to `bash run.sh main` (plus `seed=S`). Per seed, the main job runs into
OUT/seed_S (skipped when its report.json exists, so an interrupted sweep resumes); each
`--variant NAME OVERRIDES...` re-trains the KD-only student with those overrides appended to
its printed command (OUT/seed_S/variants/NAME) and scores it on the held-out split like the
other rows. Writes OUT/summary.json and OUT/summary.md: per model and class, the mean, the
standard deviation and the range over seeds, and each seed's value.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from centerx.errors import run_script

REPO = Path(__file__).resolve().parents[1]
METRICS = ("AP50", "AP")


def run_centerx(args: Sequence[str], log: Path) -> None:
    """`python -m centerx ...` from the repository root; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "centerx", *args],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if done.returncode:
        sys.exit(f"main_job_seeds: `centerx {' '.join(args[:3])} ...` failed; see {log}")


def run_seed(out: Path, seed: int, overrides: Sequence[str]) -> dict:
    run = out / f"seed_{seed}"
    report = run / "report.json"
    if not report.is_file():
        print(f"[seeds] seed {seed}: main job -> {run}", flush=True)
        resume = ["main_job.reuse=true"] if run.is_dir() else []  # an interrupted sweep
        args = ["main", *overrides, *resume, f"seed={seed}", f"hydra.run.dir={run}"]
        run_centerx(args, out / f"seed_{seed}.log")
    return json.loads(report.read_text())


def run_variant(out: Path, seed: int, report: dict, name: str, extra: Sequence[str]) -> dict:
    """The KD-only student's own command with `extra` appended, then its held-out score."""
    run = out / f"seed_{seed}" / "variants" / name
    scored = run / "eval" / "eval.json"
    if not scored.is_file():
        print(f"[seeds] seed {seed}: student variant {name}", flush=True)
        train_command = shlex.split(report["models"]["student"]["commands"][0])
        args = [a for a in train_command[2:] if not a.startswith("hydra.run.dir=")]
        run_centerx(
            [*args, *extra, f"hydra.run.dir={run / 'train'}", "overwrite=true"], run / "train.log"
        )
        checkpoint = run / "train" / "checkpoints" / "best.pt"
        run_centerx(
            [
                "eval",
                f"checkpoint={checkpoint}",
                "split=test",
                f"hydra.run.dir={run / 'eval'}",
                "overwrite=true",
            ],
            run / "eval.log",
        )
    return json.loads(scored.read_text())


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict:
    """model -> metric -> class -> spread over the seeds that trained that model (a model only
    some seeds ran, e.g. a second student, keeps those seeds; classes it does not predict are
    left out)."""
    models = list(dict.fromkeys(model for models in per_seed.values() for model in models))
    summary: dict = {}
    for model in models:
        seeds = [s for s in per_seed if model in per_seed[s]]
        summary[model] = {"seeds": seeds}
        for metric in METRICS:
            classes = per_seed[seeds[0]][model][f"per_class_{metric}"]
            summary[model][metric] = {
                name: spread(
                    [per_seed[s][model][f"per_class_{metric}"][name] or 0.0 for s in seeds]
                )
                for name in classes
            }
    return summary


def markdown(summary: dict, seeds: Sequence[int], owner: dict[str, str]) -> str:
    classes = list(owner)
    lines = [
        f"Seeds {list(seeds)}: mean ± standard deviation [min, max] of the per-class held-out metric.",
        "",
    ]
    for metric in METRICS:
        lines += [f"### per-class {metric}", "", "| model | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]  # fmt: skip
        for model, figures in summary.items():
            cells = []
            for name in classes:
                s = figures[metric].get(name)
                cells.append(
                    "-"
                    if s is None
                    else f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
                )
            only = "" if len(figures["seeds"]) == len(seeds) else f" (seeds {figures['seeds']})"
            lines.append(f"| {model}{only} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="a student variant: its name, then overrides added to the student's command")  # fmt: skip
    return parser.parse_args(argv), overrides


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    per_seed: dict[int, dict[str, dict]] = {}
    owner: dict[str, str] = {}
    for seed in args.seeds:
        report = run_seed(args.out, seed, overrides)
        owner = report["class_owner"]
        per_seed[seed] = dict(report["models"])
        for name, *extra in args.variant:
            per_seed[seed][f"student_{name}"] = run_variant(args.out, seed, report, name, extra)
    summary = {"seeds": args.seeds, "overrides": overrides, "variants": args.variant,
               "class_owner": owner, "models": summarise(per_seed)}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "scripts/main_job_seeds.py", *(sys.argv[1:] if argv is None else argv)]
    )
    text = f"`{command}`\n\n" + markdown(summary["models"], args.seeds, owner)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_script(main)
