"""Clean stops on Ctrl-C (SIGINT) and SIGTERM.

Inside the diffusion loop a first signal is only recorded: the step in progress finishes, the
stage's state is saved, and the run stops with a resumable store. A second signal, or one that
arrives anywhere else, stops at once (chunk and metadata writes are atomic, so the store stays
consistent either way).
"""

from __future__ import annotations

import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C but reported with exit code 143."""


_pending: int | None = None
_graceful = 0


def _raise(signum: int):
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def handler(signum, frame) -> None:
    global _pending
    if _graceful and _pending is None:
        _pending = signum
        return
    _raise(signum)


def pending() -> int | None:
    return _pending


def stop_now() -> None:
    """Raise the interrupt a recorded signal asked for."""
    global _pending
    signum, _pending = _pending, None
    _raise(signum if signum is not None else signal.SIGINT)


@contextlib.contextmanager
def graceful():
    """Within this block a first signal waits for the end of the current step."""
    global _graceful
    _graceful += 1
    try:
        yield
    finally:
        _graceful -= 1


@contextlib.contextmanager
def installed():
    """Install the handlers for SIGINT and SIGTERM (main thread only), restoring them after."""
    global _pending
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _pending = None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
