"""Where the tissue is: a colour rule for stained tissue, and boxes, centres and samples chosen on a
thumbnail's tissue mask (its summed-area table makes every box's tissue fraction one lookup).
"""

from __future__ import annotations

import numpy as np

from ..slides import readers

# Tissue is what is neither near-white glass nor grey (dust, ink, shadows): H&E is coloured.
WHITE_MIN = 215  # a pixel whose darkest channel is at least this is glass
SATURATION_MIN = 18  # max − min channel below this is grey, not stained tissue


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 → bool: stained tissue, i.e. not near-white and not low-saturation."""
    lo, hi = rgb.min(axis=2), rgb.max(axis=2)
    return (lo < WHITE_MIN) & ((hi.astype(np.int16) - lo) >= SATURATION_MIN)


def _integral(mask: np.ndarray) -> np.ndarray:
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    s[1:, 1:] = mask.cumsum(0).cumsum(1)
    return s


def box_fraction(sat: np.ndarray, y0, x0, h: int, w: int):
    """Mean of the mask over boxes [y0, y0+h) × [x0, x0+w) (arrays of corners allowed)."""
    return (sat[y0 + h, x0 + w] - sat[y0, x0 + w] - sat[y0 + h, x0] + sat[y0, x0]) / float(h * w)


def tissue_centre(rgb: np.ndarray, box: int) -> tuple[float, float]:
    """Centre (x, y), in pixels of ``rgb``, of a box × box window that is as full of tissue as any;
    among the nearly-full ones the nearest to the tissue's centre of mass, so zooms stay central."""
    h, w = rgb.shape[:2]
    box = max(1, min(box, h, w))
    mask = tissue_mask(rgb)
    if not mask.any():
        return w / 2, h / 2
    sat = _integral(mask)
    ys, xs = np.mgrid[0 : h - box + 1, 0 : w - box + 1]
    frac = box_fraction(sat, ys, xs, box, box)
    my, mx = (np.argwhere(mask).mean(axis=0) - box / 2)
    good = frac >= 0.95 * frac.max()
    dist = (ys - my) ** 2 + (xs - mx) ** 2
    i = np.argmin(np.where(good, dist, np.inf))
    y, x = np.unravel_index(i, frac.shape)
    return float(xs[y, x] + box / 2), float(ys[y, x] + box / 2)


def tissue_map(slide: readers.Slide, thumb_side: int = 2048):
    """(thumbnail shape, summed-area table of its tissue mask), computed once per slide object."""
    cache = slide.__dict__.setdefault("_tissue_maps", {})
    if thumb_side not in cache:
        thumb = slide.thumbnail(thumb_side)
        cache[thumb_side] = (thumb.shape, _integral(tissue_mask(thumb)))
    return cache[thumb_side]


def tissue_boxes(slide: readers.Slide, footprint: float, n: int, seed: int = 0,
                 min_tissue: float = 0.5, stride: float | None = None,
                 x_range: tuple[float, float] | None = None, thumb_side: int = 2048,
                 ) -> list[tuple[float, float]]:
    """Top-left corners (level 0) of square boxes of side ``footprint`` with at least
    ``min_tissue`` tissue: ``n`` random ones (keyed by ``seed``, overlapping as little as the
    tissue allows), or every one on a grid of ``stride`` when given. ``x_range`` limits columns."""
    W, H = slide.width, slide.height
    xa, xb = x_range or (0, W)
    if footprint > min(H, xb - xa):
        return []
    thumb_shape, sat = tissue_map(slide, thumb_side)
    f = W / thumb_shape[1]
    fp = max(1, round(footprint / f))

    def frac(x, y):
        tx = np.clip(np.round(np.asarray(x) / f).astype(int), 0, thumb_shape[1] - fp)
        ty = np.clip(np.round(np.asarray(y) / f).astype(int), 0, thumb_shape[0] - fp)
        return box_fraction(sat, ty, tx, fp, fp)

    if stride is not None:
        xs = np.arange(xa, xb - footprint + 1e-9, stride)
        ys = np.arange(0, H - footprint + 1e-9, stride)
        gx, gy = np.meshgrid(xs, ys)
        ok = frac(gx, gy) >= min_tissue
        return [(float(x), float(y)) for x, y in zip(gx[ok], gy[ok], strict=True)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E1]))
    cand_x = rng.uniform(xa, xb - footprint, size=max(64, 64 * n))
    cand_y = rng.uniform(0, H - footprint, size=cand_x.size)
    ok = frac(cand_x, cand_y) >= min_tissue
    cand = list(zip(cand_x[ok].tolist(), cand_y[ok].tolist(), strict=True))
    chosen: list[tuple[float, float]] = []
    for x, y in cand:  # first pass: no overlap
        if len(chosen) == n:
            break
        if all(abs(x - a) >= footprint or abs(y - b) >= footprint for a, b in chosen):
            chosen.append((x, y))
    for c in cand:  # tissue too small for n disjoint boxes: allow overlap
        if len(chosen) == n:
            break
        if c not in chosen:
            chosen.append(c)
    return chosen
