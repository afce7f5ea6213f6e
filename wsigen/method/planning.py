"""What a slide costs before it is sampled: stages, patches, denoiser evaluations, time.

Counts are exact for a given seed (grid offsets are keyed, so the patches of every step are
known in advance); time comes from a measured (``wsigen.run.throughput``) or user-given throughput.
"""

from __future__ import annotations

from . import gridshift
from .stages import StagePlan, plan_stages


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
