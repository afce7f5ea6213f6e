"""Stage planning (Harb et al., Algorithm 2): L, the canvas and µm/px of every stage, and what one
stage's step loop needs besides the state — its settings (the reproducibility key's sampling part)
and its context (denoiser, seed, canvas, grid)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from ..errors import UsageError
from . import gridshift, schedules


@dataclass(frozen=True)
class StagePlan:
    index: int
    height: int
    width: int
    mpp: float


def ceil_div(n: int, k: int) -> int:
    return -(-n // k)


def ceil_to(n: int, k: int) -> int:
    return ceil_div(n, k) * k


def num_stages(width: int, height: int, patch: int, k: int) -> int:
    """L = ⌈log_k(max(W, H)/M)⌉, at least 0, computed with integers."""
    L, side = 0, patch
    while side < max(width, height):
        side *= k
        L += 1
    return L


def plan_stages(width: int, height: int, patch: int, k: int, mpp: float) -> list[StagePlan]:
    """Stages 0 … L: canvas of stage l = final size / k^(L−l), rounded up to a multiple of k."""
    if width < 1 or height < 1:
        raise UsageError(f"size must be positive (got {width}x{height})")
    if patch % k:
        raise UsageError(f"patch size {patch} is not a multiple of k={k}")
    L = num_stages(width, height, patch, k)
    plans = []
    for l in range(L + 1):
        f = k ** (L - l)
        plans.append(StagePlan(l, ceil_to(-(-height // f), k), ceil_to(-(-width // f), k), mpp * f))
    return plans


@dataclass(frozen=True)
class Settings:
    """Sampling options that belong to the reproducibility key (design.md §2)."""

    steps: int = 40
    guided_steps: int = 28
    solver: str = "heun"
    batch: int = 8
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    precision: str = "fp32"
    grid_shift: bool = True
    skip_background: bool = False
    background_tolerance: float = 0.0
    state_dtype: str = "float32"
    channels_last: bool = False
    compile: bool = False
    # Schedule options (docs/architecture.md, "Schedules"); None: the paper's (today's) behaviour.
    guided_sigma: float | None = None  # project while t_i ≥ σ_r (else: while i < guided_steps)
    start_sigma: float | None = None  # guided stages start at A†y + S·ε and run from S
    stage_steps: tuple[int, ...] | None = None  # the --stage-steps rule (schedules.stage_step_count)

    @property
    def multistep(self) -> bool:
        """The solver keeps the previous data prediction (a second canvas beside the state)."""
        return self.solver in schedules.MULTISTEP

    @property
    def channels(self) -> int:
        """Channels of a band: x, plus the history of a multistep solver."""
        return 6 if self.multistep else 3

    def for_stage(self, index: int, last: int) -> Settings:
        """This stage's own settings: its step count, and its start (stage 0 always from σ_max)."""
        if self.stage_steps is None and self.start_sigma is None:
            return self
        n = schedules.stage_step_count(self.steps, self.stage_steps, index, last)
        return replace(self, steps=n, guided_steps=min(self.guided_steps, n), stage_steps=None,
                       start_sigma=None if index == 0 else self.start_sigma)

    def sigmas(self) -> list[float]:
        """t_0 … t_N of this (per-stage) schedule: from the start level, or σ_max."""
        top = self.sigma_max if self.start_sigma is None else self.start_sigma
        return schedules.stage_schedule(self.steps, self.sigma_min, top, self.rho)

    def projected(self, i: int, t: list[float]) -> bool:
        """Algorithm 1's relaxation: step i is projected while i < r, or while t_i ≥ σ_r."""
        if self.guided_sigma is None:
            return i < self.guided_steps
        return t[i] >= self.guided_sigma

    @property
    def state_torch_dtype(self) -> torch.dtype:
        """The dtype the state (x of every pixel) is held in between steps."""
        return torch.float16 if self.state_dtype == "float16" else torch.float32

    def validate(self) -> Settings:
        if self.steps < 2:
            raise UsageError(f"--steps must be at least 2 (got {self.steps})")
        if not 0 <= self.guided_steps <= self.steps:
            raise UsageError(f"--guided-steps must lie in [0, steps={self.steps}] (got {self.guided_steps})")
        if self.solver not in schedules.SOLVERS:
            raise UsageError(f"--solver must be heun, euler or dpmpp2m (got {self.solver})")
        if self.guided_sigma is not None and not self.guided_sigma >= 0:
            raise UsageError(f"--guided-sigma must be at least 0 (got {self.guided_sigma:g})")
        if self.start_sigma is not None and not self.sigma_min < self.start_sigma <= self.sigma_max:
            raise UsageError(f"--start-sigma must lie in (σ_min = {self.sigma_min:g}, σ_max = "
                             f"{self.sigma_max:g}] (got {self.start_sigma:g})")
        if self.stage_steps is not None:
            schedules.parse_stage_steps(self.stage_steps)
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1 (got {self.batch})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UsageError(f"--precision must be fp32, bf16 or fp16 (got {self.precision})")
        if self.state_dtype not in ("float32", "float16"):
            raise UsageError(f"--state-dtype must be float32 or float16 (got {self.state_dtype})")
        return self


@dataclass
class StageContext:
    """Everything one stage's loop needs besides the state."""

    denoiser: torch.nn.Module
    settings: Settings
    seed: int
    stage: int
    height: int
    width: int
    mpp: float
    patch: int
    k: int
    background: tuple[float, float, float]  # in [−1, 1]
    device: torch.device
    guided: bool = True  # False for stage 0
    shift: bool = True
    stats: dict = field(default_factory=lambda: {"evaluations": 0, "patches": 0, "skipped": 0})
    _staging: dict = field(default_factory=dict, repr=False)

    def staging(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused page-locked host buffer for moving a segment between the host state and the
        accelerator (asynchronous copies need pinned memory; one buffer per segment shape)."""
        buf = self._staging.get(shape)
        if buf is None:
            buf = self._staging[shape] = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return buf

    @functools.cached_property
    def bg(self) -> torch.Tensor:
        """The background colour as a (1, 3, 1, 1) tensor on the device (made once per stage)."""
        return torch.tensor(self.background, dtype=torch.float32, device=self.device).reshape(1, 3, 1, 1)

    def offsets(self, step: int) -> tuple[int, int]:
        return gridshift.grid_offset(self.seed, self.stage, step, self.patch, self.k, self.shift)

    def grid(self, step: int) -> tuple[list[int], list[int]]:
        oy, ox = self.offsets(step)
        return gridshift.rows_and_cols(self.height, self.width, oy, ox, self.patch)


def stage_patch_count(ctx: StageContext, step: int) -> int:
    rows, cols = ctx.grid(step)
    return len(rows) * len(cols)
