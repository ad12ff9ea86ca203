"""Signals inside `interrupts.deferred()`: held until the loop asks, a second one at once."""

from __future__ import annotations

import os
import signal

import pytest

from centerx.engine import interrupts
from centerx.errors import Terminated


def test_a_signal_waits_for_the_check_and_a_second_one_does_not() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():  # on exit: one is pending
        os.kill(os.getpid(), signal.SIGINT)  # only recorded
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_requested()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second while one is pending: at once


def test_sigterm_raises_terminated_and_nothing_is_left_pending() -> None:
    with pytest.raises(Terminated), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        interrupts.raise_if_requested()
    interrupts.raise_if_requested()  # outside: nothing pending, no effect


def test_a_signal_after_the_last_check_still_interrupts() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
