"""metrics.jsonl: one JSON object per logged step or epoch, flushed as written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_clean(record)) + "\n")

    def truncate(self, step: int) -> int:
        """Drop the records after `step` (a resumed run writes them again); how many went.
        Rewritten whole, then renamed: an interruption leaves the old file or the new one."""
        if not self.enabled or not self.path.is_file():
            return 0
        records = read_metrics(self.path)
        kept = [record for record in records if record.get("step", 0) <= step]
        if len(kept) < len(records):
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, self.path)
        return len(records) - len(kept)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
