"""The main job's report: criteria, tables, report.md (from a template), report.json,
comparison.png, the student's ONNX export and a few held-out predictions."""

from __future__ import annotations

import json
import logging
import math
import os
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DetectionSource
from centerx.engine.build import build_eval_source
from centerx.engine.evaluate import torch_predictor
from centerx.engine.predict import predict_image
from centerx.model.checkpoint import model_from_checkpoint
from centerx.recipes.overrides import command, override
from centerx.recipes.parallel import usable_cpus
from centerx.utils.visualize import draw_detections, image_grid, save_rgb

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("templates") / "main_job_report.md"
CELL = 256  # comparison.png tile size


@dataclass
class ReportContext:
    cfg: DictConfig
    out_dir: Path
    stages: list  # main_job.Stage, in run order
    base: list[str]
    teachers: dict[str, dict[str, list[str]]]  # name -> {classes, parts}
    results: dict[str, dict]  # stage name -> held-out metrics
    timings: dict[str, float]  # stage name -> training seconds (a reused stage's earlier ones)
    reused: list[str]  # stages taken from an earlier run (main_job.reuse=true)
    pseudo_label_commands: list[str]
    started: float
    slots: int = 1  # stages trained at once (main_job.parallel)
    stage_threads: int = 1  # torch threads of each stage

    @property
    def owner(self) -> dict[str, str]:
        return {c: name for name, t in self.teachers.items() for c in t["classes"]}

    @property
    def class_names(self) -> list[str]:
        return list(self.results["student"]["per_class_AP"])


def _number(value: Any) -> float:
    return 0.0 if value is None or not math.isfinite(float(value)) else float(value)


def _finite_or_none(value: float) -> float | None:
    return round(value, 1) if math.isfinite(value) else None


def _seconds(value: float) -> str:
    return "not recorded" if not math.isfinite(value) else f"{value:.0f}"


def _stages_at_once(ctx: ReportContext) -> str:
    threads = f"{ctx.stage_threads} torch thread(s)"
    if ctx.slots == 1:
        return f"one stage at a time, {threads}"
    return f"up to {ctx.slots} stages at once (main_job.parallel), {threads} each"


def _reused_note(ctx: ReportContext) -> str:
    """Said next to the wall time, which then covers only what this run did."""
    if not ctx.reused:
        return ""
    trained = sum(v for n, v in ctx.timings.items() if n in ctx.reused and math.isfinite(v))
    return (
        f" for this run, which reused {len(ctx.reused)} stage(s) trained earlier "
        f"({trained:.0f} s of training then, per stage below)"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------


def _student_entry(
    got: float, teacher: float, baselines: Mapping[str, float], ratio: float
) -> dict:
    return {
        "value": got,
        "ratio": got / teacher if teacher > 0 else None,
        "keeps": got >= ratio * teacher,
        # None: no baseline was run, so there is nothing to beat
        "beats_baselines": all(got > v for v in baselines.values()) if baselines else None,
    }


def summarise(
    results: Mapping[str, dict],
    owner: Mapping[str, str],
    baselines: Sequence[str],
    criteria: Mapping,
) -> dict:
    """Per class: each student against its owner teacher and against every baseline run."""
    metric = f"per_class_{criteria['metric']}"
    students = [name for name in ("student", "student_gt") if name in results]
    per_class = {}
    for name, teacher in owner.items():
        value = lambda model, n=name: _number(results[model][metric].get(n))  # noqa: E731
        others = {b: value(b) for b in baselines}
        entry = {"owner": teacher, "teacher": value(teacher), "baselines": others}
        entry["best_baseline"] = max(others, key=others.get) if others else None
        for student in students:
            entry[student] = _student_entry(
                value(student), entry["teacher"], others, criteria["student_ratio"]
            )
        naive = others.get("naive_merge")
        entry["naive_visibly_worse"] = (
            None if naive is None else naive <= criteria["naive_margin"] * value("student")
        )
        per_class[name] = entry
    return {
        "metric": criteria["metric"],
        "per_class": per_class,
        "student_criteria": all(
            c["student"]["keeps"] and c["student"]["beats_baselines"] is not False
            for c in per_class.values()
        ),
        "naive_visibly_worse": all(
            c["naive_visibly_worse"] is not False for c in per_class.values()
        ),
    }


def results_table(
    results: Mapping[str, dict], models: Sequence[str], class_names: Sequence[str]
) -> str:
    head = ["model", "AP", "AP50"] + [f"{n} {m}" for n in class_names for m in ("AP", "AP50")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        m = results[model]
        row = [model, _fmt(m["AP"]), _fmt(m["AP50"])]
        for name in class_names:
            known = name in m["per_class_AP"]
            row += (
                [_fmt(m["per_class_AP"][name]), _fmt(m["per_class_AP50"][name])]
                if known
                else ["-", "-"]
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _verdict(flag: bool | None) -> str:
    return "n/a" if flag is None else ("PASS" if flag else "FAIL")


def criteria_table(summary: dict) -> str:
    classes = summary["per_class"]
    with_gt = all("student_gt" in c for c in classes.values())
    head = [
        "class",
        "owner",
        "owner's",
        "student (KD only)",
        "ratio",
        "keeps",
        "beats every baseline",
    ]
    head += ["student_gt (KD + labels)", "ratio"] if with_gt else []
    head += ["best baseline", "naive visibly worse"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in classes.items():
        s = c["student"]
        row = [name, c["owner"], f"{c['teacher']:.3f}", f"{s['value']:.3f}", _fmt(s["ratio"]),
               _verdict(s["keeps"]), _verdict(s["beats_baselines"])]  # fmt: skip
        if with_gt:
            row += [f"{c['student_gt']['value']:.3f}", _fmt(c["student_gt"]["ratio"])]
        best = c["best_baseline"]
        row += ["-" if best is None else f"{best} ({c['baselines'][best]:.3f})"]
        row += [_verdict(c["naive_visibly_worse"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pictures, export, predictions
# ---------------------------------------------------------------------------------------------


def _predictor(checkpoint: Path, eval_cfg: DictConfig):
    model, state = model_from_checkpoint(checkpoint)
    predictor = torch_predictor(model, k=int(eval_cfg.top_k), flip=bool(eval_cfg.flip))
    return predictor, [str(n) for n in state["class_names"]], int(state["image_size"])


def _row(image, ann, test: DetectionSource, predictors: Mapping, threshold: float) -> list:
    """Ground truth, then each model's detections, on one enlarged image (legible labels)."""
    scale = CELL / max(image.shape[:2])
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    names = test.class_names
    row = [draw_detections(big, ann.boxes * scale, np.ones(len(ann.labels)), ann.labels, names,
                           title="ground truth")]  # fmt: skip
    for title, (predictor, classes, size) in predictors.items():
        boxes, scores, labels = predict_image(predictor, image, size, threshold)
        to_test = np.array([names.index(n) for n in classes])  # one colour per class everywhere
        row.append(draw_detections(big, boxes * scale, scores, to_test[np.asarray(labels, np.int64)],
                                   names, title=title))  # fmt: skip
    return row


def comparison_grid(ctx: ReportContext, test: DetectionSource, columns: Sequence[str]) -> Path:
    """Rows: held-out images; columns: ground truth, then each model's detections."""
    job = ctx.cfg.main_job
    predictors = {
        name: _predictor(ctx.out_dir / name / "checkpoints" / "best.pt", ctx.cfg.eval)
        for name in columns
    }
    count = min(int(job.compare_images), len(test))
    rows = [_row(*test.load(i), test, predictors, float(job.score_threshold)) for i in range(count)]
    path = ctx.out_dir / "comparison.png"
    save_rgb(path, image_grid(rows, cell=CELL))
    return path


def export_student(ctx: ReportContext) -> tuple[Path | None, str]:
    """`run.sh export` on the student (in-process); (model.onnx or None, the command)."""
    from centerx.exporter.onnx import export_task

    out = ctx.out_dir / "student"
    overrides = [
        override("checkpoint", str(out / "checkpoints" / "best.pt")),
        override("out_dir", str(out)),
        "overwrite=true",  # the job's own output (a re-used stage's earlier export)
    ]
    export_task(compose(config_name="export", overrides=overrides))
    path = out / "model.onnx"
    return (path if path.is_file() else None), command("export", overrides)


def predict_heldout(ctx: ReportContext, test: DetectionSource, model_path: Path) -> str:
    """Write a few held-out images as PNG files and `run.sh predict` them; the command."""
    from centerx.engine.tasks import predict_task

    image_dir = ctx.out_dir / "heldout_images"
    for index in range(min(int(ctx.cfg.main_job.predict_images), len(test))):
        name = Path(test.image_info(index).file_name).name
        save_rgb(image_dir / Path(name).with_suffix(".png"), test.load_image(index))
    overrides = [override("checkpoint", str(model_path)), override("input", str(image_dir)),
                 override("out_dir", str(ctx.out_dir / "predictions")),
                 override("score_threshold", float(ctx.cfg.main_job.score_threshold)),
                 "overwrite=true"]  # fmt: skip
    predict_task(compose(config_name="predict", overrides=overrides))
    return command("predict", overrides)


# ---------------------------------------------------------------------------------------------
# report.md, report.json
# ---------------------------------------------------------------------------------------------


def stage_commands(ctx: ReportContext) -> dict[str, list[str]]:
    """Per model: the command that trains it as the job did, and the one that scores it."""
    repro = ctx.out_dir / "repro"
    return {
        s.name: [
            command(s.task, ctx.base + s.overrides, repro / s.name),
            command("eval", [override("checkpoint", str(s.checkpoint(ctx.out_dir))), "split=test"],
                    repro / f"{s.name}_eval"),
        ]
        for s in ctx.stages
    }  # fmt: skip


def report_json(ctx: ReportContext, summary: dict, commands: Mapping, extras: Mapping) -> dict:
    models = {
        name: {
            "AP": _number(m["AP"]),
            "AP50": _number(m["AP50"]),
            "per_class_AP": {k: _number(v) for k, v in m["per_class_AP"].items()},
            "per_class_AP50": {k: _number(v) for k, v in m["per_class_AP50"].items()},
            "checkpoint": str(ctx.out_dir / name / "checkpoints" / "best.pt"),
            "commands": list(commands[name]),
            "train_seconds": _finite_or_none(ctx.timings.get(name, 0.0)),
            "reused": name in ctx.reused,
        }
        for name, m in ctx.results.items()
    }
    return {
        "models": models,
        "class_owner": ctx.owner,
        "teachers": ctx.teachers,
        "criteria": summary,
        "seed": int(ctx.cfg.seed),
        "wall_time_s": round(extras["wall_time_s"], 1),
        "stages_at_once": ctx.slots,
        "threads_per_stage": ctx.stage_threads,
        "export": extras["export"],
        "pseudo_label_commands": ctx.pseudo_label_commands,
    }


UNION_STAGES = {
    "student": "`student`: KD only from the teachers (it never reads a label)",
    "student_gt": "`student_gt`: KD + each image's own labels (negatives only for the classes "
    "its part labels)",
    "naive_merge": "`naive_merge`: the partial labels as they are (an unlabelled object is a "
    "negative)",
    "ignore_unlabelled": "`ignore_unlabelled`: no focal-loss negatives for the classes an "
    "image's part does not label",
    "pseudo_label": "`pseudo_label`: every teacher's detections with score >= {threshold} "
    "become boxes where a part leaves the teacher's classes unlabelled (`run.sh pseudo_label`, "
    "on the un-augmented training images)",
}


def union_stages(names: Sequence[str], threshold: float) -> str:
    """One bullet per student or baseline that ran (the report names no stage it skipped)."""
    return "\n".join(
        "  - " + UNION_STAGES[name].format(threshold=threshold)
        for name in names
        if name in UNION_STAGES
    )


def render_markdown(ctx: ReportContext, summary: dict, commands: Mapping, extras: Mapping) -> str:
    cfg, job = ctx.cfg, ctx.cfg.main_job
    repro = []
    for stage in ctx.stages:
        repro += [
            f"### {stage.name}: {stage.title}",
            "",
            "```bash",
            *commands[stage.name],
            "```",
            "",
        ]
    values = {
        "out_dir": ctx.out_dir,
        "wall_time": f"{extras['wall_time_s']:.0f} s" + _reused_note(ctx),
        "machine": f"{cfg.train.device}, {_stages_at_once(ctx)}, {extras['cpus']} CPUs, "
        f"load average {extras['load']:.1f} at the end",
        "data": f"`{extras['data_choice']}`, classes {ctx.class_names}",
        "teachers": "\n".join(
            f"- `{name}` owns {t['classes']}, trained on part(s) {t['parts']}"
            for name, t in ctx.teachers.items()
        ),
        "model": f"`{cfg.model.backbone}`, {cfg.data.image_size} px",
        "optimiser": f"`{cfg.train.optimizer._target_}` lr {cfg.train.lr}, {cfg.train.schedule}, "
        f"batch {int(job.batch_size.teacher)} (teachers) / {int(job.batch_size.union)} (union "
        f"stages), seed {cfg.seed}",
        "teacher_epochs": int(job.epochs.teacher),
        "union_epochs": int(job.epochs.union),
        "losses": f"teachers `{job.loss.teacher}`, students `{job.loss.student}`, baselines `{job.loss.baseline}`"
        + (
            f"; students start from `{job.student_init}`'s weights"
            if job.get("student_init")
            else ""
        ),
        "union_stages": union_stages(list(ctx.results), float(job.pseudo_label_threshold)),
        "results": results_table(ctx.results, list(ctx.results), ctx.class_names),
        "metric": summary["metric"],
        "ratio": f"{float(job.criteria.student_ratio):.0%}",
        "margin": f"{float(job.criteria.naive_margin):.0%}",
        "criteria": criteria_table(summary),
        "student_verdict": _verdict(summary["student_criteria"]),
        "naive_verdict": _verdict(summary["naive_visibly_worse"]),
        "timing_note": "Training seconds per stage, one stage at a time."
        if ctx.slots == 1
        else f"Training seconds per stage; up to {ctx.slots} stages trained at once, so these "
        "overlap (their sum is more than the wall time) and each is slower than it would be alone.",
        "timings": "\n".join(
            f"| {name} | {_seconds(seconds)}{' (reused)' if name in ctx.reused else ''} |"
            for name, seconds in ctx.timings.items()
        ),
        "columns": ", ".join(extras["comparison_columns"]),
        "export": extras["export_line"],
        "predictions": extras["predictions_line"],
        "main_command": command("main", [*ctx.base, f"hydra.run.dir={ctx.out_dir}"]),
        "pseudo_label_commands": "\n".join(ctx.pseudo_label_commands),
        "repro": "\n".join(repro),
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)


def write_all(ctx: ReportContext) -> dict:
    """Everything after training: criteria, pictures, export, predictions, report files."""
    job = ctx.cfg.main_job
    baselines = [name for name in job.baselines if name in ctx.results]
    summary = summarise(ctx.results, ctx.owner, baselines, OmegaConf.to_container(job.criteria))
    student = ctx.out_dir / "student" / "checkpoints" / "best.pt"
    state_cfg = OmegaConf.create(model_from_checkpoint(student)[1]["config"]["data"])
    test = build_eval_source(state_cfg, "test", ctx.class_names)
    columns = [*ctx.teachers, "student", *(["naive_merge"] if "naive_merge" in ctx.results else [])]
    comparison_grid(ctx, test, columns)
    onnx_path, export_command = export_student(ctx)
    predict_command = predict_heldout(ctx, test, onnx_path or student)
    commands = stage_commands(ctx)
    extras = {
        "wall_time_s": time.time() - ctx.started,
        "cpus": usable_cpus(),
        "load": os.getloadavg()[0],
        "data_choice": next((o for o in ctx.base if o.startswith("data=")), "data=synthetic"),
        "comparison_columns": columns,
        "export": None if onnx_path is None else str(onnx_path),
        "export_line": f"`{onnx_path}` (`{export_command}`; parity with PyTorch in student/export.json)"
        if onnx_path else "not exported",
        "predictions_line": f"`predictions/`: held-out images from `heldout_images/` (`{predict_command}`)",
    }  # fmt: skip
    (ctx.out_dir / "report.json").write_text(
        json.dumps(report_json(ctx, summary, commands, extras), indent=1)
    )
    (ctx.out_dir / "report.md").write_text(render_markdown(ctx, summary, commands, extras))
    print("\n" + results_table(ctx.results, list(ctx.results), ctx.class_names), flush=True)
    print("\n" + criteria_table(summary), flush=True)
    print(f"[main] report: {ctx.out_dir / 'report.md'} ({extras['wall_time_s']:.0f} s)", flush=True)
    return summary
