"""Distillation: KD losses on hand-made tensors, class maps, frozen teachers, modes, bad input, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from centerx.data.partial import SourceUnion
from centerx.data.pipeline import TrainingDataset, build_loader, collate
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.build import build_sources, build_train_loader
from centerx.engine.training import train_model
from centerx.errors import ConfigError
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.distill import (
    heatmap_kd_focal,
    masked_dense_l1,
    spread_to_window,
    teacher_peak_weight,
)
from centerx.losses.focal import focal_loss
from centerx.model.centernet import build_model
from centerx.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from centerx.objectives.distill import (
    DistillConfigError,
    DistillObjective,
    Teacher,
    TeacherSpec,
    load_teachers,
    specs_from_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CLASSES = ["circle", "square", "triangle"]
SIZE = 64  # image size of every test run: the tiny backbone is fast there

# A tiny, fast run: 64 px, few images, no workers, no progress bars.
SMALL = [
    f"data.image_size={SIZE}",
    f"data.train.image_size={SIZE}",
    f"data.val.image_size={SIZE}",
    "data.train.num_images=64",
    "data.val.num_images=8",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.progress=false",
    "train.eval_every=100",
    "train.warmup_epochs=0",
    "train.lr=0.005",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def model_cfg(width: int = 16, skip_connections: bool = True) -> DictConfig:
    cfg = OmegaConf.load(CONF / "model" / "centernet.yaml")
    cfg.backbones.tiny.module.width = width
    cfg.skip_connections = skip_connections
    return cfg


def save_teacher(
    path: Path, model: torch.nn.Module, class_names: list[str], cfg: DictConfig
) -> str:
    """A checkpoint with the content `checkpoint_meta` + the trainer give it (what teachers need)."""
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "ema": None,
            "class_names": list(class_names),
            "model_config": OmegaConf.to_container(cfg, resolve=True),
            "image_size": SIZE,
        },
    )
    return str(path)


def distill_model(cfg, specs, train_source, val_source, out, use_ground_truth=False):
    """`run.sh distill` with these teachers, in-process."""
    teachers = {s.name: {"checkpoint": s.checkpoint, "classes": s.classes} for s in specs}
    cfg.objective.teachers = teachers
    cfg.objective.use_ground_truth = use_ground_truth
    return train_model(cfg, train_source, val_source, out)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> str:
    """An untrained tiny teacher over the student's classes (enough for mapping checks)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random_teacher") / "teacher.pt"
    return save_teacher(path, build_model(model_cfg(), 3), CLASSES, model_cfg())


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> str:
    """A tiny teacher trained a few epochs on synthetic shapes (same architecture as the student)."""
    out = tmp_path_factory.mktemp("trained_teacher")
    cfg = compose_cfg("train", [*SMALL, "train.epochs=3", "loss=adaptive"])
    train_source, val_source = build_sources(cfg.data)
    train_model(cfg, train_source, val_source, out)
    return str(out / "checkpoints" / "last.pt")


# ---------------------------------------------------------------------------------------------
# KD losses on hand-made tensors
# ---------------------------------------------------------------------------------------------


def test_teacher_peak_weight_keeps_confident_peaks_max_over_classes() -> None:
    probs = torch.zeros(1, 2, 5, 5)
    probs[0, 0, 1, 1] = 0.8  # peak of class 0
    probs[0, 0, 1, 2] = 0.5  # its shoulder: not a peak
    probs[0, 1, 1, 1] = 0.3  # a weaker peak of class 1 at the same cell: max wins
    probs[0, 1, 3, 3] = 0.6  # peak of class 1
    probs[0, 0, 4, 0] = 0.09  # a faint background peak, below the prior: no weight
    probs[0, 1, 0, 4] = 0.1  # exactly the prior: a detection
    weight = teacher_peak_weight(probs)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 1, 1] = 0.8
    expected[0, 0, 3, 3] = 0.6
    expected[0, 0, 0, 4] = 0.1
    assert weight.shape == (1, 1, 5, 5)
    assert torch.equal(weight, expected)


def test_masked_dense_l1_mask_weighting_and_normalisation() -> None:
    teacher = torch.zeros(1, 2, 3, 3)
    student = torch.zeros(1, 2, 3, 3, requires_grad=True)
    weight = torch.zeros(1, 1, 3, 3)
    with torch.no_grad():
        student[0, :, 0, 0] = 100.0  # weight 0 here: contributes nothing
        student[0, :, 1, 1] = 2.0  # weight 0.5, error 2 in both channels
        student[0, 0, 2, 2], student[0, 1, 2, 2] = 1.0, 3.0  # weight 1, errors 1 and 3
    weight[0, 0, 1, 1], weight[0, 0, 2, 2] = 0.5, 1.0
    # (0.5*2 + 0.5*2 + 1*1 + 1*3) / ((0.5 + 1) * 2 channels) = 6 / 3
    loss = masked_dense_l1(student, teacher, weight)
    assert float(loss.detach()) == pytest.approx(2.0)
    # normalised by the mask sum: scaling every weight changes nothing
    assert float(masked_dense_l1(student.detach(), teacher, weight * 7)) == pytest.approx(2.0)
    loss.backward()
    assert torch.all(student.grad[0, :, 0, 0] == 0)  # no gradient where the weight is 0
    assert torch.all(student.grad[0, :, 1, 1] > 0)
    # no weight at all: zero, not NaN
    assert float(masked_dense_l1(student.detach(), teacher, torch.zeros_like(weight))) == 0.0
    assert float(masked_dense_l1(teacher, teacher, weight)) == 0.0


def test_spread_to_window_teaches_each_peaks_box_around_it() -> None:
    weight = torch.zeros(1, 1, 7, 7)
    weight[0, 0, 2, 3] = 0.6  # a strong peak
    weight[0, 0, 3, 5] = 0.2  # a weaker one whose window overlaps it: the strong one wins there
    weight[0, 0, 6, 0] = 0.3  # at the map's corner: its window is cut off
    torch.manual_seed(0)
    wh, offset = torch.rand(1, 2, 7, 7) * 9, torch.rand(1, 2, 7, 7)
    spread, wh_t, offset_t = spread_to_window(weight, wh, offset, 3)
    ys, xs = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    centre_x, centre_y = xs + offset_t[0, 0], ys + offset_t[0, 1]  # what decode would read
    for (py, px), cells in {
        (2, 3): [(y, x) for y in (1, 2, 3) for x in (2, 3, 4)],
        (3, 5): [(2, 5), (2, 6), (3, 5), (3, 6), (4, 4), (4, 5), (4, 6)],  # (2|3, 4): (2, 3)'s
        (6, 0): [(5, 0), (5, 1), (6, 0), (6, 1)],
    }.items():
        for y, x in cells:
            assert float(spread[0, 0, y, x]) == float(weight[0, 0, py, px]), (y, x)
            assert torch.equal(wh_t[0, :, y, x], wh[0, :, py, px]), (y, x)
            assert float(centre_x[y, x]) == pytest.approx(px + float(offset[0, 0, py, px]))
            assert float(centre_y[y, x]) == pytest.approx(py + float(offset[0, 1, py, px]))
    assert int((spread > 0).sum()) == 9 + 7 + 4  # nothing outside the windows
    assert spread_to_window(weight, wh, offset, 1) == (weight, wh, offset)
    with pytest.raises(ValueError, match="odd"):
        spread_to_window(weight, wh, offset, 2)


def test_masked_dense_l1_relative_divides_by_teacher_size() -> None:
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, :, 0, 0] = 8.0
    teacher[0, :, 1, 1] = 0.5  # below one cell: divided by 1
    student = teacher.clone()
    student[0, :, 0, 0] += 4.0  # relative error 0.5
    student[0, :, 1, 1] += 2.0  # relative error 2 / 1
    weight = torch.zeros(1, 1, 2, 2)
    weight[0, 0, 0, 0] = weight[0, 0, 1, 1] = 1.0
    assert float(masked_dense_l1(student, teacher, weight)) == pytest.approx(3.0)
    assert float(masked_dense_l1(student, teacher, weight, relative=True)) == pytest.approx(1.25)


# ---------------------------------------------------------------------------------------------
# Class maps and teacher loading
# ---------------------------------------------------------------------------------------------


def test_class_map_gathers_the_right_channels(tmp_path: Path) -> None:
    # A teacher of another architecture (narrower, no skips) whose classes are ordered and
    # named differently from the student's.
    cfg = model_cfg(width=8, skip_connections=False)
    torch.manual_seed(1)
    net = build_model(cfg, 3)
    path = save_teacher(tmp_path / "xyz.pt", net, ["square", "star", "circle"], cfg)
    other = save_teacher(tmp_path / "other.pt", net, ["square", "star", "circle"], cfg)
    teachers = load_teachers(
        [
            TeacherSpec("a", path, {"triangle": "star", "circle": "circle"}),
            TeacherSpec("b", other, {"square": "square"}),
        ],
        CLASSES,
        SIZE,
        "cpu",
    )
    a, b = teachers
    assert isinstance(a, Teacher) and a.name == "a"
    assert a.student_channels.dtype == torch.long
    assert a.student_channels.tolist() == [0, 2]  # circle, triangle (student order)
    assert a.teacher_channels.tolist() == [2, 1]  # circle, star (teacher's order)
    assert (b.student_channels.tolist(), b.teacher_channels.tolist()) == ([1], [0])
    assert a.model.backbone.out_channels == 64  # width 8, from the checkpoint, not the student
    x = images()
    with torch.no_grad():
        raw = a.model(x)["heatmap"].sigmoid()
    assert torch.equal(a.predict(x)["heatmap"], raw[:, [2, 1]])


def permuted_copy(student: torch.nn.Module, perm: list[int]) -> torch.nn.Module:
    """The student with its heatmap output channels reordered: teacher channel j = student perm[j]."""
    teacher = build_model(model_cfg(), 3)
    teacher.load_state_dict(student.state_dict())
    last = teacher.heads.heatmap[-1]
    with torch.no_grad():
        last.weight.copy_(student.heads.heatmap[-1].weight[perm])
        last.bias.copy_(student.heads.heatmap[-1].bias[perm])
    return teacher


@pytest.mark.parametrize("case", ["identity", "renamed_permuted", "two_teachers"])
def test_kd_is_zero_when_student_equals_teacher(tmp_path: Path, case: str) -> None:
    torch.manual_seed(2)
    student = build_model(model_cfg(), 3).eval()  # eval: same BN behaviour as the teacher
    if case == "identity":
        path = save_teacher(tmp_path / "t.pt", student, CLASSES, model_cfg())
        specs = [TeacherSpec("t", path, {c: c for c in CLASSES})]
    else:
        perm = [2, 0, 1]  # teacher channels: triangle, circle, square, under other names
        names = ["tri", "circ", "sq"]
        path = save_teacher(tmp_path / "t.pt", permuted_copy(student, perm), names, model_cfg())
        rename = {"circle": "circ", "square": "sq", "triangle": "tri"}
        if case == "renamed_permuted":
            specs = [TeacherSpec("t", path, rename)]
        else:
            specs = [
                TeacherSpec("t1", path, {"square": "sq"}),
                TeacherSpec("t2", path, {"triangle": "tri", "circle": "circ"}),
            ]
    # box_window=1: at the teacher's peaks only (a wider window also teaches the peak's box at
    # the cells around it, which the teacher itself does not predict there)
    objective = DistillObjective(
        load_teachers(specs, CLASSES, SIZE, "cpu"), CLASSES, heatmap_kd_focal, box_window=1
    )
    terms = objective(student, {"image": images()})
    assert set(terms) == {"kd_heatmap", "kd_wh", "kd_offset"}
    for name, value in terms.items():
        assert float(value.detach()) == pytest.approx(0.0, abs=1e-9), name
    # and not trivially: another student is far from the teacher
    torch.manual_seed(3)
    stranger = build_model(model_cfg(), 3).eval()
    with torch.no_grad():
        stranger.heads.wh[-1].bias.fill_(5.0)
    assert float(objective(stranger, {"image": images()})["kd_wh"].detach()) > 1.0


def test_unknown_class_in_map_fails_naming_it(random_teacher: str) -> None:
    with pytest.raises(ValueError, match="hexagon") as err:
        load_teachers(
            [TeacherSpec("t", random_teacher, {"hexagon": "circle"})], CLASSES, SIZE, "cpu"
        )
    assert "student classes" in str(err.value)
    with pytest.raises(ValueError, match="'round'") as err:
        load_teachers([TeacherSpec("t", random_teacher, {"circle": "round"})], CLASSES, SIZE, "cpu")
    assert "circle" in str(err.value) and "square" in str(err.value)  # the teacher's classes
    with pytest.raises(ValueError, match="owned by two teachers"):
        load_teachers(
            [
                TeacherSpec("a", random_teacher, {"circle": "circle"}),
                TeacherSpec("b", random_teacher, {"circle": "circle"}),
            ],
            CLASSES,
            SIZE,
            "cpu",
        )
    with pytest.raises(ValueError, match="owns no classes"):
        load_teachers([TeacherSpec("t", random_teacher, {})], CLASSES, SIZE, "cpu")


def test_uncovered_class_is_an_error_in_kd_only_mode(random_teacher: str) -> None:
    teachers = load_teachers(
        [TeacherSpec("t", random_teacher, {"circle": "circle"})], CLASSES, SIZE, "cpu"
    )
    with pytest.raises(ValueError, match=r"\['square', 'triangle'\].*KD-only"):
        DistillObjective(teachers, CLASSES, heatmap_kd_focal)
    with_gt = DistillObjective(teachers, CLASSES, heatmap_kd_focal, gt_criterion=CenterNetLoss())
    assert with_gt.uncovered == ["square", "triangle"]


@pytest.mark.parametrize("bad", ["missing", "corrupt", "not_centerx", "image_size"])
def test_bad_teacher_input_fails_before_training(
    tmp_path: Path, random_teacher: str, bad: str
) -> None:
    path, size = random_teacher, SIZE
    if bad == "missing":
        path, expected, kind = str(tmp_path / "nope.pt"), "not found", CheckpointError
    elif bad == "corrupt":
        path = tmp_path / "corrupt.pt"
        path.write_bytes(os.urandom(4096))
        expected, kind = "cannot read", CheckpointError
    elif bad == "not_centerx":
        path = tmp_path / "foreign.pt"
        torch.save({"weights": torch.zeros(3)}, path)
        expected, kind = "not a centerx checkpoint", CheckpointError
    else:
        size, expected, kind = 100, "multiple of 32", ValueError
    with pytest.raises(kind, match=expected) as err:
        load_teachers([TeacherSpec("t", str(path), {"circle": "circle"})], ["circle"], size, "cpu")
    if kind is CheckpointError:
        assert "teacher 't'" in str(err.value)
    # through distill_model: raised before anything is trained or written
    cfg = compose_cfg("distill", [*SMALL, f"data.image_size={size}", "data.class_names=[circle]"])
    out = tmp_path / "run"
    train_source, val_source = build_sources(cfg.data)
    specs = [TeacherSpec("t", str(path), {"circle": "circle"})]
    with pytest.raises(kind, match=expected):
        distill_model(cfg, specs, train_source, val_source, out)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_teacher_that_cannot_take_the_size_fails_clearly(random_teacher: str, monkeypatch) -> None:
    import centerx.objectives.distill as distill

    real = distill.model_from_checkpoint

    def fails(images: torch.Tensor) -> None:
        raise RuntimeError("size mismatch in neck")

    def broken(path):
        model, state = real(path)
        model.forward = fails
        return model, state

    monkeypatch.setattr(distill, "model_from_checkpoint", broken)
    with pytest.raises(ValueError, match=r"teacher 't' cannot take 64x64 images.*size mismatch"):
        load_teachers(
            [TeacherSpec("t", random_teacher, {"circle": "circle"})], CLASSES, SIZE, "cpu"
        )


def test_weighter_without_kd_targets_fails_before_training(
    random_teacher: str, tmp_path: Path
) -> None:
    cfg = compose_cfg("distill", [*SMALL, "loss=fixed"])
    train_source, val_source = build_sources(cfg.data)
    specs = [TeacherSpec("t", random_teacher, {c: c for c in CLASSES})]
    with pytest.raises(ConfigError, match="kd_heatmap"):
        distill_model(cfg, specs, train_source, val_source, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_specs_from_config() -> None:
    cfg = compose_cfg(
        "distill",
        [
            "objective.teachers={teacher_a: {checkpoint: a.pt, classes: {circle: round}}, "
            "teacher_b: {checkpoint: b.pt, classes: {square: square}}}",
        ],
    )
    assert specs_from_config(cfg.objective.teachers) == [
        TeacherSpec("teacher_a", "a.pt", {"circle": "round"}),
        TeacherSpec("teacher_b", "b.pt", {"square": "square"}),
    ]
    with pytest.raises(ValueError, match=r"objective.teachers.t.checkpoint is not set"):
        specs_from_config({"t": {"checkpoint": None, "classes": {"a": "a"}}})
    with pytest.raises(ValueError, match="no teachers configured"):
        specs_from_config(compose_cfg("distill", []).objective.teachers)
    with pytest.raises(ValueError, match="unknown keys"):
        specs_from_config({"t": {"checkpoint": "x", "classes": {"a": "a"}, "clases": {}}})
    with pytest.raises(ValueError, match="no teachers"):
        specs_from_config({})


# ---------------------------------------------------------------------------------------------
# The objective: modes
# ---------------------------------------------------------------------------------------------


def test_kd_only_never_reads_labels(random_teacher: str) -> None:
    teachers = load_teachers(
        [TeacherSpec("t", random_teacher, {c: c for c in CLASSES})], CLASSES, SIZE, "cpu"
    )
    student = build_model(model_cfg(), 3).train()
    terms = DistillObjective(teachers, CLASSES, heatmap_kd_focal)(
        student, {"image": images()}
    )  # no labels at all
    assert set(terms) == {"kd_heatmap", "kd_wh", "kd_offset"}
    assert all(v.requires_grad and torch.isfinite(v) for v in terms.values())


def test_kd_plus_gt_counts_negatives_only_for_labelled_classes(random_teacher: str) -> None:
    source = SyntheticShapes(8, seed=3, image_size=SIZE, labeled_class_names=["circle"])
    batch = next(iter(build_loader(TrainingDataset(source, SIZE), 4, shuffle=False)))
    teachers = load_teachers(
        [TeacherSpec("t", random_teacher, {"square": "square"})], CLASSES, SIZE, "cpu"
    )
    criterion = CenterNetLoss(ignore_unlabelled=False)
    objective = DistillObjective(teachers, CLASSES, heatmap_kd_focal, gt_criterion=criterion)
    assert criterion.ignore_unlabelled is False  # the caller's criterion is not modified
    torch.manual_seed(4)
    student = build_model(model_cfg(), 3).eval()
    with torch.no_grad():
        terms = objective(student, batch)
        logits = student(batch["image"])["heatmap"]
    assert set(terms) == {"cls", "wh", "offset", "kd_heatmap", "kd_wh", "kd_offset"}
    labelled_only = focal_loss(logits, batch["heatmap"], negative_weight=batch["labeled"].float())
    everywhere = focal_loss(logits, batch["heatmap"])
    assert float(terms["cls"]) == pytest.approx(float(labelled_only), rel=1e-5)
    assert float(everywhere) > float(labelled_only) + 0.05  # the dropped negatives mattered


# ---------------------------------------------------------------------------------------------
# Training: frozen teachers, self-distillation that teaches, KD + GT on a union of datasets
# ---------------------------------------------------------------------------------------------


def test_self_distillation_teaches_and_teachers_stay_frozen(
    trained_teacher: str, tmp_path: Path
) -> None:
    cfg = compose_cfg("distill", [*SMALL, "train.epochs=3", "seed=1", "train.log_every=1"])
    train_source, val_source = build_sources(cfg.data)
    specs = [TeacherSpec("self", trained_teacher, {c: c for c in CLASSES})]
    checkpoint = load_checkpoint(trained_teacher)
    teacher_weights = checkpoint["ema"] or checkpoint["model"]

    # A fixed batch and the fresh student distill_model will build (same seed, same init).
    batch = next(iter(build_train_loader(cfg.data, train_source, cfg.train.batch_size, cfg.seed)))
    teachers = load_teachers(specs, CLASSES, SIZE, "cpu")
    # The probe scores the box KD at the teacher's peaks (box_window=1): where decoding reads
    # boxes; the run itself trains with the config's window.
    probe = DistillObjective(teachers, CLASSES, heatmap_kd_focal, box_window=1)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, 3)
    initial = state_copy(fresh)
    with torch.no_grad():
        before = {k: float(v) for k, v in probe(fresh.train(), batch).items()}

    trainer = distill_model(cfg, specs, train_source, val_source, tmp_path)
    (teacher,) = trainer.objective.teachers

    # Teachers frozen: weights and BN statistics exactly the checkpoint's, no grads, eval mode.
    assert same_state(state_copy(teacher.model), teacher_weights)
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    # Not part of the student: not optimised, not in its checkpoints.
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.model.parameters()}
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["model"].keys() == initial.keys()
    assert saved["class_names"] == CLASSES
    # Even if someone flips the teacher to train mode, it predicts in eval mode.
    teacher.model.train()
    with torch.no_grad():
        after = {k: float(v) for k, v in probe(trainer.model.train(), batch).items()}
        trainer.objective(trainer.model, batch)
    assert not teacher.model.training
    assert same_state(state_copy(teacher.model), teacher_weights)

    # The student changed, and it learned the teacher: every KD term fell substantially.
    assert not same_state(state_copy(trainer.model), initial)
    for name in ("kd_heatmap", "kd_wh", "kd_offset"):
        assert after[name] < 0.6 * before[name], (name, before, after)

    # The adaptive weighter logged raw and weighted values of every term, at their targets.
    steps = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"kind": "step"' in line
    ]
    assert steps
    for name, target in cfg.loss.weighter.targets.items():
        if name.startswith("kd_"):
            assert all(s[f"weighted/{name}"] == pytest.approx(target) for s in steps)
            assert all(f"raw/{name}" in s for s in steps)


def test_kd_plus_gt_on_a_union_of_datasets(trained_teacher: str, tmp_path: Path) -> None:
    """Teacher owns square; circle and triangle come from two datasets with different labels."""
    cfg = compose_cfg("distill", [*SMALL, "train.epochs=1", "train.log_every=1"])
    views = [
        SyntheticShapes(16, seed=10, image_size=SIZE, labeled_class_names=["circle"]),
        SyntheticShapes(16, seed=11, image_size=SIZE, labeled_class_names=["circle", "triangle"]),
    ]
    val = SyntheticShapes(4, seed=12, image_size=SIZE)
    specs = [TeacherSpec("sq", trained_teacher, {"square": "square"})]
    trainer = distill_model(cfg, specs, SourceUnion(views), val, tmp_path, use_ground_truth=True)
    assert trainer.objective.uncovered == ["circle", "triangle"]
    assert trainer.objective.gt_criterion.ignore_unlabelled
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("cls", "wh", "offset", "kd_heatmap", "kd_wh", "kd_offset"):
        assert f"raw/{name}" in first
    assert all(f"weighted/{name}" in first for name in ("cls", "kd_heatmap", "kd_wh", "kd_offset"))

    # A class no teacher owns and no dataset labels: refused before training.
    unlabelled = SourceUnion([views[0]])
    with pytest.raises(ValueError, match=r"\['triangle'\].*labelled by no training image"):
        distill_model(cfg, specs, unlabelled, val, tmp_path / "refused", use_ground_truth=True)
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_collate_batches_work_with_the_objective(random_teacher: str) -> None:
    """The objective takes exactly what the training loader yields (uint8 images, labels)."""
    source = SyntheticShapes(2, seed=5, image_size=SIZE)
    dataset = TrainingDataset(source, SIZE)
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].dtype == torch.uint8
    teachers = load_teachers(
        [TeacherSpec("t", random_teacher, {c: c for c in CLASSES})], CLASSES, SIZE, "cpu"
    )
    terms = DistillObjective(teachers, CLASSES, heatmap_kd_focal, CenterNetLoss())(
        build_model(model_cfg(), 3), batch
    )
    assert len(terms) == 6


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_distill_end_to_end(trained_teacher: str, tmp_path: Path) -> None:
    run = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "centerx",
        "distill",
        f"objective.teachers={{teacher_a: {{checkpoint: '{trained_teacher}', classes: {{circle: circle}}}}}}",
        "data.class_names=[circle]",
        *[o.replace("num_images=64", "num_images=16") for o in SMALL],
        "train.epochs=1",
        "samples.count=2",
        "train.num_threads=1",
        f"hydra.run.dir={run}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "eval.json").is_file() and (run / "samples.png").is_file()
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["class_names"] == ["circle"]
    assert best["config"]["objective"]["teachers"]["teacher_a"]["checkpoint"] == trained_teacher


class _FixedOutputs(torch.nn.Module):
    """A 'model' that returns the same outputs for any images."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.expand(len(images), -1, -1, -1) for k, v in self.outputs.items()}


@pytest.mark.parametrize("window", [1, 3])
def test_box_weight_confidence_or_one_per_detection(window: int) -> None:
    # A teacher with a sure detection (0.9, box 10x10) and a faint one (0.2, box 4x4), far
    # apart; a student that predicts size 0 everywhere.
    logits = torch.full((1, 1, 16, 16), -9.0)
    logits[0, 0, 3, 3] = torch.logit(torch.tensor(0.9))
    logits[0, 0, 11, 11] = torch.logit(torch.tensor(0.2))
    wh = torch.zeros(1, 2, 16, 16)
    wh[:, :, 2:5, 2:5] = 10.0
    wh[:, :, 10:13, 10:13] = 4.0
    zeros = torch.zeros(1, 2, 16, 16)
    teacher = Teacher(
        "t",
        _FixedOutputs({"heatmap": logits, "wh": wh, "offset": zeros}),
        torch.tensor([0]),
        torch.tensor([0]),
    )
    student = _FixedOutputs({"heatmap": torch.zeros(1, 1, 16, 16), "wh": zeros, "offset": zeros})
    images = {"image": torch.zeros(2, 3, 64, 64)}

    def kd_wh(box_weight: str) -> float:
        objective = DistillObjective(
            [teacher], ["circle"], heatmap_kd_focal, box_window=window, box_weight=box_weight
        )
        return float(objective(student, images)["kd_wh"])

    # the mean box error weighted by the teacher's confidence, or one vote per detection
    assert kd_wh("confidence") == pytest.approx((10 * 0.9 + 4 * 0.2) / 1.1, rel=1e-4)
    assert kd_wh("detection") == pytest.approx((10 + 4) / 2, rel=1e-4)
    with pytest.raises(DistillConfigError, match="box_weight='height'"):
        DistillObjective([teacher], ["circle"], heatmap_kd_focal, box_weight="height")
