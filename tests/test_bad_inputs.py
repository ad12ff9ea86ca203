"""Every bad input and fault of the table in scripts/bad_inputs.py, through the real CLI.

Each case asserts its exit code, its one line (`centerx: error: ...` for an error, the warning
that counts or reports what happened otherwise), no traceback on stderr, and the verdict the
script gives it (clear, skip or handled; never silent, unclear, hang or loss). The workspace
(a tiny trained run, broken files) is built once, and the cases that need processes of their own
run beside the in-process ones: the table runs once for the whole module.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bad_inputs.py"


def _load_script():
    """scripts/bad_inputs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("centerx_bad_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


bad_inputs = _load_script()


def _params() -> list:
    marks = {True: [pytest.mark.slow], False: []}
    return [pytest.param(case, id=case.name, marks=marks[case.slow]) for case in bad_inputs.CASES]


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The outcome of every case selected in this session, run together."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.path == Path(__file__) and hasattr(item, "callspec")
    ]
    runnable = [case for case in selected if bad_inputs.unavailable(case) is None]
    workspace = bad_inputs.Workspace(tmp_path_factory.mktemp("bad_inputs"))
    workspace.build()
    jobs = max(1, (os.cpu_count() or 2) - 1)
    return bad_inputs.run_all(runnable, workspace, jobs, lambda case, outcome: None)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, outcomes: dict) -> None:
    why_not = bad_inputs.unavailable(case)
    if why_not:
        pytest.skip(why_not)
    outcome = outcomes[case.name]
    result = outcome.result
    tail = result.output[-3000:]
    assert result.code is not None, f"no exit within {bad_inputs.TIMEOUT_S} s:\n{tail}"
    assert "Traceback" not in result.stderr, tail
    assert "HYDRA_FULL_ERROR" not in result.output, tail
    assert result.code == case.code, tail
    errors = bad_inputs.error_lines(result)
    if case.expect == "clear":
        assert len(errors) == 1, tail
        assert re.search(case.message, errors[0]), errors[0]
    else:
        assert errors == [], tail
        assert any(re.search(case.message, line) for line in result.output.splitlines()), tail
    assert outcome.verdict == case.expect, outcome.why
