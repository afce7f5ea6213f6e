"""The store's image pyramid: level shapes and the integer 2×2 mean that makes each level from the last.

The operator is part of the binding store layout (the NGFF metadata names it), so every reduction
of a stored image goes through ``downsample2``.
"""

from __future__ import annotations

import numpy as np

from .. import faults
from .parallel import bounded_map

PYRAMID_MIN = 1024


def level_shapes(height: int, width: int, min_side: int = PYRAMID_MIN) -> list[tuple[int, int]]:
    """Level 0 and its 2× reductions (ceil) down to max side ≤ min_side."""
    if min_side < 1:
        raise ValueError(f"min_side must be positive (got {min_side})")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample2(a: np.ndarray) -> np.ndarray:
    """Integer 2×2 mean (round half up) of (C, H, W) uint8; an odd edge repeats its last row/column."""
    c, h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    s = a.astype(np.uint16)
    s = s[:, 0::2, 0::2] + s[:, 1::2, 0::2] + s[:, 0::2, 1::2] + s[:, 1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def halve_into(src, dst, chunk: int, level: int, workers: int) -> None:
    """Fill ``dst`` (level ``level``) with ``downsample2`` of ``src`` (the level above), one
    ``chunk``-sided block of ``dst`` per task: memory is a 2×2 block of chunks per worker."""
    h, w = dst.shape[1:]
    c = chunk

    def one(yx):
        y, x = yx
        block = np.asarray(src[:, 2 * y : 2 * (y + c), 2 * x : 2 * (x + c)])
        dst[:, y : y + c, x : x + c] = downsample2(block)[:, : min(c, h - y), : min(c, w - x)]
        faults.point("pyramid-chunk", level, y, x)

    cells = ((y, x) for y in range(0, h, c) for x in range(0, w, c))
    for _ in bounded_map(one, cells, workers):
        pass
