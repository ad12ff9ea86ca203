"""Hydra command-line overrides as text: write values back, print reproducible commands."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_PLAIN = re.compile(r"[A-Za-z_./][A-Za-z0-9_./-]*")
_RESERVED = {"null", "true", "false", "nan", "inf"}


def override_value(value: Any) -> str:
    """A plain value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as an override")


def override(key: str, value: Any) -> str:
    return f"{key}={override_value(value)}"


def override_key(item: str) -> str:
    """`+a.b=1` -> `a.b`."""
    return item.split("=", 1)[0].lstrip("+~")


def command(task: str, overrides: Sequence[str], run_dir: Path | None = None) -> str:
    """The shell command that runs `task` with `overrides` (from the repository root)."""
    words = ["bash", "run.sh", task, *overrides]
    if run_dir is not None:
        words.append(f"hydra.run.dir={run_dir}")
    return " ".join(shlex.quote(word) for word in words)
