"""One slide in this process (or as one rank of a job): resolve the run, check it, sample into the store.

``sample(spec)`` is what every rank runs: it opens (``--resume``) or creates the store, resolves the
request against the model into the store's ``SlideConfig``, refuses what cannot work before anything
is written (pre-flight), and runs the stages (``sampler.run``).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UsageError, WsigenError
from ..method import classfree, planning, stages
from ..slides import checkpoint
from ..slides.store import SlideStore
from ..version import __version__
from . import accel, oom, preflight, sampler, source
from .config import RunSpec, SlideConfig, check_mpp_range
from .devices import make_deterministic, resolve_device


def check_output(out, overwrite: bool) -> None:
    """Refuse an unusable output path before any work (SlideStore.create checks again)."""
    p = Path(out)
    parent = p.absolute().parent
    for d in [parent, *parent.parents]:
        if d.exists():
            if not d.is_dir():
                raise WsigenError(f"cannot create {p}: {d} is not a directory")
            break
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume to continue it")


def merge_resume(stored: dict, spec: RunSpec, dev: torch.device) -> SlideConfig:
    """The stored configuration, after checking that no given option contradicts it."""
    request = spec.request
    if dev.type != "cpu":
        request = replace(request, threads=None)
    batch = request.batch  # --resume --batch B: allowed (recorded by oom.record_batch_change)
    request = replace(request, batch=None)
    conflicts = request.conflicts_with(stored)
    if conflicts:
        raise UsageError("--resume: options conflict with the store's configuration: " + "; ".join(conflicts)
                         + " — drop them to continue with the stored ones")
    cfg = SlideConfig.from_store(stored)
    return cfg if batch is None else replace(cfg, batch=batch)


def _state_device(choice: str, dev: torch.device, plans, lm, settings: stages.Settings, world: int,
                  net_batch: int) -> str:
    """``--state-device``: this process's band on the GPU when it fits (see preflight.state_device)."""
    mem = planning.memory_per_rank(plans[-1].height, plans[-1].width, lm.patch, lm.config["k"], world,
                                   net_batch, sum(p.numel() for p in lm.denoiser.parameters()),
                                   settings.state_torch_dtype.itemsize)
    state = min(mem["state"], 3 * plans[-1].height * plans[-1].width * settings.state_torch_dtype.itemsize)
    state *= 2 if settings.multistep else 1  # a multistep solver's history is a second band
    free = preflight.device_free_memory(dev) if dev.type == "cuda" else None
    return preflight.state_device(choice, dev.type, state, mem["buffers"] + mem["model"], free)


def history_arg(settings: stages.Settings) -> dict:
    """``preflight.estimate``'s history flag, given only for a multistep solver."""
    return {"history": True} if settings.multistep else {}


def schedule_line(cfg: SlideConfig, settings: stages.Settings, last: int) -> str:
    """One log line: the schedule options in effect and each stage's steps."""
    per = [settings.for_stage(l, last).steps for l in range(last + 1)]
    parts = [f"preset {cfg.preset}"] if cfg.preset else []
    if cfg.guided_sigma is not None:
        parts.append(f"projected while t ≥ σ_r = {cfg.guided_sigma:.4g}")
    if cfg.start_sigma is not None:
        parts.append(f"guided stages start at σ = {cfg.start_sigma:g}")
    parts.append("steps per stage " + ",".join(map(str, per)))
    return "schedule: " + "; ".join(parts)


def _preflight(plans, lm, settings, dev, topo, out, checkpoint_every, store, net_batch=None):
    """Refuse before anything is written when memory or disk cannot hold the slide (rank 0 decides).

    Returns rank 0's ``preflight.Needs`` (``state_line()`` says the state per process), else None.
    ``net_batch``: patches per forward pass (twice ``--batch`` under classifier-free guidance).
    """
    error = needs = None
    if topo.rank == 0:
        needs = preflight.estimate(
            plans, lm.patch, lm.config["k"], net_batch or settings.batch,
            sum(p.numel() for p in lm.denoiser.parameters()), world=topo.world,
            processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", topo.world)),
            checkpoint=checkpoint_every > 0, device_type=dev.type,
            state_bytes=settings.state_torch_dtype.itemsize,
            on_disk=store.disk_bytes() if store is not None else 0, **history_arg(settings))
        try:
            preflight.check(needs, out)
        except WsigenError as e:
            error = e
    failed = topo.broadcast([int(error is not None)])[0] if topo.world > 1 else error is not None
    if error is not None:
        raise error
    if failed:
        raise WsigenError("pre-flight check failed on rank 0 (see its message)")
    return needs


def _open(spec: RunSpec, dev: torch.device):
    """(store or None, loaded model, resolved configuration) for a fresh or a resumed run."""
    out = spec.output
    if spec.resume:
        if not Path(out).exists():
            raise WsigenError(f"--resume: {out} does not exist; start it without --resume")
        store = SlideStore.open(out, mode="r+")
        if store.complete:
            raise WsigenError(f"{out} is already complete; nothing to resume")
        cfg = merge_resume(store.info["config"], spec, dev)
        if cfg.device_type != dev.type:
            raise WsigenError(f"--resume: the store was started on {cfg.device_type}, this run would use "
                              f"{dev.type}; bytes would differ (pass --device {cfg.device_type})")
        lm = checkpoint.load_model(cfg.model, patch=cfg.patch)
        if lm.sha256 != cfg.model_sha256:
            raise WsigenError(f"--resume: model {cfg.model} has changed since the store was started "
                              f"(sha256 {lm.sha256[:12]}… ≠ {cfg.model_sha256[:12]}…)")
        return store, _class_guided(lm, cfg), cfg
    name = spec.request.model or "default"
    lm = checkpoint.load_model(name, patch=spec.request.patch)
    check_output(out, spec.overwrite)
    cfg = SlideConfig.resolve(spec.request, lm, name, dev, spec.source, spec.upscale_stages)
    return None, _class_guided(lm, cfg), cfg


def _class_guided(lm, cfg: SlideConfig):
    """A class-conditional slide's denoiser: D_∅ + w·(D_c − D_∅) for its class (method.classfree)."""
    if cfg.class_name is None:
        return lm
    label = lm.class_label(cfg.class_name, cfg.guidance)
    if label != cfg.class_index:
        raise WsigenError(f"class {cfg.class_name!r} is number {label} of model {cfg.model}, "
                          f"the store recorded {cfg.class_index}")
    return replace(lm, denoiser=classfree.ClassGuided(lm.denoiser, label, cfg.guidance))


def _create(spec: RunSpec, cfg: SlideConfig, lm, plans, topo) -> SlideStore:
    """Rank 0 creates the store (the others wait and open it)."""
    info = {"torch_version": torch.__version__, "config": cfg.to_store(), "seed": cfg.seed,
            "key": cfg.key(), "model": {"name": cfg.model, "sha256": lm.sha256, "config": lm.config},
            "mpp_per_stage": [p.mpp for p in plans]}
    stages = [{"index": p.index, "height": p.height, "width": p.width, "mpp": p.mpp,
               "path": "0" if p.index == len(plans) - 1 else f"stages/{p.index}"} for p in plans]
    store = None
    if topo.rank == 0:
        store = SlideStore.create(spec.output, stages=stages, final=(cfg.height, cfg.width), info=info,
                                  overwrite=spec.overwrite, fsync=spec.fsync)
    topo.barrier()
    return store if store is not None else SlideStore.open(spec.output, mode="r+")


def sample(spec: RunSpec, *, progress: sampler.Progress | None = None,
           topology: sampler.Topology | None = None, log=None) -> dict:
    """Sample one slide into the zarr store ``spec.output``; returns a summary dict."""
    t_start = time.perf_counter()
    spec.validate()
    dev = resolve_device(spec.device)
    make_deterministic(dev)
    preflight.state_device(spec.state_device, dev.type, 0, 0, None)  # a bad choice, before any work
    accel.tune_host_allocator()
    topo = topology or sampler.Topology()
    store, lm, cfg = _open(spec, dev)
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    settings = cfg.settings()
    if cfg.source is not None:
        plans = source.plans_for(cfg.source, cfg.upscale_stages, lm.config["k"])
        source.check_range(plans, lm.config, spec.allow_extrapolation)
    else:
        plans = stages.plan_stages(cfg.width, cfg.height, lm.patch, lm.config["k"], cfg.mpp)
        check_mpp_range(plans, lm.config, spec.allow_extrapolation)
    checkpoint_every = spec.checkpoint_every
    if checkpoint_every is None:
        big = plans[-1].height * plans[-1].width >= 4096 * 4096
        checkpoint_every = max(1, settings.steps // 4) if big else 0
    net_batch = settings.batch * classfree.evaluations(cfg.guidance)
    _preflight(plans, lm, settings, dev, topo, spec.output, checkpoint_every, store, net_batch)
    if log and topo.rank == 0:
        log(f"{cfg.width}x{cfg.height} px at {cfg.mpp:g} µm/px: L = {len(plans) - 1}, "
            f"s_0 = {plans[0].mpp:g} µm/px, patch {lm.patch}, {settings.steps} {settings.solver} steps, "
            f"{settings.guided_steps} guided, model {cfg.model} ({lm.sha256[:12]}), seed {cfg.seed}"
            + (f", class {cfg.class_name} (guidance w = {cfg.guidance:g})" if cfg.class_name else ""))
        if cfg.preset or cfg.guided_sigma is not None or cfg.start_sigma is not None or cfg.stage_steps:
            log(schedule_line(cfg, settings, len(plans) - 1))
    lm = replace(lm, denoiser=accel.prepare(lm.denoiser, dev, channels_last=settings.channels_last,
                                            compile=settings.compile))
    where = _state_device(spec.state_device, dev, plans, lm, settings, topo.world, net_batch)
    if log and topo.rank == 0 and dev.type == "cuda":
        log(f"state band in {'GPU' if where == 'cuda' else 'host'} memory (--state-device {spec.state_device})")
    if store is None:
        store = _create(spec, cfg, lm, plans, topo)
    store.fsync = spec.fsync
    if spec.resume and topo.rank == 0:
        store.trust_marks(log)  # a mark counts only where the chunks it covers exist
        oom.record_batch_change(store, cfg.batch, log)
    if cfg.source is not None and topo.rank == 0 and not store.stage_complete(0):
        source.write_input(store, cfg.source)
    topo.barrier()
    if cfg.source is not None and topo.rank != 0:
        store = SlideStore.open(spec.output, mode="r+")  # zarr caches attributes: see stage 0 as complete
        store.fsync = spec.fsync
    stats = sampler.run(store, lm, plans, settings, cfg.seed, dev, (cfg.height, cfg.width),
                        topo=topo, progress=progress, checkpoint_every=checkpoint_every,
                        state_device=dev if where == "cuda" else "cpu")
    if topo.rank == 0:
        store.finalize(cfg.mpp, name=Path(spec.output).name, drop_stages=spec.drop_stages)
    topo.barrier()
    wall = time.perf_counter() - t_start
    return {
        "output": str(spec.output), "width": cfg.width, "height": cfg.height, "mpp": cfg.mpp,
        "stages": len(plans), "L": len(plans) - 1, "s0": plans[0].mpp,
        "mpp_per_stage": [p.mpp for p in plans], "model": cfg.model,
        "model_sha256": cfg.model_sha256, "seed": cfg.seed, "steps": cfg.steps,
        "guided_steps": cfg.guided_steps, "device": dev.type, "solver": cfg.solver,
        "steps_per_stage": [settings.for_stage(p.index, len(plans) - 1).steps for p in plans],
        # network evaluations: a guided call (w ∉ {0, 1}) evaluates the network twice
        "evaluations": topo.all_sum(stats["evaluations"]) * classfree.evaluations(cfg.guidance),
        "patches": topo.all_sum(stats["patches"]),
        "skipped": topo.all_sum(stats["skipped"]), "wall_s": round(wall, 3), "version": __version__,
        "skip_background": cfg.skip_background,
        **({"class": cfg.class_name, "guidance": cfg.guidance} if cfg.class_name else {}),
    }
