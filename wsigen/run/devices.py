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
