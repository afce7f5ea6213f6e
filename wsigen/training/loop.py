"""The training loop: EDM loss conditioned on µm/px, AdamW, EMA, Accelerate, resumable state.

``DIR/model.safetensors`` holds the EMA weights and the sampling config; ``DIR/train-state/``
(:mod:`.state`) holds what an exact resume needs. All randomness is keyed by (seed, step, rank, index)
(:mod:`.keyed`), so a resumed run draws the same patches, noise and dropout masks as an
uninterrupted one, whatever the number of loader processes (:mod:`.loader`) reading them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..errors import UsageError, WsigenError
from ..method import edm
from ..slides import checkpoint
from . import data, keyed, loader, log
from .config import TrainConfig, TrainOptions, default_sampling, ema_beta, learning_rate
from .progress import ProgressBar
from .sampling import grid_image, sample_patches, to_uint8, write_png
from .state import (
    KEYS_VERSION,
    OLD,
    PARTIAL,
    STATE_DIR,
    Reached,
    RunRecord,
    SavedState,
    has_state,
    load_state,
    save_state,
)

PREVIEW_DIR = "preview"


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves its state and exits 130/143."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def _resolve(
    options: TrainOptions, out: Path, resume: bool, overwrite: bool
) -> tuple[TrainConfig, SavedState | None]:
    """The run's config (the saved one on resume) and its saved state; clears DIR on overwrite."""
    if resume:
        if not has_state(out):
            raise WsigenError(f"--resume: no training state in {out} (expected {out / STATE_DIR})")
        saved = load_state(out)
        if saved.keys_version != KEYS_VERSION:
            raise WsigenError(
                f"--resume: {out / STATE_DIR} was written by an older wsigen whose patches and "
                "noise are drawn differently, so it cannot be resumed exactly; start again with "
                "--overwrite (or fine-tune its model with --init-from)"
            )
        return options.resumed(saved.config), saved
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise WsigenError(
                f"{out} exists and is not empty; use --resume to continue or --overwrite to "
                "start again"
            )
        for name in ("model.safetensors", STATE_DIR, OLD, PARTIAL, log.LOG_FILE, PREVIEW_DIR):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return options.config, None


def init_weights(net: torch.nn.Module, spec: str, arch: dict, training_data: str) -> str:
    """Start ``net`` from the weights of model ``spec`` (fine-tuning); same architecture only.

    Returns the training-data line of the new checkpoint, which names the starting model.
    """
    base = checkpoint.load_model(spec)
    if base.config["arch"] != arch:
        theirs = {k: v for k, v in base.config["arch"].items() if arch.get(k) != v}
        raise UsageError(
            f"--init-from {spec}: its network differs from this run's "
            f"({', '.join(f'{k}={v}' for k, v in sorted(theirs.items()))}); give the same "
            "--width/--mults as the model"
        )
    net.load_state_dict(base.denoiser.state_dict())
    return (
        f"fine-tuned from {base.name} (sha256 {base.sha256[:16]}…, trained on "
        f"{base.config.get('training_data') or 'unknown data'}) on {training_data}"
    )


def _describe_data(described: list[dict]) -> str:
    """The checkpoint's ``training_data`` line: each slide with its hash and µm/px."""
    return "; ".join(
        f"{d['name']} (sha256 {d['sha256'][:16]}…, {d['mpp']:.4g} µm/px)" if d["sha256"] else d["name"]
        for d in described
    )


def _sampler(cfg: TrainConfig, slides) -> data.PatchSampler:
    slides_data = data.load_slides(
        slides, mpp=cfg.slide_mpp, od_threshold=cfg.tissue_od, stain_ref=cfg.stain_normalise
    )
    target = data.reference_stain(cfg.stain_normalise) if cfg.stain_normalise else None
    return data.PatchSampler(
        slides_data,
        cfg.patch,
        cfg.mpp_min,
        cfg.mpp_max,
        cfg.tissue_threshold,
        cfg.mpp_sampling,
        stain_target=target,
    )


def train(
    slides,
    out,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    config: TrainConfig | None = None,
    **given,
) -> dict:
    """Train a UNet on the slides (files or folders) into ``out``; returns a summary dict.

    The run is ``options`` (see :class:`TrainOptions`), or ``config`` and/or keyword options
    (TrainConfig fields; None means "not given": the default, or on ``resume`` the saved value).
    On resume only RUN_CONTROL options may differ from the saved run.
    """
    from accelerate import Accelerator

    if options is None:
        options = TrainOptions.parse(config, **given)
    elif config is not None or given:
        raise UsageError("give train() either options or config/keyword options, not both")
    out = Path(out)
    cfg, saved = _resolve(options, out, resume, overwrite)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise WsigenError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=use_cpu, mixed_precision=_precision(cfg.precision, use_cpu))
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    if cfg.batch % (world * cfg.grad_accum):
        raise UsageError(f"--batch {cfg.batch} is not divisible by the {world} processes × "
                         f"--grad-accum {cfg.grad_accum}")
    local_batch = cfg.batch // world
    micro = local_batch // cfg.grad_accum

    sampler = _sampler(cfg, slides)
    sampling = default_sampling(cfg, sampler.mpp_min, sampler.mpp_max)
    described = sampler.describe()
    if saved is not None and saved.slide_hashes != [d["sha256"] for d in described]:
        raise UsageError(
            f"--resume with different slides than the saved run ({', '.join(saved.slide_names)})"
        )
    # the checkpoint's own config: a dict, as the file stores it
    ckpt_cfg = checkpoint.make_config(
        cfg.arch(),
        patch=cfg.patch,
        k=cfg.k,
        mpp_range=[sampler.mpp_min, sampler.mpp_max],
        recommended_size=sampling.recommended_size,
        final_mpp=sampling.final_mpp,
        steps=cfg.sample_steps,
        guided_steps=sampling.guided_steps,
        background=data.measured_background(sampler.slides),
        training_data=_describe_data(described),
    )
    sigma_data = ckpt_cfg["sigma_data"]
    preview_schedule = edm.Schedule(
        cfg.sample_steps, ckpt_cfg["sigma_min"], ckpt_cfg["sigma_max"], ckpt_cfg["rho"]
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # initial weights: a pure function of the seed
        net = checkpoint.build_denoiser(ckpt_cfg)
    if cfg.init_from is not None:  # on resume the saved weights replace these below
        line = init_weights(net, cfg.init_from, ckpt_cfg["arch"], ckpt_cfg["training_data"])
        ckpt_cfg = {**ckpt_cfg, "training_data": line}
    ema = checkpoint.build_denoiser(ckpt_cfg).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    before = Reached()
    if saved is not None:
        net.load_state_dict(saved.model)
        ema.load_state_dict(saved.ema)
        opt.load_state_dict(saved.optimizer_state())
        before = saved.reached
    step, images = before.step, before.images
    net, opt = acc.prepare(net, opt)
    ema.to(acc.device)
    if saved is not None and saved.scaler and acc.scaler is not None:
        acc.scaler.load_state_dict(saved.scaler)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        log.trim(out / log.LOG_FILE, step)
    run = RunRecord(cfg, described, world)

    def elapsed() -> float:
        return before.elapsed + time.time() - t_start

    def checkpoint_now():
        if main:
            checkpoint.save_checkpoint(
                out / "model.safetensors", ema, training_config(ckpt_cfg, step, images, cfg)
            )
            save_state(
                out, acc.unwrap_model(net), ema, opt, Reached(step, images, elapsed()), run, acc.scaler
            )
        acc.wait_for_everyone()

    def preview():
        if not main:
            return
        g = keyed.torch_generator(keyed.preview_rng(cfg.seed), "cpu")
        mpps = np.geomspace(sampler.mpp_min, sampler.mpp_max, 4).tolist() * 2
        ema.eval()
        x = sample_patches(ema, mpps, cfg.patch, preview_schedule, g, acc.device)
        (out / PREVIEW_DIR).mkdir(exist_ok=True)
        img = grid_image(to_uint8(x), cols=4)
        write_png(out / PREVIEW_DIR / f"step-{step:07d}.png", img)
        write_png(out / "preview.png", img)

    workers = cfg.loader_workers
    if workers is None:
        workers = loader.default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    batches = loader.Batches(sampler, cfg.seed, rank, local_batch, step, cfg.max_steps, workers, acc.device)
    t_start = time.time()
    losses, last_ckpt = [], step
    bar = ProgressBar(main and progress, cfg.max_steps, step)
    with _Stop() as stop, bar, contextlib.closing(batches):
        t_log, n_log, wait_log = time.time(), 0, 0.0
        while step < cfg.max_steps:
            # one optimizer step: a keyed batch, the EDM loss, a clipped and sanitised update
            x, s = next(batches)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            net.train()
            loss = 0.0
            for m in range(cfg.grad_accum):  # micro-batches; gradients meet (DDP) at the last
                last_micro = m == cfg.grad_accum - 1
                part = slice(m * micro, (m + 1) * micro)
                gen = keyed.loss_generator(cfg.seed, step, rank, m, x.device)
                with contextlib.nullcontext() if last_micro else acc.no_sync(net):
                    with acc.autocast(), keyed.dropout_masks(cfg.seed, step, rank, m, x.device):
                        part_loss = edm.edm_loss(_Loss(net, sigma_data), x[part], s[part], gen)
                    acc.backward(part_loss if cfg.grad_accum == 1 else part_loss / cfg.grad_accum)
                loss = loss + part_loss.detach() / cfg.grad_accum
            if cfg.grad_clip:
                acc.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            for p in net.parameters():  # a NaN/Inf gradient must not poison the weights
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.batch
            _update_ema(ema, acc.unwrap_model(net), ema_beta(cfg, images, cfg.batch))
            losses.append(float(loss.detach()))
            n_log += cfg.batch

            timed_out = cfg.time_limit is not None and time.time() - t_start >= cfg.time_limit
            signum = stop.signum
            if world > 1:  # every rank must stop at the same step, or the others wait forever
                flags = acc.reduce(
                    torch.tensor([float(timed_out), float(signum or 0)], device=acc.device),
                    reduction="max",
                )
                timed_out, signum = bool(flags[0]), int(flags[1]) or None
            last = step == cfg.max_steps or timed_out or signum is not None
            if step % cfg.log_every == 0 or last:
                mean = float(acc.gather(torch.tensor([np.mean(losses)], device=acc.device)).mean())
                span = max(time.time() - t_log, 1e-9)
                rate, waiting = n_log / span, min((batches.waited - wait_log) / span, 1.0)
                if main:
                    log.append_row(
                        out / log.LOG_FILE,
                        step=step,
                        images=images,
                        loss=round(mean, 6),
                        lr=learning_rate(cfg, step - 1),
                        images_per_s=round(rate, 2),
                        data_wait=round(waiting, 3),
                        time=round(elapsed(), 1),
                    )
                bar.update(step, mean, rate, waiting)
                losses, t_log, n_log, wait_log = [], time.time(), 0, batches.waited
            if cfg.preview_every and step % cfg.preview_every == 0:
                preview()
            if step - last_ckpt >= cfg.checkpoint_every or timed_out or signum is not None:
                checkpoint_now()
                last_ckpt = step
            if signum is not None:
                bar.stop()
                if main:
                    print(
                        f"interrupted at step {step}; state saved, continue with --resume",
                        file=sys.stderr,
                    )
                raise SystemExit(128 + signum)
            faults.point("train-step")  # crash tests: a rank killed between steps
            if timed_out:
                break
        if last_ckpt != step or not (out / "model.safetensors").exists():
            checkpoint_now()
    if main and cfg.preview_every and step % cfg.preview_every:
        preview()
    return {
        "out": str(out),
        "step": step,
        "steps_this_run": step - before.step,
        "images": images,
        "finished": step >= cfg.max_steps,
        "elapsed": elapsed(),
        "checkpoint": str(out / "model.safetensors"),
        "config": ckpt_cfg,
    }


def _precision(precision: str | None, cpu: bool) -> str:
    """Accelerate's mixed_precision for --precision (None: fp32 on CPU, bf16 or fp16 on CUDA)."""
    if precision is None:
        return "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp16" and cpu:
        raise UsageError("--precision fp16 needs CUDA (use bf16 or fp32 on the CPU)")
    return {"fp32": "no"}.get(precision, precision)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema ← beta·ema + (1 − beta)·net for the parameters; buffers are copied."""
    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
        pe.copy_(pn.detach().lerp(pe, beta))
    for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
        be.copy_(bn)


class _Loss:
    """The (maybe DDP-wrapped) denoiser as ``edm_loss`` wants it: callable, with ``sigma_data``."""

    def __init__(self, module, sigma_data: float):
        self.module, self.sigma_data = module, sigma_data

    def __call__(self, x, sigma, mpp):
        return self.module(x, sigma, mpp)


def training_config(ckpt_cfg: dict, step: int, images: int, cfg: TrainConfig) -> dict:
    """The checkpoint config plus how far training got (ignored by ``validate_config``)."""
    return {
        **ckpt_cfg,
        "training": {
            "step": step,
            "images": images,
            "batch": cfg.batch,
            "lr": cfg.lr,
            "mpp_sampling": cfg.mpp_sampling,
            "seed": cfg.seed,
            "tissue_threshold": cfg.tissue_threshold,
            "stain_normalise": cfg.stain_normalise,
        },
    }


__all__ = ["TrainConfig", "TrainOptions", "train"]
