"""The Python entry points; the CLI only parses options and calls these (docs/api.md).

Each function builds its typed configuration once (``wsigen.run.config``), from which every layer
below — the launcher, every rank, the store — takes what it needs.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .run.config import Request, RunSpec, model_config
from .slides.exporting import export  # noqa: F401  (re-exported: wsigen.export)
from .slides.store import info  # noqa: F401  (re-exported: wsigen.info)

# RunSpec fields a caller may give beside the request (the slide's own options)
_RUN_OPTIONS = ("state_device", "allow_extrapolation", "drop_stages", "checkpoint_every", "lock", "fsync")


def run_spec(out, size=None, *, device: str = "auto", resume: bool = False, overwrite: bool = False,
             **options) -> RunSpec:
    """The ``RunSpec`` of ``sample``'s (or ``upscale``'s) keyword arguments, checked."""
    run = {k: options.pop(k) for k in _RUN_OPTIONS if k in options}
    run = {k: v for k, v in run.items() if v is not None}
    return RunSpec(output=str(out), request=Request.of(size, **options), device=device, resume=resume,
                   overwrite=overwrite, **run).validate()


def _check_class(spec: RunSpec, count: int | None) -> None:
    """A class the model cannot draw is refused here, before any process starts (fresh runs; on
    --resume the store's class is checked against the given one)."""
    from .run.classes import check_class

    r = spec.request
    if not spec.resume and r.class_name is not None:
        check_class(r, model_config(r.model, r.patch), r.model or "default", count)


def sample(out: str | os.PathLike, size=None, *, model: str | None = None, mpp: float | None = None,
           seed: int | None = None, steps: int | None = None, guided_steps: int | None = None,
           solver: str | None = None, batch: int | None = None, device: str = "auto",
           patch: int | None = None, precision: str | None = None, state_dtype: str | None = None,
           channels_last: bool | None = None, compile: bool | None = None, grid_shift: bool | None = None,
           state_device: str = "auto", skip_background: bool | None = None,
           background_tolerance: float | None = None, threads: int | None = None,
           overwrite: bool = False, resume: bool = False, allow_extrapolation: bool = False,
           drop_stages: bool = False, checkpoint_every: int | None = None, workers: int | None = None,
           gpus: int | None = None, count: int | None = None, split: str = "auto", progress=None,
           topology=None, log=None, lock: bool = True, fsync: bool = True, preset: str | None = None,
           guided_sigma: float | None = None, start_sigma: float | None = None,
           stage_steps=None, class_name: str | None = None, guidance: float | None = None) -> dict | None:
    """Sample one synthetic slide (or ``count`` slides) into the zarr store ``out``; returns a summary.

    ``workers``/``gpus`` spread it over processes (the same bytes for any number); ``topology`` runs
    it as one rank of a job the caller set up. Returns None on ranks other than 0 of an externally
    launched job. ``preset`` (paper, fast), ``guided_sigma``, ``start_sigma`` and ``stage_steps``
    (e.g. "40,32,24", counted from the last stage back) choose the schedule (docs/api.md).
    ``class_name`` draws a class of a class-conditional model (with ``count``: "a,b" cycles through
    the classes) with classifier-free guidance weight ``guidance`` (default 1).
    """
    spec = run_spec(out, size, device=device, resume=resume, overwrite=overwrite, model=model, mpp=mpp,
                    preset=preset, guided_sigma=guided_sigma, start_sigma=start_sigma, stage_steps=stage_steps,
                    seed=seed, steps=steps, guided_steps=guided_steps, solver=solver, batch=batch,
                    patch=patch, precision=precision, state_dtype=state_dtype, channels_last=channels_last,
                    compile=compile, grid_shift=grid_shift, skip_background=skip_background,
                    background_tolerance=background_tolerance, threads=threads, state_device=state_device,
                    allow_extrapolation=allow_extrapolation, drop_stages=drop_stages,
                    checkpoint_every=checkpoint_every, lock=lock, fsync=fsync, class_name=class_name,
                    guidance=guidance)
    _check_class(spec, count)
    if topology is not None:
        from .run import launch, session

        if topology.rank != 0:
            return session.sample(spec, progress=progress, topology=topology, log=log)
        with launch.writer_lock(spec):
            return session.sample(spec, progress=progress, topology=topology, log=log)
    from .run import launch

    job = launch.make_job(spec, workers=workers, gpus=gpus, count=count, split=split, progress=progress,
                          log=log)
    return launch.run_job(job)


def upscale(input: str | os.PathLike, out: str | os.PathLike, *, factor: int | None = None,
            target_mpp: float | None = None, mpp: float | None = None, region=None, level: int = 0,
            resume: bool = False, overwrite: bool = False, workers: int | None = None,
            gpus: int | None = None, device: str = "auto", progress=None, log=None,
            page: int | None = None, channels=None, **options) -> dict | None:
    """Add detail to an existing image stage by stage; writes the same store as ``sample``.

    ``options`` are ``sample``'s slide options (model, seed, steps, …). ``workers``/``gpus``/``device``
    spread the guided stages over processes as in ``sample`` (the same bytes for any number). Returns
    the summary (None on ranks other than 0 of an externally launched job). ``page`` or ``channels``
    (i, j, k) pick the plane(s) of an input with several (pages, Z, T, channels as pages).
    """
    from .run import launch, source
    from .slides.planes import Planes

    planes = Planes.of(page, channels)

    spec = run_spec(out, device=device, resume=resume, overwrite=overwrite, **options)
    _check_class(spec, None)
    job = launch.make_job(spec, workers=workers, gpus=gpus, progress=progress, log=log,
                          command=f"wsigen upscale {input}")
    if not resume:
        src = source.open_source(input, mpp=mpp, level=level,
                                 region=source.parse_region(region) if isinstance(region, str) else region,
                                 planes=planes)
        # the model's k from its config: no torch work in a process that forks workers
        k = model_config(spec.request.model, spec.request.patch)["k"]
        L = source.factor_from(src, k, factor, target_mpp)
        f = k**L
        request = replace(job.spec.request, size=(src.width * f, src.height * f), mpp=src.mpp / f)
        job.spec = replace(job.spec, request=request, source=src, upscale_stages=L)
    return launch.run_job(job)


def plan(size=None, **options) -> dict:
    """Stages, patches, denoiser evaluations, memory per process, disk and an estimated wall time
    (``wsigen plan``; the options and their defaults are ``wsigen.run.estimate.plan``'s).

    The schedule options are ``sample``'s, resolved the same way, so the counts are exact;
    ``guidance`` w ∉ {0, 1} counts the two network evaluations of each guided call."""
    from .run import estimate

    return estimate.plan(size, **options)


def train(slides, out, **options) -> dict:
    """Train a denoiser on slides (``wsigen train``); see ``wsigen.training.train`` for the options
    (``labels="folders"`` or a ``slide,label`` CSV, ``label_dropout``, ``morphology_weight``, …)."""
    from .training import train as run

    return run(slides, out, **options)


def preview(path, output, **options) -> dict:
    """A figure of a slide: the whole slide and zooms (``wsigen preview``; ``wsigen.judge.preview``)."""
    from .judge.preview import preview as run

    return run(path, output, **options)


def evaluate(path, reference=(), training=(), options=None, progress=None) -> dict:
    """Quality and privacy report of a generated slide (``wsigen evaluate``; ``wsigen.judge.evaluate``)."""
    from .judge.evaluate import evaluate as run

    return run(path, reference, training, options, progress)
