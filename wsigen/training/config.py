"""What a training run depends on: the frozen :class:`TrainConfig`, and :class:`TrainOptions`, the
options a caller gave (the rest are defaults, or on ``--resume`` the saved run's values).

Both are built once at the edge (``wsigen train`` or :func:`wsigen.training.train`'s arguments),
validated there, and passed as they are. ``TrainConfig.to_json`` is the ``config`` block of
``train-state/state.json``; its keys and values must stay readable by ``--resume`` of older runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

from ..errors import UsageError
from ..nets import UNetConfig

#: Options that may change between a run and its resume; everything else must match.
RUN_CONTROL = (
    "max_steps",
    "time_limit",
    "checkpoint_every",
    "preview_every",
    "log_every",
    "device",
    "loader_workers",
)
MPP_SAMPLING = ("uniform", "log-uniform")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
#: --label-dropout when --labels is given and it is not (Ho & Salimans use 0.1–0.2)
LABEL_DROPOUT = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. None means: derive from the data (or the default).

    Construction validates (raises :class:`UsageError`), so a TrainConfig in hand is a valid one.
    """

    patch: int = 64
    width: int = 32
    mults: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    dropout: float = 0.0
    emb_freqs: int = 16
    #: which --arch the network fields came from (small, paper or a JSON file): recorded, and a
    #: --resume with another one is refused
    arch_name: str = "small"
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
    #: class labels of the slides: ``folders`` or a ``slide,label`` CSV file (None: class-free)
    labels: str | None = None
    #: share of patches trained with the "no class" label −1 (classifier-free guidance); only
    #: with ``labels``, where None becomes :data:`LABEL_DROPOUT`
    label_dropout: float | None = None
    #: α of the morphology-weighted loss: per-pixel weight 1 + α·(nuclei mask), mean 1 per patch
    morphology_weight: float = 0.0
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
    #: loader processes per training process (None: min(4, CPUs per training process)); the
    #: patches are the same for any number, so it may change on --resume
    loader_workers: int | None = None
    #: micro-batches per optimizer step on each process (gradients summed, then one update)
    grad_accum: int = 1
    #: fp32 | bf16 | fp16; None: fp32 on CPU, bf16 on CUDA (fp16 where bf16 is not supported)
    precision: str | None = None

    def __post_init__(self):
        # lists from JSON or Python callers become tuples, so equal configs compare equal
        for name in ("mults", "attn_levels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.labels is not None:  # a Path from Python callers: the config stores text
            object.__setattr__(self, "labels", str(self.labels))
            if self.label_dropout is None:
                object.__setattr__(self, "label_dropout", LABEL_DROPOUT)
        self._validate()

    def _validate(self) -> None:
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
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must lie in [0, 1) (got {self.dropout})")
        try:
            UNetConfig.from_dict(self.arch())
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad network: {e}") from None
        if self.mpp_sampling not in MPP_SAMPLING:
            raise UsageError(
                f"--mpp-sampling must be uniform or log-uniform (got {self.mpp_sampling!r})"
            )
        if self.loader_workers is not None and not 0 <= self.loader_workers <= 64:
            raise UsageError(f"--loader-workers must lie in 0…64 (got {self.loader_workers})")
        if self.grad_accum < 1:
            raise UsageError(f"--grad-accum must be at least 1 (got {self.grad_accum})")
        if self.precision not in (None, *PRECISIONS):
            raise UsageError(f"--precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        self._validate_labels()
        if self.device not in DEVICES:
            raise UsageError(f"--device must be cpu, cuda or auto (got {self.device!r})")

    def _validate_labels(self) -> None:
        if self.labels is None and self.label_dropout is not None:
            raise UsageError("--label-dropout needs --labels (it drops class labels, and a run "
                             "without --labels has none; on --resume give the run's --labels too)")
        if self.labels is not None and not self.labels.strip():
            raise UsageError("--labels must be 'folders' or a slide,label CSV file (got '')")
        p = self.label_dropout
        if p is not None and not (isinstance(p, int | float) and 0 <= p < 1):
            raise UsageError(f"--label-dropout must lie in [0, 1) (got {p})")
        a = self.morphology_weight
        if not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
            raise UsageError(f"--morphology-weight must be a finite number ≥ 0 (got {a})")

    def to_json(self) -> dict:
        d = asdict(self)
        d["mults"], d["attn_levels"] = list(self.mults), list(self.attn_levels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        """The config of a saved run; keys this version does not know are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def arch(self, classes: int = 0) -> dict:
        """The ``arch`` block of the checkpoint config (as ``checkpoint.build_denoiser`` reads it),
        with ``classes`` class embeddings (0: class-free, the key left out)."""
        cfg = UNetConfig(
            width=self.width,
            mults=tuple(self.mults),
            blocks=self.blocks,
            attn_levels=tuple(self.attn_levels),
            emb_freqs=self.emb_freqs,
            dropout=self.dropout,
            classes=classes,
        )
        d = {"name": "unet", **cfg.to_dict()}
        d.pop("extra", None)
        return d


@dataclass(frozen=True)
class TrainOptions:
    """The options a caller gave: ``config`` holds them over the defaults, ``given`` names them.

    A fresh run trains ``config``; a resumed one keeps the saved run and takes only the given
    :data:`RUN_CONTROL` options from here (:meth:`resumed`).
    """

    config: TrainConfig = TrainConfig()
    given: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, config: TrainConfig | None = None, **options: Any) -> TrainOptions:
        """From keyword options (TrainConfig fields; None: not given) over ``config`` or the defaults.

        Passing a whole ``config`` counts every field as given.
        """
        names = {f.name for f in fields(TrainConfig)}
        unknown = set(options) - names
        if unknown:
            raise UsageError(f"unknown training options: {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if v is not None}
        explicit = set(given) | (names if config is not None else set())
        return cls(replace(config or TrainConfig(), **given), frozenset(explicit))

    def resumed(self, saved: TrainConfig) -> TrainConfig:
        """The saved run's config with the given run-control options; other changes are refused."""
        diff = [
            n
            for n in sorted(self.given)
            if n not in RUN_CONTROL and getattr(self.config, n) != getattr(saved, n)
        ]
        net = {"arch_name", "width", "mults", "blocks", "attn_levels", "dropout", "emb_freqs", "patch"}
        if "arch_name" in diff or ("arch_name" in self.given and net & set(diff)):
            raise UsageError(
                f"--resume with a different network (--arch {self.config.arch_name}, saved run: "
                f"{saved.arch_name}, {', '.join(f'{n}={getattr(saved, n)!r}' for n in sorted(net & set(diff)))}); "
                "a run cannot change its network (start a new one, or --init-from its model)"
            )
        if diff:
            raise UsageError(
                f"--resume with options that differ from the saved run: "
                f"{', '.join(f'{n} (saved {getattr(saved, n)!r})' for n in diff)}"
            )
        return replace(saved, **{n: getattr(self.config, n) for n in RUN_CONTROL if n in self.given})


def arch_options(
    arch: str | None = None,
    *,
    patch: int | None = None,
    width: int | None = None,
    mults: tuple[int, ...] | None = None,
    blocks: int | None = None,
    attn_levels: tuple[int, ...] | None = None,
    dropout: float | None = None,
) -> dict[str, Any]:
    """TrainConfig network fields for ``--arch`` (small, paper, FILE.json) with single-field
    overrides; all None when nothing is given (the defaults, or on resume the saved network).

    Given an arch, every network field counts as given, so ``--resume --arch X`` of a run
    trained with another network is refused by :meth:`TrainOptions.resumed`.
    """
    from ..nets import archs

    over = dict(width=width, mults=mults, blocks=blocks, attn_levels=attn_levels, dropout=dropout)
    if arch is None:
        return {"patch": patch, **over}
    a = archs.resolve(arch)
    net = archs.override(a.net, **over)
    return {"arch_name": a.name, "patch": patch if patch is not None else a.patch,
            "width": net.width, "mults": net.mults, "blocks": net.blocks,
            "attn_levels": net.attn_levels, "dropout": net.dropout, "emb_freqs": net.emb_freqs}


class SamplingDefaults(NamedTuple):
    """Sampling defaults recorded in the checkpoint."""

    final_mpp: float
    recommended_size: int
    guided_steps: int


def default_sampling(cfg: TrainConfig, mpp_min: float, mpp_max: float) -> SamplingDefaults:
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
    return SamplingDefaults(final, size, guided)


def ema_beta(cfg: TrainConfig, images: int, batch: int) -> float:
    """EDM's EMA: half-life min(ema_halflife_kimg·1000, rampup·images seen) images."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup:
        halflife = min(halflife, images * cfg.ema_rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``lr_warmup`` steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
