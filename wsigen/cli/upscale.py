"""``wsigen upscale``: add detail to an existing image with the guided stages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from . import options as opt


def register(app: typer.Typer) -> None:
    from .app import _emit, _skip_note, command, err

    def hint(kw):
        flag = (f" --gpus {kw['gpus']}" if kw.get("gpus") else
                f" --workers {kw['workers']}" if kw.get("workers") else "")
        return (f"the store is resumable: wsigen upscale {kw.get('input')} --resume "
                f"-o {kw.get('output')}{flag}")

    @app.command()
    @command(hint)
    def upscale(
        input: Annotated[Path, typer.Argument(help="Image or slide (TIFF, OME-TIFF, SVS, NDPI, PNG, JPEG, …).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Output zarr store.")],
        factor: Annotated[int | None, typer.Option(help="Upscaling factor, a power of k (2) [default: 2].", min=1)] = None,
        target_mpp: Annotated[float | None, typer.Option(help="Target µm/px instead of --factor.")] = None,
        mpp: Annotated[float | None, typer.Option(help="µm/px of the input where the file does not say.")] = None,
        region: Annotated[str | None, typer.Option(help="x,y,w,h in level-0 pixels.")] = None,
        level: Annotated[int, typer.Option(help="Pyramid level to read the input from.", min=0)] = 0,
        model: Annotated[str | None, typer.Option(help="Checkpoint file, training folder, or built-in name.")] = None,
        patch: Annotated[int | None, typer.Option(help="Patch size M (models without one).", min=2)] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed [default: 0].", min=0)] = None,
        steps: Annotated[int | None, typer.Option(help="Solver steps N.", min=2)] = None,
        guided_steps: Annotated[int | None, typer.Option(help="Guided steps r.", min=0)] = None,
        solver: opt.SolverOption = None,
        preset: opt.PresetOption = None,
        guided_sigma: opt.GuidedSigmaOption = None,
        start_sigma: opt.StartSigmaOption = None,
        stage_steps: opt.StageStepsOption = None,
        class_name: opt.ClassOption = None,
        guidance: opt.GuidanceOption = None,
        batch: Annotated[int | None, typer.Option(help="Patches per forward pass.", min=1)] = None,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
        precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 autocast [default: fp32].")] = None,
        state_dtype: Annotated[str | None, typer.Option(help="float32 or float16 state between steps [default: float32].")] = None,
        channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help="NHWC memory format for the network [default: on].")] = None,
        compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network.")] = False,
        threads: Annotated[int | None, typer.Option(help="CPU threads per process (part of the reproducibility key).", min=1)] = None,
        workers: Annotated[int | None, typer.Option(help="Worker processes sharing the work (with --device cpu: gloo); same bytes for any number.", min=1)] = None,
        gpus: Annotated[int | None, typer.Option(help="CUDA workers, one device each (an error where there are fewer).", min=1)] = None,
        allow_extrapolation: Annotated[bool, typer.Option(help="Allow µm/px outside the model's range.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
        resume: Annotated[bool, typer.Option(help="Continue an interrupted store.")] = False,
        page: Annotated[int | None, typer.Option(help="Read this one plane (page, Z, T or channel) of an input with several.", min=0)] = None,
        channels: Annotated[str | None, typer.Option(help="i,j,k: read these three planes of an input's channel axis (or pages) as R, G, B.")] = None,
        no_lock: Annotated[bool, typer.Option("--no-lock", help="Take no lock beside the store (only where the filesystem refuses locks).")] = False,
        no_fsync: Annotated[bool, typer.Option("--no-fsync", help="Do not force chunks and marks to disk (scratch runs).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ):
        """Super-resolve an image or a slide region into a zarr (OME-NGFF) store."""
        from .. import api
        from ..run.progress import RichProgress

        bar = RichProgress(enabled=not os.environ.get("WSIGEN_NO_PROGRESS"))
        s = api.upscale(input, output, factor=factor, target_mpp=target_mpp, mpp=mpp, region=region,
                        level=level, model=model, patch=patch, seed=seed, steps=steps,
                        guided_steps=guided_steps, batch=batch, device=device, threads=threads,
                        solver=solver, preset=preset, guided_sigma=guided_sigma, start_sigma=start_sigma,
                        stage_steps=stage_steps, class_name=class_name, guidance=guidance,
                        precision=precision, state_dtype=state_dtype, channels_last=channels_last,
                        compile=compile or None,
                        workers=workers, gpus=gpus, allow_extrapolation=allow_extrapolation,
                        overwrite=overwrite, resume=resume, progress=bar, page=page, channels=channels,
                        lock=not no_lock, fsync=not no_fsync,
                        log=None if as_json else err)
        if s is None:  # a rank other than 0 of an externally launched job: rank 0 reports
            return
        _emit(s, as_json, f"done: {s['width']}x{s['height']} px at {s['mpp']:g} µm/px from {input} "
              f"({s['L']} stages)" + (f", class {s['class']} (w = {s['guidance']:g})" if s.get("class") else "")
              + f", {s['evaluations']:,} denoiser evaluations{_skip_note(s)} in "
              f"{s['wall_s']:.1f} s → {s['output']}")
