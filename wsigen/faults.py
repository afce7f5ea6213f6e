"""Fault injection for crash tests (design.md §6): kill this process at a chosen point.

``WSIGEN_FAULT=NAME:N[:SIG]`` makes the N-th call of ``point(NAME, …)`` (counting from 1) send
SIGKILL (or SIG: INT, TERM, STOP) to the process itself; ``:OOM`` raises ``torch.OutOfMemoryError``
there instead (a GPU out of memory, on any device). With ``WSIGEN_FAULT_RANK=R`` only the
worker of rank R (``RANK``) counts.
Unset, ``point`` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str, *detail) -> None:
    spec = os.environ.get("WSIGEN_FAULT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    nth, _, sig = rest.partition(":")
    if target != name:
        return
    rank = os.environ.get("WSIGEN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        if sig == "OOM":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {name} {detail})")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
