"""The typed run configuration: what a ``sample`` or ``upscale`` run is, built once and passed as is.

``Request`` is what the user asked for (``None``: the model's, the store's or the built-in default),
validated when it is built from CLI or API arguments. ``RunSpec`` adds where the slide goes and how
the run behaves (device, resume, overwrite, …); it is what the launcher hands to every rank.
``SlideConfig`` is the request resolved against a model and a device: exactly the flat ``config``
stored in the store (``to_store``) and, less the model's name, its reproducibility key (``key``), so
stores written before these types existed still ``--resume`` (``from_store``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, WsigenError
from .classes import CLASS_FIELDS, check_guidance, class_choice
from .presets import SCHEDULE_FIELDS, check_preset, schedule_record
from .presets import resolve as resolve_schedule
from .source import Source

if TYPE_CHECKING:
    import torch

    from ..method.stages import Settings
    from ..slides.checkpoint import LoadedModel

DEFAULT_BG_TOLERANCE = 4.0  # grey levels
MAX_SIDE = 2**22
SOLVERS = ("heun", "euler", "dpmpp2m")
PRECISIONS = ("fp32", "bf16", "fp16")
STATE_DTYPES = ("float32", "float16")
DEVICES = ("cpu", "cuda", "auto")


def parse_size(size: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'S' or 'WxH' (or an int, or (W, H)) → (W, H), both ≥ 1."""
    if isinstance(size, tuple | list):
        w, h = size
    elif isinstance(size, int):
        w = h = size
    else:
        text = str(size).strip().lower()
        try:
            vals = [int(p) for p in text.split("x")]
        except ValueError:
            raise UsageError(f"size must be S or WxH in pixels (got {size!r})") from None
        if len(vals) not in (1, 2):
            raise UsageError(f"size must be S or WxH in pixels (got {size!r})")
        w, h = vals if len(vals) == 2 else (vals[0], vals[0])
    if w < 1 or h < 1:
        raise UsageError(f"size must be positive (got {w}x{h})")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise UsageError(f"size {w}x{h} exceeds the supported maximum of {MAX_SIDE} px per side")
    return w, h


def default_threads() -> int:
    import torch

    return torch.get_num_threads() or os.cpu_count() or 1


@dataclass(frozen=True)
class Request:
    """The slide options a user gave; ``None`` means "not given" (the model's or store's value)."""

    size: tuple[int, int] | None = None
    mpp: float | None = None
    model: str | None = None
    patch: int | None = None
    seed: int | None = None
    steps: int | None = None
    guided_steps: int | None = None
    solver: str | None = None
    batch: int | None = None
    precision: str | None = None
    state_dtype: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    grid_shift: bool | None = None
    skip_background: bool | None = None
    background_tolerance: float | None = None
    threads: int | None = None
    # schedule options (run/presets.py); None: today's behaviour
    guided_sigma: float | None = None
    start_sigma: float | None = None
    stage_steps: tuple[int, ...] | None = None
    preset: str | None = None
    # class-conditional models: the tissue class (a set of slides: "a,b" cycles) and the
    # classifier-free guidance weight w (None: 1)
    class_name: str | None = None
    guidance: float | None = None

    @classmethod
    def of(cls, size=None, **given) -> Request:
        """From API/CLI keyword arguments (``None`` = not given); checks every value it can alone."""
        from ..method.schedules import parse_stage_steps

        model = given.pop("model", None)
        if given.get("stage_steps") is not None:
            given["stage_steps"] = parse_stage_steps(given["stage_steps"])
        return cls(size=None if size is None else parse_size(size),
                   model=None if model is None else str(model), **given).validate()

    def validate(self) -> Request:
        def at_least(name: str, lo: int) -> None:
            v = getattr(self, name)
            if v is not None and v < lo:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {lo} (got {v})")

        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise UsageError(f"--mpp must be a positive number (got {self.mpp:g})")
        if self.seed is not None and self.seed < 0:
            raise UsageError(f"--seed must be non-negative (got {self.seed})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        for name, lo in (("steps", 2), ("batch", 1)):
            at_least(name, lo)
        for name, choices in (("solver", SOLVERS), ("precision", PRECISIONS), ("state_dtype", STATE_DTYPES)):
            v = getattr(self, name)
            if v is not None and v not in choices:
                raise UsageError(f"--{name.replace('_', '-')} must be {', '.join(choices[:-1])} or "
                                 f"{choices[-1]} (got {v})")
        if self.background_tolerance is not None and self.background_tolerance < 0:
            raise UsageError(f"--background-tolerance must be non-negative (got {self.background_tolerance:g})")
        self._validate_schedule()
        self._validate_class()
        return self

    def _validate_class(self) -> None:
        if self.guidance is not None:
            if self.class_name is None:
                raise UsageError("--guidance needs --class (it weighs the class against the class-free model)")
            check_guidance(self.guidance)
        if self.class_name is not None:
            self.classes()

    def classes(self) -> list[str]:
        """The class names given (one for a slide; a set of slides cycles through several)."""
        if self.class_name is None:
            return []
        names = [c.strip() for c in self.class_name.split(",")]
        if not all(names):
            raise UsageError("--class takes a class name, or comma-separated names with --count "
                             f"(got {self.class_name!r})")
        return names

    def for_slide(self, index: int) -> Request:
        """Slide ``index`` of a set: its class the set's classes cycle to (``--count K --class a,b``)."""
        names = self.classes()
        return replace(self, class_name=names[index % len(names)]) if len(names) > 1 else self

    def _validate_schedule(self) -> None:
        """The schedule options that can be checked without the model (run/presets.py)."""
        check_preset(self.preset)
        if self.guided_sigma is not None and self.guided_steps is not None:
            raise UsageError("--guided-sigma and --guided-steps exclude each other (one relaxation rule)")
        if self.guided_sigma is not None and not (self.guided_sigma >= 0 and math.isfinite(self.guided_sigma)):
            raise UsageError(f"--guided-sigma must be a non-negative number (got {self.guided_sigma:g})")
        if self.start_sigma is not None and not (self.start_sigma > 0 and math.isfinite(self.start_sigma)):
            raise UsageError(f"--start-sigma must be a positive number (got {self.start_sigma:g})")

    def given(self) -> dict[str, Any]:
        """The options given, by store-config name (``size`` stands for width and height)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_json(self) -> dict[str, Any]:
        """The given options as a slide set's manifest records them."""
        d = self.given()
        if "size" in d:
            d["size"] = list(d["size"])
        if "stage_steps" in d:
            d["stage_steps"] = list(d["stage_steps"])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Request:
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        return cls.of(**d)

    def conflicts_with(self, stored: dict[str, Any]) -> list[str]:
        """Given options whose value differs from a stored configuration."""
        out = []
        for key, val in self.given().items():
            if key in SCHEDULE_FIELDS:  # absent from older stores: today's behaviour (None)
                have = stored.get(key)
                if key == "stage_steps" and have is not None:
                    have, val = list(have), list(val)
                if val != have:
                    out.append(f"{key} {val!r} (store: {have!r})")
                continue
            if key in CLASS_FIELDS:  # absent from class-free stores
                have = stored.get(CLASS_FIELDS[key])
                if val != have:
                    out.append(f"{'class' if key == 'class_name' else key} {val!r} (store: {have!r})")
                continue
            if key == "size":
                if val != (stored["width"], stored["height"]):
                    out.append(f"size {val[0]}x{val[1]} (store: {stored['width']}x{stored['height']})")
            elif key in stored and val != stored[key]:
                out.append(f"{key} {val!r} (store: {stored[key]!r})")
        return out


@dataclass(frozen=True)
class SlideConfig:
    """A slide's resolved configuration: the store's ``config``, field for field, in this order."""

    width: int
    height: int
    mpp: float
    model: str
    model_sha256: str
    patch: int
    seed: int
    steps: int
    guided_steps: int
    solver: str
    batch: int
    precision: str
    grid_shift: bool
    skip_background: bool
    background_tolerance: float
    sigma_min: float
    sigma_max: float
    rho: float
    device_type: str
    threads: int | None
    state_dtype: str = "float32"  # absent from stores written before it existed: these defaults
    channels_last: bool = False
    compile: bool = False
    source: Source | None = None  # upscale: the input that is stage 0
    upscale_stages: int | None = None
    # the schedule options (run/presets.py); None: today's — stored (and keyed) only when set
    guided_sigma: float | None = None
    start_sigma: float | None = None
    stage_steps: tuple[int, ...] | None = None
    preset: str | None = None  # provenance only: the resolved values above are what counts
    # a class-conditional model's class, its index in the model's classes, and the guidance w
    class_name: str | None = None
    class_index: int | None = None
    guidance: float | None = None

    # the key is every field but the model's name (its sha256 stands for it) and the input's record
    KEY_FIELDS = ("width", "height", "mpp", "patch", "seed", "steps", "guided_steps", "solver", "batch",
                  "precision", "grid_shift", "skip_background", "background_tolerance", "sigma_min",
                  "sigma_max", "rho", "device_type", "threads", "state_dtype", "channels_last", "compile",
                  "model_sha256")

    @classmethod
    def resolve(cls, request: Request, lm: LoadedModel, spec: str, device: torch.device,
                source: Source | None = None, upscale_stages: int | None = None) -> SlideConfig:
        """The request with every missing value taken from the model (or the built-in default)."""
        mc, r = lm.config, request
        sched = resolve_schedule(r, mc)
        label, weight = class_choice(r, lm)
        steps, guided = sched.steps, sched.guided_steps
        w, h = r.size or parse_size(mc["recommended_size"])
        threads = r.threads if r.threads is not None else default_threads()

        def pick(value, default):
            return default if value is None else value

        return cls(
            width=w, height=h, mpp=float(pick(r.mpp, mc["final_mpp"])), model=str(spec),
            model_sha256=lm.sha256, patch=lm.patch, seed=int(pick(r.seed, 0)), steps=steps,
            guided_steps=guided, solver=sched.solver, batch=pick(r.batch, 8),
            precision=pick(r.precision, "fp32"), grid_shift=r.grid_shift is not False,
            skip_background=r.skip_background is not False,
            background_tolerance=float(pick(r.background_tolerance, DEFAULT_BG_TOLERANCE)),
            sigma_min=mc["sigma_min"], sigma_max=mc["sigma_max"], rho=mc["rho"], device_type=device.type,
            threads=threads if device.type == "cpu" else None, state_dtype=pick(r.state_dtype, "float32"),
            # NHWC: 1.5× faster on this CPU for the default model (64² patches), and the GPU layout
            channels_last=bool(pick(r.channels_last, True)), compile=bool(pick(r.compile, False)),
            source=source, upscale_stages=upscale_stages, guided_sigma=sched.guided_sigma,
            start_sigma=sched.start_sigma, stage_steps=sched.stage_steps, preset=sched.preset,
            class_name=r.class_name, class_index=label, guidance=weight)

    def to_store(self) -> dict[str, Any]:
        """The flat ``config`` dict of the store (upscale runs add ``input`` and ``upscale_stages``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("source", "upscale_stages", *SCHEDULE_FIELDS, *CLASS_FIELDS, "class_index")}
        d.update(schedule_record(self, SCHEDULE_FIELDS))  # only when set: older runs store what they did
        d.update(self._class_record())
        if self.source is not None:
            d["input"] = self.source.describe()
            d["upscale_stages"] = self.upscale_stages
        return d

    def key(self) -> dict[str, Any]:
        # the resolved schedule when set; the preset's name is provenance only
        return {**{k: getattr(self, k) for k in self.KEY_FIELDS},
                **schedule_record(self, SCHEDULE_FIELDS[:-1]), **self._class_record()}

    def _class_record(self) -> dict[str, Any]:
        """``class``, ``class_index`` and ``guidance`` of a class-conditional slide (nothing otherwise)."""
        if self.class_name is None:
            return {}
        return {"class": self.class_name, "class_index": self.class_index, "guidance": self.guidance}

    @classmethod
    def from_store(cls, cfg: dict[str, Any]) -> SlideConfig:
        names = {f.name for f in fields(cls)} - {"source", "upscale_stages"}
        source = Source.from_record(cfg["input"]) if cfg.get("input") else None
        vals = {k: v for k, v in cfg.items() if k in names}
        vals.update({f: cfg[c] for f, c in CLASS_FIELDS.items() if c in cfg})
        if vals.get("stage_steps") is not None:
            vals["stage_steps"] = tuple(vals["stage_steps"])
        return cls(**vals, source=source, upscale_stages=cfg.get("upscale_stages"))

    def settings(self) -> Settings:
        from ..method.stages import Settings

        return Settings(steps=self.steps, guided_steps=self.guided_steps, solver=self.solver,
                        batch=self.batch, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                        precision=self.precision, grid_shift=self.grid_shift,
                        skip_background=self.skip_background,
                        background_tolerance=self.background_tolerance, state_dtype=self.state_dtype,
                        channels_last=self.channels_last, compile=self.compile,
                        guided_sigma=self.guided_sigma, start_sigma=self.start_sigma,
                        stage_steps=self.stage_steps).validate()


@dataclass(frozen=True)
class RunSpec:
    """One run of the sampler: the slide request, its output and how to run it."""

    output: str
    request: Request = Request()
    device: str = "auto"
    state_device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    allow_extrapolation: bool = False
    drop_stages: bool = False
    checkpoint_every: int | None = None
    source: Source | None = None  # upscale: the input region (stage 0) and how many stages follow
    upscale_stages: int | None = None
    lock: bool = True  # --no-lock: no exclusive lock beside the store (filesystems without locks)
    fsync: bool = True  # --no-fsync: marks and chunks are not forced to disk (scratch runs)

    def validate(self) -> RunSpec:
        if self.device not in DEVICES:
            raise UsageError(f"--device must be cpu, cuda or auto (got {self.device})")
        if self.state_device not in DEVICES:
            raise UsageError(f"--state-device must be auto, cpu or cuda (got {self.state_device})")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be at least 0 (got {self.checkpoint_every})")
        return self

    def with_(self, **changes) -> RunSpec:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """What a slide set's manifest records of the run (the request and the run's options)."""
        d = self.request.to_json()
        for k in ("state_device", "allow_extrapolation", "drop_stages", "checkpoint_every"):
            v = getattr(self, k)
            if v != getattr(RunSpec, k):
                d[k] = v
        return d

    @classmethod
    def from_json(cls, output: str, d: dict[str, Any], **run) -> RunSpec:
        runs = {k: d[k] for k in ("state_device", "allow_extrapolation", "drop_stages", "checkpoint_every")
                if k in d}
        return cls(output=output, request=Request.from_json(d), **{**runs, **run}).validate()


def model_config(spec: str | None, patch: int | None = None) -> dict:
    """A model's config without building it (no torch work in a process that forks workers)."""
    from ..slides import checkpoint

    spec = spec or "default"
    if str(spec) == "gaussian":
        return checkpoint.gaussian_config(patch)
    return checkpoint.read_config(checkpoint.resolve_model_path(spec))


def check_mpp_range(plans, model_cfg: dict, allow_extrapolation: bool) -> None:
    """Sampling: stage 0 and the final µm/px must lie in the model's trained range."""
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
