"""What a slide costs before it is sampled: stages, patches, denoiser evaluations, time.

Counts are exact for a given seed (grid offsets are keyed, so the patches of every step are
known in advance); time comes from a measured or user-given throughput.
"""

from __future__ import annotations

import time

import torch

from . import gridshift
from .cascade import StagePlan, plan_stages


def stage_counts(plan: StagePlan, patch: int, k: int, steps: int, seed: int, heun: bool = True,
                 shift: bool = True) -> dict:
    """Patch steps and denoiser evaluations of one stage (stage 0: one M × M patch)."""
    per_step = []
    for i in range(steps):
        if plan.index == 0:
            per_step.append(1)
            continue
        oy, ox = gridshift.grid_offset(seed, plan.index, i, patch, k, shift)
        per_step.append(gridshift.patch_count(plan.height, plan.width, oy, ox, patch))
    evals = sum(n * (2 if heun and i < steps - 1 else 1) for i, n in enumerate(per_step))
    return {"index": plan.index, "height": plan.height, "width": plan.width, "mpp": plan.mpp,
            "patches_per_step": max(per_step), "patch_steps": sum(per_step), "evaluations": evals}


def count(width: int, height: int, patch: int, k: int, mpp: float, steps: int, seed: int = 0,
          heun: bool = True, shift: bool = True) -> dict:
    plans = plan_stages(width, height, patch, k, mpp)
    stages = [stage_counts(p, patch, k, steps, seed, heun, shift) for p in plans]
    return {"L": len(plans) - 1, "s0": plans[0].mpp, "stages": stages,
            "patch_steps": sum(s["patch_steps"] for s in stages),
            "evaluations": sum(s["evaluations"] for s in stages)}


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


def memory_per_rank(height: int, width: int, patch: int, k: int, world: int, batch: int,
                    params: int, state_bytes: int = 4) -> dict:
    """Bytes one process holds in the last (largest) stage: state band, guide band, buffers, model."""
    rows = -(-height // world) + patch  # a band plus the rows a shift can move into it
    state = 3 * rows * width * state_bytes
    guide = 3 * (-(-rows // k) + patch // k) * (-(-width // k))
    from .cascade import segment_cap

    # one row segment's x, u, x_next, u2, padding mask and guide, plus the network's batch copies
    buffers = 8 * segment_cap(batch, patch) * 3 * patch * patch * 4
    model = params * 4
    return {"state": state, "guide": guide, "buffers": buffers, "model": model,
            "total": state + guide + buffers + model}


def disk_bytes(plans: list[StagePlan], width: int, height: int, state_bytes: int = 4) -> dict:
    """Upper bounds (uncompressed) of the store: stages, level 0 + pyramid, mid-stage state."""
    stages = sum(3 * p.height * p.width for p in plans[:-1])
    level0 = 3 * width * height
    pyramid = level0 // 3  # 1/4 + 1/16 + … < 1/3
    state = 3 * plans[-1].height * plans[-1].width * state_bytes
    return {"stages": stages, "level0": level0, "pyramid": pyramid, "state": state,
            "total": stages + level0 + pyramid + state}
