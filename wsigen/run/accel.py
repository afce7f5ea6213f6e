"""Making the denoiser fast on its device: channels-last memory format and torch.compile.

Both change which kernels run, so both belong to the reproducibility key (``stages.Settings``):
the same options give the same bytes, eager and compiled runs may differ in the last bits.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import nn

from ..errors import WsigenError

#: torch.compile backend; tests set WSIGEN_COMPILE_BACKEND=eager to check the wiring quickly.
BACKEND_ENV = "WSIGEN_COMPILE_BACKEND"


class ChannelsLast(nn.Module):
    """Feed the wrapped network NHWC-strided inputs (its weights are converted once)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.pixelwise = getattr(net, "pixelwise", False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mpp: torch.Tensor | None = None):
        return self.net(x.contiguous(memory_format=torch.channels_last), sigma, mpp)


def has_compiler() -> bool:
    """torch.compile's default backend (inductor) builds C++ on CPU: it needs a compiler."""
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


def prepare(denoiser: nn.Module, device: torch.device, *, channels_last: bool = False,
            compile: bool = False) -> nn.Module:
    """The denoiser on ``device`` in eval mode, optionally channels-last and/or compiled."""
    net = denoiser.to(device).eval()
    if channels_last and not getattr(net, "pixelwise", False):  # no convolutions: nothing to gain
        net = ChannelsLast(net)
    if compile:
        backend = os.environ.get(BACKEND_ENV, "inductor")
        if backend == "inductor" and device.type == "cpu" and not has_compiler():
            raise WsigenError("--compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile; "
                              "install one (e.g. apt install g++) or drop --compile")
        # Batches have a fixed size (--batch), so static shapes: one graph, plus one per short
        # tail batch at most.
        net = torch.compile(net, backend=backend, dynamic=False)
    return net


#: Allocations below this come from the heap, not from fresh mmaps (``tune_host_allocator``).
HEAP_THRESHOLD = 64 << 20


def tune_host_allocator(threshold: int = HEAP_THRESHOLD) -> bool:
    """Let glibc serve the per-segment temporaries (a few MB each) from its heap.

    By default glibc maps every allocation above 128 KiB (up to a dynamic 32 MiB) freshly and
    unmaps it on free, so each of a step's temporaries page-faults its way into memory again:
    on CPU that made a Heun step of the analytic model 1.7× slower. Above ``threshold`` (the
    state bands) allocations are still mapped and returned at once, and the heap's free top is
    trimmed beyond 2 × ``threshold``, so at most that much more memory is kept. Linux/glibc
    only; WSIGEN_MALLOC_TUNE=0 turns it off. Returns whether it was applied.
    """
    if sys.platform != "linux" or os.environ.get("WSIGEN_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(threshold))
                    and libc.mallopt(m_trim_threshold, int(2 * threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
