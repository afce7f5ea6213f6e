"""Where a stage's state lives: a band of rows [y0, y1) of the (3, H, W) canvas.

A single process holds every row; with several processes each holds the band its patch rows
need, and ``distributed`` moves rows between bands when the grid shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """x ∈ [−1, 1] → round((x + 1)·127.5), clipped: the one conversion used everywhere."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return quantize_(x.to(torch.float32, copy=True)).to(torch.uint8).cpu().numpy()


def quantize_(t: torch.Tensor) -> torch.Tensor:
    """In place on a float32 tensor: round((t + 1)·127.5) clamped to [0, 255] (``to_uint8``'s
    arithmetic, for callers that convert into a reused buffer)."""
    return t.add_(1).mul_(127.5).round_().clamp_(0, 255)


def from_uint8(u: np.ndarray | torch.Tensor, device="cpu") -> torch.Tensor:
    """uint8 → float32 in [−1, 1] (the inverse of ``to_uint8`` on its grid)."""
    t = torch.as_tensor(u, device=device)
    return t.to(torch.float32) / 127.5 - 1


@dataclass
class Band:
    """Rows [y0, y1) of a (3, height, width) state; ``data`` has shape (3, y1 − y0, width), or
    (6, …) when a multistep solver keeps its history (the previous data prediction) beside x."""

    height: int
    width: int
    y0: int
    y1: int
    data: torch.Tensor

    def rows(self, a: int, b: int) -> torch.Tensor:
        """View of canvas rows [a, b) of the state x, which must lie inside the band."""
        return self.all_rows(a, b)[:3]

    def history(self, a: int, b: int) -> torch.Tensor:
        """View of rows [a, b) of a multistep solver's history (channels 3…5 of ``data``)."""
        if self.data.shape[0] < 6:
            raise RuntimeError("this band holds no multistep history")
        return self.all_rows(a, b)[3:6]

    def all_rows(self, a: int, b: int) -> torch.Tensor:
        """Every channel of rows [a, b): what moves between processes."""
        if not self.y0 <= a <= b <= self.y1:
            raise IndexError(f"rows [{a}, {b}) outside band [{self.y0}, {self.y1})")
        return self.data[:, a - self.y0 : b - self.y0]


@dataclass
class GuideBand:
    """Rows [y0, y1) of the previous stage as stored (uint8, shape (3, y1 − y0, width))."""

    y0: int
    y1: int
    data: np.ndarray
