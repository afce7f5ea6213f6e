"""Device options: which torch device a run uses (``--device cpu|cuda|auto``)."""

from __future__ import annotations

import torch

from ..errors import UsageError, WsigenError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WsigenError("--device cuda: no CUDA device is available (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto (got {device})")
    return torch.device(device)


def make_deterministic(device: torch.device) -> None:
    """The kernel choices the same-bytes promise needs on CUDA (design.md §2, "Determinism").

    cuDNN may pick its convolution algorithm by timing (``benchmark``) and use non-deterministic
    ones; both are turned off, so the same shapes give the same bits in every process, after a
    resume, and whether the state waits on the GPU or in host memory. cuBLAS matmuls and the
    attention kernels are deterministic for fixed shapes in inference. TF32 stays at torch's
    defaults (off for matmuls, on for cuDNN convolutions): it changes values, not repeatability.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
