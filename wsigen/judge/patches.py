"""Tissue patches at a given µm/px from a set of slides, with where each came from: what the colour,
feature and memorisation metrics compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..slides import readers
from .tissue import tissue_boxes


@dataclass
class PatchSet:
    """Patches of ``size`` px at one µm/px, with where each came from (slide index, x, y level 0)."""

    mpp: float
    size: int
    images: list[np.ndarray] = field(default_factory=list)
    where: list[tuple[int, float, float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def array(self) -> np.ndarray:
        if not self.images:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack(self.images)


def footprint(slide: readers.Slide, mpp: float, size: int) -> float | None:
    """Level-0 side of a ``size`` px patch at ``mpp``, or None where the slide cannot give one."""
    if slide.mpp is None or mpp < slide.mpp * (1 - 1e-6):
        return None
    f = size * mpp / slide.mpp
    return f if f <= min(slide.width, slide.height) else None


def sample_patches(slides: list[readers.Slide], mpp: float, size: int, n: int, seed: int,
                   min_tissue: float = 0.5, stride: float | None = None,
                   x_ranges: list[tuple[float, float]] | None = None,
                   max_count: int | None = None) -> PatchSet:
    """``n`` random tissue patches spread evenly over the slides, or, with ``stride`` (in
    footprints), every tissue patch on a grid: the finest of stride, 2·stride, … up to 1 that
    gives at most ``max_count`` (then a keyed random ``max_count`` of them). ``x_ranges`` limits
    each slide's patches to columns [a, b) in level-0 pixels."""
    ps = PatchSet(mpp, size)
    ps.names = [Path(s.path).name if s.path else f"slide {i}" for i, s in enumerate(slides)]
    usable = [(i, s, f) for i, s in enumerate(slides) if (f := footprint(s, mpp, size))]
    plan: list[tuple[int, float, float, float]] = []  # (slide, x, y, footprint)
    if stride is not None:
        st = stride
        while True:
            plan = [(i, x, y, f) for i, s, f in usable
                    for x, y in tissue_boxes(s, f, 0, seed, min_tissue, stride=st * f,
                                             x_range=x_ranges[i] if x_ranges else None)]
            if max_count is None or len(plan) <= max_count or st >= 1:
                break
            st = min(2 * st, 1.0)
        if max_count is not None and len(plan) > max_count:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B5]))
            plan = [plan[j] for j in np.sort(rng.choice(len(plan), max_count, replace=False))]
    else:
        for j, (i, s, f) in enumerate(usable):
            want = n // len(usable) + (1 if j < n % len(usable) else 0)
            xr = x_ranges[i] if x_ranges else None
            boxes = tissue_boxes(s, f, want, seed + 7919 * i, min_tissue, x_range=xr)
            plan += [(i, x, y, f) for x, y in boxes]
    for i, x, y, f in plan:
        ps.images.append(slides[i].read_scaled(x, y, f, f, size, size))
        ps.where.append((i, x, y))
    return ps


def default_mpps(slide: readers.Slide, size: int) -> list[float]:
    return [slide.mpp * f for f in (1, 4, 16) if footprint(slide, slide.mpp * f, size)]
