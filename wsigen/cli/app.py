"""The ``wsigen`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from ..errors import WsigenError
from ..run import stopping
from ..run.stopping import Terminated
from . import options as opt

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Synthetic gigapixel H&E whole-slide images with guided, grid-shifted diffusion.")
model_app = typer.Typer(no_args_is_help=True, help="Create and inspect checkpoints.")
app.add_typer(model_app, name="model")


def err(msg: str) -> None:
    typer.echo(f"wsigen: {msg}", err=True)


def command(resume_hint=None):
    """Decorator: WsigenError → one line + exit code; Ctrl-C/SIGTERM → 130/143 with a resume hint."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                with stopping.installed():
                    return fn(*args, **kwargs)
            except WsigenError as e:
                err(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt as e:
                hint = resume_hint(kwargs) if resume_hint else None
                what = "terminated" if isinstance(e, Terminated) else "interrupted"
                err(what + (f"; {hint}" if hint else ""))
                raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
            except OSError as e:
                err(_os_message(e))
                raise typer.Exit(1) from None
            except ModuleNotFoundError as e:  # an optional library this command needs (lazy imports)
                err(f"this needs the Python package {e.name or str(e)!r}, which is not installed here "
                    "(make install sets up every dependency)")
                raise typer.Exit(1) from None
            except MemoryError:
                err("out of memory; use a smaller --size, more --workers, or --batch 1")
                raise typer.Exit(1) from None
            except (typer.Exit, typer.Abort, click.exceptions.ClickException):
                raise
            except Exception as e:  # a bug, not bad input: still one line, traceback on request
                if os.environ.get("WSIGEN_DEBUG"):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                err(f"internal error: {type(e).__name__}: {first} (set WSIGEN_DEBUG=1 for the traceback; "
                    "please report it)")
                raise typer.Exit(1) from None

        return run

    return wrap


def _os_message(e: OSError) -> str:
    import errno

    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"write failed ({e.strerror}{where}); free disk space, then run the same command "
                f"with --resume to continue")
    return f"{e.strerror or e}{where}"


def _sample_hint(kw) -> str:
    return f"the store is resumable: wsigen sample --resume -o {kw.get('output')}"


def _skip_note(s: dict) -> str:
    if not s.get("skipped"):
        return ""
    return f" ({s['skipped'] / max(s['patches'], 1):.1%} of patch steps skipped as glass)"


def _emit(summary: dict, as_json: bool, line: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(line)


Output = Annotated[Path, typer.Option("-o", "--output", help="Output path.")]


@app.command()
@command(_sample_hint)
def sample(
    output: Output,
    size: Annotated[str | None, typer.Option(help="S or WxH in pixels [default: the model's recommended size].")] = None,
    mpp: Annotated[float | None, typer.Option(help="Final µm/px [default: from the model].")] = None,
    model: Annotated[str | None, typer.Option(help="Checkpoint file, training folder, or built-in: default, gaussian.")] = None,
    patch: Annotated[int | None, typer.Option(help="Patch size M (only for models without one, e.g. gaussian).", min=2)] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: 0].", min=0)] = None,
    steps: Annotated[int | None, typer.Option(help="Solver steps N [default: from the model].", min=2)] = None,
    guided_steps: Annotated[int | None, typer.Option(help="r: steps i < r are projected onto the previous stage.", min=0)] = None,
    solver: opt.SolverOption = None,
    preset: opt.PresetOption = None,
    guided_sigma: opt.GuidedSigmaOption = None,
    start_sigma: opt.StartSigmaOption = None,
    stage_steps: opt.StageStepsOption = None,
    class_name: opt.ClassOption = None,
    guidance: opt.GuidanceOption = None,
    batch: Annotated[int | None, typer.Option(help="Patches per forward pass [default: 8].", min=1)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 autocast [default: fp32].")] = None,
    state_dtype: Annotated[str | None, typer.Option(help="float32 or float16: the dtype the state is held in between steps (float16 halves its memory) [default: float32].")] = None,
    state_device: Annotated[str, typer.Option(help="auto, cpu or cuda: where the state band waits between steps (auto: on the GPU when it fits; same bytes either way).")] = "auto",
    channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help="NHWC memory format for the network [default: on].")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network (a warm-up of seconds to minutes; faster steps on GPUs).")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads per process (part of the reproducibility key).", min=1)] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes sharing the work (with --device cpu: gloo); same bytes for any number.", min=1)] = None,
    gpus: Annotated[int | None, typer.Option(help="CUDA workers, one device each (an error where there are fewer).", min=1)] = None,
    count: Annotated[int | None, typer.Option(help="Sample K slides, seeds seed … seed+K−1, into -o DIR with a manifest.", min=1)] = None,
    grid_shift: Annotated[bool, typer.Option("--grid-shift/--no-grid-shift", help="Shift the patch grid every step (off: fixed grid, for ablations).")] = True,
    skip_background: Annotated[bool, typer.Option("--skip-background/--no-skip-background", help="Skip the network in patches whose guide is glass everywhere.")] = True,
    background_tolerance: Annotated[float | None, typer.Option(help="Grey levels a guide pixel may differ from the glass colour and still count as glass [default: 4].", min=0)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save the mid-stage state every K steps (0: never) [default: N/4 for stages ≥ 4096²].", min=0)] = None,
    allow_extrapolation: Annotated[bool, typer.Option(help="Allow µm/px outside the model's trained range.")] = False,
    drop_stages: Annotated[bool, typer.Option(help="Remove the intermediate stages at the end.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output store.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted store with its stored configuration.")] = False,
    no_lock: Annotated[bool, typer.Option("--no-lock", help="Take no lock beside the store (only where the filesystem refuses locks and nothing else writes it).")] = False,
    no_fsync: Annotated[bool, typer.Option("--no-fsync", help="Do not force chunks and marks to disk (scratch runs: a power loss may lose a marked stage).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Sample a synthetic slide into a zarr (OME-NGFF) store."""
    from .. import api
    from ..run.progress import RichProgress

    bar = RichProgress(enabled=not os.environ.get("WSIGEN_NO_PROGRESS"))
    s = api.sample(output, size, workers=workers, gpus=gpus, count=count, model=model, mpp=mpp,
                   seed=seed, steps=steps, guided_steps=guided_steps, solver=solver, batch=batch, device=device, patch=patch, precision=precision,
                   state_dtype=state_dtype, state_device=state_device, channels_last=channels_last, compile=compile or None,
                   grid_shift=None if grid_shift else False, threads=threads,
                   skip_background=None if skip_background else False,
                   background_tolerance=background_tolerance, overwrite=overwrite,
                   resume=resume, allow_extrapolation=allow_extrapolation, drop_stages=drop_stages,
                   checkpoint_every=checkpoint_every, progress=bar, log=lambda m: err(m) if not as_json else None,
                   lock=not no_lock, fsync=not no_fsync, preset=preset, guided_sigma=guided_sigma,
                   start_sigma=start_sigma, stage_steps=stage_steps, class_name=class_name, guidance=guidance)
    if s is None:  # a rank other than 0 of an externally launched job: rank 0 reports
        return
    if "manifest" in s:
        _emit(s, as_json, f"done: {s['count']} slides ({s['sampled']} sampled now) → {s['manifest']}")
        return
    _emit(s, as_json, f"done: {s['width']}x{s['height']} px at {s['mpp']:g} µm/px, {s['stages']} stages "
          f"(s_0 = {s['s0']:g} µm/px)" + (f", class {s['class']} (w = {s['guidance']:g})" if s.get("class") else "")
          + f", {s['evaluations']:,} denoiser evaluations"
          f"{_skip_note(s)} in {s['wall_s']:.1f} s "
          f"→ {s['output']}")


@model_app.command("init")
@command()
def model_init(
    output: Output,
    arch: Annotated[str | None, typer.Option(
        help="Network: small, paper or a JSON file of UNet fields (as wsigen train --arch); "
             "the options below override single fields. Without it: a tiny test net.")] = None,
    width: Annotated[int | None, typer.Option(help="Base channel width. (default 16)", min=4)] = None,
    mults: Annotated[str | None, typer.Option(
        help="Channel multipliers per level, comma-separated. (default 1,2,2)")] = None,
    blocks: Annotated[int | None, typer.Option(help="Residual blocks per level. (default 1)", min=1)] = None,
    attn: Annotated[str | None, typer.Option(
        "--attn", "--attn-levels", help="Levels with self-attention, comma-separated (0 = full res).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout in the residual blocks. (default 0)")] = None,
    patch: Annotated[int | None, typer.Option(help="Patch size M. (default 64, or the arch's)", min=8)] = None,
    mpp_min: Annotated[float, typer.Option(help="Lowest trained µm/px.")] = 0.25,
    mpp_max: Annotated[float, typer.Option(help="Highest trained µm/px.")] = 256.0,
    final_mpp: Annotated[float, typer.Option(help="Default final µm/px.")] = 1.0,
    recommended_size: Annotated[int, typer.Option(help="Default output size.")] = 512,
    steps: Annotated[int, typer.Option(help="Default steps N.", min=2)] = 40,
    guided_steps: Annotated[int, typer.Option(help="Default guided steps r.", min=0)] = 28,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    classes: Annotated[str | None, typer.Option(
        help="Make it class-conditional: comma-separated class names (at least two), e.g. tumour,normal.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the config as JSON.")] = False,
):
    """Create an untrained UNet checkpoint (for tests, speed measurements, or --init-from)."""
    from ..errors import UsageError
    from ..nets import UNetConfig, archs
    from ..slides import checkpoint

    try:
        m = tuple(int(v) for v in mults.split(",") if v.strip()) if mults is not None else None
    except ValueError:
        raise UsageError("--mults takes comma-separated integers") from None
    a = archs.parse_levels(attn, "--attn")
    names = archs.parse_classes(classes)
    if arch is not None:
        base = archs.resolve(arch)
        net, patch = base.net, patch if patch is not None else base.patch
    else:  # the tiny test net this command has always made
        net, patch = UNetConfig(width=16), patch if patch is not None else 64
    net = archs.override(net, width=width, mults=m, blocks=blocks, attn_levels=a, dropout=dropout)
    if patch % 2 ** (len(net.mults) - 1):
        raise UsageError(f"--patch {patch} must be a multiple of {2 ** (len(net.mults) - 1)} "
                         f"(for {len(net.mults)} UNet levels)")
    if output.exists() and not overwrite:
        raise WsigenError(f"output {output} exists; pass --overwrite to replace it")
    arch_d = {"width": net.width, "mults": list(net.mults), "blocks": net.blocks,
              "attn_levels": list(net.attn_levels), "dropout": net.dropout, "emb_freqs": net.emb_freqs}
    sha = checkpoint.init_model(output, arch_d, seed=seed, patch=patch, classes=names,
                                mpp_range=[mpp_min, mpp_max], final_mpp=final_mpp,
                                recommended_size=recommended_size, steps=steps, guided_steps=guided_steps)
    cfg = checkpoint.read_config(output)
    mults_text = ",".join(map(str, net.mults))
    _emit({"output": str(output), "sha256": sha, "config": cfg}, as_json,
          f"wrote {output} (sha256 {sha[:12]}…, patch {patch}, width {net.width}, mults {mults_text}"
          + (f", classes {', '.join(names)})" if names else ")"))


@model_app.command("info")
@command()
def model_info(
    model: Annotated[str, typer.Argument(help="Checkpoint file, training folder or built-in name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
):
    """Print a checkpoint's configuration."""
    from ..slides import checkpoint

    lm = checkpoint.load_model(model)
    params = sum(p.numel() for p in lm.denoiser.parameters())
    d = {"model": model, "sha256": lm.sha256, "parameters": params, "config": lm.config}
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"model      {model}\nsha256     {lm.sha256}\nparameters {params:,}")
    for k, v in lm.config.items():
        typer.echo(f"{k:<17}{json.dumps(v)}")


def _register_commands() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name == "app":
            continue
        m = importlib.import_module(f"{__package__}.{mod.name}")
        if hasattr(m, "register"):
            m.register(app)


_register_commands()


def main() -> None:
    # A file-size limit must surface as EFBIG (handled: clear message, resumable store), not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
