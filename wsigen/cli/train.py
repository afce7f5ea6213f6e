"""``wsigen train SLIDES... -o DIR``: parse the options into a TrainOptions and call
:func:`wsigen.training.train` with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError


def _mults(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(
            f"--mults must be comma-separated integers such as 1,2,2 (got {text!r})"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"--mults must be positive integers (got {text!r})")
    return vals


def _duration(text: str | None) -> float | None:
    """Seconds from '5400', '90m', '1.5h', '45s'."""
    if text is None:
        return None
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        v = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise UsageError(
            f"--time-limit must be seconds or a number with s/m/h (got {text!r})"
        ) from None
    if v <= 0:
        raise UsageError(f"--time-limit must be positive (got {text!r})")
    return v


def train_command(
    slides: Annotated[
        list[Path],
        typer.Argument(help="Slide files or folders (all slides in a folder, recursively)."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="Training folder: model.safetensors, train-state/, loss.jsonl."
        ),
    ],
    max_steps: Annotated[
        int | None,
        typer.Option(help="Total optimizer steps (counting resumed ones). (default 10000)", min=0),
    ] = None,
    time_limit: Annotated[
        str | None,
        typer.Option(
            help="Stop after this wall time (e.g. 5400, 90m, 1.5h), saving a resumable state."
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="Patches per step over all processes. (default 16)", min=1)
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="AdamW learning rate (after a linear warm-up). (default 1e-3)"),
    ] = None,
    patch: Annotated[
        int | None, typer.Option(help="Patch size M in pixels. (default 64)", min=8)
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="UNet base channels. (default 32)", min=4)
    ] = None,
    mults: Annotated[
        str | None,
        typer.Option(help="UNet channel multipliers per level, e.g. 1,2,2. (default 1,2,2)"),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Network: small (default), paper (Harb et al.: M=512, width 64, mults "
            "1,2,2,4,4,4, 2 blocks, attention at 32² and 16², dropout 0.1) or a JSON file of "
            "UNet fields. --patch/--width/--mults/--blocks/--attn-levels/--dropout override it."
        ),
    ] = None,
    blocks: Annotated[
        int | None, typer.Option(help="Residual blocks per UNet level. (default 1)", min=1)
    ] = None,
    attn_levels: Annotated[
        str | None,
        typer.Option(help="UNet levels with self-attention, e.g. 4,5 (0 = full resolution; "
                     "'none'). (default none)"),
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(help="Dropout in the residual blocks, 0..1. (default 0)")
    ] = None,
    mpp_min: Annotated[
        float | None, typer.Option(help="Finest µm/px trained. (default the slides' native µm/px)")
    ] = None,
    mpp_max: Annotated[
        float | None,
        typer.Option(help="Coarsest µm/px trained. (default a patch just fits the slide)"),
    ] = None,
    mpp_sampling: Annotated[
        str | None,
        typer.Option(help="How s is drawn: uniform (the paper) or log-uniform. (default uniform)"),
    ] = None,
    slide_mpp: Annotated[
        float | None,
        typer.Option("--mpp", help="µm/px of slides that do not record it (e.g. PNG)."),
    ] = None,
    tissue_threshold: Annotated[
        float | None,
        typer.Option(
            help="Least tissue fraction of a kept patch, 0..1. (default 0.25)", min=0, max=1
        ),
    ] = None,
    stain_normalise: Annotated[
        str | None,
        typer.Option(
            "--stain-normalise",
            help="Macenko-normalise patches to this reference image (or 'standard').",
        ),
    ] = None,
    final_mpp: Annotated[
        float | None,
        typer.Option(help="Default final µm/px recorded for sampling. (default mpp-min)"),
    ] = None,
    recommended_size: Annotated[
        int | None,
        typer.Option(
            help="Default sample size recorded for sampling. (default M·k^L, L ≤ 3)", min=1
        ),
    ] = None,
    sample_steps: Annotated[
        int | None,
        typer.Option(
            help="Default sampling steps N recorded in the model, used by previews. (default 40)",
            min=2,
        ),
    ] = None,
    sample_guided_steps: Annotated[
        int | None,
        typer.Option(help="Default guided steps r recorded in the model. (default 0.7·N)", min=0),
    ] = None,
    preview_every: Annotated[
        int | None,
        typer.Option(help="Write a preview grid every K steps (0: never). (default 1000)", min=0),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(help="Save model and train-state every K steps. (default 500)", min=1),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Class-conditional training: a slide,label CSV file (slide = file name "
                     "or path relative to a folder given) or 'folders' (each slide's parent folder "
                     "is its class). At least two classes; patches are drawn class-balanced."),
    ] = None,
    label_dropout: Annotated[
        float | None,
        typer.Option(help="Share of patches trained as 'no class' (for classifier-free guidance), "
                     "0 ≤ p < 1; only with --labels. (default 0.1)"),
    ] = None,
    morphology_weight: Annotated[
        float | None,
        typer.Option(help="α of the morphology-weighted loss: each pixel's loss × (1 + α·nuclei "
                     "mask), mean 1 per patch. (default 0: the plain EDM loss)"),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of initial weights, patches and noise. (default 0)")
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Start from the weights of this model (fine-tuning; same --width/--mults), "
            "e.g. 'default'."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto. (default auto)")] = None,
    loader_workers: Annotated[
        int | None,
        typer.Option(help="Patch-reading processes per training process, prefetching ahead of "
                     "the optimizer; the patches are the same for any number. (default "
                     "min(4, CPUs per training process))", min=0, max=64),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Training processes (with --device cpu: gloo), started and watched "
                     "here; --batch is split over them.", min=1),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(help="CUDA training processes, one device each (an error where there "
                     "are fewer).", min=1),
    ] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option(help="Micro-batches per optimizer step on each process. (default 1)", min=1),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="fp32, bf16 or fp16. (default fp32 on CPU, bf16 on CUDA)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from DIR/train-state exactly.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start again in a non-empty DIR.")
    ] = False,
) -> None:
    """Train a denoiser on your slides (EDM loss at random µm/px); writes DIR/model.safetensors."""
    from .. import training
    from ..nets import archs

    if resume and overwrite:
        raise UsageError("--resume and --overwrite cannot be used together")
    # built and validated once here; None: not given (the default, or on --resume the saved value)
    options = training.TrainOptions.parse(
        max_steps=max_steps,
        time_limit=_duration(time_limit),
        batch=batch,
        lr=lr,
        **training.arch_options(
            arch, patch=patch, width=width, mults=_mults(mults), blocks=blocks,
            attn_levels=archs.parse_levels(attn_levels), dropout=dropout,
        ),
        mpp_min=mpp_min,
        mpp_max=mpp_max,
        mpp_sampling=mpp_sampling,
        slide_mpp=slide_mpp,
        tissue_threshold=tissue_threshold,
        stain_normalise=stain_normalise,
        labels=labels,
        label_dropout=label_dropout,
        morphology_weight=morphology_weight,
        final_mpp=final_mpp,
        recommended_size=recommended_size,
        sample_steps=sample_steps,
        sample_guided_steps=sample_guided_steps,
        preview_every=preview_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
        init_from=init_from,
        device=device,
        loader_workers=loader_workers,
        grad_accum=grad_accum,
        precision=precision,
    )
    paths = [str(s) for s in slides]
    if workers is None and gpus is None:  # this process (or one rank of accelerate launch/torchrun)
        summary = training.train(paths, output, options, resume=resume, overwrite=overwrite)
    else:
        from ..training import launch

        summary = launch.train_job(paths, output, options, workers=workers, gpus=gpus,
                                   resume=resume, overwrite=overwrite)
    state = "finished" if summary["finished"] else "stopped (resume with --resume)"
    typer.echo(f"{state} at step {summary['step']}: {summary['checkpoint']}")


def _hint(kw) -> str:
    return f"the training state is saved: run the same command with --resume -o {kw.get('output')}"


def register(app: typer.Typer) -> None:
    from .app import command

    app.command("train", no_args_is_help=True)(command(_hint)(train_command))
