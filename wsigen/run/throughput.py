"""Measured denoiser throughput on a device (the time half of ``wsigen plan --measure``)."""

from __future__ import annotations

import time

import torch


def measure_throughput(denoiser: torch.nn.Module, patch: int, batch: int, device: torch.device,
                       precision: str = "fp32", seconds: float = 3.0, mpp: float = 1.0) -> float:
    """Denoiser evaluations (patches) per second at batch ``batch`` on ``device``."""
    x = torch.randn(batch, 3, patch, patch, device=device)
    sigma = torch.tensor([1.0], device=device)
    s = torch.tensor([mpp], device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), ctx:
        denoiser(x, sigma, s)  # warm-up
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            denoiser(x, sigma, s)
            n += 1
        sync()
    return n * batch / (time.perf_counter() - t0)
