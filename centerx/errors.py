"""Known failures and the one place that turns them into `centerx: error: <what> (<what to do>)`.

Modules raise typed exceptions; `describe` maps them to one line on stderr and an exit code:

- 2, usage: the command line or configuration is wrong (UsageError and its ConfigError, Hydra's
  override and config-group errors, a `???` value left unset);
- 1, runtime: the command was valid but the run failed (CenterxError: data, checkpoints,
  divergence; the deployment kit's errors; an OSError, named by its real reason even when it is
  buried in a chain of wrappers; another training process that died);
- 128 + signal number: interrupted (130 for Ctrl-C, 143 for SIGTERM).

Anything else is a bug and keeps its traceback. CENTERX_DEBUG=1 shows the traceback of known
failures too. This module is the bottom layer of centerx (every layer raises its types): it
imports nothing from centerx, only the deployment kit's exception classes.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from centerx_export.imaging import ImageReadError, VideoError
from centerx_export.predictor import ModelError, NoReadableInputError

DEBUG_ENV = "CENTERX_DEBUG"
USAGE_EXIT = 2
RUNTIME_EXIT = 1


class CenterxError(Exception):
    """A failure the user can act on: printed as one line, without traceback (exit 1)."""

    exit_code = RUNTIME_EXIT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint  # what to do about it, printed in parentheses

    def __reduce__(self) -> tuple:
        # Keeps the hint when the error crosses a process boundary (a stage process of a recipe).
        return (type(self), (str(self), self.hint))


class UsageError(CenterxError, ValueError):
    """The command line or configuration asks for something impossible (exit 2)."""

    exit_code = USAGE_EXIT


class ConfigError(UsageError):
    """A configuration value is invalid (found by the up-front checks, before data is read)."""


class Interrupted(CenterxError):
    """Ctrl-C or SIGTERM; the message says what was kept and the hint how to go on."""

    def __init__(self, message: str, hint: str | None = None, signum: int = signal.SIGINT):
        super().__init__(message, hint)
        self.exit_code = 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (every `except KeyboardInterrupt` cleans up the same way)."""

    signum = signal.SIGTERM


def signal_number(interrupt: BaseException) -> int:
    return int(getattr(interrupt, "signum", signal.SIGINT))


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM handler: a kill from a job scheduler unwinds like Ctrl-C."""
    raise Terminated()


# ---------------------------------------------------------------------------------------------
# Up-front configuration checks (each sub-config's check function uses these)
# ---------------------------------------------------------------------------------------------


def check_number(
    node: Mapping[str, Any],
    key: str,
    prefix: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> None:
    """`prefix.key` must be a finite number (an integer when `integer`) within the bounds."""
    value = node.get(key)
    if value is None and optional:
        return
    rules = ["an integer" if integer else "a finite number"]
    rules += [f">= {minimum}"] if minimum is not None else []
    rules += [f"> {above}"] if above is not None else []
    rules += [f"< {below}"] if below is not None else []
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = (
        is_number
        and math.isfinite(value)
        and (not integer or float(value).is_integer())
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (below is None or value < below)
    )
    if not ok:
        raise ConfigError(
            f"{prefix}.{key}={value!r} must be {' and '.join(rules)}",
            f"e.g. {prefix}.{key}={_example(minimum, above, integer)}",
        )


def _example(minimum: float | None, above: float | None, integer: bool) -> str:
    if integer:
        return str(max(1, int(minimum if minimum is not None else 1)))
    return "0.001" if above == 0 else str(minimum if minimum is not None else 1)


# ---------------------------------------------------------------------------------------------
# Exceptions -> one line
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int
    hint: str | None = None

    @property
    def line(self) -> str:
        text = " ".join(self.message.split())  # one line, whatever the exception held
        return f"centerx: error: {text}" + (f" ({self.hint})" if self.hint else "")


# errno -> what to do; an OSError with one of these anywhere in a chain is the real reason.
SYSTEM_REASONS = {
    errno.ENOSPC: "free disk space, or write the run elsewhere with hydra.run.dir=PATH",
    errno.EDQUOT: "free disk space, or write the run elsewhere with hydra.run.dir=PATH",
    errno.EROFS: "the file system is read-only: write the run elsewhere with hydra.run.dir=PATH",
    errno.EFBIG: "the file size limit was reached (ulimit -f)",
    errno.EIO: "the disk reported an I/O error",
}
PATH_REASONS = {
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "that is a folder; give a file",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.ENOENT: "check the path",
}
# gloo reports a dead peer as a plain RuntimeError; NCCL raises torch.distributed.DistError.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def system_error(exc: BaseException) -> OSError | None:
    """The full disk, read-only file system, ... (SYSTEM_REASONS) anywhere in `exc`'s chain:
    the real reason, whatever wrapped it (torch reports a full disk as a RuntimeError)."""
    return next(
        (e for e in _chain(exc) if isinstance(e, OSError) and e.errno in SYSTEM_REASONS), None
    )


def _os_failure(err: OSError) -> Failure:
    if err.errno is None or not err.strerror:
        return Failure(str(err), RUNTIME_EXIT)  # raised with a message of ours
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    hint = SYSTEM_REASONS.get(err.errno) or PATH_REASONS.get(err.errno)
    return Failure(f"{err.strerror}: {where}" if where else err.strerror, RUNTIME_EXIT, hint)


def _hydra_failure(exc: HydraException) -> Failure:
    """Composition errors: Hydra's message (first line what, the rest what to do) + its cause."""
    text = str(exc).split("Config search path")[0]  # where Hydra looked: noise here
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    what = lines[0].rstrip(".") if lines else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        what += f": {str(cause).splitlines()[0].strip()}"
    hint = " ".join(lines[1:]) or "check the overrides; --help lists the config groups"
    return Failure(what, USAGE_EXIT, hint)


def _peer_failure(exc: BaseException) -> bool:
    distributed = sys.modules.get("torch.distributed")  # only torch raises these
    if distributed is not None and isinstance(exc, getattr(distributed, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_GONE)


def _describe_one(exc: BaseException) -> Failure | None:
    if isinstance(exc, CenterxError):
        return Failure(str(exc), exc.exit_code, exc.hint)
    if isinstance(exc, KeyboardInterrupt):
        signum = signal_number(exc)
        return Failure(f"interrupted by {signal.Signals(signum).name}", 128 + signum)
    if isinstance(exc, ModelError | ImageReadError | NoReadableInputError | VideoError):
        return Failure(str(exc), RUNTIME_EXIT)
    if isinstance(exc, MissingMandatoryValue):
        key = exc.full_key or "a value"
        return Failure(f"{key} is not set", USAGE_EXIT, f"give it on the command line: {key}=...")
    if isinstance(exc, InterpolationResolutionError):
        return Failure(str(exc).splitlines()[0], USAGE_EXIT, "check the ${...} references")
    if isinstance(exc, InstantiationException):
        # A `_target_` that does not import is a config error; a constructor's own failure is
        # described by its cause (known) or is a bug (unknown).
        if isinstance(exc.__cause__, ImportError | AttributeError) or exc.__cause__ is None:
            return Failure(str(exc).split(", set env var HYDRA_FULL_ERROR")[0], USAGE_EXIT)
        return None
    if isinstance(exc, HydraException):
        return _hydra_failure(exc)
    if _peer_failure(exc):
        return Failure(
            "another training process stopped (its own error is printed above)", RUNTIME_EXIT
        )
    if isinstance(exc, OSError):
        return _os_failure(exc)
    return None


def describe(exc: BaseException) -> Failure | None:
    """The one-line failure of a known exception; None for a bug (show the traceback).

    A full disk or a read-only file system anywhere in the chain is the reason, whatever
    wrapped it; otherwise the outermost known exception speaks (Hydra's instantiate wrapper
    is looked through)."""
    system = system_error(exc)
    if system is not None:
        return _os_failure(system)
    for link in _chain(exc):
        failure = _describe_one(link)
        if failure is not None:
            return failure
        if not isinstance(link, InstantiationException):
            return None
    return None


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(exc: BaseException, stream: TextIO | None = None) -> int:
    """Print `exc` as one line (a known failure) or with its traceback (a bug, or
    CENTERX_DEBUG=1); returns the exit code."""
    stream = stream or sys.stderr
    failure = describe(exc)
    if failure is None or debug_enabled():
        traceback.print_exception(exc, file=stream)
    if failure is None:
        return RUNTIME_EXIT
    print(failure.line, file=stream, flush=True)
    return failure.exit_code


def run_script(main: Callable[[], object]) -> NoReturn:
    """The `__main__` of a script in scripts/: known failures as one line, the exit code of
    `report`; a closed pipe (`| head`) is not a failure. An int from `main` is the exit code;
    anything else it returns (a report for callers in Python) means success."""
    try:
        result = main()
        code = result if isinstance(result, int) else 0
    except SystemExit:
        raise  # argparse has already said why
    except BrokenPipeError:
        code = 0
    except BaseException as exc:
        code = report(exc)
    sys.exit(code)
