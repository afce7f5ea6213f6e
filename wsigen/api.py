"""The Python entry points; the CLI only parses options and calls these."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from .errors import UsageError, WsigenError
from .method import cascade
from .method.cascade import Settings
from .run import accel, sampler
from .run.devices import resolve_device
from .slides import checkpoint
from .slides.exporting import export  # noqa: F401  (re-exported: wsigen.export)
from .slides.store import SlideStore, info  # noqa: F401  (info re-exported: wsigen.info)
from .version import __version__

# Options that form a slide's configuration (stored in the store; --resume reuses them).
CONFIG_KEYS = ("width", "height", "mpp", "model", "patch", "seed", "steps", "guided_steps", "solver",
               "batch", "precision", "grid_shift", "skip_background", "background_tolerance",
               "sigma_min", "sigma_max", "rho", "device_type", "threads", "state_dtype", "channels_last",
               "compile")
DEFAULT_BG_TOLERANCE = 4.0  # grey levels
KEY_KEYS = tuple(k for k in CONFIG_KEYS if k != "model") + ("model_sha256",)


def parse_size(size: str | int | tuple[int, int]) -> tuple[int, int]:
    """'S' or 'WxH' (or an int, or (W, H)) → (W, H), both ≥ 1."""
    if isinstance(size, tuple):
        w, h = size
    elif isinstance(size, int):
        w = h = size
    else:
        text = str(size).strip().lower()
        parts = text.split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"size must be S or WxH in pixels (got {size!r})") from None
        if len(vals) == 1:
            w = h = vals[0]
        elif len(vals) == 2:
            w, h = vals
        else:
            raise UsageError(f"size must be S or WxH in pixels (got {size!r})")
    if w < 1 or h < 1:
        raise UsageError(f"size must be positive (got {w}x{h})")
    if w > 2**22 or h > 2**22:
        raise UsageError(f"size {w}x{h} exceeds the supported maximum of {2**22} px per side")
    return w, h


def settings_of(cfg: dict) -> Settings:
    return Settings(steps=cfg["steps"], guided_steps=cfg["guided_steps"], solver=cfg["solver"],
                    batch=cfg["batch"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
                    rho=cfg["rho"], precision=cfg["precision"], grid_shift=cfg["grid_shift"],
                    skip_background=cfg["skip_background"],
                    background_tolerance=cfg["background_tolerance"],
                    state_dtype=cfg.get("state_dtype", "float32"),
                    channels_last=bool(cfg.get("channels_last", False)),
                    compile=bool(cfg.get("compile", False))).validate()


def check_mpp_range(plans, model_cfg: dict, allow_extrapolation: bool) -> None:
    lo, hi = model_cfg["mpp_range"]
    s0, sl = plans[0].mpp, plans[-1].mpp
    if allow_extrapolation:
        return
    if not lo <= s0 <= hi:
        raise WsigenError(f"stage 0 would sample at s_0 = {s0:g} µm/px (L = {len(plans) - 1}), outside "
                          f"the model's trained range {lo:g}–{hi:g} µm/px; choose another --mpp or "
                          f"--size, or pass --allow-extrapolation")
    if not lo <= sl <= hi:
        raise WsigenError(f"final µm/px {sl:g} lies outside the model's trained range {lo:g}–{hi:g}; "
                          f"choose another --mpp or pass --allow-extrapolation")


def build_config(model: checkpoint.LoadedModel, model_spec: str, requested: dict,
                 device: torch.device) -> dict:
    mc = model.config
    steps = requested.get("steps", mc["steps"])
    guided = requested.get("guided_steps")
    if guided is None:
        guided = min(steps, round(steps * mc["guided_steps"] / mc["steps"]))
    w, h = parse_size(requested.get("size", mc["recommended_size"]))
    threads = requested.get("threads", sampler.default_threads())
    cfg = {
        "width": w, "height": h, "mpp": float(requested.get("mpp", mc["final_mpp"])),
        "model": str(model_spec), "model_sha256": model.sha256, "patch": model.patch,
        "seed": int(requested.get("seed", 0)), "steps": steps, "guided_steps": guided,
        "solver": requested.get("solver", "heun"), "batch": requested.get("batch", 8),
        "precision": requested.get("precision", "fp32"),
        "grid_shift": requested.get("grid_shift", True) is not False,
        "skip_background": requested.get("skip_background", True) is not False,
        "background_tolerance": float(requested.get("background_tolerance", DEFAULT_BG_TOLERANCE)),
        "sigma_min": mc["sigma_min"], "sigma_max": mc["sigma_max"], "rho": mc["rho"],
        "device_type": device.type, "threads": threads if device.type == "cpu" else None,
        "state_dtype": requested.get("state_dtype", "float32"),
        # NHWC: 1.5× faster on this CPU for the default model (64² patches), and the GPU layout
        "channels_last": bool(requested.get("channels_last", True)),
        "compile": bool(requested.get("compile", False)),
    }
    if not cfg["mpp"] > 0 or cfg["mpp"] == float("inf"):
        raise UsageError(f"--mpp must be a positive number (got {cfg['mpp']:g})")
    if cfg["seed"] < 0:
        raise UsageError(f"--seed must be non-negative (got {cfg['seed']})")
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise UsageError(f"--threads must be at least 1 (got {cfg['threads']})")
    return cfg


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


def _merge_resume(stored: dict, requested: dict) -> dict:
    conflicts = []
    for key, val in requested.items():
        if key == "size":
            w, h = parse_size(val)
            if (w, h) != (stored["width"], stored["height"]):
                conflicts.append(f"size {w}x{h} (store: {stored['width']}x{stored['height']})")
        elif key in stored and val != stored[key]:
            conflicts.append(f"{key} {val!r} (store: {stored[key]!r})")
    if conflicts:
        raise UsageError("--resume: options conflict with the store's configuration: " + "; ".join(conflicts)
                         + " — drop them to continue with the stored ones")
    return dict(stored)


def preflight_state_device(choice: str, dev: torch.device) -> None:
    """Refuse a bad ``--state-device`` before anything is read or written."""
    from .run import preflight

    preflight.state_device(choice, dev.type, 0, 0, None)


def _state_device(choice: str, dev: torch.device, plans, lm, settings: Settings, world: int) -> str:
    """``--state-device``: this process's band on the GPU when it fits (see preflight.state_device)."""
    from .method import planning
    from .run import preflight

    mem = planning.memory_per_rank(plans[-1].height, plans[-1].width, lm.patch, lm.config["k"], world,
                                   settings.batch, sum(p.numel() for p in lm.denoiser.parameters()),
                                   settings.state_torch_dtype.itemsize)
    state = min(mem["state"], 3 * plans[-1].height * plans[-1].width * settings.state_torch_dtype.itemsize)
    free = preflight.device_free_memory(dev) if dev.type == "cuda" else None
    return preflight.state_device(choice, dev.type, state, mem["buffers"] + mem["model"], free)


def _preflight(plans, lm, settings, dev, topo, out, checkpoint_every, store):
    """Refuse before anything is written when memory or disk cannot hold the slide (rank 0 decides).

    Returns rank 0's ``preflight.Needs`` (``state_line()`` says the state per process), else None.
    """
    from .run import preflight

    error = needs = None
    if topo.rank == 0:
        needs = preflight.estimate(
            plans, lm.patch, lm.config["k"], settings.batch,
            sum(p.numel() for p in lm.denoiser.parameters()), world=topo.world,
            processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", topo.world)),
            checkpoint=checkpoint_every > 0, device_type=dev.type,
            state_bytes=settings.state_torch_dtype.itemsize,
            on_disk=store.disk_bytes() if store is not None else 0)
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


def sample(out: str | os.PathLike, size=None, *, model: str | None = None, mpp: float | None = None,
           seed: int | None = None, steps: int | None = None, guided_steps: int | None = None,
           solver: str | None = None, batch: int | None = None, device: str = "auto",
           patch: int | None = None, precision: str | None = None, state_dtype: str | None = None,
           channels_last: bool | None = None, compile: bool | None = None, grid_shift: bool | None = None,
           state_device: str = "auto",
           skip_background: bool | None = None, background_tolerance: float | None = None,
           threads: int | None = None, overwrite: bool = False, resume: bool = False,
           allow_extrapolation: bool = False, drop_stages: bool = False,
           checkpoint_every: int | None = None, progress: sampler.Progress | None = None,
           topology: sampler.Topology | None = None, log=None, source: dict | None = None) -> dict:
    """Sample one synthetic slide into the zarr store ``out``; returns a summary dict.

    ``source`` (from ``wsigen.upscale``) makes an existing image stage 0 instead of sampling it.
    """
    t_start = time.perf_counter()
    requested = {k: v for k, v in dict(
        size=size, mpp=mpp, seed=seed, steps=steps, guided_steps=guided_steps, solver=solver,
        batch=batch, precision=precision, grid_shift=grid_shift, skip_background=skip_background,
        background_tolerance=background_tolerance, threads=threads, patch=patch, state_dtype=state_dtype,
        channels_last=channels_last, compile=compile,
        model=model).items() if v is not None}
    dev = resolve_device(device)
    preflight_state_device(state_device, dev)
    accel.tune_host_allocator()
    topo = topology or sampler.Topology()
    if resume:
        if overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if not Path(out).exists():
            raise WsigenError(f"--resume: {out} does not exist; start it without --resume")
        store = SlideStore.open(out, mode="r+")
        if store.complete:
            raise WsigenError(f"{out} is already complete; nothing to resume")
        requested.pop("threads", None) if dev.type != "cpu" else None
        cfg = _merge_resume(store.info["config"], requested)
        if cfg["device_type"] != dev.type:
            raise WsigenError(f"--resume: the store was started on {cfg['device_type']}, this run would use "
                              f"{dev.type}; bytes would differ (pass --device {cfg['device_type']})")
        lm = checkpoint.load_model(cfg["model"], patch=cfg["patch"])
        if lm.sha256 != cfg["model_sha256"]:
            raise WsigenError(f"--resume: model {cfg['model']} has changed since the store was started "
                              f"(sha256 {lm.sha256[:12]}… ≠ {cfg['model_sha256'][:12]}…)")
    else:
        spec = model or "default"
        lm = checkpoint.load_model(spec, patch=patch)
        check_output(out, overwrite)
        cfg = build_config(lm, spec, requested, dev)
        if source:
            cfg.update(source)
        store = None
    if dev.type == "cpu" and cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    settings = settings_of(cfg)
    if cfg.get("input"):
        from .run import upscaling as up

        plans = up.plans_for(cfg, lm.config["k"])
        up.check_range(plans, lm.config, allow_extrapolation)
    else:
        plans = cascade.plan_stages(cfg["width"], cfg["height"], lm.patch, lm.config["k"], cfg["mpp"])
        check_mpp_range(plans, lm.config, allow_extrapolation)
    if checkpoint_every is None:
        big = plans[-1].height * plans[-1].width >= 4096 * 4096
        checkpoint_every = max(1, settings.steps // 4) if big else 0
    _preflight(plans, lm, settings, dev, topo, out, checkpoint_every, store)
    if log and topo.rank == 0:
        log(f"{cfg['width']}x{cfg['height']} px at {cfg['mpp']:g} µm/px: L = {len(plans) - 1}, "
            f"s_0 = {plans[0].mpp:g} µm/px, patch {lm.patch}, {settings.steps} {settings.solver} steps, "
            f"{settings.guided_steps} guided, model {cfg['model']} ({lm.sha256[:12]}), seed {cfg['seed']}")
    lm = replace(lm, denoiser=accel.prepare(lm.denoiser, dev, channels_last=settings.channels_last,
                                            compile=settings.compile))
    where = _state_device(state_device, dev, plans, lm, settings, topo.world)
    if log and topo.rank == 0 and dev.type == "cuda":
        log(f"state band in {'GPU' if where == 'cuda' else 'host'} memory (--state-device {state_device})")
    if store is None:
        info = {"torch_version": torch.__version__, "config": cfg, "seed": cfg["seed"],
                "key": {k: cfg.get(k) for k in KEY_KEYS},
                "model": {"name": cfg["model"], "sha256": lm.sha256, "config": lm.config},
                "mpp_per_stage": [p.mpp for p in plans]}
        stages = [{"index": p.index, "height": p.height, "width": p.width, "mpp": p.mpp,
                   "path": "0" if p.index == len(plans) - 1 else f"stages/{p.index}"} for p in plans]
        if topo.rank == 0:
            store = SlideStore.create(out, stages=stages, final=(cfg["height"], cfg["width"]),
                                      info=info, overwrite=overwrite)
        topo.barrier()
        if store is None:
            store = SlideStore.open(out, mode="r+")
    if cfg.get("input") and topo.rank == 0 and not store.stage_complete(0):
        from .run import upscaling as up

        up.write_input(store, cfg)
    topo.barrier()
    if cfg.get("input") and topo.rank != 0:
        store = SlideStore.open(out, mode="r+")  # zarr caches attributes: see stage 0 as complete
    stats = sampler.run(store, lm, plans, settings, cfg["seed"], dev, (cfg["height"], cfg["width"]),
                        topo=topo, progress=progress, checkpoint_every=checkpoint_every,
                        state_device=dev if where == "cuda" else "cpu")
    if topo.rank == 0:
        store.finalize(cfg["mpp"], name=Path(out).name, drop_stages=drop_stages)
    topo.barrier()
    wall = time.perf_counter() - t_start
    return {
        "output": str(out), "width": cfg["width"], "height": cfg["height"], "mpp": cfg["mpp"],
        "stages": len(plans), "L": len(plans) - 1, "s0": plans[0].mpp,
        "mpp_per_stage": [p.mpp for p in plans], "model": cfg["model"],
        "model_sha256": cfg["model_sha256"], "seed": cfg["seed"], "steps": cfg["steps"],
        "guided_steps": cfg["guided_steps"], "device": dev.type,
        "evaluations": topo.all_sum(stats["evaluations"]), "patches": topo.all_sum(stats["patches"]),
        "skipped": topo.all_sum(stats["skipped"]), "wall_s": round(wall, 3), "version": __version__,
        "skip_background": cfg["skip_background"],
    }


def plan(size=None, *, model: str = "default", mpp: float | None = None, patch: int | None = None,
         steps: int | None = None, solver: str = "heun", batch: int = 8, seed: int = 0,
         world: int = 1, device: str = "auto", precision: str = "fp32", measure: bool = False,
         throughput: float | None = None, measure_seconds: float = 3.0, compile: bool = False,
         channels_last: bool | None = None, state_dtype: str = "float32") -> dict:
    """Stages, patches, denoiser evaluations, memory per process, disk and an estimated wall time."""
    from .method import planning

    if world < 1:
        raise UsageError(f"process count must be at least 1 (got {world})")
    if state_dtype not in ("float32", "float16"):
        raise UsageError(f"--state-dtype must be float32 or float16 (got {state_dtype})")
    lm = checkpoint.load_model(model, patch=patch)
    mc = lm.config
    w, h = parse_size(size or mc["recommended_size"])
    mpp = float(mpp or mc["final_mpp"])
    n = steps or mc["steps"]
    c = planning.count(w, h, lm.patch, mc["k"], mpp, n, seed, heun=solver == "heun")
    plans = cascade.plan_stages(w, h, lm.patch, mc["k"], mpp)
    params = sum(p.numel() for p in lm.denoiser.parameters())
    out = {"width": w, "height": h, "mpp": mpp, "model": model, "patch": lm.patch, "steps": n,
           "solver": solver, "processes": world, **c,
           "memory_per_process": planning.memory_per_rank(plans[-1].height, plans[-1].width, lm.patch,
                                                          mc["k"], world, batch, params,
                                                          2 if state_dtype == "float16" else 4),
           "disk": planning.disk_bytes(plans, w, h, 2 if state_dtype == "float16" else 4)}
    if measure:
        from .run.throughput import measure_throughput

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


def upscale(input, out, **options) -> dict:
    """Super-resolve an image or slide region (see ``wsigen.run.upscaling.upscale``)."""
    from .run.upscaling import upscale as run_upscale

    return run_upscale(input, out, **options)
