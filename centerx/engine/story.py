"""The main job (`bash run.sh`, conf/main.yaml): multi-teacher distillation on partial labels.

1. Two partial-label views of the synthetic shapes: view A labels only class A, view B only
   class B; the images of both contain both classes (conf/data/synthetic_views.yaml).
2. Teacher A (one class) trains on view A, teacher B on view B.
3. A two-class student is distilled from both on the union of the images, KD only.
4. Three baselines train on the same union, with the student's epochs and model: naive merge
   (partial labels as they are: unlabelled objects become negatives), ignore-unlabelled (no
   focal negatives for classes a sample's source does not label) and pseudo-labels (teacher
   detections above a threshold become ground truth for the classes a view leaves out).
5. Every model is scored on a fully labelled held-out set (per-class AP, AP50); the student is
   exported to ONNX when the exporter is available and predicts a few held-out images.
6. report.md, report.json and comparison.png go into the run directory.

Every stage is the configuration that `bash run.sh train|distill ...` composes from the
overrides printed in report.md: the story composes that very configuration with Hydra and runs
it, so the printed commands reproduce the rows (each stage seeds itself, as a fresh process
does). The held-out figures come from the printed `bash run.sh eval ...` commands' config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from centerx.data.base import DetectionSource
from centerx.data.pipeline import EvalDataset, SourceUnion, build_loader
from centerx.data.synthetic import SyntheticShapes
from centerx.data.views import ClassSubset, PseudoLabeled
from centerx.engine.build import build_sources, model_from_checkpoint, run_dir, setup_process
from centerx.engine.evaluate import (
    Predictor,
    evaluate_predictor,
    format_table,
    to_original,
    torch_predictor,
)
from centerx.engine.predict import predict_files, predict_image
from centerx.utils.visualize import draw_detections, image_grid, save_rgb
from centerx_export.predictor import list_images

log = logging.getLogger(__name__)

TEACHERS = ("teacher_a", "teacher_b")
BASELINES = ("naive_merge", "ignore_unlabelled", "pseudo_label")
MODELS = (*TEACHERS, "student", *BASELINES)
STUDENT_RATIO = 0.95  # the student must keep this fraction of its teacher's AP on each class
NAIVE_MARGIN = 0.9  # "visibly worse": naive merge's AP at most this fraction of the student's
CELL = 256  # comparison.png tile size
SHOWN = ("train.epochs", "train.batch_size", "train.lr")  # always in a stage's command

# ---------------------------------------------------------------------------------------------
# Data: the views as one source (the `data.train` target of conf/data/synthetic_views.yaml)
# ---------------------------------------------------------------------------------------------


def teacher_detections(
    source: DetectionSource,
    checkpoint: str | Path,
    classes: Mapping[str, str],
    threshold: float,
    batch_size: int = 32,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A teacher's detections above `threshold` on every (un-augmented) image of `source`:
    per image (boxes in original pixels, labels as indices of source.class_names), only for
    the classes in `classes` (source class -> the teacher's class)."""
    model, state = model_from_checkpoint(checkpoint)
    teacher_names = [str(name) for name in state["class_names"]]
    to_source = np.full(len(teacher_names), -1, np.int64)
    for name, teacher_name in classes.items():
        if name not in source.class_names:
            raise ValueError(f"pseudo-labels: class {name!r} is not in {source.class_names}")
        if teacher_name not in teacher_names:
            raise ValueError(
                f"pseudo-labels: {checkpoint} has no class {teacher_name!r} (it has {teacher_names})"
            )
        to_source[teacher_names.index(teacher_name)] = source.class_names.index(name)
    predictor = torch_predictor(model)
    loader = build_loader(EvalDataset(source, int(state["image_size"])), batch_size, shuffle=False)
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    found: list[tuple[np.ndarray, np.ndarray]] = [empty] * len(source)
    for batch in loader:
        if "image" not in batch:
            continue
        boxes, scores, labels = (np.asarray(t.cpu()) for t in predictor(batch["image"]))
        for i, index in enumerate(batch["source_index"].tolist()):
            info = source.image_info(index)
            mapped = to_source[labels[i].astype(np.int64)]
            keep = (scores[i] >= threshold) & (mapped >= 0)
            found[index] = (
                to_original(
                    boxes[i][keep], batch["matrix"][i].numpy(), info.width, info.height
                ).astype(np.float32),
                mapped[keep],
            )
    return found


def pseudo_labeled(
    source: DetectionSource, teachers: Mapping[str, Any], threshold: float
) -> DetectionSource:
    """`source` with each teacher's detections filling the classes it owns that some images
    leave unlabelled (`teachers`: name -> {checkpoint, classes: {class: teacher's class}})."""
    labeled_everywhere = np.ones(source.num_classes, bool)
    for index in range(len(source)):
        labeled_everywhere &= np.asarray(source.labeled_classes(index), bool)
    merged: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(source))]
    fill: list[str] = []
    for name, spec in teachers.items():
        classes = {str(k): str(v) for k, v in spec["classes"].items()}
        missing = [c for c in classes if c not in source.class_names]
        if missing:
            raise ValueError(f"pseudo-labels: teacher {name!r} maps unknown classes {missing}")
        wanted = {
            c: t for c, t in classes.items() if not labeled_everywhere[source.class_names.index(c)]
        }
        if not wanted:
            continue  # every image labels this teacher's classes: nothing to fill
        found = teacher_detections(source, spec["checkpoint"], wanted, threshold)
        for index, item in enumerate(found):
            merged[index].append(item)
        fill += list(wanted)
        log.info(
            "pseudo-labels: %s fills %s on %d images: %d boxes with score >= %.2f",
            name,
            list(wanted),
            len(source),
            sum(len(labels) for _, labels in found),
            threshold,
        )
    if not fill:
        return source
    detections = [
        (np.concatenate([b for b, _ in items]), np.concatenate([lab for _, lab in items]))
        for items in merged
    ]
    return PseudoLabeled(source, detections, fill)


def view_source(
    class_names: Sequence[str],
    views: Mapping[str, Any],
    use: Sequence[str],
    keep: Sequence[str] | None = None,
    render_size: int = 128,
    objects_per_image: int = 6,
    pseudo_labels: Mapping[str, Any] | None = None,
) -> DetectionSource:
    """The union of the named partial-label views of the synthetic shapes, optionally with
    teacher pseudo-labels (computed once, here) and narrowed to the classes in `keep`."""
    if not use:
        raise ValueError("data.use names no view: list at least one of data.views")
    unknown = [name for name in use if name not in views]
    if unknown:
        raise ValueError(f"data.use names unknown views {unknown}; known: {sorted(views)}")
    parts: list[DetectionSource] = []
    for name in use:
        view = views[name]
        parts.append(
            SyntheticShapes(
                num_images=int(view["num_images"]),
                seed=int(view["seed"]),
                class_names=list(class_names),
                image_size=int(render_size),
                max_objects=int(objects_per_image),
                labeled_class_names=None if view["labeled"] is None else list(view["labeled"]),
            )
        )
    teachers = (pseudo_labels or {}).get("teachers") or {}
    if teachers:
        threshold = float(pseudo_labels["threshold"])
        parts = [pseudo_labeled(part, teachers, threshold) for part in parts]
    source = parts[0] if len(parts) == 1 else SourceUnion(parts)
    return ClassSubset(source, None if keep is None else list(keep))


# ---------------------------------------------------------------------------------------------
# Stages as command-line overrides
# ---------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_./][A-Za-z0-9_./-]*")
_MISSING = object()


def override_value(value: Any) -> str:
    """A plain value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in {"null", "true", "false", "nan", "inf"}:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {override_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as an override")


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a plain container into dotted keys (lists and empty dicts are leaves)."""
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _plain(cfg: DictConfig, sections: Sequence[str]) -> dict[str, Any]:
    plain = {}
    for key in sections:
        if key in cfg:
            node = cfg[key]
            plain[key] = (
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            )
    return leaves(plain)


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    """Whether the value at `key`, or any node above it, comes from an interpolation."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        if OmegaConf.is_interpolation(node, part):
            return True
        node = node[part]
    return False


def express(
    task: str,
    groups: Mapping[str, str],
    wanted: DictConfig,
    sections: Sequence[str],
    extra: Sequence[str] = (),
) -> tuple[list[str], DictConfig]:
    """Overrides that make `conf/{task}.yaml` compose to `wanted` (on `sections`).

    Returns (overrides, the composed config). Values that follow from an interpolation are
    left to it when they come out right; whatever still differs is set literally."""
    want = _plain(wanted, sections)
    fixes: dict[str, Any] = {}
    added: set[str] = set()  # keys the task's config lacks: "+key=value"
    head = [f"{group}={choice}" for group, choice in groups.items()]
    for _ in range(8):
        overrides = head + [
            f"{'+' if key in added else ''}{key}={override_value(value)}"
            for key, value in fixes.items()
        ]
        composed = compose(config_name=task, overrides=overrides + list(extra))
        got = _plain(composed, sections)
        differ = [key for key, value in want.items() if got.get(key, _MISSING) != value]
        if not differ:
            return _drop_default_groups(task, overrides, list(extra), composed), composed
        direct = [key for key in differ if not _is_interpolation(composed, key)]
        for key in direct or differ:
            if key not in got and key not in fixes:
                added.add(key)
            fixes[key] = want[key]
    raise RuntimeError(f"cannot express the {task} stage as overrides; still differ: {differ}")


def _drop_default_groups(
    task: str, overrides: list[str], extra: list[str], composed: DictConfig
) -> list[str]:
    """Leave out group choices that the task's config makes anyway (shorter commands)."""
    target = OmegaConf.to_container(composed, resolve=True)
    kept = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0]
        if "." in key or key.startswith(("+", "~")):
            continue
        trial = [o for o in kept if o != item]
        try:
            same = (
                OmegaConf.to_container(
                    compose(config_name=task, overrides=trial + extra), resolve=True
                )
                == target
            )
        except Exception:  # without the choice the other overrides do not even apply
            same = False
        if same:
            kept = trial
    return kept + extra


@dataclass
class Stage:
    name: str
    task: str  # train | distill
    title: str
    cfg: DictConfig = field(repr=False)
    overrides: list[str]
    eval_cfg: DictConfig = field(repr=False)
    eval_overrides: list[str]

    def command(self, task: str, overrides: Sequence[str], run_dir: Path) -> str:
        words = ["bash", "run.sh", task, *overrides, f"hydra.run.dir={run_dir}"]
        return " ".join(shlex.quote(word) for word in words)


def _teachers_override(teachers: Mapping[str, Mapping[str, Any]]) -> str:
    return override_value({name: dict(spec) for name, spec in teachers.items()})


def plan_stages(cfg: DictConfig, out_dir: Path) -> list[Stage]:
    """The six stages of the story, each as the overrides of its own command."""
    story = cfg.story
    choices = HydraConfig.get().runtime.choices
    a, b = str(story.class_a), str(story.class_b)
    if a == b:
        raise ValueError(f"story.class_a and story.class_b must differ, both are {a!r}")
    main_groups = {g: str(choices[g]) for g in ("data", "model", "train", "loss")}
    checkpoint = {name: str(out_dir / name / "checkpoints" / "best.pt") for name in TEACHERS}
    teachers = {
        "teacher_a": {"checkpoint": checkpoint["teacher_a"], "classes": {a: a}},
        "teacher_b": {"checkpoint": checkpoint["teacher_b"], "classes": {b: b}},
    }
    union = {"data.use": ["a", "b"], "data.keep": None, "train.epochs": int(story.epochs.union)}
    specs = [
        # name, task, loss config, settings, extra overrides, title
        (
            "teacher_a",
            "train",
            story.loss.teacher,
            {"data.use": ["a"], "data.keep": [a], "train.epochs": int(story.epochs.teacher)},
            [],
            f"teacher A: {a} only, trained on view A",
        ),
        (
            "teacher_b",
            "train",
            story.loss.teacher,
            {"data.use": ["b"], "data.keep": [b], "train.epochs": int(story.epochs.teacher)},
            [],
            f"teacher B: {b} only, trained on view B",
        ),
        (
            "student",
            "distill",
            story.loss.student,
            union,
            [
                "distill.use_ground_truth=false",
                "~teachers",
                f"+teachers={_teachers_override(teachers)}",
            ],
            "student: KD only from both teachers on views A+B",
        ),
        (
            "naive_merge",
            "train",
            story.loss.baseline,
            {**union, "loss.criterion.ignore_unlabelled": False},
            [],
            "naive merge: views A+B with their partial labels",
        ),
        (
            "ignore_unlabelled",
            "train",
            story.loss.baseline,
            {**union, "loss.criterion.ignore_unlabelled": True},
            [],
            "ignore-unlabelled: no focal negatives for unlabelled classes",
        ),
        (
            "pseudo_label",
            "train",
            story.loss.baseline,
            {
                **union,
                "loss.criterion.ignore_unlabelled": False,
                "data.pseudo_labels.threshold": float(story.pseudo_label_threshold),
                "data.pseudo_labels.teachers": teachers,
            },
            [],
            f"pseudo-labels: teacher detections >= {float(story.pseudo_label_threshold)} fill "
            "the missing class",
        ),
    ]
    stages = []
    for name, task, loss, settings, extra, title in specs:
        groups = {**main_groups, "loss": str(loss)}
        sections = ["seed", "data", "model", "train", "eval", "samples"]
        if groups["loss"] == main_groups["loss"]:
            sections.append("loss")
        wanted = _with(cfg, settings)
        # Maps, and settings outside the carried sections (another loss config), are set
        # directly; the rest is derived by `express`.
        direct = [
            f"{key}={override_value(value)}"
            for key, value in settings.items()
            if key.split(".")[0] not in sections or isinstance(value, Mapping)
        ]
        overrides, stage_cfg = express(task, groups, wanted, sections, direct + extra)
        # The budget is always spelled out, even where it equals the task's default.
        given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
        overrides += [
            f"{key}={override_value(OmegaConf.select(stage_cfg, key))}"
            for key in SHOWN
            if key not in given
        ]
        for key, value in settings.items():
            got = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(stage_cfg, key)}))
            if got["v"] != (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value):
                raise RuntimeError(f"stage {name}: {key} composed to {got['v']!r}, not {value!r}")
        # The held-out evaluation: the stage's data with the test set as val, no pseudo-labels.
        test = _with(
            stage_cfg,
            {
                "data.val_set": OmegaConf.to_container(story.test_set),
                "data.pseudo_labels.teachers": None,
            },
        )
        eval_overrides, eval_cfg = express(
            "eval",
            {"data": groups["data"]},
            test,
            ["data", "eval"],
            [f"checkpoint={override_value(str(out_dir / name / 'checkpoints' / 'best.pt'))}"],
        )
        stages.append(Stage(name, task, title, stage_cfg, overrides, eval_cfg, eval_overrides))
    return stages


def _with(cfg: DictConfig, settings: Mapping[str, Any]) -> DictConfig:
    """A copy of cfg with dotted keys set (interpolations elsewhere stay live)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(copy):
        for key, value in settings.items():
            OmegaConf.update(copy, key, value, merge=False, force_add=True)
    return copy


# ---------------------------------------------------------------------------------------------
# Running and scoring
# ---------------------------------------------------------------------------------------------


def _stage_done(stage: Stage, stage_dir: Path) -> bool:
    config = stage_dir / "config.yaml"
    return (
        (stage_dir / "checkpoints" / "best.pt").is_file()
        and config.is_file()
        and config.read_text() == OmegaConf.to_yaml(stage.cfg, resolve=True)
    )


def run_stage(stage: Stage, stage_dir: Path, reuse: bool) -> float:
    """Train one stage into stage_dir (checkpoints, metrics.jsonl, curves.png); seconds taken."""
    if reuse and _stage_done(stage, stage_dir):
        log.info("[story] %s: reusing %s", stage.name, stage_dir / "checkpoints" / "best.pt")
        return 0.0
    started = time.time()
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)  # a rerun starts a fresh log
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(stage.cfg, resolve=True))
    train_source, val_source = build_sources(stage.cfg.data)
    log.info(
        "[story] %s: %d training images, classes %s, %d epochs",
        stage.name,
        len(train_source),
        train_source.class_names,
        stage.cfg.train.epochs,
    )
    if stage.task == "distill":
        from centerx.engine.distill import distill_model, specs_from_config

        distill_model(
            stage.cfg,
            specs_from_config(stage.cfg.teachers),
            train_source,
            val_source,
            stage_dir,
            use_ground_truth=bool(stage.cfg.distill.use_ground_truth),
        )
    else:
        from centerx.engine.tasks import train_model

        train_model(stage.cfg, train_source, val_source, stage_dir)
    return time.time() - started


def load_predictor(checkpoint: Path, eval_cfg: DictConfig) -> tuple[Predictor, list[str], int]:
    model, state = model_from_checkpoint(checkpoint)
    predictor = torch_predictor(model, k=int(eval_cfg.top_k), flip=bool(eval_cfg.flip))
    return predictor, [str(n) for n in state["class_names"]], int(state["image_size"])


def evaluate_stage(stage: Stage, stage_dir: Path) -> dict:
    """Score best.pt on the held-out set exactly as the stage's eval command does."""
    _, test_source = build_sources(stage.eval_cfg.data)
    predictor, names, size = load_predictor(
        stage_dir / "checkpoints" / "best.pt", stage.eval_cfg.eval
    )
    if names != list(test_source.class_names):
        raise RuntimeError(f"{stage.name}: model classes {names} vs {test_source.class_names}")
    metrics = evaluate_predictor(
        predictor, test_source, size, batch_size=int(stage.eval_cfg.eval.batch_size), progress=False
    )
    (stage_dir / "heldout_eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _number(value: Any) -> float:
    return 0.0 if value is None or not math.isfinite(float(value)) else float(value)


def summarise(results: Mapping[str, dict], class_owner: Mapping[str, str]) -> dict:
    """The criteria of the story, per class."""
    per_class = {}
    for name, owner in class_owner.items():
        student = results["student"]["per_class_AP"][name]
        teacher = results[owner]["per_class_AP"][name]
        baselines = {b: results[b]["per_class_AP"][name] for b in BASELINES}
        per_class[name] = {
            "owner": owner,
            "teacher_AP": teacher,
            "student_AP": student,
            "ratio": student / teacher if teacher > 0 else None,
            "keeps_95": student >= STUDENT_RATIO * teacher,
            "beats_baselines": all(student > v for v in baselines.values()),
            "best_baseline": max(baselines, key=baselines.get),
            "naive_over_student": baselines["naive_merge"] / student if student > 0 else 1.0,
            "naive_visibly_worse": baselines["naive_merge"] <= NAIVE_MARGIN * student,
        }
    passed = all(c["keeps_95"] and c["beats_baselines"] for c in per_class.values())
    naive = all(c["naive_visibly_worse"] for c in per_class.values())
    return {"per_class": per_class, "student_criteria": passed, "naive_visibly_worse": naive}


# ---------------------------------------------------------------------------------------------
# Pictures, export, predictions
# ---------------------------------------------------------------------------------------------


def comparison_grid(
    stages: Mapping[str, Stage],
    out_dir: Path,
    test_source: DetectionSource,
    columns: Sequence[str],
    count: int,
    score_threshold: float,
) -> Path:
    """Rows: held-out images; columns: ground truth, then each model's detections."""
    predictors = {
        name: load_predictor(out_dir / name / "checkpoints" / "best.pt", stages[name].eval_cfg.eval)
        for name in columns
    }
    rows = []
    for index in range(min(count, len(test_source))):
        image, ann = test_source.load(index)
        # Draw on an enlarged copy so labels stay legible in the grid.
        scale = CELL / max(image.shape[:2])
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        row = [
            draw_detections(
                big,
                ann.boxes * scale,
                np.ones(len(ann.labels)),
                ann.labels,
                test_source.class_names,
                title="ground truth",
            )
        ]
        for name in columns:
            predictor, names, size = predictors[name]
            boxes, scores, classes = predict_image(predictor, image, size, score_threshold)
            # colours by the held-out set's class order, so a class looks the same everywhere
            to_test = np.array([test_source.class_names.index(n) for n in names])
            row.append(
                draw_detections(
                    big,
                    boxes * scale,
                    scores,
                    to_test[np.asarray(classes, np.int64)],
                    test_source.class_names,
                    title=name,
                )
            )
        rows.append(row)
    path = out_dir / "comparison.png"
    save_rgb(path, image_grid(rows, cell=CELL))
    return path


def export_student(checkpoint: Path, out_dir: Path) -> tuple[Path | None, str | None]:
    """`bash run.sh export checkpoint=... out_dir=...` in-process, when the exporter is
    installed: out_dir/model.onnx and export.json (parity with PyTorch). Returns (ONNX path or
    None, the command)."""
    try:
        from centerx_export.onnx_export import export_task
    except ImportError as err:
        log.warning("[story] no ONNX exporter (%s): the student is not exported", err)
        return None, None
    overrides = [
        f"checkpoint={override_value(str(checkpoint))}",
        f"out_dir={override_value(str(out_dir))}",
    ]
    export_task(compose(config_name="export", overrides=overrides))
    path = out_dir / "model.onnx"
    command = " ".join(shlex.quote(w) for w in ["bash", "run.sh", "export", *overrides])
    return (path if path.is_file() else None), command


def predict_heldout(
    out_dir: Path,
    test_source: DetectionSource,
    checkpoint: Path,
    onnx_path: Path | None,
    eval_cfg: DictConfig,
    count: int,
    score_threshold: float,
) -> tuple[Path, str]:
    """Write `count` held-out images as PNG files and predict them with the student (its ONNX
    export when there is one); returns (predictions dir, which model predicted)."""
    image_dir = out_dir / "heldout_images"
    for index in range(min(count, len(test_source))):
        save_rgb(image_dir / test_source.image_info(index).file_name, test_source.load_image(index))
    if onnx_path is not None:
        from centerx_export.predictor import OnnxDetector

        detector = OnnxDetector(onnx_path, top_k=int(eval_cfg.top_k))
        predictor, names, size = (
            detector.predict_letterboxed,
            list(detector.class_names),
            int(detector.image_size),
        )
        which = str(onnx_path)
    else:
        predictor, names, size = load_predictor(checkpoint, eval_cfg)
        which = str(checkpoint)
    pred_dir = out_dir / "predictions"
    predict_files(predictor, list_images(str(image_dir)), names, size, pred_dir, score_threshold)
    return pred_dir, which


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def results_table(results: Mapping[str, dict], class_names: Sequence[str]) -> str:
    head = ["model", "AP", "AP50"]
    for name in class_names:
        head += [f"{name} AP", f"{name} AP50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in MODELS:
        m = results[model]
        row = [model, _fmt(m["AP"]), _fmt(m["AP50"])]
        for name in class_names:
            if name in m["per_class_AP"]:
                row += [_fmt(m["per_class_AP"][name]), _fmt(m["per_class_AP50"][name])]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def criteria_table(summary: dict) -> str:
    lines = [
        "| class | owner | owner AP | student AP | student/owner | >= 95% | best baseline (AP) "
        "| student > every baseline | naive merge / student | naive visibly worse |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = lambda flag: "PASS" if flag else "FAIL"  # noqa: E731
    for name, c in summary["per_class"].items():
        lines.append(
            f"| {name} | {c['owner']} | {c['teacher_AP']:.3f} | {c['student_AP']:.3f} | "
            f"{_fmt(c['ratio'])} | {ok(c['keeps_95'])} | {c['best_baseline']} "
            f"({c['best_baseline_AP']:.3f}) | {ok(c['beats_baselines'])} | "
            f"{c['naive_over_student']:.3f} | {ok(c['naive_visibly_worse'])} |"
        )
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    cfg: DictConfig,
    stages: Mapping[str, Stage],
    results: Mapping[str, dict],
    summary: dict,
    timings: Mapping[str, float],
    extras: Mapping[str, Any],
) -> None:
    story = cfg.story
    class_names = [str(story.class_a), str(story.class_b)]
    stage_of = dict(stages)
    parts = [
        "# centerx main job: multi-teacher distillation on partial labels",
        "",
        f"Run directory: `{out_dir}`; wall time {extras['wall_time_s']:.0f} s "
        f"({extras['device']}, {extras['threads']} torch thread(s) + "
        f"{cfg.data.num_workers} loader process(es); {extras['cpus']} CPUs, load average "
        f"{extras['load']:.1f} at the end: other processes sharing the CPU slow the job down).",
        "",
        "## Set-up",
        "",
        f"- Data: synthetic shapes, classes **{class_names[0]}** (A) and **{class_names[1]}** "
        f"(B); every image draws both. View A: {int(story.images_per_view)} images (seed "
        f"{cfg.data.views.a.seed}) labelled for {class_names[0]} only; view B: "
        f"{int(story.images_per_view)} other images (seed {cfg.data.views.b.seed}) labelled for "
        f"{class_names[1]} only.",
        f"- Held-out test set: {int(story.test_set.num_images)} fully labelled images (seed "
        f"{story.test_set.seed}), used only for the figures below. best.pt of every stage is "
        f"picked on a separate fully labelled val set ({int(cfg.data.val_set.num_images)} "
        f"images, seed {cfg.data.val_set.seed}, evaluated every "
        f"{cfg.train.eval_every} epochs).",
        f"- Model: CenterNet, backbone `{cfg.model.backbone}`, {cfg.data.image_size} px input, "
        f"the same for every stage. Optimiser/schedule: `{cfg.train.optimizer._target_}` lr "
        f"{cfg.train.lr}, {cfg.train.schedule}, batch {cfg.train.batch_size}, seed {cfg.seed}.",
        f"- Teachers: one class each, {int(story.epochs.teacher)} epochs on their view "
        f"(loss config `{story.loss.teacher}`).",
        f"- Student and the three baselines: two classes, {int(story.epochs.union)} epochs on "
        f"the union of both views ({2 * int(story.images_per_view)} images: "
        f"{2 * int(story.epochs.union) / int(story.epochs.teacher):.2g}x a teacher's steps). "
        "Student: KD only (it never reads a label), loss config "
        f"`{story.loss.student}`. Baselines: loss config `{story.loss.baseline}`.",
        "- Budget: every union stage (student and baselines) trains the same epochs on the same "
        "images with the same model and seed. The ground-truth baselines are still climbing at "
        "this budget while the KD student converges faster; with more union epochs the "
        "pseudo-label baseline catches up (conf/main.yaml notes a 12-epoch run where they tied).",
        "- Baselines: **naive_merge** trains on the partial labels as they are (an unlabelled "
        "object is a negative); **ignore_unlabelled** switches focal-loss negatives off for the "
        "classes a sample's view does not label; **pseudo_label** adds the other view's "
        f"teacher detections with score >= {float(story.pseudo_label_threshold)} as boxes for "
        "the class a view does not label (computed once, on the un-augmented images).",
        "",
        "## Held-out results (COCO AP@[.5:.95] and AP50, per class)",
        "",
        "Teachers are scored on their own class only (a one-class model).",
        "",
        results_table(results, class_names),
        "",
        "## Criteria",
        "",
        f"The student must keep at least {STUDENT_RATIO:.0%} of the owner teacher's AP on each "
        f"class and beat every baseline on it; naive merge counts as visibly worse when its AP "
        f"is at most {NAIVE_MARGIN:.0%} of the student's on every class.",
        "",
        criteria_table(summary),
        "",
        f"Student criteria: **{'PASS' if summary['student_criteria'] else 'FAIL'}**; naive merge "
        f"visibly worse: **{'PASS' if summary['naive_visibly_worse'] else 'FAIL'}**.",
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()),
        "",
        "## Files",
        "",
        "- `comparison.png`: held-out images (rows); columns: ground truth, "
        + ", ".join(extras["comparison_columns"])
        + f" (detections with score >= {float(story.score_threshold)}).",
        "- `<stage>/`: config.yaml, checkpoints/{last,best}.pt, metrics.jsonl, curves.png, "
        "heldout_eval.json (the figures above), command.txt.",
        f"- Student export: {extras['export'] or 'not exported (no exporter available)'}"
        + (
            f" (`{extras['export_command']}`; parity with PyTorch in student/export.json)."
            if extras["export"]
            else "."
        ),
        f"- `predictions/`: {extras['predict_count']} held-out images (`heldout_images/`) "
        f"predicted by {extras['predicted_with']}.",
        "",
        "## Reproduce",
        "",
        "The whole job: `bash run.sh "
        + " ".join(shlex.quote(o) for o in extras["main_overrides"])
        + "`. Each row on its own (run from the repository root; the student and the "
        "pseudo-label baseline read this run's teacher checkpoints): the first command trains "
        "the stage exactly as the main job did, the second scores the main job's checkpoint on "
        "the held-out set (point `checkpoint=` at the new run's best.pt to score the re-trained "
        "one). The commands hold for this revision of the code and conf/ defaults.",
        "",
    ]
    for name in MODELS:
        stage = stage_of[name]
        parts += [
            f"### {name}: {stage.title}",
            "",
            "```bash",
            stage.command(stage.task, stage.overrides, out_dir / "repro" / name),
            stage.command("eval", stage.eval_overrides, out_dir / "repro" / f"{name}_eval"),
            "```",
            "",
        ]
    (out_dir / "report.md").write_text("\n".join(parts))


def _report_json(
    results: Mapping[str, dict],
    class_owner: Mapping[str, str],
    summary: dict,
    stages: Mapping[str, Stage],
    out_dir: Path,
    timings: Mapping[str, float],
    extras: Mapping[str, Any],
) -> dict:
    models = {}
    for name in MODELS:
        m = results[name]
        stage = stages[name]
        models[name] = {
            "AP": _number(m["AP"]),
            "AP50": _number(m["AP50"]),
            "per_class_AP": {k: _number(v) for k, v in m["per_class_AP"].items()},
            "per_class_AP50": {k: _number(v) for k, v in m["per_class_AP50"].items()},
            "checkpoint": str(out_dir / name / "checkpoints" / "best.pt"),
            "commands": [
                stage.command(stage.task, stage.overrides, out_dir / "repro" / name),
                stage.command("eval", stage.eval_overrides, out_dir / "repro" / f"{name}_eval"),
            ],
            "train_seconds": round(timings.get(name, 0.0), 1),
        }
    return {
        "models": models,
        "class_owner": dict(class_owner),
        "criteria": summary,
        "wall_time_s": round(extras["wall_time_s"], 1),
        "export": extras["export"],
    }


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def main_task(cfg: DictConfig) -> dict:
    started = time.time()
    setup_process(cfg)
    story = cfg.story
    out_dir = run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    a, b = str(story.class_a), str(story.class_b)
    class_owner = {a: "teacher_a", b: "teacher_b"}
    stages = {stage.name: stage for stage in plan_stages(cfg, out_dir)}
    order = [*TEACHERS, "student", *BASELINES]
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for number, name in enumerate(order, 1):
        stage = stages[name]
        stage_dir = out_dir / name
        log.info("[story] stage %d/%d: %s", number, len(order), stage.title)
        print(f"[story] stage {number}/{len(order)}: {stage.title}", flush=True)
        timings[name] = run_stage(stage, stage_dir, bool(story.reuse))
        (stage_dir / "command.txt").write_text(
            stage.command(stage.task, stage.overrides, out_dir / "repro" / name)
            + "\n"
            + stage.command("eval", stage.eval_overrides, out_dir / "repro" / f"{name}_eval")
            + "\n"
        )
        results[name] = evaluate_stage(stage, stage_dir)
        print(format_table(results[name], title=f"{name} on the held-out set"), flush=True)

    summary = summarise(results, class_owner)
    for name, c in summary["per_class"].items():
        best = c["best_baseline"]
        c["best_baseline_AP"] = results[best]["per_class_AP"][name]

    print("[story] pictures, export, predictions", flush=True)
    _, test_source = build_sources(stages["student"].eval_cfg.data)
    columns = ["teacher_a", "teacher_b", "student", "naive_merge"]
    comparison_grid(
        stages,
        out_dir,
        test_source,
        columns,
        int(story.compare_images),
        float(story.score_threshold),
    )
    student_ckpt = out_dir / "student" / "checkpoints" / "best.pt"
    onnx_path, export_command = export_student(student_ckpt, out_dir / "student")
    pred_dir, predicted_with = predict_heldout(
        out_dir,
        test_source,
        student_ckpt,
        onnx_path,
        stages["student"].eval_cfg.eval,
        int(story.predict_images),
        float(story.score_threshold),
    )
    overrides = HydraConfig.get().overrides.task
    extras = {
        "wall_time_s": time.time() - started,
        "device": str(cfg.train.device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "comparison_columns": columns,
        "export": None if onnx_path is None else str(onnx_path),
        "export_command": export_command,
        "predict_count": min(int(story.predict_images), len(test_source)),
        "predicted_with": predicted_with,
        "main_overrides": [*overrides, f"hydra.run.dir={out_dir}"],
    }
    report = _report_json(results, class_owner, summary, stages, out_dir, timings, extras)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    write_report(out_dir, cfg, stages, results, summary, timings, extras)
    print("\n" + results_table(results, [a, b]) + "\n\n" + criteria_table(summary), flush=True)
    print(f"[story] report: {out_dir / 'report.md'} ({extras['wall_time_s']:.0f} s)", flush=True)
    return {
        "student_criteria": summary["student_criteria"],
        "naive_visibly_worse": summary["naive_visibly_worse"],
        "wall_time_s": round(extras["wall_time_s"], 1),
        "run_dir": str(out_dir),
        "predictions": str(pred_dir),
    }
