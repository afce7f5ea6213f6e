"""Two synthetic H&E slide classes for ``benchmarks/conditional.py``, and the class statistic.

Slides are made by Beer–Lambert with the published Macenko H and E vectors at 1 µm/px: a tissue blob
on glass, fibrous eosin stroma with some background haematoxylin, and elliptical nuclei whose size,
density and darkness are the class's. The statistic is the mean H amount of the tissue pixels in the
same fixed basis, so it reads back what the classes were made with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsigen.judge import stains

MPP = 1.0  # µm/px of the synthetic training slides
TISSUE_OD = 0.15  # ‖OD‖ above which a pixel is tissue (the training sampler's threshold)


# -- the two classes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How a class is stained and how its nuclei look (amounts in the published H, E basis)."""

    stroma_h: float  # background haematoxylin of the stroma
    stroma_e: float  # eosin of the stroma
    nucleus_h: float  # haematoxylin inside a nucleus
    radius: tuple[float, float]  # nucleus radius range, µm
    coverage: float  # fraction of the tissue covered by nuclei (before overlaps)


CLASSES = {
    "A": Profile(stroma_h=0.08, stroma_e=0.75, nucleus_h=0.95, radius=(2.5, 3.5), coverage=0.05),
    "B": Profile(stroma_h=0.25, stroma_e=0.55, nucleus_h=1.30, radius=(4.0, 6.0), coverage=0.30),
}


def smooth(rng: np.random.Generator, side: int, cell: float) -> np.ndarray:
    """(side, side) smooth noise in [0, 1] with features about ``cell`` px across (bicubic upsampling
    of a coarse uniform grid: no SciPy needed)."""
    import torch

    n = max(2, int(np.ceil(side / cell)) + 3)
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, n, n)).astype(np.float32))
    m = int(cell)  # a margin cut off: bicubic edges overshoot
    up = torch.nn.functional.interpolate(coarse, size=(side + 2 * m,) * 2, mode="bicubic", align_corners=False)
    f = up[0, 0, m:m + side, m:m + side].numpy()
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def synth_slide(p: Profile, side: int, seed: int) -> np.ndarray:
    """An H&E-like (side, side, 3) uint8 slide of class profile ``p`` at ``MPP``: a tissue blob on
    glass, fibrous stroma, and elliptical nuclei of the class's size and density."""
    rng = np.random.default_rng(seed)
    tissue = smooth(rng, side, side / 3) > 0.3
    fib = smooth(rng, side, 6 / MPP)
    c_h = p.stroma_h * (0.7 + 0.6 * smooth(rng, side, 10 / MPP))
    c_e = p.stroma_e * (0.7 + 0.6 * fib)
    r_lo, r_hi = (r / MPP for r in p.radius)
    n = int(p.coverage * side * side / (np.pi * ((r_lo + r_hi) / 2) ** 2))
    ys, xs = rng.uniform(0, side, n), rng.uniform(0, side, n)
    for y, x, a, ecc, th, dark in zip(ys, xs, rng.uniform(r_lo, r_hi, n), rng.uniform(0.7, 1.0, n),
                                      rng.uniform(0, np.pi, n), rng.uniform(0.85, 1.15, n), strict=True):
        y0, y1 = int(max(0, y - a - 1)), int(min(side, y + a + 2))
        x0, x1 = int(max(0, x - a - 1)), int(min(side, x + a + 2))
        if not tissue[int(min(y, side - 1)), int(min(x, side - 1))] or y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u, v = (xx - x) * np.cos(th) + (yy - y) * np.sin(th), -(xx - x) * np.sin(th) + (yy - y) * np.cos(th)
        inside = (u / a) ** 2 + (v / (a * ecc)) ** 2 <= 1
        c_h[y0:y1, x0:x1][inside] = p.nucleus_h * dark
        c_e[y0:y1, x0:x1][inside] *= 0.3
    c = np.stack([c_h, c_e], axis=-1) * tissue[..., None]
    rgb = 240 * np.exp(-c @ stains.REFERENCE.he.T) - 1
    rgb = np.where(tissue[..., None], rgb, np.array([242.0, 240.0, 244.0]))
    rgb += rng.normal(0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_slides(root: Path, per_class: int, side: int, seed: int = 0) -> dict[str, list[Path]]:
    """``per_class`` TIFFs per class in ``root/A``, ``root/B`` (µm/px in the resolution tags)."""
    import tifffile

    out: dict[str, list[Path]] = {}
    for ci, (name, p) in enumerate(sorted(CLASSES.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(per_class):
            path = root / name / f"{name}{i}.tif"
            tifffile.imwrite(path, synth_slide(p, side, seed * 1000 + ci * 100 + i), photometric="rgb",
                             resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", tile=(256, 256))
            out[name].append(path)
    return out


# -- the class statistic -------------------------------------------------------------------------


def h_amount(rgb: np.ndarray) -> float:
    """Mean haematoxylin amount of the tissue pixels (‖OD‖ > 0.15) in the published Macenko basis;
    NaN when there is no tissue."""
    od = stains.optical_density(rgb.reshape(-1, 3))
    od = od[np.linalg.norm(od, axis=1) > TISSUE_OD]
    if not len(od):
        return float("nan")
    return float(stains.concentrations(od, stains.REFERENCE.he)[:, 0].mean())


def read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def store_rgb(path: Path) -> np.ndarray:
    """The final image (level 0) of a wsigen store as (H, W, 3)."""
    from wsigen.slides.store import SlideStore

    return np.asarray(SlideStore.open(path).level_array(0)[:]).transpose(1, 2, 0)


def real_statistics(slides: dict[str, list[Path]], size: int, crops: int, seed: int) -> dict:
    """The statistic of each training slide, and of ``crops`` random size² crops per class that are
    at least half tissue (what a sampled slide of that size is compared with)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, paths in slides.items():
        images = [read_tiff(p) for p in paths]
        crop_vals: list[float] = []
        while len(crop_vals) < crops:
            im = images[len(crop_vals) % len(images)]
            y, x = (int(rng.integers(0, s - size + 1)) for s in im.shape[:2])
            c = im[y:y + size, x:x + size]
            if (np.linalg.norm(stains.optical_density(c), axis=-1) > TISSUE_OD).mean() >= 0.5:
                crop_vals.append(h_amount(c))
        out[name] = {"slides": [round(h_amount(im), 4) for im in images], "crops": summary(crop_vals)}
    return out


def summary(vals) -> dict:
    v = np.asarray(vals, dtype=np.float64)
    ok = v[np.isfinite(v)]
    d = {"values": [round(float(x), 4) for x in v], "mean": None, "min": None, "max": None}
    if len(ok):
        d.update(mean=round(float(ok.mean()), 4), min=round(float(ok.min()), 4), max=round(float(ok.max()), 4))
    return d


def separation(a: dict, b: dict) -> dict:
    """B above A: the gap between the classes' per-seed values (> 0: no overlap) and the difference
    of their means."""
    if a["min"] is None or b["min"] is None:
        return {"gap": None, "mean_difference": None, "overlap": True}
    gap = b["min"] - a["max"]
    return {"gap": round(gap, 4), "mean_difference": round(b["mean"] - a["mean"], 4), "overlap": gap <= 0}
