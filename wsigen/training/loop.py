"""The training loop: EDM loss conditioned on µm/px, AdamW, EMA, Accelerate, resumable state.

``DIR/model.safetensors`` holds the EMA weights and the sampling config; ``DIR/train-state/``
(:mod:`.state`) holds what an exact resume needs. All randomness is keyed by (seed, step, rank, index)
(:mod:`.keyed`), so a resumed run draws the same patches, noise and dropout masks as an
uninterrupted one, whatever the number of loader processes (:mod:`.loader`) reading them.
"""

from __future__ import annotations

import contextlib
import os
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
from . import data, keyed, loader, log, setup
from .config import TrainConfig, TrainOptions, default_sampling, ema_beta, learning_rate
from .progress import ProgressBar
from .sampling import grid_image, sample_patches, to_uint8, write_png
from .setup import PREVIEW_DIR, init_weights, training_config  # noqa: F401  (their old home)
from .state import Reached, RunRecord, save_state
from .step import optimizer_step, update_ema

#: preview rows of a labelled model: one per class, up to this many
PREVIEW_CLASSES = 8


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
    cfg, saved = setup.resolve(options, out, resume, overwrite)
    files, labels = setup.slide_files(cfg, slides)  # bad labels: refused before any slide is read
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

    sampler = setup.make_sampler(cfg, files, labels)
    sampling = default_sampling(cfg, sampler.mpp_min, sampler.mpp_max)
    described = sampler.describe()
    if saved is not None and saved.slide_hashes != [d["sha256"] for d in described]:
        raise UsageError(
            f"--resume with different slides than the saved run ({', '.join(saved.slide_names)})"
        )
    label_record = None if labels is None else labels.record(files)
    if saved is not None:
        setup.check_resumed_labels(saved, label_record, [d["name"] for d in described])
    # the checkpoint's own config: a dict, as the file stores it
    ckpt_cfg = checkpoint.make_config(
        cfg.arch(0 if labels is None else len(labels.classes)),
        patch=cfg.patch,
        k=cfg.k,
        mpp_range=[sampler.mpp_min, sampler.mpp_max],
        recommended_size=sampling.recommended_size,
        final_mpp=sampling.final_mpp,
        steps=cfg.sample_steps,
        guided_steps=sampling.guided_steps,
        background=data.measured_background(sampler.slides),
        training_data=setup.describe_data(described),
        **setup.class_config(labels, cfg),
    )
    sigma_data = ckpt_cfg["sigma_data"]
    preview_schedule = edm.Schedule(
        cfg.sample_steps, ckpt_cfg["sigma_min"], ckpt_cfg["sigma_max"], ckpt_cfg["rho"]
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # initial weights: a pure function of the seed
        net = checkpoint.build_denoiser(ckpt_cfg)
    if cfg.init_from is not None:  # on resume the saved weights replace these below
        line = init_weights(net, cfg.init_from, ckpt_cfg["arch"], ckpt_cfg["training_data"],
                            ckpt_cfg.get("classes"))
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
        if overwrite and saved is None:
            setup.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        log.trim(out / log.LOG_FILE, step)
        for sd in sampler.slides:
            if sd.stain_fallback:
                print(f"wsigen: {sd.name}: no stain vectors could be fitted on its thumbnail; its "
                      "nuclei masks use the published reference stains", file=sys.stderr)
    run = RunRecord(cfg, described, world, label_record)

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
        rows = min(sampler.n_classes, PREVIEW_CLASSES) or 2  # a row per class, or two seeds
        mpps = np.geomspace(sampler.mpp_min, sampler.mpp_max, 4).tolist() * rows
        classes = [r for r in range(rows) for _ in range(4)] if sampler.n_classes else None
        ema.eval()
        x = sample_patches(ema, mpps, cfg.patch, preview_schedule, g, acc.device, classes,
                           repeat=rows if classes else 1)  # class rows: the same noise per column
        (out / PREVIEW_DIR).mkdir(exist_ok=True)
        img = grid_image(to_uint8(x), cols=4)
        write_png(out / PREVIEW_DIR / f"step-{step:07d}.png", img)
        write_png(out / "preview.png", img)

    workers = cfg.loader_workers
    if workers is None:
        workers = loader.default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    batches = loader.Batches(sampler, cfg.seed, rank, local_batch, step, cfg.max_steps, workers, acc.device,
                             cfg.label_dropout or 0.0)
    t_start = time.time()
    losses, last_ckpt = [], step
    bar = ProgressBar(main and progress, cfg.max_steps, step)
    with _Stop() as stop, bar, contextlib.closing(batches):
        t_log, n_log, wait_log = time.time(), 0, 0.0
        while step < cfg.max_steps:
            loss = optimizer_step(acc, net, opt, cfg, next(batches), step, rank, micro, sigma_data)
            step += 1
            images += cfg.batch
            update_ema(ema, acc.unwrap_model(net), ema_beta(cfg, images, cfg.batch))
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


__all__ = ["TrainConfig", "TrainOptions", "train"]
