"""The main job (`bash run.sh`, conf/main.yaml): distillation on partial labels, end to end.

The data is a union of parts that label different classes (conf/data/union.yaml; the default,
conf/data/synthetic_views.yaml, is two synthetic parts: one labels circles, the other triangles,
and each holds unlabelled objects of the other class). The job runs these stages, each the very
configuration that `bash run.sh train|distill|pseudo_label <overrides>` composes (report.md
prints the commands):

1. a teacher per part (or per class group, `main_job.teachers`), trained on the parts that label
   its classes, on those classes only;
2. `student`: KD only from every teacher on the union of the training images (no label read);
3. `student_gt`: KD + each image's own labels (negatives only for the classes its part labels);
4. baselines with the students' budget and model: `naive_merge` (partial labels as they are),
   `ignore_unlabelled` (no focal negatives for unlabelled classes) and `pseudo_label` (each
   teacher's detections, from `run.sh pseudo_label`, as boxes where a part leaves its classes
   unlabelled);
5. every model scored on the held-out set (`run.sh eval checkpoint=... split=test`), per class;
6. report.md / report.json / comparison.png, the student exported to ONNX, a few predictions.

Up to `main_job.parallel` stages train at once, each in a process of its own
(centerx/recipes/parallel.py), every stage as soon as what it needs exists: the students and
the pseudo-label baseline wait for the teachers, the other baselines for nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from centerx.data.base import DatasetError, DetectionSource
from centerx.data.partial import SourceUnion
from centerx.engine.build import (
    build_eval_source,
    build_sources,
    run_dir,
    save_config,
    setup_process,
)
from centerx.engine.evaluate import evaluate_predictor, format_table, torch_predictor
from centerx.engine.pseudo_label import pseudo_label
from centerx.engine.run_directory import clear_outputs
from centerx.engine.training import check_config, claim_run_dir, train_model
from centerx.errors import CenterxError
from centerx.model.checkpoint import model_from_checkpoint
from centerx.recipes import parallel, report
from centerx.recipes.overrides import command, override, override_key

log = logging.getLogger(__name__)

STUDENTS = ("student", "student_gt")
BASELINES = ("naive_merge", "ignore_unlabelled", "pseudo_label")
# Config groups whose choice the stages inherit from the main job (the experiment too: one that
# conf/main.yaml picks by default sizes the synthetic stages' data).
GROUPS = ("data", "model", "train", "loss", "objective", "experiment")
# Roots of the keys a pseudo_label command accepts (its config has no model/train/loss).
PSEUDO_LABEL_KEYS = ("data", "seed", "eval", "experiment")


@dataclass
class Stage:
    """One model of the job: `bash run.sh {task} {base overrides} {overrides}`."""

    name: str
    task: str  # train | distill
    title: str
    overrides: list[str]
    cfg: DictConfig | None = field(default=None, repr=False)

    @property
    def needs_teachers(self) -> bool:
        """Students learn from the teachers, the pseudo-label baseline from their detections."""
        return self.task == "distill" or self.name == "pseudo_label"

    def checkpoint(self, out_dir: Path) -> Path:
        return out_dir / self.name / "checkpoints" / "best.pt"


# ---------------------------------------------------------------------------------------------
# Planning: the main job's own command line, turned into each stage's
# ---------------------------------------------------------------------------------------------


def base_overrides() -> list[str]:
    """The main job's command line as train/distill overrides: the group choices conf/main.yaml
    makes that conf/train.yaml does not, then the user's overrides (main_job.* and hydra.* are
    the job's own)."""
    runtime = HydraConfig.get().runtime.choices
    defaults = compose(config_name="train", return_hydra_config=True).hydra.runtime.choices
    user = [
        item
        for item in HydraConfig.get().overrides.task
        if not override_key(item).startswith(("main_job", "hydra"))
    ]
    given = {override_key(item) for item in user}
    choices = [
        f"{group}={runtime[group]}"
        for group in GROUPS
        if runtime.get(group) != defaults.get(group) and group not in given
    ]
    return choices + user


def teacher_groups(cfg: DictConfig, union: SourceUnion) -> dict[str, dict[str, list[str]]]:
    """teacher name -> {classes it owns, parts it trains on}. Default: one per part that labels
    something; `main_job.teachers: {name: [classes]}` groups classes instead."""
    labelled = {
        name: list(part.classes) for name, part in zip(union.names, union.parts, strict=True)
    }
    order = list(union.class_names)
    groups = cfg.main_job.get("teachers")
    if groups is None:
        groups = {f"teacher_{name}": classes for name, classes in labelled.items() if classes}
    plan = {}
    for name, classes in groups.items():
        classes = sorted((str(c) for c in classes), key=order.index)
        parts = [part for part, got in labelled.items() if set(classes) & set(got)]
        if not parts:
            raise DatasetError(f"main_job.teachers.{name}: no part labels any of {classes}")
        plan[str(name)] = {"classes": classes, "parts": parts}
    owners = [c for group in plan.values() for c in group["classes"]]
    orphans = [c for c in order if c not in owners]
    if orphans or len(owners) != len(set(owners)):
        raise DatasetError(
            f"every class needs exactly one teacher; teachers own {plan}, classes {order}"
        )
    return plan


def parts_for_classes(parts: list[dict], classes: Sequence[str]) -> list[dict]:
    """Evaluation parts narrowed to a teacher's classes: a part that names its classes keeps
    those the teacher owns, and is left out when it names none of them; `absent` keeps only
    the teacher's classes (both must lie within the model's class names)."""
    kept = []
    for spec in parts:
        if spec.get("absent"):
            spec = {**spec, "absent": [c for c in spec["absent"] if c in classes]}
        named = spec.get("classes")
        if named is not None:
            mine = [c for c in named if c in classes]
            if not mine:
                continue
            narrowed = {c: named[c] for c in mine} if isinstance(named, Mapping) else mine
            spec = {**spec, "classes": narrowed}
        kept.append(spec)
    return kept


def eval_parts_overrides(data_cfg: DictConfig, classes: Sequence[str]) -> list[str]:
    """A teacher predicts only its classes: its val and test parts must not name others."""
    overrides = []
    for key in ("val_parts", "test_parts"):
        parts = data_cfg.get(key)
        if parts:
            resolved = OmegaConf.to_container(parts, resolve=True)
            overrides.append(override(f"data.{key}", parts_for_classes(resolved, classes)))
    return overrides


def student_start(teacher: str | None, taught: Mapping[str, Mapping]) -> list[str]:
    """`main_job.student_init`: the students start from that teacher's weights
    (`model.init_from`: backbone, neck, box heads, its classes' heatmap channels)."""
    if not teacher:
        return []
    if teacher not in taught:
        raise DatasetError(
            f"main_job.student_init={teacher!r} is not a teacher of this job; "
            f"teachers: {sorted(taught)}"
        )
    return [override("model.init_from", taught[teacher]["checkpoint"])]


def stage_budget(job: DictConfig, kind: str) -> list[str]:
    """`main_job.epochs.<kind>` and `main_job.batch_size.<kind>` (teacher or union) as overrides."""
    return [
        override("train.epochs", int(job.epochs[kind])),
        override("train.batch_size", int(job.batch_size[kind])),
    ]


def plan_stages(cfg: DictConfig, teachers: Mapping[str, Mapping], out_dir: Path) -> list[Stage]:
    """Teachers, the two students and the three baselines, as overrides."""
    job = cfg.main_job
    union_budget = stage_budget(job, "union")
    stages = [
        Stage(
            name,
            "train",
            f"{', '.join(t['classes'])} only, on part(s) {', '.join(t['parts'])}",
            [
                override("data.use_parts", t["parts"]),
                override("data.class_names", t["classes"]),
                *eval_parts_overrides(cfg.data, t["classes"]),
                *stage_budget(job, "teacher"),
                f"loss={job.loss.teacher}",
            ],
        )
        for name, t in teachers.items()
    ]
    taught = {
        name: {"checkpoint": str(out_dir / name / "checkpoints" / "best.pt"),
               "classes": {c: c for c in t["classes"]}}
        for name, t in teachers.items()
    }  # fmt: skip
    start = student_start(job.get("student_init"), taught)
    for name, with_labels, title in (
        ("student", False, "KD only from every teacher (reads no label)"),
        ("student_gt", True, "KD from every teacher + each image's own labels"),
    ):
        overrides = [
            f"objective={job.student_objective}",
            f"loss={job.loss.student}",
            override("objective.teachers", taught),
            override("objective.use_ground_truth", with_labels),
            *union_budget,
            *start,
        ]
        stages.append(Stage(name, "distill", title, overrides))
    baseline = [f"loss={job.loss.baseline}", *union_budget]
    stages += [
        Stage("naive_merge", "train", "naive merge: partial labels as they are",
              [*baseline, override("loss.criterion.ignore_unlabelled", False)]),
        Stage("ignore_unlabelled", "train", "ignore unlabelled: no negatives for unlabelled classes",
              [*baseline, override("loss.criterion.ignore_unlabelled", True)]),
        Stage("pseudo_label", "train", "pseudo-labels: teacher detections fill unlabelled classes",
              [*baseline, override("loss.criterion.ignore_unlabelled", False),
               override("data.pseudo_labels", [str(pseudo_label_file(out_dir, t)) for t in teachers])]),
    ]  # fmt: skip
    wanted = {*teachers, *job.students, *job.baselines}
    unknown = sorted(set(job.students) - set(STUDENTS) | set(job.baselines) - set(BASELINES))
    if unknown or "student" not in job.students:
        raise DatasetError(
            f"main_job.students must include 'student' and name only {list(STUDENTS)}, "
            f"main_job.baselines only {list(BASELINES)}; got {unknown or list(job.students)}"
        )
    return [stage for stage in stages if stage.name in wanted]


def pseudo_label_file(out_dir: Path, teacher: str) -> Path:
    return out_dir / "pseudo_labels" / f"{teacher}.json"


def pseudo_label_overrides(
    base: Sequence[str], out_dir: Path, teacher: str, threshold: float
) -> list[str]:
    """`run.sh pseudo_label` for one teacher on the union's training images."""
    data_only = [o for o in base if override_key(o).split(".")[0] in PSEUDO_LABEL_KEYS]
    return [
        *data_only,
        override("checkpoint", str(out_dir / teacher / "checkpoints" / "best.pt")),
        override("threshold", float(threshold)),
        override("out", str(pseudo_label_file(out_dir, teacher))),
    ]


# ---------------------------------------------------------------------------------------------
# Running and scoring
# ---------------------------------------------------------------------------------------------


STAGE_SECONDS = "stage_seconds.json"  # a stage's own training time; written once it finished


def stage_done(stage: Stage, stage_dir: Path) -> bool:
    """Trained to the end with this very config. best.pt alone does not say so: a stage killed
    mid-training has one from its last evaluation; stage_seconds.json is written at the end."""
    config = stage_dir / "config.yaml"
    return (
        stage.checkpoint(stage_dir.parent).is_file()
        and (stage_dir / STAGE_SECONDS).is_file()
        and config.is_file()
        and config.read_text() == OmegaConf.to_yaml(stage.cfg, resolve=True)
    )


def run_stage(
    stage: Stage, out_dir: Path, reuse: bool, progress: bool | None = None
) -> tuple[float, bool]:
    """Train one stage into out_dir/<name> (checkpoints, metrics.jsonl, curves.png); its
    training seconds and whether it was reused (then the seconds are those it took back then).
    `progress` overrides train.progress for this run only (not in its config.yaml: it changes
    what the terminal shows, not the model)."""
    stage_dir = out_dir / stage.name
    if reuse and stage_done(stage, stage_dir):
        log.info("[main] %s: reusing %s", stage.name, stage.checkpoint(out_dir))
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return float(json.loads((stage_dir / STAGE_SECONDS).read_text())["seconds"]), True
        return float("nan"), True  # its time file is unreadable
    started = time.time()
    clear_outputs(stage_dir)  # a rerun starts afresh (no old log or best.pt mixed in)
    save_config(stage.cfg, stage_dir)
    cfg = stage.cfg
    if progress is not None:
        cfg = OmegaConf.merge(cfg, {"train": {"progress": progress}})
    train_source, val_source = build_sources(cfg.data)
    train_model(cfg, train_source, val_source, stage_dir)
    seconds = time.time() - started
    (stage_dir / STAGE_SECONDS).write_text(json.dumps({"seconds": round(seconds, 1)}))
    return seconds, False


def score(checkpoint: Path, eval_cfg: DictConfig) -> dict:
    """`run.sh eval checkpoint=... split=test`: the model on its data config's held-out set."""
    model, state = model_from_checkpoint(checkpoint)
    data_cfg = OmegaConf.create(state["config"]["data"])
    source = build_eval_source(data_cfg, "test", [str(n) for n in state["class_names"]])
    predictor = torch_predictor(model, k=int(eval_cfg.top_k), flip=bool(eval_cfg.flip))
    return evaluate_predictor(
        predictor,
        source,
        int(state["image_size"]),
        batch_size=int(eval_cfg.batch_size),
        num_workers=int(eval_cfg.num_workers),
        progress=False,
    )


@dataclass
class StageOutcome:
    seconds: float  # training seconds (a reused stage's from back then)
    reused: bool
    heldout: dict  # held-out metrics


def train_and_score(
    stage: Stage, out_dir: Path, reuse: bool, eval_cfg: DictConfig, progress: bool | None = None
) -> StageOutcome:
    """A stage trained (or reused) and scored on the held-out set (<stage>/heldout_eval.json)."""
    seconds, reused = run_stage(stage, out_dir, reuse, progress)
    heldout = score(stage.checkpoint(out_dir), eval_cfg)
    (out_dir / stage.name / "heldout_eval.json").write_text(json.dumps(heldout, indent=1))
    return StageOutcome(seconds, reused, heldout)


def train_and_score_in_process(
    stage: Stage,
    out_dir: Path,
    reuse: bool,
    eval_cfg: DictConfig,
    log_files: list[str],
    start_method: str,
) -> StageOutcome:
    """train_and_score in a stage process of its own (main_job.parallel > 1): its threads, its
    log lines prefixed with its name, and no progress bar (two would garble one terminal)."""
    parallel.enter_stage_process(stage.name, log_files, start_method)
    setup_process(stage.cfg.train)
    return train_and_score(stage, out_dir, reuse, eval_cfg, progress=False)


def make_pseudo_labels(
    cfg: DictConfig, base: list[str], teachers: Mapping, out_dir: Path
) -> list[str]:
    """Each teacher labels the union's training images (run.sh pseudo_label); the commands.
    The teachers' commands differ only in checkpoint and output, so they share one source,
    read as `run.sh pseudo_label` reads it (each image once per teacher: no cache to fill,
    no val split to build)."""
    commands = []
    source = None
    for teacher in teachers:
        overrides = pseudo_label_overrides(
            base, out_dir, teacher, cfg.main_job.pseudo_label_threshold
        )
        step = compose(config_name="pseudo_label", overrides=overrides)
        if source is None:
            source = instantiate(step.data[step.split])
        labels = pseudo_label(
            source, step.checkpoint, float(step.threshold), None, step.eval.batch_size
        )
        path = pseudo_label_file(out_dir, teacher)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(labels))
        log.info(
            "[main] %s pseudo-labels: %d boxes -> %s", teacher, len(labels["annotations"]), path
        )
        commands.append(command("pseudo_label", overrides, out_dir / "repro" / f"pseudo_{teacher}"))
    return commands


def training_union(cfg: DictConfig) -> SourceUnion:
    """The training parts and what each labels (no pixels: `data.cache` is for the stages)."""
    source: DetectionSource = instantiate(cfg.data.train)
    if not isinstance(source, SourceUnion):
        raise DatasetError(
            "the main job needs a union of parts that label different classes: data=union "
            "(see conf/data/union.yaml) or data=synthetic_views"
        )
    return source


def main_job_task(cfg: DictConfig) -> dict:
    """The job in its own run directory (main_job.reuse=true continues one)."""
    check_config(cfg)
    setup_process(cfg.train)
    out_dir = run_dir()
    with claim_run_dir(cfg, out_dir, bool(cfg.main_job.reuse), "main_job.reuse=true"):
        return run_main_job(cfg, out_dir)


def stage_resources(cfg: DictConfig, slots: int, base: Sequence[str]) -> list[str]:
    """Overrides for every stage when `slots` stages train at once: each its share of the CPUs
    as torch threads, and no loader worker (training or evaluation) when that share is one
    core (the worker would only compete with its own trainer). Only where the config differs
    and the command line is silent; they are part of each stage's config, so its printed
    command reproduces it."""
    if slots == 1:
        return []
    given = {override_key(item) for item in base}
    threads = max(1, parallel.usable_cpus() // slots)
    wanted = {"train.num_threads": threads}
    if threads == 1:
        wanted |= {"data.num_workers": 0, "eval.num_workers": 0}
    current = {
        "train.num_threads": cfg.train.num_threads,
        "data.num_workers": cfg.data.num_workers,
        "eval.num_workers": cfg.eval.num_workers,
    }
    return [
        override(key, value)
        for key, value in wanted.items()
        if key not in given and current[key] != value
    ]


def _ready(stage: Stage, teachers_done: bool, labels_made: bool) -> bool:
    if not stage.needs_teachers:
        return True
    return teachers_done and (stage.name != "pseudo_label" or labels_made)


def run_stages(
    cfg: DictConfig,
    stages: list[Stage],
    slots: int,
    base: list[str],
    teachers: Mapping,
    out_dir: Path,
) -> tuple[dict[str, StageOutcome], list[str]]:
    """Every stage, up to `slots` at once (stage processes, see centerx/recipes/parallel.py),
    each as soon as what it needs exists; the outcomes and the pseudo-label commands. Finished
    stages stay on disk whatever happens to the others."""
    reuse = bool(cfg.main_job.reuse)
    outcomes: dict[str, StageOutcome] = {}
    waiting, running = list(stages), {}
    pseudo_commands: list[str] = []
    executor = parallel.stage_executor(slots)
    try:
        while waiting or running:
            teachers_done = all(name in outcomes for name in teachers)
            labels_made = bool(pseudo_commands)
            for stage in [s for s in waiting if _ready(s, teachers_done, labels_made)]:
                if len(running) >= slots:
                    break
                waiting.remove(stage)
                number = len(stages) - len(waiting)
                print(
                    f"[main] stage {number}/{len(stages)}: {stage.name}: {stage.title}", flush=True
                )
                if slots == 1:
                    future = executor.submit(train_and_score, stage, out_dir, reuse, stage.cfg.eval)
                else:
                    future = executor.submit(
                        train_and_score_in_process, stage, out_dir, reuse, stage.cfg.eval,
                        parallel.log_files(), multiprocessing.get_start_method(),
                    )  # fmt: skip
                running[future] = stage
            if teachers_done and not labels_made and any(s.name == "pseudo_label" for s in waiting):
                # Here, while the other stages train: a free slot would wait for them otherwise.
                pseudo_commands = make_pseudo_labels(cfg, base, teachers, out_dir)
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    outcomes[stage.name] = future.result()
                except BrokenProcessPool as err:
                    raise CenterxError(
                        f"the process training stage {stage.name} died ({err})",
                        "out of memory? finished stages are kept: rerun with "
                        "main_job.reuse=true, or main_job.parallel=1",
                    ) from err
                title = f"{stage.name} on the held-out set"
                print(format_table(outcomes[stage.name].heldout, title=title), flush=True)
    except BaseException:
        parallel.stop(executor)
        raise
    executor.shutdown()
    return outcomes, pseudo_commands


def run_main_job(cfg: DictConfig, out_dir: Path) -> dict:
    started = time.time()
    teachers = teacher_groups(cfg, training_union(cfg))
    base = base_overrides()
    stages = plan_stages(cfg, teachers, out_dir)
    slots = parallel.stage_slots(cfg.main_job.get("parallel", "auto"), str(cfg.train.device))
    resources = stage_resources(cfg, slots, base)
    for stage in stages:  # every stage's config and held-out set, before hours of training
        stage.overrides += resources
        stage.cfg = compose(config_name=stage.task, overrides=base + stage.overrides)
        build_eval_source(stage.cfg.data, "test", list(stage.cfg.data.class_names))
    outcomes, pseudo_commands = run_stages(cfg, stages, slots, base, teachers, out_dir)
    in_order = {stage.name: outcomes[stage.name] for stage in stages}
    context = report.ReportContext(
        cfg=cfg, out_dir=out_dir, stages=stages, base=base, teachers=teachers,
        results={name: o.heldout for name, o in in_order.items()},
        timings={name: o.seconds for name, o in in_order.items()},
        reused=[name for name, o in in_order.items() if o.reused],
        pseudo_label_commands=pseudo_commands, started=started,
        slots=slots, stage_threads=int(stages[0].cfg.train.num_threads or torch.get_num_threads()),
    )  # fmt: skip
    summary = report.write_all(context)
    return {
        "student_criteria": summary["student_criteria"],
        "wall_time_s": round(time.time() - started, 1),
        "run_dir": str(out_dir),
    }
