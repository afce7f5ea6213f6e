"""What a slide will cost before it is sampled (``wsigen plan``): evaluations, memory, disk, time."""

from __future__ import annotations

from ..errors import UsageError
from ..method import classfree, planning, stages
from ..slides import checkpoint
from . import accel
from .classes import check_guidance
from .config import Request, parse_size
from .devices import resolve_device
from .presets import resolve as resolve_schedule


def plan(size=None, *, model: str = "default", mpp: float | None = None, patch: int | None = None,
         steps: int | None = None, solver: str | None = None, batch: int = 8, seed: int = 0,
         world: int = 1, device: str = "auto", precision: str = "fp32", measure: bool = False,
         throughput: float | None = None, measure_seconds: float = 3.0, compile: bool = False,
         channels_last: bool | None = None, state_dtype: str = "float32", preset: str | None = None,
         guided_steps: int | None = None, guided_sigma: float | None = None,
         start_sigma: float | None = None, stage_steps=None, grid_shift: bool = True,
         guidance: float | None = None) -> dict:
    """Stages, patches, denoiser evaluations, memory per process, disk and an estimated wall time."""
    if world < 1:
        raise UsageError(f"process count must be at least 1 (got {world})")
    req = Request.of(steps=steps, solver=solver, preset=preset, guided_steps=guided_steps,
                     guided_sigma=guided_sigma, start_sigma=start_sigma, stage_steps=stage_steps,
                     state_dtype=state_dtype)
    lm = checkpoint.load_model(model, patch=patch)
    mc = lm.config
    w, h = parse_size(size or mc["recommended_size"])
    mpp = float(mpp or mc["final_mpp"])
    sched = resolve_schedule(req, mc)
    n = sched.steps
    settings = stages.Settings(steps=n, guided_steps=sched.guided_steps, solver=sched.solver,
                               sigma_min=mc["sigma_min"], sigma_max=mc["sigma_max"], rho=mc["rho"],
                               grid_shift=grid_shift, guided_sigma=sched.guided_sigma,
                               start_sigma=sched.start_sigma, stage_steps=sched.stage_steps).validate()
    c = planning.count(w, h, lm.patch, mc["k"], mpp, n, seed, settings=settings)
    check_guidance(guidance)
    per_call = classfree.evaluations(guidance)
    if guidance is not None:  # network evaluations: twice per guided denoiser call (w ∉ {0, 1})
        c = {**c, "denoiser_calls": c["evaluations"], "evaluations": c["evaluations"] * per_call,
             "stages": [{**st, "evaluations": st["evaluations"] * per_call} for st in c["stages"]]}
    plans = stages.plan_stages(w, h, lm.patch, mc["k"], mpp)
    params = sum(p.numel() for p in lm.denoiser.parameters())
    history = settings.multistep
    out = {"width": w, "height": h, "mpp": mpp, "model": model, "patch": lm.patch, "steps": n,
           "solver": sched.solver, "guided_steps": sched.guided_steps, "processes": world, **c,
           "memory_per_process": planning.memory_per_rank(plans[-1].height, plans[-1].width, lm.patch,
                                                          mc["k"], world, batch * per_call, params,
                                                          2 if state_dtype == "float16" else 4,
                                                          history=history),
           "disk": planning.disk_bytes(plans, w, h, 2 if state_dtype == "float16" else 4, history=history)}
    out.update(sched.record())
    if guidance is not None:
        out["guidance"] = guidance
    if measure:
        from .throughput import measure_throughput

        dev = resolve_device(device)
        net = accel.prepare(lm.denoiser, dev, compile=compile,
                            channels_last=True if channels_last is None else channels_last)
        throughput = measure_throughput(net, lm.patch, batch, dev, precision,
                                                 seconds=measure_seconds, mpp=mpp)
        out["measured_on"] = dev.type
    if throughput:
        out["throughput_per_process"] = throughput
        out["estimated_seconds"] = c["evaluations"] / (throughput * world)
    return out
