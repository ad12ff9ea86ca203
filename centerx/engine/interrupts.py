"""Ctrl-C and SIGTERM while training: stop between steps, not wherever the signal lands.

Python's default handler raises KeyboardInterrupt at the next bytecode, which can be inside a
`__del__` or weakref callback (Python prints "Exception ignored" and the run trains on), or
while the main process is receiving a batch's shared memory from a loader worker (the worker
prints a BrokenPipeError traceback). Inside `deferred()` a signal only records itself; the
training and evaluation loops call `raise_if_requested()` between batches. A second signal
raises at once, for a step that never ends.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from centerx.errors import Terminated

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []  # signals received inside deferred() and not yet raised


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _record(signum: int, frame: object) -> None:
    if _pending:
        raise _interrupt(signum)
    _pending.append(signum)
    log.warning(
        "%s: stopping after this step (send it again to stop at once)",
        signal.Signals(signum).name,
    )


def raise_if_requested() -> None:
    """Raise the interrupt a signal asked for (KeyboardInterrupt, or Terminated for SIGTERM)."""
    if _pending:
        raise _interrupt(_pending.pop())


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the next `raise_if_requested()`; the previous handlers
    come back on exit. Outside the main thread (signals only reach it) it does nothing."""
    nested = signal.getsignal(signal.SIGINT) is _record
    if nested or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _record) for signum in SIGNALS}
    try:
        yield
        raise_if_requested()  # a signal after the last check still ends the run as interrupted
    finally:
        _pending.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
