"""The training loop: EDM loss conditioned on µm/px, AdamW, EMA, Accelerate, resumable state.

``DIR/model.safetensors`` holds the EMA weights and the sampling config; ``DIR/train-state/``
holds what an exact resume needs (weights, EMA, optimizer moments, step) as safetensors + JSON.
All randomness is keyed by (seed, step, rank), so the state needs no generator snapshots: a
resumed run draws the same patches and noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError, WsigenError
from ..method import edm, keys
from ..nets import UNetConfig
from ..slides import checkpoint
from . import data

STATE_DIR = "train-state"
LOG_FILE = "loss.jsonl"
PREVIEW_DIR = "preview"
#: Options that may change between a run and its resume; everything else must match.
RUN_CONTROL = (
    "max_steps",
    "time_limit",
    "checkpoint_every",
    "preview_every",
    "log_every",
    "device",
)
# sub-keys of the keyed RNG for training draws
_DATA, _PREVIEW = 0, 1


@dataclass
class TrainConfig:
    """Everything a run depends on. None means: derive from the data (or the default)."""

    patch: int = 64
    width: int = 32
    mults: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    batch: int = 16
    lr: float = 1e-3
    lr_warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_halflife_kimg: float = 50.0
    ema_rampup: float = 0.05
    mpp_min: float | None = None
    mpp_max: float | None = None
    mpp_sampling: str = "uniform"
    tissue_threshold: float = 0.25
    tissue_od: float = 0.15
    stain_normalise: str | None = None
    slide_mpp: float | None = None
    k: int = 2
    final_mpp: float | None = None
    recommended_size: int | None = None
    sample_steps: int = 40
    sample_guided_steps: int | None = None
    seed: int = 0
    init_from: str | None = None
    max_steps: int = 10000
    time_limit: float | None = None
    checkpoint_every: int = 500
    preview_every: int = 1000
    log_every: int = 10
    device: str = "auto"

    def to_json(self) -> dict:
        d = asdict(self)
        d["mults"], d["attn_levels"] = list(self.mults), list(self.attn_levels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("mults", "attn_levels"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def arch(self) -> dict:
        cfg = UNetConfig(
            width=self.width,
            mults=tuple(self.mults),
            blocks=self.blocks,
            attn_levels=tuple(self.attn_levels),
        )
        d = {"name": "unet", **cfg.to_dict()}
        d.pop("extra", None)
        return d

    def validate(self) -> TrainConfig:
        if self.batch < 1 or self.max_steps < 0 or self.patch < 8:
            raise UsageError("batch ≥ 1, max-steps ≥ 0 and patch ≥ 8 are required")
        multiple = 2 ** (len(self.mults) - 1)
        if self.patch % multiple or self.patch % self.k:
            raise UsageError(
                f"patch {self.patch} must be a multiple of {multiple} (for {len(self.mults)} "
                f"UNet levels) and of k={self.k}"
            )
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        try:
            UNetConfig.from_dict(self.arch())
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad network: {e}") from None
        if self.device not in ("cpu", "cuda", "auto"):
            raise UsageError(f"--device must be cpu, cuda or auto (got {self.device!r})")
        return self


# ----------------------------------------------------------------------------- state on disk


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"{pid}.{name}"] = (
                (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
            )
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(
    out: Path, net: torch.nn.Module, ema: torch.nn.Module, opt, step: int, info: dict, scaler=None
) -> None:
    """Write DIR/train-state atomically: a new folder, then a rename (state.json written last)."""
    tmp, final, old = out / (STATE_DIR + ".partial"), out / STATE_DIR, out / (STATE_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
        str(tmp / "ema.safetensors"),
    )
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "step": step,
        **info,
        "optimizer": meta,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "scheme": "keyed by (seed, TRAIN, step, rank) via wsigen.method.keys; nothing else to restore"
        },
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path) -> tuple[dict, dict, dict, dict]:
    d = out / STATE_DIR
    if not (d / "state.json").is_file():
        old = out / (STATE_DIR + ".old")  # interrupted between the two renames
        if (old / "state.json").is_file():
            d = old
        else:
            raise WsigenError(f"nothing to resume in {out}: {d}/state.json is missing")
    try:
        state = json.loads((d / "state.json").read_text())
        return (
            state,
            load_file(str(d / "model.safetensors")),
            load_file(str(d / "ema.safetensors")),
            load_file(str(d / "optimizer.safetensors")),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise WsigenError(
            f"cannot read the training state in {d} ({e}); start again with --overwrite"
        ) from None


# ----------------------------------------------------------------------------- helpers


def ema_beta(cfg: TrainConfig, images: int, batch: int) -> float:
    """EDM's EMA: half-life min(ema_halflife_kimg·1000, rampup·images seen) images."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup:
        halflife = min(halflife, images * cfg.ema_rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))


def step_rng(seed: int, step: int, rank: int, what: int) -> np.random.Generator:
    return keys.rng(seed, keys.TRAIN, what, step, rank)


def torch_generator(g: np.random.Generator, device) -> torch.Generator:
    t = torch.Generator(device=device)
    t.manual_seed(int(g.integers(2**62)))
    return t


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """x ∈ [−1, 1] (…, 3, H, W) → round((x + 1)·127.5) clipped, channels last."""
    return (
        ((x.float() + 1) * 127.5)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        .movedim(-3, -1)
        .cpu()
        .numpy()
    )


@torch.no_grad()
def sample_patches(
    denoiser, mpps, patch: int, steps: int, gen: torch.Generator, device, cfg: dict
) -> torch.Tensor:
    """Unguided Heun sampling of one patch per µm/px in ``mpps`` (for previews)."""
    sched = edm.Schedule(steps, cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
    t = edm.karras_sigmas(sched)
    s = torch.tensor(mpps, dtype=torch.float32, device=device)
    x = (
        torch.randn((len(mpps), 3, patch, patch), generator=gen, device=gen.device).to(device)
        * t[0]
    )

    def denoise(x, sigma):
        return denoiser(x, torch.tensor(sigma, device=device), s)

    for i in range(steps):
        x, _ = edm.solver_step(denoise, x, t[i], t[i + 1])
    return x.clamp(-1, 1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    import imagecodecs

    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))
    os.replace(tmp, path)


def grid_image(tiles: np.ndarray, cols: int, pad: int = 2, value: int = 255) -> np.ndarray:
    n, h, w, c = tiles.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, np.uint8)
    for i, t in enumerate(tiles):
        r, q = divmod(i, cols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = t
    return out


def default_sampling(cfg: TrainConfig, mpp_min: float, mpp_max: float) -> tuple[float, int, int]:
    """final µm/px, recommended size and guided steps recorded in the checkpoint.

    Default final µm/px is s_min; the recommended size is the largest M·k^L (L ≤ 3) whose
    stage-0 resolution final·k^L still lies inside the trained range.
    """
    final = cfg.final_mpp if cfg.final_mpp is not None else mpp_min
    if not mpp_min * (1 - 1e-6) <= final <= mpp_max * (1 + 1e-6):
        raise UsageError(
            f"final µm/px {final:g} lies outside the trained range [{mpp_min:g}, {mpp_max:g}]"
        )
    if cfg.recommended_size is not None:
        size = cfg.recommended_size
    else:
        L = 0
        while L < 3 and final * cfg.k ** (L + 1) <= mpp_max * (1 + 1e-6):
            L += 1
        size = cfg.patch * cfg.k**L
    guided = (
        cfg.sample_guided_steps
        if cfg.sample_guided_steps is not None
        else round(0.7 * cfg.sample_steps)
    )
    return final, size, guided


# ----------------------------------------------------------------------------- the loop


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
    cfg: TrainConfig, explicit: set[str], out: Path, resume: bool, overwrite: bool
) -> tuple[TrainConfig, dict | None]:
    have = (out / STATE_DIR / "state.json").is_file() or (
        out / (STATE_DIR + ".old") / "state.json"
    ).is_file()
    if resume:
        if not have:
            raise WsigenError(f"--resume: no training state in {out} (expected {out / STATE_DIR})")
        loaded = load_state(out)
        saved = TrainConfig.from_json(loaded[0]["config"])
        diff = [
            n
            for n in sorted(explicit)
            if n not in RUN_CONTROL and getattr(cfg, n) != getattr(saved, n)
        ]
        if diff:
            raise UsageError(
                f"--resume with options that differ from the saved run: "
                f"{', '.join(f'{n} (saved {getattr(saved, n)!r})' for n in diff)}"
            )
        merged = replace(saved, **{n: getattr(cfg, n) for n in RUN_CONTROL if n in explicit})
        return merged.validate(), loaded
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise WsigenError(
                f"{out} exists and is not empty; use --resume to continue or --overwrite to "
                "start again"
            )
        for name in (
            "model.safetensors",
            STATE_DIR,
            STATE_DIR + ".old",
            STATE_DIR + ".partial",
            LOG_FILE,
            PREVIEW_DIR,
        ):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return cfg.validate(), None


def init_weights(net: torch.nn.Module, spec: str, ckpt_cfg: dict) -> str:
    """Start ``net`` from the weights of model ``spec`` (fine-tuning); same architecture only.

    Returns the training-data line of the new checkpoint, which names the starting model.
    """
    base = checkpoint.load_model(spec)
    if base.config["arch"] != ckpt_cfg["arch"]:
        theirs = {k: v for k, v in base.config["arch"].items() if ckpt_cfg["arch"].get(k) != v}
        raise UsageError(
            f"--init-from {spec}: its network differs from this run's "
            f"({', '.join(f'{k}={v}' for k, v in sorted(theirs.items()))}); give the same "
            "--width/--mults as the model"
        )
    net.load_state_dict(base.denoiser.state_dict())
    return (
        f"fine-tuned from {base.name} (sha256 {base.sha256[:16]}…, trained on "
        f"{base.config.get('training_data') or 'unknown data'}) on {ckpt_cfg['training_data']}"
    )


def train(
    slides,
    out,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    config: TrainConfig | None = None,
    **options,
) -> dict:
    """Train a UNet on the slides (files or folders) into ``out``; returns a summary dict.

    ``options`` are TrainConfig fields; None means "not given" (the default, or on ``resume``
    the saved value). On resume only RUN_CONTROL options may differ from the saved run.
    """
    from accelerate import Accelerator

    out = Path(out)
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - names
    if unknown:
        raise UsageError(f"unknown training options: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in options.items() if v is not None}
    for k in ("mults", "attn_levels"):
        if k in given:
            given[k] = tuple(int(v) for v in given[k])
    explicit = set(given) | (names if config is not None else set())
    cfg, loaded = _resolve(
        replace(config or TrainConfig(), **given), explicit, out, resume, overwrite
    )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise WsigenError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    precision = "no" if use_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    acc = Accelerator(cpu=use_cpu, mixed_precision=precision)
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    if cfg.batch % world:
        raise UsageError(f"--batch {cfg.batch} is not divisible by the {world} processes")
    local_batch = cfg.batch // world

    slides_data = data.load_slides(
        slides, mpp=cfg.slide_mpp, od_threshold=cfg.tissue_od, stain_ref=cfg.stain_normalise
    )
    target = data.reference_stain(cfg.stain_normalise) if cfg.stain_normalise else None
    sampler = data.PatchSampler(
        slides_data,
        cfg.patch,
        cfg.mpp_min,
        cfg.mpp_max,
        cfg.tissue_threshold,
        cfg.mpp_sampling,
        stain_target=target,
    )
    final_mpp, rec_size, guided = default_sampling(cfg, sampler.mpp_min, sampler.mpp_max)
    background = data.measured_background(slides_data)
    described = sampler.describe()
    if loaded is not None:
        before = [d.get("sha256") for d in loaded[0].get("slides", [])]
        if before != [d["sha256"] for d in described]:
            raise UsageError(
                "--resume with different slides than the saved run "
                f"({', '.join(d['name'] for d in loaded[0].get('slides', []))})"
            )
    ckpt_cfg = checkpoint.make_config(
        cfg.arch(),
        patch=cfg.patch,
        k=cfg.k,
        mpp_range=[sampler.mpp_min, sampler.mpp_max],
        recommended_size=rec_size,
        final_mpp=final_mpp,
        steps=cfg.sample_steps,
        guided_steps=guided,
        background=background,
        training_data="; ".join(
            f"{d['name']} (sha256 {d['sha256'][:16]}…, {d['mpp']:.4g} µm/px)"
            if d["sha256"]
            else d["name"]
            for d in described
        ),
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # initial weights: a pure function of the seed
        net = checkpoint.build_denoiser(ckpt_cfg)
    if cfg.init_from is not None:  # on resume the saved weights replace these below
        ckpt_cfg["training_data"] = init_weights(net, cfg.init_from, ckpt_cfg)
    ema = checkpoint.build_denoiser(ckpt_cfg).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    step, images, elapsed_before = 0, 0, 0.0
    if loaded is not None:
        state, w, e, o = loaded
        net.load_state_dict(w)
        ema.load_state_dict(e)
        opt.load_state_dict(_optimizer_state(o, state["optimizer"]))
        step, images, elapsed_before = state["step"], state["images"], state.get("elapsed", 0.0)
    net, opt = acc.prepare(net, opt)
    ema.to(acc.device)
    if loaded is not None and loaded[0].get("scaler") and acc.scaler is not None:
        acc.scaler.load_state_dict(loaded[0]["scaler"])

    if main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / LOG_FILE, step)
    run_info = {
        "config": cfg.to_json(),
        "slides": described,
        "world_size": world,
        "torch": torch.__version__,
    }

    def checkpoint_now():
        if main:
            final = replace_config(ckpt_cfg, step, images, cfg)
            checkpoint.save_checkpoint(out / "model.safetensors", ema, final)
            save_state(
                out,
                acc.unwrap_model(net),
                ema,
                opt,
                step,
                {**run_info, "images": images, "elapsed": elapsed_before + time.time() - t_start},
                acc.scaler,
            )
        acc.wait_for_everyone()

    def preview():
        if not main:
            return
        g = torch_generator(keys.rng(cfg.seed, keys.TRAIN, _PREVIEW), "cpu")
        mpps = np.geomspace(sampler.mpp_min, sampler.mpp_max, 4).tolist() * 2
        ema.eval()
        x = sample_patches(ema, mpps, cfg.patch, cfg.sample_steps, g, acc.device, ckpt_cfg)
        (out / PREVIEW_DIR).mkdir(exist_ok=True)
        img = grid_image(to_uint8(x), cols=4)
        write_png(out / PREVIEW_DIR / f"step-{step:07d}.png", img)
        write_png(out / "preview.png", img)

    t_start = time.time()
    start_step, losses, last_ckpt = step, [], step
    bar = _Progress(main and progress, cfg.max_steps, step)
    with _Stop() as stop, bar:
        t_log, n_log = time.time(), 0
        while step < cfg.max_steps:
            g = step_rng(cfg.seed, step, rank, _DATA)
            x, s = sampler.batch(g, local_batch)
            x, s = x.to(acc.device), s.to(acc.device)
            gen = torch_generator(g, x.device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            net.train()
            with acc.autocast():
                loss = edm.edm_loss(_Loss(net, ckpt_cfg["sigma_data"]), x, s, gen)
            acc.backward(loss)
            if cfg.grad_clip:
                acc.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            for p in net.parameters():  # a NaN/Inf gradient must not poison the weights
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.batch
            beta = ema_beta(cfg, images, cfg.batch)
            with torch.no_grad():
                for pe, pn in zip(
                    ema.parameters(), acc.unwrap_model(net).parameters(), strict=True
                ):
                    pe.copy_(pn.detach().lerp(pe, beta))
                for be, bn in zip(ema.buffers(), acc.unwrap_model(net).buffers(), strict=True):
                    be.copy_(bn)
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
                rate = n_log / max(time.time() - t_log, 1e-9)
                if main:
                    with open(out / LOG_FILE, "a") as f:
                        f.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "images": images,
                                    "loss": round(mean, 6),
                                    "lr": learning_rate(cfg, step - 1),
                                    "images_per_s": round(rate, 2),
                                    "time": round(elapsed_before + time.time() - t_start, 1),
                                }
                            )
                            + "\n"
                        )
                bar.update(step, mean, rate)
                losses, t_log, n_log = [], time.time(), 0
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
            if timed_out:
                break
        if last_ckpt != step or not (out / "model.safetensors").exists():
            checkpoint_now()
    if main and cfg.preview_every and step % cfg.preview_every:
        preview()
    return {
        "out": str(out),
        "step": step,
        "steps_this_run": step - start_step,
        "images": images,
        "finished": step >= cfg.max_steps,
        "elapsed": elapsed_before + time.time() - t_start,
        "checkpoint": str(out / "model.safetensors"),
        "config": ckpt_cfg,
    }


class _Loss:
    """The (maybe DDP-wrapped) denoiser as ``edm_loss`` wants it: callable, with ``sigma_data``."""

    def __init__(self, module, sigma_data: float):
        self.module, self.sigma_data = module, sigma_data

    def __call__(self, x, sigma, mpp):
        return self.module(x, sigma, mpp)


def replace_config(ckpt_cfg: dict, step: int, images: int, cfg: TrainConfig) -> dict:
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


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the saved step (they were lost with the interruption)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            if json.loads(line)["step"] <= step:
                keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


class _Progress:
    """A rich progress bar on a terminal; otherwise a plain line on stderr now and then."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.bar = None
        self.last_print = 0.0
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)
            if self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("train"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]} img/s"),
                    TimeRemainingColumn(),
                    console=self.console,
                )
                self.task = self.bar.add_task(
                    "train", total=total, completed=start, loss="…", rate="…"
                )

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float, rate: float):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}")
        elif time.time() - self.last_print > 30 or step == self.total:
            self.last_print = time.time()
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} img/s",
                file=sys.stderr,
                flush=True,
            )


def loss_history(out) -> list[dict]:
    """The rows of DIR/loss.jsonl."""
    p = Path(out) / LOG_FILE
    return (
        [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        if p.exists()
        else []
    )


__all__ = ["TrainConfig", "train", "loss_history"]
