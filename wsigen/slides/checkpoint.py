"""Checkpoints: safetensors weights with a JSON config in the file's metadata; never pickle.

``load_model`` accepts a file, a training folder (``DIR/model.safetensors``) or a built-in
name (``default``, ``gaussian``) and returns the preconditioned denoiser D with its config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import WsigenError
from ..method.edm import EDMPrecond
from ..nets import GaussianDenoiser, UNet, UNetConfig

FORMAT = "wsigen-checkpoint/1"
META_KEY = "wsigen"
BUILTIN = ("default", "gaussian")

DEFAULTS = {
    "patch": 64,
    "k": 2,
    "mpp_range": [0.25, 256.0],
    "recommended_size": 512,
    "final_mpp": 1.0,
    "steps": 40,
    "guided_steps": 28,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "rho": 7.0,
    "sigma_data": 0.5,
    "background": [242, 240, 244],
    "training_data": "untrained (random initialisation)",
}
REQUIRED = ("format", "arch", "patch", "k", "mpp_range", "recommended_size", "final_mpp", "steps",
            "guided_steps", "sigma_min", "sigma_max", "rho", "sigma_data", "background")


def _num(cfg: dict, key: str, lo: float, hi: float, integer: bool = False) -> float:
    v = cfg.get(key)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not lo <= v <= hi or (integer and int(v) != v):
        kind = "an integer" if integer else "a number"
        raise WsigenError(f"checkpoint config: '{key}' must be {kind} in [{lo}, {hi}] (got {v!r})")
    return v


def validate_config(cfg: dict) -> dict:
    """Check a checkpoint config against the schema; returns it or raises WsigenError."""
    if not isinstance(cfg, dict):
        raise WsigenError("checkpoint config is not a JSON object")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise WsigenError(f"checkpoint config is missing fields: {', '.join(missing)}")
    if cfg["format"] != FORMAT:
        raise WsigenError(f"checkpoint format {cfg['format']!r} is not {FORMAT!r}")
    arch = cfg["arch"]
    if not isinstance(arch, dict) or arch.get("name") not in ("unet", "gaussian"):
        raise WsigenError("checkpoint config: 'arch.name' must be 'unet' or 'gaussian'")
    k = int(_num(cfg, "k", 2, 8, integer=True))
    if cfg["patch"] is not None:
        m = int(_num(cfg, "patch", 8, 4096, integer=True))
        if m % k:
            raise WsigenError(f"checkpoint config: patch {m} is not a multiple of k={k}")
    lo_hi = cfg["mpp_range"]
    if (not isinstance(lo_hi, list) or len(lo_hi) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in lo_hi)
            or not 0 < lo_hi[0] < lo_hi[1]):
        raise WsigenError(f"checkpoint config: 'mpp_range' must be [lo, hi] with 0 < lo < hi (got {lo_hi!r})")
    _num(cfg, "recommended_size", 1, 2**22, integer=True)
    _num(cfg, "final_mpp", 1e-3, 1e4)
    n = _num(cfg, "steps", 2, 10000, integer=True)
    _num(cfg, "guided_steps", 0, n, integer=True)
    _num(cfg, "sigma_min", 1e-6, 10)
    _num(cfg, "sigma_max", cfg["sigma_min"], 1e4)
    _num(cfg, "rho", 0.1, 100)
    _num(cfg, "sigma_data", 1e-3, 10)
    bg = cfg["background"]
    if not (isinstance(bg, list) and len(bg) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in bg)):
        raise WsigenError(f"checkpoint config: 'background' must be three integers 0..255 (got {bg!r})")
    if arch["name"] == "unet":
        try:
            UNetConfig.from_dict(arch)
        except (TypeError, ValueError) as e:
            raise WsigenError(f"checkpoint config: bad UNet architecture: {e}") from None
    _check_classes(cfg)
    return cfg


def _check_classes(cfg: dict) -> None:
    """``classes`` (names, ≥ 2, distinct) ⇔ a UNet built with that many class embeddings;
    ``class_slides`` (training slides per class) and ``label_dropout`` are optional."""
    names, n = cfg.get("classes"), cfg["arch"].get("classes", 0)
    if names is None:
        if n:
            raise WsigenError("checkpoint config: the network has class embeddings but no 'classes' names")
        return
    if (not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names)
            or not all(isinstance(c, str) and c.strip() for c in names)):
        raise WsigenError(f"checkpoint config: 'classes' must be ≥ 2 distinct names (got {names!r})")
    if cfg["arch"]["name"] != "unet" or n != len(names):
        raise WsigenError(f"checkpoint config: {len(names)} class names but the network has {n} class embeddings")
    counts = cfg.get("class_slides")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(names)
                               or not all(isinstance(c, int) and c >= 0 for c in counts)):
        raise WsigenError("checkpoint config: 'class_slides' must give a slide count per class")
    p = cfg.get("label_dropout")
    if p is not None and not (isinstance(p, int | float) and 0 <= p < 1):
        raise WsigenError(f"checkpoint config: 'label_dropout' must lie in [0, 1) (got {p!r})")


@dataclass
class LoadedModel:
    """A ready-to-call denoiser D(x, σ, s) and what the sampler needs to know about it."""

    denoiser: torch.nn.Module
    config: dict
    sha256: str
    name: str

    @property
    def patch(self) -> int | None:
        return self.config["patch"]

    @property
    def classes(self) -> list[str]:
        """The tissue classes the model draws (empty: a class-free model)."""
        return list(self.config.get("classes") or [])

    def class_label(self, name: str, guidance: float | None = None) -> int:
        """The index of class ``name`` (see :func:`class_label`)."""
        return class_label(self.config, name, guidance, self.name)


def class_label(cfg: dict, name: str, guidance: float | None = None, model: str = "the model") -> int:
    """The index of class ``name`` in a checkpoint config; WsigenError naming the model's classes
    otherwise, or when a guidance w ≠ 1 needs the class-free call a model trained without label
    dropout lacks."""
    classes = list(cfg.get("classes") or [])
    if not classes:
        raise WsigenError(f"--class {name}: model {model} is class-free (it was trained without "
                          "--labels); use a class-conditional model or drop --class")
    if name not in classes:
        raise WsigenError(f"--class {name!r}: model {model} knows the classes {', '.join(classes)}")
    if guidance is not None and guidance != 1 and cfg.get("label_dropout") == 0:
        raise WsigenError(f"--guidance {guidance:g}: model {model} was trained with --label-dropout 0, "
                          "so it has no class-free call to guide against (use --guidance 1)")
    return classes.index(name)


def make_config(arch: dict, **overrides) -> dict:
    cfg = {"format": FORMAT, "arch": arch, **DEFAULTS}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(cfg)


def build_denoiser(cfg: dict) -> torch.nn.Module:
    arch = cfg["arch"]
    if arch["name"] == "gaussian":
        return GaussianDenoiser(arch.get("mean"), arch.get("std"))
    return EDMPrecond(UNet(UNetConfig.from_dict(arch)), sigma_data=cfg["sigma_data"])


def gaussian_config(patch: int | None = None) -> dict:
    from ..nets.gaussian import DEFAULT_MEAN, DEFAULT_STD

    arch = {"name": "gaussian", "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    return make_config(arch, patch=patch, training_data="analytic: Gaussian data, H&E-pink mean",
                       mpp_range=[0.01, 10000.0])


def save_checkpoint(path: str | os.PathLike, denoiser: torch.nn.Module, config: dict) -> str:
    """Write weights + config as safetensors (atomically); returns the file's sha256."""
    validate_config(config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in denoiser.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(config, sort_keys=True)})
    os.replace(tmp, path)
    return sha256_file(path)


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_model_path() -> Path:
    return Path(str(resources.files("wsigen") / "models" / "default.safetensors"))


def resolve_model_path(spec: str | os.PathLike) -> Path:
    p = Path(spec)
    if str(spec) == "default":
        p = default_model_path()
        if not p.is_file():
            raise WsigenError("the bundled default model is missing from this install; "
                              "pass --model PATH or --model gaussian")
        return p
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise WsigenError(f"model not found: {spec} (give a .safetensors file, a training folder, "
                          f"or one of: {', '.join(BUILTIN)})")
    return p


def read_config(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WsigenError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if META_KEY not in meta:
        raise WsigenError(f"{path} has no wsigen config in its metadata; is it a wsigen checkpoint?")
    try:
        cfg = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise WsigenError(f"{path}: config is not valid JSON ({e})") from None
    return validate_config(cfg)


def load_model(spec: str | os.PathLike = "default", patch: int | None = None) -> LoadedModel:
    """Load a denoiser by name or path; weights must be finite and match the config."""
    if str(spec) == "gaussian":
        cfg = gaussian_config(patch)
        sha = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
        return LoadedModel(build_denoiser(cfg).eval(), cfg, sha, "gaussian")
    path = resolve_model_path(spec)
    cfg = read_config(path)
    if patch is not None and cfg["patch"] is not None and patch != cfg["patch"]:
        raise WsigenError(f"--patch {patch} conflicts with the model's fixed patch size {cfg['patch']}")
    if cfg["patch"] is None:
        cfg = {**cfg, "patch": patch or DEFAULTS["patch"]}
    net = build_denoiser(cfg)
    try:
        from safetensors.torch import load_file

        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WsigenError(f"{path}: cannot read weights ({e})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WsigenError(f"{path}: weights contain NaN/Inf ({bad[0]}{' …' if len(bad) > 1 else ''})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise WsigenError(f"{path}: weights do not match the architecture in its config "
                          f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    name = "default" if str(spec) == "default" else path.name
    return LoadedModel(net.eval(), cfg, sha256_file(path), name)


def init_model(path: str | os.PathLike, arch: dict | None = None, seed: int = 0,
               classes: list[str] | None = None, **overrides) -> str:
    """Write an untrained UNet checkpoint (``wsigen model init``); returns its sha256.

    ``classes`` makes it class-conditional (random class embeddings, label dropout unknown)."""
    arch = {"name": "unet", **UNetConfig().to_dict(), **(arch or {})}
    arch.pop("extra", None)
    if classes:
        arch["classes"] = len(classes)
        overrides["classes"] = list(classes)
    cfg = make_config(arch, **overrides)
    multiple = 2 ** (len(arch["mults"]) - 1)
    if cfg["patch"] % multiple:
        raise WsigenError(f"patch {cfg['patch']} must be a multiple of {multiple} for {len(arch['mults'])} levels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_denoiser(cfg)
        # Layers that training starts from zero would make an untrained F ≡ 0, a pixel-wise
        # denoiser that cannot show batch, seam or boundary effects: give them small weights.
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1 and not p.detach().any():
                torch.nn.init.normal_(p, std=0.05 / p[0].numel() ** 0.5)
    return save_checkpoint(path, net, cfg)
