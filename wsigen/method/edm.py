"""EDM (Karras et al. 2022): time steps, preconditioning, loss and the Heun/Euler steps.

Schedules are separate from solvers; a solver step takes a denoiser ``u = denoise(x, t)`` that
already includes any guidance, so the same step serves guided and unguided sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Schedule:
    """Karras time-step parameters (design.md §2)."""

    steps: int = 40
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


def karras_sigmas(sched: Schedule) -> list[float]:
    """t_0 … t_{N-1} by the Karras formula, then t_N = 0 (float64 Python floats)."""
    n = sched.steps
    if n < 2:
        raise ValueError(f"steps must be at least 2 (got {n})")
    if not 0 < sched.sigma_min < sched.sigma_max:
        raise ValueError("need 0 < sigma_min < sigma_max")
    a, b = sched.sigma_max ** (1 / sched.rho), sched.sigma_min ** (1 / sched.rho)
    return [(a + i / (n - 1) * (b - a)) ** sched.rho for i in range(n)] + [0.0]


def scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """c_skip, c_out, c_in, c_noise for noise level σ — used by the forward pass and the loss."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; σ, s) = c_skip·x + c_out·F(c_in·x; c_noise, log s) around any network F."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mpp: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: class per sample (−1: none), for a class-conditional F; None: no class."""
        shape = (-1, 1, 1, 1)
        sigma = sigma.to(torch.float32).reshape(-1).expand(x.shape[0])
        mpp = mpp.to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = scalings(sigma, self.sigma_data)
        args = (c_noise, mpp.log()) if labels is None else (
            c_noise, mpp.log(), labels.reshape(-1).expand(x.shape[0]))
        f = self.net((c_in.reshape(shape) * x).to(x.dtype), *args)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * f.to(torch.float32)


def edm_loss(
    model: EDMPrecond,
    x: torch.Tensor,
    mpp: torch.Tensor,
    generator: torch.Generator | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """λ(σ)·‖D(x + n; σ, s) − x‖² with ln σ ~ N(P_mean, P_std²), averaged over the batch.

    ``pixel_weight`` (broadcastable to x, e.g. (B, 1, H, W)) multiplies the squared error per
    pixel; None is the plain loss (the same operations as without the argument)."""
    b = x.shape[0]
    rnd = torch.randn(b, device=x.device, generator=generator)
    sigma = (rnd * p_std + p_mean).exp()
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    noise = torch.randn(x.shape, device=x.device, generator=generator) * sigma.reshape(-1, 1, 1, 1)
    d = model(x + noise, sigma, mpp)
    err = (d - x) ** 2
    if pixel_weight is not None:
        err = err * pixel_weight
    return (weight.reshape(-1, 1, 1, 1) * err).mean()


Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def solver_step(
    denoise: Denoise,
    x: torch.Tensor,
    t_cur: float,
    t_next: float,
    heun: bool = True,
    reset: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """One step from t_cur to t_next (Algorithm 1 of Harb et al. with EDM's Heun correction).

    ``reset(x, t)`` lets the caller restore non-state pixels (padding) before the second
    evaluation. Returns the new x and the number of denoiser evaluations made.
    """
    u = denoise(x, t_cur)
    x_next = torch.lerp(u, x, t_next / t_cur)  # Euler: x + (t_next − t_cur)·(x − u)/t_cur
    if not heun or t_next == 0:
        return x_next, 1
    if reset is not None:
        x_next = reset(x_next, t_next)
    u2 = denoise(x_next, t_next)
    # Trapezoid x + h/2·(d_cur + d_next) with d = (x − u)/t, h = t_next − t_cur, as one linear
    # combination of x, u, x_next, u2 accumulated in place in u2 (four passes, no temporaries).
    h = t_next - t_cur
    c, e = h / (2 * t_cur), h / (2 * t_next)
    mine = {t.untyped_storage().data_ptr() for t in (x, x_next, u)}
    out = (u2.clone() if u2.untyped_storage().data_ptr() in mine else u2).mul_(-e)
    out.add_(x_next, alpha=e)
    out.add_(x, alpha=1 + c)
    out.add_(u, alpha=-c)
    return out, 2


def evaluations_per_diffusion(steps: int, heun: bool) -> int:
    """2N − 1 for Heun, N for Euler."""
    return 2 * steps - 1 if heun else steps
