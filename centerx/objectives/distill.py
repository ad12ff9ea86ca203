"""Multi-teacher distillation: frozen teachers, class maps by name, the distillation objective.

Each teacher is rebuilt from its own checkpoint (architecture and class names come from it, so
teachers may differ in backbone from the student and from each other) and owns some of the
student's classes through a map by name (student class -> teacher class; renaming allowed).
This generalises centerX's contiguous index ranges: a teacher may own any subset of the
student's classes in any order.

Modes (one `DistillObjective`):
    * KD only (no ground-truth criterion): the student never reads the batch's labels, so the
      training images may be unlabelled. Every student class must be owned by a teacher.
    * KD + ground truth: the supervised CenterNet terms on each sample's own labels are added.
      A class no teacher owns is then allowed if some training images label it. Focal
      negatives count only for the classes a sample's source labels: for the others "no box
      here" is false (their objects are merely unannotated) and it would contradict the
      teacher that sees them (`CenterNetLoss.ignore_unlabelled` is forced on, on a copy).

Classes a sample's source declares `absent` (conf/data/union.yaml) are known not to be in its
images: a teacher's detections of them there are false, so the KD targets become 0.

Several teachers: `teacher_balance=sum` adds the teachers' KD terms (a teacher with more or
more confident peaks teaches more); `separate` gives each teacher's term the same magnitude
before adding them (centerX's per-teacher normalisation).

Teachers are frozen: requires_grad False, evaluated in eval mode (re-asserted before every
forward, so BatchNorm statistics never move) under `torch.no_grad`, on exactly the batch the
student gets. The objective holds them, not the student module, so the optimiser, the EMA and
the checkpoints never see them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from centerx.errors import UsageError
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.distill import (
    check_box_window,
    masked_dense_l1,
    spread_to_window,
    teacher_peak_weight,
)
from centerx.model.centernet import OUTPUT_STRIDE
from centerx.model.checkpoint import CheckpointError, model_from_checkpoint
from centerx.objectives import ObjectiveContext, require_labels

log = logging.getLogger(__name__)

BACKBONE_STRIDE = 32
KD_TERMS = ("kd_heatmap", "kd_wh", "kd_offset")
GT_TERMS = ("cls", "wh", "offset")
BALANCES = ("sum", "separate")
#: how much a teacher detection's box teaches: its height, or 1 for every detection (>= prior)
BOX_WEIGHTS = ("confidence", "detection")
HeatmapLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DistillConfigError(UsageError):
    """The teachers or their class maps cannot teach this student."""


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


# ---------------------------------------------------------------------------------------------
# Teachers from config
# ---------------------------------------------------------------------------------------------


def specs_from_config(teachers: Mapping[str, Any] | None) -> list[TeacherSpec]:
    """`{name: {checkpoint: PATH, classes: {student_class: teacher_class}}}` -> specs."""
    if not teachers:
        raise DistillConfigError(
            "no teachers configured: set 'objective.teachers={NAME: {checkpoint: PATH.pt, "
            "classes: {student_class: teacher_class}}}'"
        )
    specs = []
    for name, entry in teachers.items():
        where = f"objective.teachers.{name}"
        if not isinstance(entry, Mapping):
            raise DistillConfigError(f"{where} must be a mapping {{checkpoint, classes}}")
        extra = sorted(set(entry.keys()) - {"checkpoint", "classes"})
        if extra:
            raise DistillConfigError(
                f"{where} has unknown keys {extra}; expected checkpoint, classes"
            )
        if not entry.get("checkpoint") or entry.get("checkpoint") == "???":
            raise DistillConfigError(
                f"{where}.checkpoint is not set: pass {where}.checkpoint=PATH.pt"
            )
        classes = entry.get("classes")
        if not classes:
            raise DistillConfigError(
                f"{where}.classes is empty: map student classes to the teacher's, e.g. "
                f"+{where}.classes.circle=circle"
            )
        classes = {str(student): str(teacher) for student, teacher in classes.items()}
        specs.append(TeacherSpec(str(name), str(entry["checkpoint"]), classes))
    return specs


def check_class_maps(specs: Sequence[TeacherSpec], class_names: Sequence[str]) -> dict[str, str]:
    """Every rule about class maps that needs no checkpoint; returns {student class: owner}."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise DistillConfigError(f"teacher names must be unique, got {names}")
    owner: dict[str, str] = {}
    for spec in specs:
        if not spec.classes:
            raise DistillConfigError(
                f"teacher {spec.name!r} owns no classes: give it a map {{student_class: teacher_class}}"
            )
        unknown = [name for name in spec.classes if name not in class_names]
        if unknown:
            raise DistillConfigError(
                f"teacher {spec.name!r}: its class map names student class(es) {unknown} that "
                f"the student does not have; student classes: {list(class_names)}"
            )
        for name in spec.classes:
            if name in owner:
                raise DistillConfigError(
                    f"student class {name!r} is owned by two teachers, {owner[name]!r} and "
                    f"{spec.name!r}; each class must come from exactly one teacher"
                )
            owner[name] = spec.name
    return owner


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _rebuild(spec: TeacherSpec) -> tuple[nn.Module, dict]:
    try:
        return model_from_checkpoint(spec.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"teacher {spec.name!r}: {err}") from err
    except Exception as err:  # weights that do not fit the checkpoint's own architecture
        raise CheckpointError(
            f"teacher {spec.name!r}: checkpoint {spec.checkpoint} cannot be rebuilt into its "
            f"model: {type(err).__name__}: {err}"
        ) from err


@torch.no_grad()
def _check_forward(name: str, model: nn.Module, image_size: int, num_classes: int) -> None:
    """One dummy forward at the training size, so a teacher that cannot take it fails now."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    try:
        outputs = model(images)
    except Exception as err:  # any failure of a foreign architecture: say which teacher
        raise DistillConfigError(
            f"teacher {name!r} cannot take {image_size}x{image_size} images: "
            f"{type(err).__name__}: {err}"
        ) from err
    grid = image_size // OUTPUT_STRIDE
    expected = (1, num_classes, grid, grid)
    if tuple(outputs["heatmap"].shape) != expected:
        raise DistillConfigError(
            f"teacher {name!r} gives a heatmap of shape {tuple(outputs['heatmap'].shape)} on "
            f"{image_size}x{image_size} images; the student needs {expected}"
        )


def load_teacher(
    spec: TeacherSpec, class_names: Sequence[str], image_size: int, device: torch.device
) -> Teacher:
    """Rebuild, freeze and check one teacher (its map was checked by `check_class_maps`)."""
    model, state = _rebuild(spec)
    teacher_names = [str(name) for name in state.get("class_names", [])]
    missing = sorted({c for c in spec.classes.values() if c not in teacher_names})
    if missing:
        raise DistillConfigError(
            f"teacher {spec.name!r} ({spec.checkpoint}) has no class(es) {missing}: its "
            f"checkpoint's classes are {teacher_names}, its map is {spec.classes} "
            "(student class -> teacher class)"
        )
    model = _freeze(model.to(device))
    _check_forward(spec.name, model, image_size, len(teacher_names))
    trained_size = state.get("image_size")
    if trained_size and int(trained_size) != image_size:
        log.warning(
            "teacher %r was trained at %s px and now sees %d px images: objects change scale, "
            "its predictions may be worse",
            spec.name,
            trained_size,
            image_size,
        )
    owned = [name for name in class_names if name in spec.classes]
    log.info(
        "teacher %r: %s (backbone %s, classes %s) teaches %s",
        spec.name,
        spec.checkpoint,
        state["model_config"].get("backbone"),
        teacher_names,
        {name: spec.classes[name] for name in owned},
    )
    index = lambda names, wanted: torch.tensor(  # noqa: E731
        [names.index(w) for w in wanted], dtype=torch.long, device=device
    )
    return Teacher(
        name=spec.name,
        model=model,
        student_channels=index(list(class_names), owned),
        teacher_channels=index(teacher_names, [spec.classes[name] for name in owned]),
        class_names=teacher_names,
        checkpoint=spec.checkpoint,
    )


def load_teachers(
    specs: Sequence[TeacherSpec], class_names: Sequence[str], image_size: int, device: Any
) -> list[Teacher]:
    """Check the maps, then load every teacher; raises a clear error before any training."""
    if not specs:
        raise DistillConfigError("distillation needs at least one teacher")
    check_class_maps(specs, class_names)
    if int(image_size) <= 0 or int(image_size) % BACKBONE_STRIDE:
        raise DistillConfigError(
            f"image size {image_size} cannot be fed to the teachers: it must be a positive "
            f"multiple of {BACKBONE_STRIDE} (the backbone stride)"
        )
    return [load_teacher(s, class_names, int(image_size), torch.device(device)) for s in specs]


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def _ignoring_unlabelled(criterion: CenterNetLoss) -> CenterNetLoss:
    """The criterion with focal negatives only for the classes each sample's source labels."""
    if criterion.ignore_unlabelled:
        return criterion
    criterion = copy.copy(criterion)
    criterion.ignore_unlabelled = True
    log.info(
        "KD + ground truth: focal negatives count only for the classes each sample's source "
        "labels (loss.criterion.ignore_unlabelled is forced on)"
    )
    return criterion


def _combine(values: list[torch.Tensor], balance: str) -> torch.Tensor:
    """Teachers' terms of one kind -> one term: their sum, or (`separate`) the sum of each
    divided by its own detached magnitude, so every teacher counts the same."""
    if balance == "separate":
        values = [v / v.detach().abs().clamp(min=1e-12) for v in values]
    return torch.stack(values).sum()


class DistillObjective:
    """objective(model, batch) -> {"cls", "wh", "offset" (with ground truth), "kd_heatmap",
    "kd_wh", "kd_offset" (over teachers, see `teacher_balance`)}, unweighted."""

    def __init__(
        self,
        teachers: Sequence[Teacher],
        class_names: Sequence[str],
        heatmap_loss: HeatmapLoss,
        gt_criterion: CenterNetLoss | None = None,
        wh_relative: bool = False,
        teacher_balance: str = "sum",
        box_window: int = 3,
        box_weight: str = "confidence",
    ) -> None:
        if not teachers:
            raise DistillConfigError("distillation needs at least one teacher")
        if teacher_balance not in BALANCES:
            raise DistillConfigError(
                f"unknown objective.teacher_balance={teacher_balance!r}; use {' or '.join(BALANCES)}"
            )
        self.teachers = list(teachers)
        self.class_names = [str(name) for name in class_names]
        self.heatmap_loss = heatmap_loss
        self.wh_relative = wh_relative
        self.teacher_balance = teacher_balance
        try:
            check_box_window(box_window)
        except ValueError as err:
            raise DistillConfigError(f"objective.box_window: {err}") from err
        self.box_window = box_window
        if box_weight not in BOX_WEIGHTS:
            raise DistillConfigError(
                f"unknown objective.box_weight={box_weight!r}; use {' or '.join(BOX_WEIGHTS)}"
            )
        self.box_weight = box_weight
        owned = {c for t in self.teachers for c in t.student_channels.tolist()}
        #: student classes no teacher owns: they can only learn from ground truth
        self.uncovered = [n for i, n in enumerate(self.class_names) if i not in owned]
        if self.uncovered and gt_criterion is None:
            raise DistillConfigError(
                f"student class(es) {self.uncovered} are owned by no teacher and this is KD-only "
                "training (no ground truth): add them to a teacher's class map, or train with "
                "ground truth (objective.use_ground_truth=true) on data that labels them"
            )
        self.gt_criterion = None if gt_criterion is None else _ignoring_unlabelled(gt_criterion)
        self.term_names = (GT_TERMS if gt_criterion is not None else ()) + KD_TERMS

    def _teach(
        self, teacher: Teacher, outputs: dict[str, torch.Tensor], batch: dict, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One teacher's (heatmap, wh, offset) KD terms on its own channels."""
        taught = teacher.predict(images)
        heatmap = outputs["heatmap"]
        if taught["heatmap"].shape[-2:] != heatmap.shape[-2:]:
            raise DistillConfigError(
                f"teacher {teacher.name!r} predicts a {tuple(taught['heatmap'].shape[-2:])} grid, "
                f"the student {tuple(heatmap.shape[-2:])}: both must have stride {OUTPUT_STRIDE}"
            )
        target = taught["heatmap"]
        if "absent" in batch:  # classes known not to be in the image: the teacher's peaks are false
            present = ~batch["absent"].index_select(1, teacher.student_channels).bool()
            target = target * present[:, :, None, None]
        student = heatmap.index_select(1, teacher.student_channels)
        weight, wh, offset = spread_to_window(
            teacher_peak_weight(target), taught["wh"], taught["offset"], self.box_window
        )
        if self.box_weight == "detection":  # every detection's box counts once, like a label's
            weight = (weight > 0).to(weight.dtype)
        return (
            self.heatmap_loss(student, target),
            masked_dense_l1(outputs["wh"], wh, weight, relative=self.wh_relative),
            masked_dense_l1(outputs["offset"], offset, weight),
        )

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outputs = model(images)
        if outputs["heatmap"].shape[1] != len(self.class_names):
            raise DistillConfigError(
                f"the student predicts {outputs['heatmap'].shape[1]} classes but was set up with "
                f"{len(self.class_names)} {self.class_names}"
            )
        per_teacher = [self._teach(t, outputs, batch, images) for t in self.teachers]
        terms = {} if self.gt_criterion is None else dict(self.gt_criterion(outputs, batch))
        for kind, values in zip(KD_TERMS, zip(*per_teacher, strict=True), strict=True):
            terms[kind] = _combine(list(values), self.teacher_balance)
        return terms


def build_distill_objective(
    teachers: Mapping[str, Any],
    heatmap_loss: HeatmapLoss,
    criterion: CenterNetLoss,
    use_ground_truth: bool = False,
    wh_relative: bool = False,
    teacher_balance: str = "sum",
    box_window: int = 3,
    box_weight: str = "confidence",
    *,
    context: ObjectiveContext,
) -> DistillObjective:
    """The `_target_` of conf/objective/distill.yaml: load the teachers and build the objective."""
    specs = specs_from_config(teachers)
    loaded = load_teachers(specs, context.class_names, context.image_size, context.device)
    objective = DistillObjective(
        loaded,
        context.class_names,
        heatmap_loss,
        gt_criterion=criterion if use_ground_truth else None,
        wh_relative=wh_relative,
        teacher_balance=teacher_balance,
        box_window=box_window,
        box_weight=box_weight,
    )
    if objective.uncovered:
        require_labels(
            context.train_source, objective.uncovered, "no teacher and no label would teach them"
        )
    log.info(
        "distilling %d teacher(s) (%s) into classes %s",
        len(loaded),
        "KD + ground truth" if use_ground_truth else "KD only",
        context.class_names,
    )
    return objective
