"""`python -m centerx SUBCOMMAND [hydra overrides...]` (run.sh calls this)."""

from __future__ import annotations

import sys

from centerx.cli import SUBCOMMANDS


def main() -> None:
    args = sys.argv[1:]
    command = "main"
    if args and "=" not in args[0] and not args[0].startswith("-"):
        command = args.pop(0)
    if command not in SUBCOMMANDS:
        sys.exit(f"centerx: unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}")
    from centerx import cli

    sys.argv = [f"centerx {command}", *args]
    cli.run(command)


if __name__ == "__main__":
    main()
