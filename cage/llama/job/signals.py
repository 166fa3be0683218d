"""SIGINT/SIGTERM during training: finish the step, checkpoint, say how to resume, leave."""

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


class StopRequest:
    """Set by the handler; read by the loop after each step."""

    signum: int = 0


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, the first SIGINT or SIGTERM only sets ``request.signum``; the previous
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

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
