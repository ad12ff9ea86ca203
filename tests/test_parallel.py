"""Stages trained at once (centerx/recipes/parallel.py, main_job.parallel). The end-to-end
run in parallel is tests/test_main_job.py's smoke test (auto: 2 stages on a 2-core machine)."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest
from omegaconf import OmegaConf

from centerx.data.base import DatasetError
from centerx.errors import ConfigError, describe
from centerx.recipes import parallel
from centerx.recipes.main_job import Stage, _ready, stage_resources


def test_slots_auto_and_checked(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    assert parallel.stage_slots("auto", "cpu") == 3  # one more than the cores
    assert parallel.stage_slots("auto", "cuda") == 1
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 1)
    assert parallel.stage_slots("auto", "cpu") == 1
    assert parallel.stage_slots(3, "cpu") == 3
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ConfigError, match=r"main_job\.parallel"):
            parallel.stage_slots(bad, "cpu")


def test_each_stage_gets_its_share_of_the_cpus(monkeypatch) -> None:
    cfg = OmegaConf.create(
        {"train": {"num_threads": None}, "data": {"num_workers": 1}, "eval": {"num_workers": 1}}
    )
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    assert stage_resources(cfg, 1, []) == []
    assert stage_resources(cfg, 2, []) == [
        "train.num_threads=1", "data.num_workers=0", "eval.num_workers=0"
    ]  # fmt: skip
    # The command line wins; a config that already says so needs no override.
    assert stage_resources(cfg, 2, ["data.num_workers=2"]) == [
        "train.num_threads=1", "eval.num_workers=0"
    ]  # fmt: skip
    cfg.train.num_threads, cfg.data.num_workers, cfg.eval.num_workers = 1, 0, 0
    assert stage_resources(cfg, 2, []) == []
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 16)
    assert stage_resources(cfg, 2, []) == ["train.num_threads=8"]  # workers keep overlapping


def test_students_and_pseudo_labels_wait_for_the_teachers() -> None:
    teacher = Stage("teacher_a", "train", "", [])
    student = Stage("student", "distill", "", [])
    naive = Stage("naive_merge", "train", "", [])
    pseudo = Stage("pseudo_label", "train", "", [])
    assert _ready(teacher, False, False) and _ready(naive, False, False)
    assert not _ready(student, False, False) and _ready(student, True, False)
    assert not _ready(pseudo, True, False) and _ready(pseudo, True, True)


def test_inline_executor_hands_errors_to_the_reader() -> None:
    future = parallel.InlineExecutor().submit(int, "x")
    with pytest.raises(ValueError):
        future.result()
    assert parallel.InlineExecutor().submit(int, "7").result() == 7


def _fail(message: str) -> None:
    raise DatasetError(message, "the hint")


def test_a_stage_process_error_arrives_as_one_line_with_its_hint() -> None:
    err = pickle.loads(pickle.dumps(DatasetError("no images", "check data.root")))
    assert type(err) is DatasetError and err.hint == "check data.root"
    with (
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool,
        pytest.raises(DatasetError) as caught,
    ):
        pool.submit(_fail, "part b has no images").result()
    assert describe(caught.value).line == "centerx: error: part b has no images (the hint)"


def _start_method_in_stage(log_file: str) -> tuple[str, str]:
    before = multiprocessing.get_start_method()
    parallel.enter_stage_process("teacher_a", [log_file], "fork")
    logging.getLogger("centerx.test").info("hello")
    return before, multiprocessing.get_start_method()


def test_a_stage_process_starts_its_workers_like_its_parent_and_logs_as_its_stage(
    tmp_path,
) -> None:
    """A spawned process would spawn its loader workers too (each importing torch again and
    receiving a copy of the image cache); the stage process goes back to the parent's method."""
    log_file = tmp_path / "cli.log"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        before, after = pool.submit(_start_method_in_stage, str(log_file)).result()
    assert (before, after) == ("spawn", "fork")
    assert "[centerx.test][INFO] - [teacher_a] hello" in log_file.read_text()
