"""SIGINT/SIGTERM during training: finish the step, checkpoint, say how to resume, leave.

Before the training loop starts (the corpus loading, the model build, a checkpoint being read)
there is nothing to checkpoint, so a signal then stops the run at once (``SignalBeforeStart``,
raised from the handler) instead of waiting for a first step that a stuck read may never reach.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a checkpoint; ``exit_code`` is the shell's 128 + signal
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, message: str, is_main: bool = True):
        super().__init__(message)
        self.signum, self.step, self.is_main = signum, step, is_main
        self.exit_code = 128 + signum


class SignalBeforeStart(BaseException):
    """A stop signal arrived before the training loop began (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` of the setup swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Set by the handler; read by the loop after each step. Until ``arm()`` (the loop is about
    to start), the handler raises SignalBeforeStart instead."""

    signum: int = 0
    armed: bool = False

    def arm(self) -> None:
        self.armed = True


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, the first SIGINT or SIGTERM only sets ``request.signum`` (once
    ``request.arm()`` was called; before that it raises SignalBeforeStart); the previous
    handlers come back at once, so a second one acts as usual (KeyboardInterrupt, or exit).
    Signal handlers can only be set from the main thread: elsewhere nothing is caught."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, frame):
        request.signum = signum
        for s, h in previous.items():
            signal.signal(s, h)
        if not request.armed:
            raise SignalBeforeStart(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
