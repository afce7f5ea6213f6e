"""The ``Slide`` interface: an image pyramid read as RGB uint8 regions in level-0 coordinates.

Backends implement ``_read``; everything else (background outside the image, scaled reads from
the best level, thumbnails) is here. ``ArraySlide`` is an in-memory pyramid.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from ..errors import WsigenError
from .pixels import WHITE, area_resize


class Slide:
    """An image pyramid: ``levels`` are (width, height, downsample); level 0 is full resolution."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        levels: list[tuple[int, int, float]],
        mpp: float | None,
        background=WHITE,
    ):
        self.path = Path(path) if path is not None else None
        self.levels = levels
        self.width, self.height = levels[0][0], levels[0][1]
        self.mpp = mpp
        self.background = tuple(int(v) for v in background)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, {self.width}x{self.height}, mpp={self.mpp})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of ``level`` in that level's coordinates, inside the image."""
        raise TypeError(f"{type(self).__name__} does not implement _read")

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like ``_read`` but any box: what lies outside the image is background."""
        lw, lh, _ = self.levels[level]
        if x >= 0 and y >= 0 and x + w <= lw and y + h <= lh:  # inside: no background to paint
            return self._read(level, x, y, w, h)
        out = np.empty((h, w, 3), np.uint8)
        out[:] = np.asarray(self.background, np.uint8)
        ax0, ay0, ax1, ay1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = self._read(
                level, ax0, ay0, ax1 - ax0, ay1 - ay0
            )
        return out

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 at ``level``: (x, y) in level-0 pixels, (w, h) at the level."""
        if not 0 <= level < len(self.levels):
            raise WsigenError(
                f"{self.path}: level {level} does not exist ({len(self.levels)} levels)"
            )
        if w < 1 or h < 1:
            raise WsigenError(f"region size must be positive (got {w}x{h})")
        d = self.levels[level][2]
        return self._read_level(
            level, int(math.floor(x / d)), int(math.floor(y / d)), int(w), int(h)
        )

    def best_level(self, factor: float) -> int:
        """The coarsest level whose downsample does not exceed ``factor`` (never upsample one)."""
        best = 0
        for i, (_, _, d) in enumerate(self.levels):
            if d <= factor * (1 + 1e-6) and d >= self.levels[best][2]:
                best = i
        return best

    def read_scaled(
        self, x: float, y: float, w: float, h: float, out_w: int, out_h: int
    ) -> np.ndarray:
        """The level-0 box (x, y, w, h) area-averaged to out_h × out_w from the best level."""
        lvl = self.best_level(min(w / out_w, h / out_h))
        d = self.levels[lvl][2]
        bx0, by0, bx1, by1 = x / d, y / d, (x + w) / d, (y + h) / d
        ix0, iy0 = math.floor(bx0), math.floor(by0)
        ix1, iy1 = max(math.ceil(bx1), ix0 + 1), max(math.ceil(by1), iy0 + 1)
        region = self._read_level(lvl, ix0, iy0, ix1 - ix0, iy1 - iy0)
        return area_resize(region, (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0), out_w, out_h)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image, longest side ``max_side`` (never upscaled)."""
        f = max(self.width, self.height) / max_side
        if f <= 1:
            return self.read_region(0, 0, self.width, self.height)
        tw, th = max(1, round(self.width / f)), max(1, round(self.height / f))
        return self.read_scaled(0, 0, self.width, self.height, tw, th)

    def sha256(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()


class ArraySlide(Slide):
    """An in-memory image with a 2× area-average pyramid (PNG/JPEG, or a cached small slide)."""

    def __init__(
        self, rgb: np.ndarray, mpp: float | None, path=None, background=WHITE, min_side: int = 256
    ):
        pyramid = [np.ascontiguousarray(rgb)]
        while min(pyramid[-1].shape[:2]) >= 2 * min_side:
            a = pyramid[-1]
            h2, w2 = a.shape[0] // 2, a.shape[1] // 2
            pyramid.append(area_resize(a, (0, 0, 2 * w2, 2 * h2), w2, h2))
        self.pyramid = pyramid
        # level i is an exact 2^i reduction of the top-left part that divides evenly
        levels = [(a.shape[1], a.shape[0], float(2**i)) for i, a in enumerate(pyramid)]
        super().__init__(path, levels, mpp, background)

    def _read(self, level, x, y, w, h):
        return self.pyramid[level][y : y + h, x : x + w].copy()  # callers may write to it


def cached(slide: Slide, max_pixels: int = 64 * 2**20) -> Slide:
    """An in-memory copy of a slide that is small enough (random patch reads become cheap)."""
    if isinstance(slide, ArraySlide) or slide.width * slide.height > max_pixels:
        return slide
    rgb = slide.read_region(0, 0, slide.width, slide.height)
    return ArraySlide(rgb, slide.mpp, slide.path, slide.background)
