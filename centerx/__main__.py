"""`python -m centerx SUBCOMMAND [hydra overrides...]` (run.sh calls this)."""

from __future__ import annotations

import sys

SUBCOMMANDS = ("main", "train", "eval", "predict", "distill", "export")  # see cli.TASKS


def main() -> None:
    args = sys.argv[1:]
    command = "main"
    if args and "=" not in args[0] and not args[0].startswith("-"):
        command = args.pop(0)
    if command not in SUBCOMMANDS:
        sys.exit(f"centerx: unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}")
    from centerx import cli  # deferred: `--help` on a typo should not pay for importing torch

    if command in ("eval", "predict"):
        # `model=PATH` names a file, but conf/model/ is a config group, so Hydra would read it as
        # a group choice and fail; `checkpoint=` takes .pt and .onnx paths alike.
        args = [f"checkpoint={a[len('model=') :]}" if a.startswith("model=") else a for a in args]
    sys.argv = [f"centerx {command}", *args]
    cli.run(command)


if __name__ == "__main__":
    main()
