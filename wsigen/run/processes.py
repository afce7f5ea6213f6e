"""Process plumbing shared by the launcher and the processes it starts (Linux specifics kept here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

from ..errors import PeerLost, WsigenError

# Set in forked worker processes: libraries with thread pools that the launcher may have used
# (libvips decoding the input of ``wsigen upscale``) are broken there (see ``source.write_input``).
_FORKED_WORKER = False


def mark_forked_worker() -> None:
    global _FORKED_WORKER
    _FORKED_WORKER = True


def forked_worker() -> bool:
    return _FORKED_WORKER


def die_with_parent() -> None:
    """Linux: SIGTERM this process if the launching process dies (it left the terminal's group)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


def forget_accelerate_state() -> None:
    """A forked worker inherits the launcher's Accelerate singletons: if the launching process had
    used Accelerate (e.g. training earlier in the same Python), they would say "one process" and
    skip initialising the process group."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def external_world() -> int:
    """WORLD_SIZE of an external launcher (accelerate launch, torchrun), else 0."""
    try:
        return int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        return 0


GRACE_S = 15.0  # after a failure: how long the other workers get to stop before SIGKILL


def watch(procs, stopped: set[int], wait) -> KeyboardInterrupt | None:
    """Wait for every worker; at the first non-zero exit stop the others (SIGTERM, then SIGKILL).

    Workers sit in their own process group, so Ctrl-C and SIGTERM reach only this process, which
    passes each on: the first lets every worker finish its step and save the state (the ranks
    agree on the step), a second stops them at once. Returns the interrupt to re-raise, if any.
    """

    running = {p.sentinel: r for r, p in enumerate(procs) if p.exitcode is None}
    deadline, interrupt = None, None
    while running:
        try:
            for sentinel in wait(list(running), timeout=0.5):
                r = running.pop(sentinel)
                procs[r].join()
                code = procs[r].exitcode
                # 130/143: an interrupted worker; the ranks agree on stopping by themselves
                if code not in (0, 130, 143) and deadline is None and interrupt is None:
                    stop(procs, stopped, signal.SIGTERM)
                    deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                stop(procs, stopped, signal.SIGKILL)
                deadline = float("inf")
        except KeyboardInterrupt as e:
            from .stopping import Terminated

            sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            stop(procs, set(), sig)
            if interrupt is not None and deadline is None:  # the second: stop now
                deadline = time.monotonic() + GRACE_S
            interrupt = interrupt or e
    return interrupt


def stop(procs, stopped: set[int], sig) -> None:
    for r, p in enumerate(procs):
        if p.exitcode is None and p.pid:
            stopped.add(r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)


def read_reports(jobdir: str, n: int) -> dict[int, dict]:
    out = {}
    for r in range(n):
        p = Path(jobdir) / f"rank-{r}.json"
        if p.exists():
            with contextlib.suppress(ValueError, OSError):
                out[r] = json.loads(p.read_text())
    return out


def classify(e: BaseException) -> tuple[str, int]:
    if isinstance(e, PeerLost):
        return "lost", 1
    if isinstance(e, KeyboardInterrupt):
        from .stopping import Terminated

        return "interrupted", 143 if isinstance(e, Terminated) else 130
    if isinstance(e, WsigenError):
        return "error", e.exit_code
    if isinstance(e, RuntimeError) and ("gloo" in str(e).lower() or "Connection closed" in str(e)):
        return "lost", 1
    return "error", 1


# how a failed rank ranks when the job's error names one: killed first, then an error, then
# interrupted, then lost contact; +4 for a rank the launcher itself stopped
INTERRUPTED = (2, 6)
KILLED = (0, 5)


def first_failure(n: int, reports: dict[int, dict], codes: dict[int, int | None],
                  stopped: set[int]) -> tuple[int, int, str, int, bool]:
    """(rank, order, message, exit code, terminated) of the rank a job's error should name.

    ``terminated``: the ranks were interrupted and at least one by SIGTERM (they stop together).
    """

    def why(rank: int) -> tuple[int, str, int]:
        rep, code = reports.get(rank), codes.get(rank)
        if rep is None:
            if code is not None and code < 0:
                try:
                    how = f"was killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"was killed by signal {-code}"
            else:
                how = f"died without a report (exit code {code})"
            return (5 if rank in stopped else 0), how, 1
        order = {"error": 1, "interrupted": 2, "lost": 3}.get(rep.get("kind"), 1)
        order += 4 if rank in stopped else 0
        return order, rep.get("message", "failed"), int(rep.get("code", 1))

    failed = [r for r in range(n) if codes.get(r) or not (reports.get(r) or {}).get("ok")]
    first = min(failed, key=lambda r: (why(r)[0], r))
    order, msg, code = why(first)
    terminated = any(why(r)[2] == 143 for r in failed if why(r)[0] in INTERRUPTED)
    return first, order, msg, code, terminated
