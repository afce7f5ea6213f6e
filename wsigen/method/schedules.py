"""Per-stage noise schedules: relaxation by noise level, part-way starts, per-stage step counts.

The paper runs every stage with the same N steps from σ_max and projects steps i < r. Here a
guided stage may instead start part-way down (x = A†y + S·ε on a Karras schedule from S), run its
own number of steps (``--stage-steps``), and be projected while t_i ≥ σ_r (``--guided-sigma``),
which keeps its meaning when the schedule changes (design.md §2). Pure arithmetic, no I/O.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from . import edm

#: Solvers and the denoiser evaluations one step costs (Heun's last step, to t_N = 0, has one).
SOLVERS = ("heun", "euler", "dpmpp2m")
MULTISTEP = ("dpmpp2m",)  # keep the previous data prediction as a second canvas


def sigma_for_index(sigmas: list[float], r: int) -> float:
    """σ_r equivalent to "project steps i < r" on ``sigmas`` (t_0 … t_N, t_N = 0).

    The midpoint of t_{r−1} and t_r, so that t_i ≥ σ_r holds exactly for i < r; r = 0 gives
    2·t_0 (above every level: never projected; finite, so it can be stored as JSON), r = N gives
    t_{N−1}/2 (every step projected).
    """
    n = len(sigmas) - 1
    if not 0 <= r <= n:
        raise UsageError(f"--guided-steps must lie in [0, {n}] (got {r})")
    if r == 0:
        return 2 * sigmas[0]
    return (sigmas[r - 1] + sigmas[r]) / 2


def stage_step_count(steps: int, stage_steps: tuple[int, ...] | None, index: int, last: int) -> int:
    """N of stage ``index`` of 0 … ``last``: the rule of ``--stage-steps a,b,…,z``.

    Values are counted from the last stage backwards (z for stage L, the one before for L − 1,
    …); every earlier guided stage takes the first value a; stage 0 (unguided, from σ_max) always
    takes ``steps``. Without the option every stage takes ``steps``.
    """
    if index == 0 or not stage_steps:
        return steps
    back = last - index  # 0 for the last stage
    vals = tuple(stage_steps)
    return vals[len(vals) - 1 - back] if back < len(vals) else vals[0]


def parse_stage_steps(text: str | tuple | list | None) -> tuple[int, ...] | None:
    """'40,32,24' (or a sequence) → (40, 32, 24), every value at least 2."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
        except ValueError:
            raise UsageError(f"--stage-steps must be comma-separated integers (got {text!r})") from None
    else:
        vals = tuple(int(v) for v in text)
    if not vals:
        raise UsageError("--stage-steps needs at least one value")
    bad = [v for v in vals if v < 2]
    if bad:
        raise UsageError(f"--stage-steps values must be at least 2 (got {bad[0]})")
    return vals


def evaluations_per_step(solver: str, last_step: bool) -> int:
    """Denoiser evaluations of one step: Heun 2 (1 at the step to t_N = 0), Euler and DPM++ 1."""
    return 2 if solver == "heun" and not last_step else 1


def dpmpp2m_update(x, u, prev, t_prev: float | None, t_cur: float, t_next: float):
    """One DPM-Solver++(2M) step (Lu et al. 2022, data prediction) on EDM's σ = t (α = 1).

    With λ = −ln t and h = λ_next − λ_cur, x_next = (t_next/t_cur)·x + (1 − t_next/t_cur)·D, where
    D = u at the first step (``prev`` None) and at the last (t_next = 0), else the second-order
    extrapolation D = (1 + 1/(2ρ))·u − 1/(2ρ)·prev with ρ = h_last/h. A projection applied to u
    and prev carries over to D (both pool to y, so D does). Returns a new tensor.
    """
    if prev is None or t_next == 0 or t_prev is None:
        d = u
    else:
        h = math.log(t_cur / t_next)
        h_last = math.log(t_prev / t_cur)
        c = h / (2 * h_last)  # = 1/(2ρ)
        d = u.mul(1 + c).sub_(prev, alpha=c)
    return torch.lerp(d, x, t_next / t_cur)


def stage_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    return edm.karras_sigmas(edm.Schedule(steps, sigma_min, sigma_max, rho))
