"""Relaxed projection onto the previous stage (design.md §2): A = k×k average pooling.

A·Aᵀ = I/k², so A† = k²·Aᵀ is nearest-neighbour upsampling by k and
ū = u − A†(A u) + A† y satisfies A ū = y exactly. No matrices are formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def avgpool(x: torch.Tensor, k: int) -> torch.Tensor:
    """A: k×k average pooling of (B, C, H, W) with H, W multiples of k.

    Summed from k + k strided slices (rows, then columns) in x's dtype: on CPU this is several
    times faster than ``F.avg_pool2d``.
    """
    if x.shape[-1] % k or x.shape[-2] % k:
        raise ValueError(f"spatial size {tuple(x.shape[-2:])} is not a multiple of k={k}")
    if x.device.type != "cpu":
        return F.avg_pool2d(x, k)
    rows = x[..., 0::k, :] + x[..., 1::k, :] if k > 1 else x.clone()
    for j in range(2, k):
        rows += x[..., j::k, :]
    out = rows[..., 0::k] + rows[..., 1::k] if k > 1 else rows
    for j in range(2, k):
        out += rows[..., j::k]
    return out.mul_(1.0 / (k * k))


def pinv(y: torch.Tensor, k: int) -> torch.Tensor:
    """A†: nearest-neighbour upsampling by k (a broadcast view, materialised once)."""
    *lead, h, w = y.shape
    return y[..., :, None, :, None].expand(*lead, h, k, w, k).reshape(*lead, h * k, w * k)


def project(u: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """ū = u − A†(A u) + A† y: the closest image to u whose k×k means are y."""
    return project_(u.clone(), y, k)


def project_(u: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``project`` in place on u (returned): A†(y − A u) is added block position by position,
    so no full-size temporary is made."""
    delta = y.to(u.dtype) - avgpool(u, k)
    for j in range(k):
        for i in range(k):
            u[..., j::k, i::k] += delta
    return u
