"""Relaxed projection onto the previous stage (design.md §2): A = k×k average pooling.

A·Aᵀ = I/k², so A† = k²·Aᵀ is nearest-neighbour upsampling by k and
ū = u − A†(A u) + A† y satisfies A ū = y exactly. No matrices are formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def avgpool(x: torch.Tensor, k: int) -> torch.Tensor:
    """A: k×k average pooling of (B, C, H, W) with H, W multiples of k."""
    if x.shape[-1] % k or x.shape[-2] % k:
        raise ValueError(f"spatial size {tuple(x.shape[-2:])} is not a multiple of k={k}")
    return F.avg_pool2d(x, k)


def pinv(y: torch.Tensor, k: int) -> torch.Tensor:
    """A†: nearest-neighbour upsampling by k (a broadcast view, materialised once)."""
    *lead, h, w = y.shape
    return y[..., :, None, :, None].expand(*lead, h, k, w, k).reshape(*lead, h * k, w * k)


def project(u: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """ū = u − A†(A u) + A† y: the closest image to u whose k×k means are y."""
    return u + pinv(y - avgpool(u, k), k)
