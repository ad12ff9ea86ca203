"""Multi-teacher distillation: frozen teachers, class maps by name, the `distill` subcommand.

Each teacher is rebuilt from its own checkpoint (architecture and class names come from
the checkpoint, so teachers may differ in backbone from the student and from each
other) and owns some of the student's classes through an explicit map by name
(student class -> teacher class; renaming allowed). This generalises centerX's
contiguous index ranges: a teacher may own any subset of the student's classes in any
order, and its own class list may be ordered and named differently.

Modes (all the same `DistillObjective`):
    * KD only (`gt_criterion=None`): the student never reads the batch's labels, so the
      training images may be unlabelled. Every student class must be owned by a teacher.
    * KD + ground truth: the supervised CenterNet terms on each sample's own labels are
      added. A student class no teacher owns is then allowed if some training images label it.
    * Self-distillation: a teacher with the student's architecture; nothing special.

Ground-truth negatives in KD + GT mode: the training data may be a union of datasets with
different label sets (`batch["labeled"]` [B,C] says which classes each sample's source
labels). The focal loss's negatives say "no object of class c here"; for a class the
sample's source does not label, that is false (its objects are there, just unannotated)
and it would contradict the teacher that owns the class, which sees them. So in KD + GT
mode the objective always counts focal negatives only for the classes each sample's
source labels (`CenterNetLoss.ignore_unlabelled` is forced on, on a copy); positives
exist only for labelled classes anyway. Unlabelled classes learn from their teacher's
KD terms alone, labelled ones from both. The naive alternative (negatives everywhere)
remains available as plain supervised training, for baselines.

Teachers are frozen: requires_grad False, evaluated in eval mode (re-asserted before
every forward, so BatchNorm statistics never move) under `torch.no_grad`, on exactly
the batch the student gets (same augmentation). They are held by the objective, not
by the student module, so the optimiser, the EMA and the checkpoints never see them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from centerx.data.base import DetectionSource
from centerx.engine import distributed as dist
from centerx.engine.build import (
    build_sources,
    build_train_loader,
    checkpoint_meta,
    make_evaluator,
    model_from_checkpoint,
    run_dir,
    save_config,
    setup_process,
)
from centerx.engine.checkpoint import CheckpointError
from centerx.engine.tasks import finish_run
from centerx.engine.trainer import Trainer, resolve_device, seed_everything
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.distill import heatmap_kd, masked_dense_l1, teacher_peak_weight
from centerx.model.centernet import build_model

log = logging.getLogger(__name__)

BACKBONE_STRIDE = 32
KD_TERMS = ("kd_heatmap", "kd_wh", "kd_offset")
GT_TERMS = ("cls", "wh", "offset")


@dataclass
class TeacherSpec:
    name: str
    checkpoint: str
    classes: dict[str, str]  # student class name -> teacher class name (renaming allowed)


@dataclass(eq=False)
class Teacher:
    """A frozen model and the channels it owns: student channel `student_channels[i]` is
    taught by the teacher's channel `teacher_channels[i]` (both in the student's class order)."""

    name: str
    model: nn.Module
    student_channels: torch.Tensor  # int64 [K]
    teacher_channels: torch.Tensor  # int64 [K]
    class_names: list[str] = field(default_factory=list)  # the teacher's own, from its checkpoint
    classes: dict[str, str] = field(default_factory=dict)  # student -> teacher, as owned
    checkpoint: str = ""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Owned heatmap probabilities [B,K,H,W], wh and offset [B,2,H,W]; no gradient."""
        self.model.eval()  # whatever happened to it since: BN must use its running stats
        outputs = self.model(images)
        return {
            "heatmap": outputs["heatmap"].float().index_select(1, self.teacher_channels).sigmoid(),
            "wh": outputs["wh"].float(),
            "offset": outputs["offset"].float(),
        }


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _check_maps(specs: Sequence[TeacherSpec], student_class_names: list[str]) -> None:
    """Everything about the class maps that does not need the checkpoints."""
    if not specs:
        raise ValueError("distillation needs at least one teacher")
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen_names:
            raise ValueError(f"two teachers are named {spec.name!r}; teacher names must be unique")
        seen_names.add(spec.name)
        if not spec.classes:
            raise ValueError(
                f"teacher {spec.name!r} owns no classes: give it a map "
                "{student_class: teacher_class}"
            )
        unknown = [name for name in spec.classes if name not in student_class_names]
        if unknown:
            raise ValueError(
                f"teacher {spec.name!r}: its class map names student class(es) {unknown} that "
                f"the student does not have; student classes: {student_class_names}"
            )
        for name in spec.classes:
            if name in owner:
                raise ValueError(
                    f"student class {name!r} is owned by two teachers, {owner[name]!r} and "
                    f"{spec.name!r}; each class must come from exactly one teacher"
                )
            owner[name] = spec.name


def _check_image_size(image_size: int) -> int:
    if int(image_size) <= 0 or int(image_size) % BACKBONE_STRIDE:
        raise ValueError(
            f"image size {image_size} cannot be fed to the teachers: it must be a positive "
            f"multiple of {BACKBONE_STRIDE} (the backbone stride); e.g. "
            f"{max(BACKBONE_STRIDE, round(int(image_size) / BACKBONE_STRIDE) * BACKBONE_STRIDE)}"
        )
    return int(image_size)


@torch.no_grad()
def _check_forward(
    name: str, model: nn.Module, image_size: int, device: torch.device, num_classes: int
) -> None:
    """One dummy forward at the training size, so a teacher that cannot take it fails now."""
    images = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    try:
        outputs = model(images)
    except Exception as err:  # any failure of a foreign architecture: say which teacher
        raise ValueError(
            f"teacher {name!r} cannot take {image_size}x{image_size} images: "
            f"{type(err).__name__}: {err}"
        ) from err
    grid = image_size // 4
    expected = (1, num_classes, grid, grid)
    if tuple(outputs["heatmap"].shape) != expected:
        raise ValueError(
            f"teacher {name!r} gives a heatmap of shape {tuple(outputs['heatmap'].shape)} on "
            f"{image_size}x{image_size} images; the student needs {expected}"
        )


def load_teachers(
    specs: list[TeacherSpec],
    student_class_names: list[str],
    image_size: int,
    device: torch.device | str,
) -> list[Teacher]:
    """Load, freeze and check every teacher; raises a clear error before any training.

    Errors: no teacher, a duplicate teacher name, an empty map, a map naming a student class
    the student lacks, a class owned by two teachers, an image size the teachers cannot take
    (ValueError); a missing/corrupt/foreign checkpoint (CheckpointError); a map naming a
    class the teacher's checkpoint lacks (ValueError listing both).
    """
    student_class_names = [str(name) for name in student_class_names]
    device = torch.device(device)
    _check_maps(specs, student_class_names)
    image_size = _check_image_size(image_size)
    teachers = []
    for spec in specs:
        path = str(spec.checkpoint)
        try:
            model, state = model_from_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"teacher {spec.name!r}: {err}") from err
        except Exception as err:  # weights that do not fit the checkpoint's own architecture
            raise CheckpointError(
                f"teacher {spec.name!r}: checkpoint {path} cannot be rebuilt into its model: "
                f"{type(err).__name__}: {err}"
            ) from err
        teacher_names = [str(name) for name in state.get("class_names", [])]
        missing = sorted({c for c in spec.classes.values() if c not in teacher_names})
        if missing:
            raise ValueError(
                f"teacher {spec.name!r} ({path}) has no class(es) {missing}: its checkpoint's "
                f"classes are {teacher_names}, its map is {dict(spec.classes)} "
                "(student class -> teacher class)"
            )
        model = _freeze(model.to(device))
        _check_forward(spec.name, model, image_size, device, len(teacher_names))
        trained_size = state.get("image_size")
        if trained_size and int(trained_size) != image_size:
            log.warning(
                "teacher %r was trained at %s px and now sees %d px images: objects change "
                "scale, its predictions may be worse",
                spec.name,
                trained_size,
                image_size,
            )
        owned = [name for name in student_class_names if name in spec.classes]
        teachers.append(
            Teacher(
                name=spec.name,
                model=model,
                student_channels=torch.tensor(
                    [student_class_names.index(name) for name in owned],
                    dtype=torch.long,
                    device=device,
                ),
                teacher_channels=torch.tensor(
                    [teacher_names.index(spec.classes[name]) for name in owned],
                    dtype=torch.long,
                    device=device,
                ),
                class_names=teacher_names,
                classes={name: spec.classes[name] for name in owned},
                checkpoint=path,
            )
        )
        log.info(
            "teacher %r: %s (backbone %s, classes %s) teaches %s",
            spec.name,
            path,
            state["model_config"].get("backbone"),
            teacher_names,
            {name: spec.classes[name] for name in owned},
        )
    return teachers


def _ignoring_unlabelled(criterion: CenterNetLoss) -> CenterNetLoss:
    """The criterion with focal negatives only for the classes each sample's source labels."""
    if getattr(criterion, "ignore_unlabelled", True):
        return criterion
    criterion = copy.copy(criterion)
    criterion.ignore_unlabelled = True
    log.info(
        "KD + ground truth: focal negatives count only for the classes each sample's source "
        "labels (loss.criterion.ignore_unlabelled is forced on)"
    )
    return criterion


class DistillObjective:
    """objective(model, batch) -> {"cls", "wh", "offset" (with ground truth),
    "kd_heatmap", "kd_wh", "kd_offset" (summed over teachers)}, unweighted."""

    def __init__(
        self,
        teachers: list[Teacher],
        student_class_names: list[str],
        gt_criterion: CenterNetLoss | None = None,
        wh_relative: bool = False,
    ) -> None:
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        self.teachers = list(teachers)
        self.class_names = [str(name) for name in student_class_names]
        self.wh_relative = wh_relative
        owner: dict[int, str] = {}
        for teacher in self.teachers:
            for channel in teacher.student_channels.tolist():
                if not 0 <= channel < len(self.class_names):
                    raise ValueError(
                        f"teacher {teacher.name!r} owns student channel {channel}, but the "
                        f"student has {len(self.class_names)} classes {self.class_names}"
                    )
                if channel in owner:
                    raise ValueError(
                        f"student class {self.class_names[channel]!r} is owned by two teachers, "
                        f"{owner[channel]!r} and {teacher.name!r}"
                    )
                owner[channel] = teacher.name
        #: student classes no teacher owns: they can only learn from ground truth
        self.uncovered = [n for i, n in enumerate(self.class_names) if i not in owner]
        if self.uncovered and gt_criterion is None:
            raise ValueError(
                f"student class(es) {self.uncovered} are owned by no teacher and this is KD-only "
                "training (no ground truth): add them to a teacher's class map, or train with "
                "ground truth (distill.use_ground_truth=true) on data that labels them"
            )
        self.gt_criterion = None if gt_criterion is None else _ignoring_unlabelled(gt_criterion)

    @property
    def term_names(self) -> tuple[str, ...]:
        return (GT_TERMS if self.gt_criterion is not None else ()) + KD_TERMS

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outputs = model(images)
        heatmap = outputs["heatmap"]
        if heatmap.shape[1] != len(self.class_names):
            raise ValueError(
                f"the student predicts {heatmap.shape[1]} classes but was set up with "
                f"{len(self.class_names)} {self.class_names}"
            )
        kd_heatmap, kd_wh, kd_offset = [], [], []
        for teacher in self.teachers:
            taught = teacher.predict(images)
            if taught["heatmap"].shape[-2:] != heatmap.shape[-2:]:
                raise ValueError(
                    f"teacher {teacher.name!r} predicts a {tuple(taught['heatmap'].shape[-2:])} "
                    f"grid, the student {tuple(heatmap.shape[-2:])}: both must have stride 4"
                )
            kd_heatmap.append(
                heatmap_kd(heatmap.index_select(1, teacher.student_channels), taught["heatmap"])
            )
            weight = teacher_peak_weight(taught["heatmap"])
            kd_wh.append(
                masked_dense_l1(outputs["wh"], taught["wh"], weight, relative=self.wh_relative)
            )
            kd_offset.append(masked_dense_l1(outputs["offset"], taught["offset"], weight))
        terms = {} if self.gt_criterion is None else dict(self.gt_criterion(outputs, batch))
        terms["kd_heatmap"] = torch.stack(kd_heatmap).sum()
        terms["kd_wh"] = torch.stack(kd_wh).sum()
        terms["kd_offset"] = torch.stack(kd_offset).sum()
        return terms


def _check_ground_truth_covers(source: DetectionSource, classes: list[str]) -> None:
    """A class no teacher owns must be labelled by at least one training image."""
    labeled = np.zeros(source.num_classes, dtype=bool)
    for index in range(len(source)):
        labeled |= np.asarray(source.labeled_classes(index), dtype=bool)
        if labeled.all():
            return
    never = [name for name in classes if not labeled[list(source.class_names).index(name)]]
    if never:
        raise ValueError(
            f"student class(es) {never} are owned by no teacher and no training image labels "
            "them: they would never be learned. Add them to a teacher's class map or train on "
            "data that labels them"
        )


def _check_weighter(weighter: Any, names: Sequence[str]) -> None:
    """Fail before training when the weighter has no target/weight for a term (by name)."""
    table = getattr(weighter, "targets", None)
    if table is None:
        table = getattr(weighter, "weights", None)
    if not isinstance(table, Mapping):
        return
    missing = [name for name in names if name not in table]
    if missing:
        raise KeyError(
            f"the loss weighter {type(weighter).__name__} has no entry for loss term(s) "
            f"{missing} (configured: {sorted(table)}); use loss=adaptive or add them, e.g. "
            f"+loss.weighter.{'targets' if hasattr(weighter, 'targets') else 'weights'}."
            f"{missing[0]}=1.0"
        )


def distill_model(
    cfg: DictConfig,
    teacher_specs: list[TeacherSpec],
    train_source: DetectionSource,
    val_source: DetectionSource,
    out_dir: Path,
    use_ground_truth: bool = False,
) -> Trainer:
    """Train a student (`build_model(cfg.model, C)`) from frozen teachers, like
    `centerx.engine.tasks.train_model`; returns the Trainer after fit (checkpoints in
    out_dir/checkpoints). Every configuration error is raised before the first step."""
    class_names = list(train_source.class_names)
    device = resolve_device(cfg.train.device)
    distill_cfg = cfg.get("distill") or {}
    teachers = load_teachers(teacher_specs, class_names, int(cfg.data.image_size), device)
    criterion = instantiate(cfg.loss.criterion) if use_ground_truth else None
    objective = DistillObjective(
        teachers, class_names, criterion, wh_relative=bool(distill_cfg.get("wh_relative", False))
    )
    if objective.uncovered:
        _check_ground_truth_covers(train_source, objective.uncovered)
    weighter = instantiate(cfg.loss.weighter)
    _check_weighter(weighter, objective.term_names)
    log.info(
        "distilling %d teacher(s) into %s (%s): classes %s",
        len(teachers),
        cfg.model.backbone,
        "KD + ground truth" if use_ground_truth else "KD only",
        class_names,
    )
    seed_everything(cfg.seed)  # after the teachers: the student's init is train_model's
    model = build_model(cfg.model, len(class_names))
    trainer = Trainer(
        model,
        objective,
        weighter,
        build_train_loader(cfg, train_source),
        cfg.train,
        out_dir,
        checkpoint_meta(cfg, class_names),
        evaluate=make_evaluator(cfg, val_source),
    )
    if cfg.train.resume:
        trainer.resume(cfg.train.resume)
    trainer.fit()
    return trainer


def specs_from_config(teachers_cfg: Mapping[str, Any] | None) -> list[TeacherSpec]:
    """`teachers: {name: {checkpoint: PATH, classes: {student_class: teacher_class}}}` -> specs."""
    if not teachers_cfg:
        raise ValueError(
            "no teachers configured: set teachers.NAME.checkpoint=PATH.pt and "
            "teachers.NAME.classes={student_class: teacher_class}"
        )
    specs = []
    for name, entry in teachers_cfg.items():
        if not isinstance(entry, Mapping | DictConfig):
            raise ValueError(f"teachers.{name} must be a mapping {{checkpoint, classes}}")
        extra = sorted(set(entry.keys()) - {"checkpoint", "classes"})
        if extra:
            raise ValueError(
                f"teachers.{name} has unknown keys {extra}; expected checkpoint, classes"
            )
        if (
            isinstance(entry, DictConfig) and OmegaConf.is_missing(entry, "checkpoint")
        ) or not entry.get("checkpoint"):
            raise ValueError(
                f"teachers.{name}.checkpoint is not set: pass teachers.{name}.checkpoint=PATH.pt"
            )
        classes = entry.get("classes")
        if not classes:
            raise ValueError(
                f"teachers.{name}.classes is empty: map student classes to the teacher's, e.g. "
                f"+teachers.{name}.classes.circle=circle"
            )
        specs.append(
            TeacherSpec(
                str(name),
                str(entry["checkpoint"]),
                {str(student): str(teacher) for student, teacher in classes.items()},
            )
        )
    return specs


def distill_task(cfg: DictConfig) -> dict:
    setup_process(cfg)
    specs = specs_from_config(cfg.get("teachers"))
    out_dir = run_dir()
    save_config(cfg, out_dir)
    train_source, val_source = build_sources(cfg.data)
    use_ground_truth = bool(cfg.distill.use_ground_truth)
    log.info(
        "train: %d images, val: %d images, classes %s, teachers %s",
        len(train_source),
        len(val_source),
        train_source.class_names,
        [spec.name for spec in specs],
    )
    distill_model(cfg, specs, train_source, val_source, out_dir, use_ground_truth)
    metrics = finish_run(cfg, out_dir, val_source)
    dist.shutdown()
    return {key: metrics[key] for key in ("AP", "AP50")} | {"run_dir": str(out_dir)}
