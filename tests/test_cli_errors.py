"""centerx.errors, the one place that turns exceptions into `centerx: error: ...` lines, and the
CLI around it: exit codes, the debug switch, tracebacks kept for bugs.

The bad inputs themselves (50+ of them, through the real CLI) are tests/test_bad_inputs.py.
"""

from __future__ import annotations

import errno
import signal

import pytest
from hydra.errors import InstantiationException

from centerx import cli, errors
from centerx.data.base import DatasetError
from centerx.model.checkpoint import CheckpointError
from centerx_export.predictor import NoReadableInputError

FAST = ["train.progress=false", "data.num_workers=0", "data.image_size=64"]


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    """`outer` raised while handling `inner` (what `raise outer` in an except block makes)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 (the implicit chain is the point)
    except BaseException as err:
        return err


@pytest.mark.parametrize(
    ("exc", "line", "code"),
    [
        (errors.ConfigError("train.lr=-1 must be > 0", "e.g. train.lr=0.001"),
         "centerx: error: train.lr=-1 must be > 0 (e.g. train.lr=0.001)", 2),
        (DatasetError("a.xml: xmin is 'abc'"), "centerx: error: a.xml: xmin is 'abc'", 1),
        (CheckpointError("checkpoint not found: x.pt"),
         "centerx: error: checkpoint not found: x.pt", 1),
        (NoReadableInputError("no input could be read"),
         "centerx: error: no input could be read", 1),
        (KeyboardInterrupt(), "centerx: error: interrupted by SIGINT", 130),
        (errors.Terminated(), "centerx: error: interrupted by SIGTERM", 143),
        (errors.Interrupted("interrupted in epoch 2", "resume with: X", signal.SIGTERM),
         "centerx: error: interrupted in epoch 2 (resume with: X)", 143),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b"),
         "centerx: error: No such file or directory: /a/b (check the path)", 1),
        (RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"),
         "centerx: error: another training process stopped (its own error is printed above)", 1),
    ],
)  # fmt: skip
def test_known_failures_are_one_line(exc: BaseException, line: str, code: int) -> None:
    failure = errors.describe(exc)
    assert failure is not None
    assert (failure.line, failure.exit_code) == (line, code)


def test_a_full_disk_is_the_reason_whatever_wraps_it() -> None:
    """torch reports a full disk as a RuntimeError raised while handling the OSError; the
    message names the disk problem, not the wrapper."""
    full = OSError(errno.ENOSPC, "No space left on device", "/run/checkpoints/last.pt")
    wrapped = chained(RuntimeError("[enforce fail at inline_container.cc] unexpected pos"), full)
    failure = errors.describe(CheckpointError("cannot save"))
    assert failure is not None and "cannot save" in failure.line
    failure = errors.describe(wrapped)
    assert failure is not None and failure.exit_code == 1
    assert failure.line.startswith(
        "centerx: error: No space left on device: /run/checkpoints/last.pt (free disk space"
    )


def test_hydra_instantiate_is_looked_through() -> None:
    """A known error raised inside a `_target_` speaks for itself; an unknown one is a bug."""
    known = InstantiationException("Error in call to target 'x.VOC'")
    known.__cause__ = DatasetError("VOC root r is not a folder")
    assert errors.describe(known).line == "centerx: error: VOC root r is not a folder"
    bug = InstantiationException("Error in call to target 'x.VOC'")
    bug.__cause__ = ZeroDivisionError("division by zero")
    assert errors.describe(bug) is None
    unknown_target = InstantiationException(
        "Error locating target 'torch.optim.Nope', set env var HYDRA_FULL_ERROR=1 to see chained "
        "exception."
    )
    unknown_target.__cause__ = ImportError("no torch.optim.Nope")
    failure = errors.describe(unknown_target)
    assert failure.line == "centerx: error: Error locating target 'torch.optim.Nope'"
    assert failure.exit_code == 2


def test_bugs_keep_their_traceback(capsys) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError as err:
        bug = err
    assert errors.describe(bug) is None
    assert errors.report(bug) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "centerx: error" not in err


def test_check_number_names_the_key_and_the_rule() -> None:
    errors.check_number({"lr": 0.1}, "lr", "train", above=0)
    errors.check_number({"grad_clip": None}, "grad_clip", "train", above=0, optional=True)
    for value in (0, -1, float("nan"), float("inf"), "abc", True):
        with pytest.raises(errors.ConfigError, match=r"train\.lr=.* must be a finite number"):
            errors.check_number({"lr": value}, "lr", "train", above=0)
    with pytest.raises(errors.ConfigError, match=r"train\.epochs=1\.5 must be an integer"):
        errors.check_number({"epochs": 1.5}, "epochs", "train", integer=True, minimum=1)


# ---------------------------------------------------------------------------------------------
# The CLI (in this process)
# ---------------------------------------------------------------------------------------------


def test_usage_error_exit_code_and_one_line(tmp_path, capsys) -> None:
    code = cli.main(["train", *FAST, "train.lr=nan", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "centerx: error: train.lr=nan must be a finite number and > 0 (e.g. train.lr=0.001)"
    ]
    assert not (tmp_path / "run" / "config.yaml").exists()  # checked before anything is written


def test_hydra_composition_errors_without_hydra_noise(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = cli.main(["train", "train.epochz=3", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "centerx: error: Could not override 'train.epochz': Key 'epochz' is not in struct "
        "(To append to your config use +train.epochz=3)"
    ]
    import os

    assert "HYDRA_FULL_ERROR" not in os.environ  # set for Hydra's call only, then restored


def test_debug_switch_shows_the_traceback(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    code = cli.main(["train", *FAST, "data.image_size=100", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "check_image_size" in err
    assert err.strip().splitlines()[-1].startswith("centerx: error: data.image_size=100")


def test_a_bug_in_a_task_shows_its_traceback(tmp_path, capsys, monkeypatch) -> None:
    import centerx.engine.tasks as tasks

    def broken(cfg):
        return 1 / 0

    monkeypatch.setattr(tasks, "eval_task", broken)
    code = cli.main(["eval", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "Error executing job" not in err  # Hydra's own report stays out


def test_unknown_subcommand_lists_them(capsys) -> None:
    assert cli.main(["trian", "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("centerx: error: unknown subcommand 'trian' (choose one of main, train")


def test_scripts_report_known_failures_in_one_line(capsys) -> None:
    """scripts/ run their main through errors.run_script: a bad override is one line, exit 2."""

    def bad_override() -> None:
        raise errors.ConfigError("data.root is not in the config", "use +data.root=...")

    with pytest.raises(SystemExit) as stop:
        errors.run_script(bad_override)
    assert stop.value.code == errors.USAGE_EXIT
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "centerx: error: data.root is not in the config (use +data.root=...)"
    ]
    with pytest.raises(SystemExit) as stop:
        errors.run_script(lambda: 3)
    assert stop.value.code == 3
    with pytest.raises(SystemExit) as stop:
        errors.run_script(lambda: {"report": 1})  # a main that returns its results
    assert stop.value.code == 0
