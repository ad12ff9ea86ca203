"""`python -m centerx SUBCOMMAND [hydra overrides...]` (run.sh calls this)."""

from __future__ import annotations

import sys

from centerx.cli import main

if __name__ == "__main__":
    sys.exit(main())
