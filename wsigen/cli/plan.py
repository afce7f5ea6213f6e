"""``wsigen plan``: what a slide will cost, before sampling it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from . import options as opt


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _duration(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


def register(app: typer.Typer) -> None:
    from .app import command

    @app.command()
    @command()
    def plan(
        size: Annotated[str | None, typer.Option(help="S or WxH [default: the model's recommended size].")] = None,
        model: Annotated[str, typer.Option(help="Checkpoint file, training folder or built-in name.")] = "default",
        mpp: Annotated[float | None, typer.Option(help="Final µm/px [default: from the model].")] = None,
        patch: Annotated[int | None, typer.Option(help="Patch size M (models without one).", min=2)] = None,
        steps: Annotated[int | None, typer.Option(help="Solver steps N.", min=2)] = None,
        solver: opt.SolverOption = None,
        guided_steps: Annotated[int | None, typer.Option(help="r: steps i < r are projected.", min=0)] = None,
        preset: opt.PresetOption = None,
        guided_sigma: opt.GuidedSigmaOption = None,
        start_sigma: opt.StartSigmaOption = None,
        stage_steps: opt.StageStepsOption = None,
        guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance w of a class-conditional run: w ≠ 0, 1 doubles the network evaluations (and the batch in each pass).", min=0)] = None,
        batch: Annotated[int, typer.Option(help="Patches per forward pass.", min=1)] = 8,
        gpus: Annotated[int | None, typer.Option(help="Plan for N GPU processes.", min=1)] = None,
        workers: Annotated[int | None, typer.Option(help="Plan for N processes.", min=1)] = None,
        seed: Annotated[int, typer.Option(help="Seed (grid offsets decide exact patch counts).", min=0)] = 0,
        measure: Annotated[bool, typer.Option(help="Time the model on this machine for the estimate.")] = False,
        throughput: Annotated[float | None, typer.Option(help="Known evaluations/s per process on the target device.", min=0)] = None,
        device: Annotated[str, typer.Option(help="Device for --measure.")] = "auto",
        precision: Annotated[str, typer.Option(help="Precision for --measure.")] = "fp32",
        compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model for --measure (as sample --compile).")] = False,
        channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help="Memory format for --measure [default: on].")] = None,
        state_dtype: Annotated[str, typer.Option(help="float32 or float16 state (as sample --state-dtype).")] = "float32",
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    ):
        """Stages, patches, denoiser evaluations, memory per process, disk and estimated time."""
        from .. import api

        p = api.plan(size, model=model, mpp=mpp, patch=patch, steps=steps, batch=batch, seed=seed,
                     world=gpus or workers or 1, device=device, precision=precision, measure=measure,
                     throughput=throughput, compile=compile, channels_last=channels_last,
                     state_dtype=state_dtype, preset=preset, solver=solver, guided_steps=guided_steps,
                     guided_sigma=guided_sigma, start_sigma=start_sigma, stage_steps=stage_steps,
                     guidance=guidance)
        if as_json:
            typer.echo(json.dumps(p, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{p['width']}x{p['height']} px at {p['mpp']:g} µm/px — model {p['model']}, "
                        f"M = {p['patch']}, N = {p['steps']}, {p['solver']}, {p['processes']} process(es)"
                        + (f", preset {p['preset']}" if p.get("preset") else "")
                        + (f", guidance w = {p['guidance']:g}" if p.get("guidance") is not None else ""))
        for col in ("stage", "canvas", "µm/px", "steps", "patches/step", "denoiser evaluations"):
            t.add_column(col, justify="right")
        for s in p["stages"]:
            t.add_row(str(s["index"]), f"{s['width']}x{s['height']}", f"{s['mpp']:g}", str(s["steps"]),
                      f"{s['patches_per_step']:,}", f"{s['evaluations']:,}")
        con = Console()
        con.print(t)
        mem, disk = p["memory_per_process"], p["disk"]
        twice = (f", {p['denoiser_calls']:,} guided denoiser calls of two each"
                 if p.get("denoiser_calls") not in (None, p["evaluations"]) else "")
        con.print(f"total: {p['evaluations']:,} denoiser evaluations ({p['patch_steps']:,} patch steps{twice})")
        hist = f"multistep history {_gb(mem['history'])}, " if "history" in mem else ""
        con.print(f"memory per process: {_gb(mem['total'])} (state {_gb(mem['state'])}, {hist}guide "
                  f"{_gb(mem['guide'])}, buffers {_gb(mem['buffers'])}, model {_gb(mem['model'])})")
        con.print(f"disk (uncompressed bound): {_gb(disk['total'])} (stages {_gb(disk['stages'])}, "
                  f"level 0 {_gb(disk['level0'])}, pyramid {_gb(disk['pyramid'])}, mid-stage state "
                  f"{_gb(disk['state'])})")
        if "estimated_seconds" in p:
            src = f"measured on {p['measured_on']}" if "measured_on" in p else "given"
            con.print(f"estimated time: {_duration(p['estimated_seconds'])} at "
                      f"{p['throughput_per_process']:,.1f} evaluations/s per process ({src})")
        else:
            con.print("no time estimate: pass --measure or --throughput EVALS_PER_S")
