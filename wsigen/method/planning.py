"""What a slide costs before it is sampled: stages, patches, denoiser evaluations, time.

Counts are exact for a given seed (grid offsets are keyed, so the patches of every step are
known in advance); time comes from a measured (``wsigen.run.throughput``) or user-given throughput.
"""

from __future__ import annotations

from . import gridshift, schedules
from .stages import Settings, StagePlan, plan_stages


def stage_counts(plan: StagePlan, patch: int, k: int, steps: int, seed: int, heun: bool = True,
                 shift: bool = True, solver: str | None = None) -> dict:
    """Patch steps and denoiser evaluations of one stage (stage 0: one M × M patch).

    ``solver`` (heun, euler, dpmpp2m) overrides ``heun`` when given."""
    solver = solver or ("heun" if heun else "euler")
    per_step = []
    for i in range(steps):
        if plan.index == 0:
            per_step.append(1)
            continue
        oy, ox = gridshift.grid_offset(seed, plan.index, i, patch, k, shift)
        per_step.append(gridshift.patch_count(plan.height, plan.width, oy, ox, patch))
    evals = sum(n * schedules.evaluations_per_step(solver, i == steps - 1) for i, n in enumerate(per_step))
    return {"index": plan.index, "height": plan.height, "width": plan.width, "mpp": plan.mpp, "steps": steps,
            "patches_per_step": max(per_step), "patch_steps": sum(per_step), "evaluations": evals}


def count(width: int, height: int, patch: int, k: int, mpp: float, steps: int, seed: int = 0,
          heun: bool = True, shift: bool = True, settings: Settings | None = None,
          plans: list[StagePlan] | None = None) -> dict:
    """Counts of every stage. With ``settings`` each stage takes its own steps and solver
    (``Settings.for_stage``: ``--stage-steps``, ``--solver``), and ``steps``/``heun`` are ignored."""
    plans = plans or plan_stages(width, height, patch, k, mpp)
    if settings is None:
        stages = [stage_counts(p, patch, k, steps, seed, heun, shift) for p in plans]
    else:
        per = [settings.for_stage(p.index, len(plans) - 1) for p in plans]
        stages = [stage_counts(p, patch, k, st.steps, seed, shift=settings.grid_shift and shift,
                               solver=st.solver) for p, st in zip(plans, per, strict=True)]
    return {"L": len(plans) - 1, "s0": plans[0].mpp, "stages": stages,
            "patch_steps": sum(s["patch_steps"] for s in stages),
            "evaluations": sum(s["evaluations"] for s in stages)}


def memory_per_rank(height: int, width: int, patch: int, k: int, world: int, batch: int,
                    params: int, state_bytes: int = 4, history: bool = False) -> dict:
    """Bytes one process holds in the last (largest) stage: state band, guide band, buffers, model.

    ``history``: a multistep solver's previous data prediction, a second band like the state."""
    rows = -(-height // world) + patch  # a band plus the rows a shift can move into it
    state = 3 * rows * width * state_bytes
    hist = state if history else 0
    guide = 3 * (-(-rows // k) + patch // k) * (-(-width // k))
    from .cascade import segment_cap

    # one row segment's x, u, x_next, u2, padding mask and guide, plus the network's batch copies
    buffers = 8 * segment_cap(batch, patch) * 3 * patch * patch * 4
    model = params * 4
    out = {"state": state, "guide": guide, "buffers": buffers, "model": model,
           "total": state + guide + buffers + model}
    if history:
        out["history"] = hist
        out["total"] += hist
    return out


def disk_bytes(plans: list[StagePlan], width: int, height: int, state_bytes: int = 4,
               history: bool = False) -> dict:
    """Upper bounds (uncompressed) of the store: stages, level 0 + pyramid, mid-stage state (with
    ``history``, a multistep solver's, saved beside it)."""
    stages = sum(3 * p.height * p.width for p in plans[:-1])
    level0 = 3 * width * height
    pyramid = level0 // 3  # 1/4 + 1/16 + … < 1/3
    state = 3 * plans[-1].height * plans[-1].width * state_bytes * (2 if history else 1)
    return {"stages": stages, "level0": level0, "pyramid": pyramid, "state": state,
            "total": stages + level0 + pyramid + state}
