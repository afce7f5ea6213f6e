"""Patch-grid arithmetic (design.md §2 "Grid shift"): pure index computations, no image data.

Step i of a stage uses grid lines at o_i + jM on each axis, o_i a keyed multiple of k in [0, M).
Patches reaching past the canvas are padded; the padding is not state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import keys


@dataclass(frozen=True)
class Patch:
    """An M × M patch whose top-left corner lies at (y0, x0) on the canvas (may be negative)."""

    y0: int
    x0: int
    size: int

    def valid(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Canvas rows [ya, yb) and columns [xa, xb) that the patch covers."""
        m = self.size
        return max(self.y0, 0), min(self.y0 + m, height), max(self.x0, 0), min(self.x0 + m, width)

    def is_padded(self, height: int, width: int) -> bool:
        ya, yb, xa, xb = self.valid(height, width)
        return (yb - ya, xb - xa) != (self.size, self.size)


def grid_offset(seed: int, stage: int, step: int, patch: int, k: int, shift: bool = True):
    """(o_y, o_x) of step ``step``: uniform over the multiples of k in [0, M), keyed."""
    if patch % k:
        raise ValueError(f"patch size {patch} is not a multiple of k={k}")
    if not shift:
        return 0, 0
    g = keys.rng(seed, keys.GRID_OFFSET, stage, step)
    oy, ox = (int(v) * k for v in g.integers(0, patch // k, size=2))
    assert oy % k == 0 and ox % k == 0, "grid offsets must be multiples of k"
    return oy, ox


def axis_starts(n: int, offset: int, patch: int) -> list[int]:
    """Starts of the patches [p, p + M) meeting [0, n) when grid lines lie at offset + jM."""
    if not 0 <= offset < patch:
        raise ValueError(f"offset {offset} outside [0, {patch})")
    first = offset - patch if offset else 0
    return list(range(first, n, patch))


def rows_and_cols(height: int, width: int, oy: int, ox: int, patch: int):
    """Patch row starts and column starts of one step's grid."""
    return axis_starts(height, oy, patch), axis_starts(width, ox, patch)


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced split of range(n) into ``parts`` ranges (some may be empty)."""
    base, extra = divmod(n, parts)
    out, a = [], 0
    for r in range(parts):
        b = a + base + (1 if r < extra else 0)
        out.append((a, b))
        a = b
    return out


def row_span(starts: list[int], patch: int, height: int) -> tuple[int, int]:
    """Canvas rows covered by consecutive patch rows with the given starts."""
    if not starts:
        return 0, 0
    return max(min(starts), 0), min(max(starts) + patch, height)


def batches(cols: list[int], batch: int) -> Iterator[list[int]]:
    """Column starts of one patch row cut into batches of ``batch`` in left-to-right order."""
    for i in range(0, len(cols), batch):
        yield cols[i : i + batch]


def patch_count(height: int, width: int, oy: int, ox: int, patch: int) -> int:
    rows, cols = rows_and_cols(height, width, oy, ox, patch)
    return len(rows) * len(cols)
