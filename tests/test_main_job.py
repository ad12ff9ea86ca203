"""The main job (centerx/recipes/main_job.py): planning, criteria, and a shrunk end-to-end run."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from centerx.data.base import DatasetError
from centerx.data.partial import Relabeled, SourceUnion
from centerx.data.synthetic import SyntheticShapes
from centerx.recipes.main_job import parts_for_classes, teacher_groups
from centerx.recipes.overrides import override_value
from centerx.recipes.report import summarise

REPO = Path(__file__).resolve().parents[1]
CRITERIA = {"metric": "AP", "student_ratio": 0.95, "naive_margin": 0.9}
BASELINES = ("naive_merge", "ignore_unlabelled", "pseudo_label")


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 0.002, "torch.optim.AdamW", "x y", "1", "null", ["a", "b"], {"k": {"c": "c"}}],
)
def test_override_values_read_back(value) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+probe={override_value(value)}"])
    assert OmegaConf.to_container(cfg, resolve=True)["probe"] == value


def union_of(labels: dict[str, list[str]]) -> SourceUnion:
    names = ["circle", "square", "triangle"]
    parts = [
        Relabeled(SyntheticShapes(2, seed=i, image_size=32), names, classes)
        for i, classes in enumerate(labels.values())
    ]
    return SourceUnion(parts, list(labels))


def test_one_teacher_per_part_or_per_class_group() -> None:
    union = union_of({"a": ["circle"], "b": ["square", "triangle"], "extra": []})
    cfg = OmegaConf.create({"main_job": {"teachers": None}})
    assert teacher_groups(cfg, union) == {
        "teacher_a": {"classes": ["circle"], "parts": ["a"]},
        "teacher_b": {"classes": ["square", "triangle"], "parts": ["b"]},
    }
    cfg.main_job.teachers = {"round": ["circle"], "edgy": ["triangle", "square"]}
    assert teacher_groups(cfg, union)["edgy"] == {"classes": ["square", "triangle"], "parts": ["b"]}
    cfg.main_job.teachers = {"round": ["circle"], "edgy": ["square"]}
    with pytest.raises(DatasetError, match="exactly one teacher"):
        teacher_groups(cfg, union)


def metrics(per_class: dict[str, float]) -> dict:
    return {"AP": 0.0, "AP50": 0.0, "per_class_AP": per_class, "per_class_AP50": per_class}


def test_criteria_per_class() -> None:
    results = {
        "teacher_a": metrics({"circle": 0.60}),
        "teacher_b": metrics({"square": 0.50}),
        "student": metrics({"circle": 0.58, "square": 0.45}),
        "student_gt": metrics({"circle": 0.62, "square": 0.49}),
        "naive_merge": metrics({"circle": 0.30, "square": 0.20}),
        "ignore_unlabelled": metrics({"circle": 0.40, "square": 0.47}),
        "pseudo_label": metrics({"circle": 0.55, "square": 0.30}),
    }
    owner = {"circle": "teacher_a", "square": "teacher_b"}
    summary = summarise(results, owner, BASELINES, CRITERIA)
    circle, square = summary["per_class"]["circle"], summary["per_class"]["square"]
    assert circle["student"]["ratio"] == pytest.approx(0.58 / 0.60)
    assert circle["student"]["keeps"] and circle["student"]["beats_baselines"]
    assert not square["student"]["keeps"]  # 0.45 < 0.95 * 0.50
    assert not square["student"]["beats_baselines"]  # ignore_unlabelled has 0.47
    assert square["best_baseline"] == "ignore_unlabelled"
    assert square["student_gt"]["keeps"] and square["student_gt"]["beats_baselines"]
    assert summary["naive_visibly_worse"] and not summary["student_criteria"]


@pytest.mark.slow
def test_main_job_smoke(tmp_path: Path, run_ok) -> None:
    run = tmp_path / "run"
    run_ok(
        [sys.executable, "-m", "centerx", "main", "experiment=fast_story", f"hydra.run.dir={run}"],
        600,
    )
    for name in ("report.md", "report.json", "comparison.png", "predictions/predictions.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    models = ["teacher_a", "teacher_b", "student", "student_gt", *BASELINES]
    assert list(report["models"]) == models
    assert report["class_owner"] == {"circle": "teacher_a", "triangle": "teacher_b"}
    for name, figures in report["models"].items():
        assert {"AP", "AP50", "per_class_AP", "per_class_AP50"} <= set(figures), name
        values = [figures["AP"], figures["AP50"], *figures["per_class_AP"].values()]
        assert all(isinstance(v, float | int) and 0.0 <= v <= 1.0 for v in values), name
        assert (run / name / "checkpoints" / "best.pt").is_file()
    assert list(report["models"]["teacher_a"]["per_class_AP"]) == ["circle"]
    assert list(report["models"]["student"]["per_class_AP"]) == ["circle", "triangle"]
    for teacher in ("teacher_a", "teacher_b"):
        labels = json.loads((run / "pseudo_labels" / f"{teacher}.json").read_text())
        assert {"images", "categories", "annotations"} <= set(labels)
    assert (run / "student" / "model.onnx").is_file()
    assert report["export"] == str(run / "student" / "model.onnx")
    text = (run / "report.md").read_text()
    assert "| student |" in text and "bash run.sh distill" in text and "$" not in text

    # The printed eval command of a row gives that row's figures.
    train_command, eval_command = report["models"]["student"]["commands"]
    assert train_command.startswith(
        "bash run.sh distill data=synthetic_views experiment=fast_story"
    )
    args = [a for a in shlex.split(eval_command)[2:] if not a.startswith("hydra.run.dir=")]
    run_ok([sys.executable, "-m", "centerx", *args, f"hydra.run.dir={tmp_path / 'eval'}"], 120)
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["AP"] == pytest.approx(report["models"]["student"]["AP"], abs=1e-9)
    assert scored["per_class_AP"] == pytest.approx(report["models"]["student"]["per_class_AP"])

    # Rendered again from the trained stages: the same figures, each stage's own training time.
    (run / "report.json").unlink()
    run_ok([sys.executable, "-m", "centerx", "main", "experiment=fast_story",
            f"hydra.run.dir={run}", "main_job.reuse=true"], 300)  # fmt: skip
    again = json.loads((run / "report.json").read_text())
    for name, figures in again["models"].items():
        first = report["models"][name]
        assert figures["reused"] and not first["reused"], name
        assert figures["train_seconds"] == first["train_seconds"] > 0, name
        assert figures["per_class_AP"] == pytest.approx(first["per_class_AP"]), name
    text = (run / "report.md").read_text()
    assert "(reused)" in text and f"reused {len(models)} stage(s) trained earlier" in text


def test_a_teachers_eval_parts_name_only_its_classes() -> None:
    """apple_mask: the test parts name [apple] and [mask]; the apple teacher's held-out set
    must not ask its one-class model for `mask` (it failed after training, before this)."""
    parts = [
        {"name": "fruits", "root": "F", "classes": ["apple"]},
        {"name": "mask", "root": "M", "classes": {"mask": "with_mask", "face": "no_mask"}},
        {"name": "all", "root": "A", "absent": ["apple", "mask"]},  # default classes
    ]
    assert parts_for_classes(parts, ["apple"]) == [
        parts[0],
        {"name": "all", "root": "A", "absent": ["apple"]},
    ]
    assert parts_for_classes(parts, ["mask"]) == [
        {"name": "mask", "root": "M", "classes": {"mask": "with_mask"}},
        {"name": "all", "root": "A", "absent": ["mask"]},
    ]


def test_the_stages_inherit_the_default_experiment() -> None:
    """conf/main.yaml picks experiment=main_synthetic by default: its data settings (size,
    cache) must reach every stage, not only the main job's own config."""
    from hydra.core.hydra_config import HydraConfig

    from centerx.recipes.main_job import base_overrides

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        main = compose(config_name="main", overrides=["seed=3"], return_hydra_config=True)
        HydraConfig.instance().set_config(main)
        base = base_overrides()
        stage = compose(config_name="train", overrides=base)
    assert "experiment=main_synthetic" in base and "seed=3" in base
    for key in ("image_size", "cache"):
        assert stage.data[key] == main.data[key], key


def test_a_stage_is_reused_only_when_it_trained_to_the_end(tmp_path: Path) -> None:
    """A stage killed mid-training leaves best.pt from its last evaluation: not done."""
    from centerx.recipes.main_job import STAGE_SECONDS, Stage, stage_done

    cfg = OmegaConf.create({"train": {"epochs": 16}})
    stage = Stage("teacher_a", "train", "", [], cfg)
    stage_dir = tmp_path / "teacher_a"
    (stage_dir / "checkpoints").mkdir(parents=True)
    (stage_dir / "checkpoints" / "best.pt").write_bytes(b"")
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert not stage_done(stage, stage_dir)
    (stage_dir / STAGE_SECONDS).write_text('{"seconds": 12.0}')
    assert stage_done(stage, stage_dir)
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml({"train": {"epochs": 8}}))
    assert not stage_done(stage, stage_dir)


def test_students_take_the_jobs_student_objective() -> None:
    """main_job.student_objective picks the students' objective config (apple_mask: the
    relative-pull KD for faint teachers); teachers and baselines keep the supervised one."""
    from centerx.recipes.main_job import plan_stages

    roots = ["data.roots.fruits=F", "data.roots.mask=M"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        main = compose(config_name="main", overrides=["experiment=apple_mask", *roots])
        teachers = {
            "teacher_fruits": {"classes": ["apple"], "parts": ["fruits"]},
            "teacher_mask": {"classes": ["mask"], "parts": ["mask"]},
        }
        stages = {s.name: s for s in plan_stages(main, teachers, Path("/tmp/job"))}
        task_config = {"train": "train", "distill": "distill"}
        composed = {
            name: compose(
                config_name=task_config[stage.task],
                overrides=["experiment=apple_mask", *roots, *stage.overrides],
            )
            for name, stage in stages.items()
            if name in ("teacher_mask", "student", "student_gt", "naive_merge")
        }
    assert main.main_job.student_objective == "distill_relative"
    for name in ("student", "student_gt"):
        assert composed[name].objective.heatmap_loss.relative_pull is True, name
        assert composed[name].objective.box_window == 3
        assert set(composed[name].objective.teachers) == set(teachers)
    for name in ("teacher_mask", "naive_merge"):
        assert "heatmap_loss" not in composed[name].objective, name
    # apple_mask's union stages (students and baselines alike) take batch 4, its teachers the
    # recipe's 16; every stage trains the teachers' 16 epochs and draws the parts equally often
    batch = {name: cfg.train.batch_size for name, cfg in composed.items()}
    assert batch == {"teacher_mask": 16, "student": 4, "student_gt": 4, "naive_merge": 4}
    assert {cfg.train.epochs for cfg in composed.values()} == {16}
    assert all(cfg.data.balance_parts for cfg in composed.values())


def test_student_init_starts_both_students_from_the_named_teacher() -> None:
    """main_job.student_init=<teacher> adds model.init_from=<its best.pt> to the students only;
    a name that is not a teacher is a one-line error."""
    from centerx.recipes.main_job import plan_stages

    roots = ["data.roots.fruits=F", "data.roots.mask=M"]
    teachers = {
        "teacher_fruits": {"classes": ["apple"], "parts": ["fruits"]},
        "teacher_mask": {"classes": ["mask"], "parts": ["mask"]},
    }
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        main = compose(config_name="main", overrides=["experiment=apple_mask", *roots])
        assert main.main_job.student_init is None
        plain = {s.name: s for s in plan_stages(main, teachers, Path("/tmp/job"))}
        main.main_job.student_init = "teacher_mask"
        started = {s.name: s for s in plan_stages(main, teachers, Path("/tmp/job"))}
        main.main_job.student_init = "teacher_pear"
        with pytest.raises(DatasetError, match=r"teacher_pear.*not a teacher"):
            plan_stages(main, teachers, Path("/tmp/job"))
    wanted = "model.init_from=/tmp/job/teacher_mask/checkpoints/best.pt"
    for name in ("student", "student_gt"):
        assert wanted in started[name].overrides, name
        assert not any("init_from" in o for o in plain[name].overrides)
    for name in ("teacher_fruits", "teacher_mask", "naive_merge"):
        assert started[name].overrides == plain[name].overrides, name
