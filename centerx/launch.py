"""`python -m centerx.launch NPROC [SUBCOMMAND] [overrides]`: torchrun on this machine, NPROC
processes (what `NPROC=2 bash run.sh train` runs).

torchrun reports a failed process with its own traceback and a page of details; each process
has already printed its `centerx: error:` line, so this says in one more line which process
failed first, and exits with its exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nproc, *args = sys.argv[1:] if argv is None else argv
    launch = ["--standalone", f"--nproc_per_node={int(nproc)}", "-m", "centerx", *args]
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        failed = len(err.failures)
        print(
            f"centerx: error: {failed} of {nproc} training processes failed, first rank {rank} "
            f"(exit {failure.exitcode}; its error is printed above)",
            file=sys.stderr,
            flush=True,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
