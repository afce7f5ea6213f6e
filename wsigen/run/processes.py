"""Process plumbing shared by the launcher and the processes it starts (Linux specifics kept here)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket

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
