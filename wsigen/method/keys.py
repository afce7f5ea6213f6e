"""Keyed randomness (design.md §2 "Determinism"): every random draw is a pure function of a key.

No global stream is ever used: the same key gives the same numbers in any process, in any
order, after any interruption.
"""

from __future__ import annotations

import numpy as np

# Purpose tags keep the key spaces of different kinds of draws apart.
INIT_NOISE = 0
GRID_OFFSET = 1
PAD_NOISE = 2
TRAIN = 3

#: Fixed tiling of a canvas on which the initial noise is keyed (independent of bands and ranks).
NOISE_TILE = 256

_MASK = (1 << 64) - 1


def rng(seed: int, purpose: int, *key: int) -> np.random.Generator:
    """A Philox generator determined by (seed, purpose, *key) alone."""
    entropy = [int(seed) & _MASK, int(purpose), *(int(v) & _MASK for v in key)]
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def normal(shape: tuple[int, ...], seed: int, purpose: int, *key: int) -> np.ndarray:
    """Standard normal float32 array keyed by (seed, purpose, *key)."""
    return rng(seed, purpose, *key).standard_normal(shape, dtype=np.float32)


def initial_noise(seed: int, stage: int, height: int, width: int, y0: int, y1: int,
                  x0: int = 0, x1: int | None = None) -> np.ndarray:
    """ε for rows [y0, y1) (columns [x0, x1), default all) of a height × width canvas, keyed per
    tile of a fixed tiling.

    The value of a pixel depends only on (seed, stage, its tile, its place in the tile), so any
    block of the canvas can be produced by any process or thread and agrees with every other one.
    """
    t = NOISE_TILE
    x1 = width if x1 is None else x1
    out = np.empty((3, y1 - y0, x1 - x0), dtype=np.float32)
    for ty in range(y0 // t, (y1 - 1) // t + 1 if y1 > y0 else 0):
        ty0, ty1 = ty * t, min((ty + 1) * t, height)
        a, b = max(ty0, y0), min(ty1, y1)
        for tx in range(x0 // t, (x1 - 1) // t + 1 if x1 > x0 else 0):
            tx0, tx1 = tx * t, min((tx + 1) * t, width)
            c, d = max(tx0, x0), min(tx1, x1)
            tile = normal((3, ty1 - ty0, tx1 - tx0), seed, INIT_NOISE, stage, ty, tx)
            out[:, a - y0 : b - y0, c - x0 : d - x0] = tile[:, a - ty0 : b - ty0, c - tx0 : d - tx0]
    return out
