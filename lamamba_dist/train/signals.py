"""Stop requests: SIGUSR2 / SIGTERM / a first SIGINT (or :func:`request_stop`) -> save at the next step boundary,
exit 3. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once: no save.

The handler only sets a flag; the training loop polls it at every step boundary and all ranks agree on it
through an all-reduce, so a signal that reaches the ranks at slightly different times still produces one
consistent checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time

EXIT_OK = 0
EXIT_FAILURE = 1
# Exit code after a signal-triggered save: the job should be requeued and rerun with the same command.
EXIT_REQUEUE = 3

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

_stop = threading.Event()
_reason: list[str] = []


def request_stop(reason: str = "request_stop()") -> None:
    """Ask the running training loop to checkpoint and return EXIT_REQUEUE at the next step boundary."""
    if not _stop.is_set():
        _reason.append(reason)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _reason[0] if _reason else ""


def clear_stop_request() -> None:
    _stop.clear()
    _reason.clear()
    _interrupts.clear()


# A second SIGINT within this many seconds of the first counts as the same Ctrl-C: a terminal's Ctrl-C reaches
# every process of the group, and torchrun forwards the one it got to its workers a moment later.
SIGINT_DEBOUNCE_S = float(os.environ.get("LAMAMBA_SIGINT_DEBOUNCE_S", "1.0"))


def _handler(signum, frame):  # noqa: ARG001 - signal API
    if signum == signal.SIGINT:
        now = time.monotonic()
        if _interrupts and now - _interrupts[0] >= SIGINT_DEBOUNCE_S:  # Ctrl-C again: the user wants out now
            raise KeyboardInterrupt
        if _interrupts:
            return
        _interrupts.append(now)
        import sys

        sys.stderr.write("\n[lamamba] SIGINT: saving at the next step boundary, then exiting (Ctrl-C again to exit "
                         "at once, without saving)\n")
        sys.stderr.flush()
    request_stop(f"signal {signal.Signals(signum).name}")


_interrupts: list[float] = []  # time of the first SIGINT


class StopSignals:
    """Context manager installing the stop handlers (main thread only) and restoring the previous ones."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                try:
                    self._previous[s] = signal.signal(s, _handler)
                except (ValueError, OSError):  # pragma: no cover - exotic platforms
                    pass
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            try:
                signal.signal(s, prev)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self._previous.clear()
        return False
