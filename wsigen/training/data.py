"""Training patches at random spatial resolutions (Harb et al.): s ~ U(s_min, s_max), then a patch.

A patch at s µm/px covers M·s µm; it is read from the best pyramid level and area-averaged to
M × M, kept if the tissue mask (from a thumbnail) says it holds enough tissue, then flipped and
rotated by a random element of the dihedral group. Every draw comes from the generator passed
in: the caller keys it per patch (``keyed.patch_rng``: seed, step, rank, index), so a resumed
run, or one with another number of loader processes, sees exactly the same patches.

Slide handles (OpenSlide, tifffile) are not fork-safe: a loader worker never uses its parent's.
``PatchSampler.release`` closes them in the parent before workers start, and each process then
opens its own on first read (``SlideData.reader``). In-memory slides are plain arrays, shared.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError, WsigenError
from ..judge import stains
from ..method.classfree import NO_CLASS
from ..slides import readers
from . import keyed, morphology

DEFAULT_BACKGROUND = (242, 240, 244)


def tissue_mask(rgb: np.ndarray, od_threshold: float = 0.15) -> np.ndarray:
    """Tissue where the largest optical density of a pixel's channels exceeds the threshold."""
    od = -np.log((rgb.astype(np.float32) + 1) / 256)
    return od.max(axis=2) > od_threshold


def glass_colour(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Median colour of the brightest non-tissue pixels (the slide's empty glass), or None."""
    bg = rgb[~mask]
    if len(bg) < 16:
        return None
    bright = bg[bg.sum(axis=1) >= np.percentile(bg.sum(axis=1), 50)]
    return np.median(bright, axis=0)


@dataclass
class SlideData:
    """One slide with its tissue mask (at ``mask_scale`` level-0 pixels per mask pixel)."""

    slide: readers.Slide
    mask: np.ndarray
    mask_scale: float
    glass: np.ndarray | None
    stain: stains.StainModel | None = None
    #: the stain vectors could not be fitted on the thumbnail: ``stain`` is the published reference
    stain_fallback: bool = False
    integral: np.ndarray = field(init=False)
    released: bool = field(default=False, init=False)
    _handles: dict = field(default_factory=dict, init=False, repr=False)  # pid → own handle

    def reader(self) -> readers.Slide:
        """The slide to read pixels from in this process (see the module docstring)."""
        if isinstance(self.slide, readers.ArraySlide) or not self.released:
            return self.slide
        pid = os.getpid()
        h = self._handles.get(pid)
        if h is None:
            h = self._handles[pid] = readers.open_image(self.slide.path, mpp=self.slide.mpp)
        return h

    def release(self) -> None:
        """Close this process's handle: from now on every process opens its own."""
        if not isinstance(self.slide, readers.ArraySlide) and not self.released:
            self.slide.close()
            self.released = True

    def __post_init__(self):
        self.integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        self.integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)

    @property
    def name(self) -> str:
        return self.slide.path.name if self.slide.path else "array"

    def fits(self, s: float, patch: int) -> bool:
        """A patch of ``patch`` px at s µm/px lies inside the slide."""
        side = patch * s / self.slide.mpp
        return side <= min(self.slide.width, self.slide.height) + 1e-6

    def max_mpp(self, patch: int) -> float:
        return min(self.slide.width, self.slide.height) * self.slide.mpp / patch

    def tissue_fraction(self, x: float, y: float, side: float) -> float:
        f = self.mask_scale
        h, w = self.mask.shape
        x0, y0 = min(max(int(round(x / f)), 0), w), min(max(int(round(y / f)), 0), h)
        x1, y1 = (
            min(max(int(round((x + side) / f)), x0 + 1), w),
            min(max(int(round((y + side) / f)), y0 + 1), h),
        )
        if x1 <= x0 or y1 <= y0:
            return 0.0
        s = self.integral
        return float(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]) / ((x1 - x0) * (y1 - y0))

    def tissue_area(self) -> float:
        return float(self.mask.mean()) * self.slide.width * self.slide.height * self.slide.mpp**2


def load_slides(
    paths,
    mpp: float | None = None,
    od_threshold: float = 0.15,
    thumb_side: int = 1024,
    stain_ref: str | None = None,
    cache_pixels: int = 64 * 2**20,
    planes: readers.Planes | None = None,
    fit_stains: bool = False,
) -> list[SlideData]:
    """Open every slide, cache small ones in memory, build tissue masks (and stain models).

    Stain vectors are fitted on the thumbnail for ``stain_ref`` (normalisation: a failed fit is
    an error) or ``fit_stains`` (the nuclei mask: a failed fit falls back to the published
    reference). A slide with several planes (pages, Z, T, channels as pages) is refused unless
    ``planes`` picks them (``slides.planes``)."""
    files = readers.find_images(paths)
    out = []
    for p in files:
        slide = readers.cached(readers.open_image(p, mpp=mpp, planes=planes), cache_pixels)
        thumb = slide.thumbnail(thumb_side)
        mask = tissue_mask(thumb, od_threshold)
        stain, fallback = None, False
        if stain_ref is not None or fit_stains:
            try:
                stain = stains.fit_macenko(thumb)
            except WsigenError as e:
                if stain_ref is not None:
                    raise WsigenError(
                        f"{p}: cannot estimate stain vectors for normalisation ({e})"
                    ) from None
                stain, fallback = stains.REFERENCE, True
        out.append(SlideData(slide, mask, slide.width / thumb.shape[1], glass_colour(thumb, mask),
                             stain, fallback))
    return out


def reference_stain(ref: str) -> stains.StainModel:
    """``standard`` (Macenko's published reference) or the stain model fitted on an image."""
    if ref == "standard":
        return stains.REFERENCE
    with readers.open_image(ref, require_mpp=False) as img:
        return stains.fit_macenko(img.thumbnail(2048))


def measured_background(slides: list[SlideData]) -> list[int]:
    """The glass colour over all slides (median of their glass medians), as three ints."""
    g = [s.glass for s in slides if s.glass is not None]
    if not g:
        return list(DEFAULT_BACKGROUND)
    return [int(round(v)) for v in np.median(np.stack(g), axis=0)]


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """Element k ∈ 0…7 of the square's dihedral group: k % 4 quarter turns, a flip if k ≥ 4."""
    a = np.rot90(a, k % 4, axes=(0, 1))
    return a[:, ::-1] if k >= 4 else a


class PatchSampler:
    """Draws (patch, s): s ~ U(s_min, s_max) (or log-uniform), then a slide and a position.

    With ``classes`` (each slide's class index 0 … n−1) the draw is class-balanced: after s, a
    class uniformly, then one of its slides by tissue area, so every class gets the same share of
    patches however many slides or how much tissue it has (docs/training.md). The default s_max
    is then the largest s at which a patch fits in some slide of *every* class. ``nuclei``: each
    patch comes with its nuclei mask (:mod:`.morphology`), from its slide's stain vectors.
    """

    def __init__(
        self,
        slides: list[SlideData],
        patch: int,
        mpp_min: float | None = None,
        mpp_max: float | None = None,
        min_tissue: float = 0.25,
        mpp_sampling: str = "uniform",
        augment: bool = True,
        stain_target: stains.StainModel | None = None,
        tries: int = 32,
        classes: list[int] | None = None,
        nuclei: bool = False,
    ):
        if not slides:
            raise WsigenError("no slides to train on")
        if mpp_sampling not in ("uniform", "log-uniform"):
            raise UsageError(
                f"mpp sampling must be 'uniform' or 'log-uniform' (got {mpp_sampling!r})"
            )
        if not 0 <= min_tissue <= 1:
            raise UsageError(f"tissue threshold must lie in [0, 1] (got {min_tissue})")
        self.slides, self.patch = slides, patch
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and (len(self.classes) != len(slides)
                                         or sorted(set(self.classes)) != list(range(max(self.classes) + 1))):
            raise ValueError("classes: one index per slide, every class 0 … n−1 present")
        self.n_classes = 0 if self.classes is None else max(self.classes) + 1
        native = min(s.slide.mpp for s in slides)
        largest, where = max(s.max_mpp(patch) for s in slides), "any slide"
        if self.classes is not None:  # the coarsest s at which every class still has a slide
            per_class = [max(s.max_mpp(patch) for s, c in zip(slides, self.classes, strict=True) if c == k)
                         for k in range(self.n_classes)]
            largest = min(per_class)
            where = f"any slide of class {per_class.index(largest)}"
        self.mpp_min = float(mpp_min) if mpp_min is not None else native
        self.mpp_max = float(mpp_max) if mpp_max is not None else largest
        if not 0 < self.mpp_min < self.mpp_max:
            raise UsageError(f"need 0 < mpp-min < mpp-max (got {self.mpp_min:g}, {self.mpp_max:g})")
        if self.mpp_max > largest * (1 + 1e-6):
            raise UsageError(
                f"mpp-max {self.mpp_max:g} is too coarse: a {patch}-px patch at that µm/px does "
                f"not fit in {where} (largest possible {largest:.3g})"
            )
        self.min_tissue, self.mpp_sampling, self.augment = min_tissue, mpp_sampling, augment
        self.stain_target, self.tries = stain_target, tries
        self.nuclei = nuclei
        if nuclei and any(self._stain(i) is None for i in range(len(slides))):
            raise ValueError("nuclei masks need every slide's stain vectors (load_slides(fit_stains=True))")
        self._weights = np.array([max(s.tissue_area(), 1e-9) for s in slides])
        self._luts: dict[int, np.ndarray] = {}

    def draw_mpp(self, rng: np.random.Generator) -> float:
        if self.mpp_sampling == "uniform":
            return float(rng.uniform(self.mpp_min, self.mpp_max))
        return float(math.exp(rng.uniform(math.log(self.mpp_min), math.log(self.mpp_max))))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """One (M, M, 3) uint8 patch and its s."""
        img, s, _ = self.draw(rng)
        return img, s

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
        """One (M, M, 3) uint8 patch, its s and the index of its slide."""
        s = self.draw_mpp(rng)
        ok = [i for i, sd in enumerate(self.slides) if sd.fits(s, self.patch)]
        if self.classes is not None:  # class-balanced: a class first, then one of its slides
            c = int(rng.integers(self.n_classes))
            ok = [i for i in ok if self.classes[i] == c]
        w = self._weights[ok] / self._weights[ok].sum()
        i = ok[int(rng.choice(len(ok), p=w))]
        sd = self.slides[i]
        side = self.patch * s / sd.slide.mpp  # level-0 pixels
        best, best_frac = None, -1.0
        # s stays fixed while the position is redrawn: the law of s stays exactly U(s_min, s_max)
        for _ in range(self.tries):
            x = rng.uniform(0, sd.slide.width - side)
            y = rng.uniform(0, sd.slide.height - side)
            frac = sd.tissue_fraction(x, y, side)
            if frac > best_frac:
                best, best_frac = (x, y), frac
            if frac >= self.min_tissue:
                break
        x, y = best
        img = sd.reader().read_scaled(x, y, side, side, self.patch, self.patch)
        if self.stain_target is not None and sd.stain is not None:
            img = stains.normalise(img, sd.stain, self.stain_target)
        if self.augment:
            img = dihedral(img, int(rng.integers(8)))
        return np.ascontiguousarray(img), s, i

    def keyed_patch(self, seed: int, step: int, rank: int, index: int) -> tuple[np.ndarray, float]:
        """Patch ``index`` of ``step`` on ``rank``: a function of those and the seed alone."""
        return self.sample(keyed.patch_rng(seed, step, rank, index))

    def keyed_item(self, seed: int, step: int, rank: int, index: int,
                   label_dropout: float = 0.0) -> tuple[np.ndarray, float, int | None, np.ndarray | None]:
        """Patch ``index`` of ``step`` on ``rank`` with its class label (−1 where keyed label
        dropout drops it; None for a class-free sampler) and its nuclei mask (None unless
        ``nuclei``): a function of those and the seed alone."""
        img, s, i = self.draw(keyed.patch_rng(seed, step, rank, index))
        label = None
        if self.classes is not None:
            label = NO_CLASS if keyed.label_dropped(seed, step, rank, index, label_dropout) else self.classes[i]
        return img, s, label, self.nuclei_mask(img, i) if self.nuclei else None

    def nuclei_mask(self, img: np.ndarray, i: int) -> np.ndarray:
        """The nuclei mask of a patch of slide ``i`` (in the target's stains when normalised)."""
        if i not in self._luts:
            self._luts[i] = morphology.haematoxylin_lut(self._stain(i))
        return morphology.nuclei_mask(img, self._stain(i), self._luts[i])

    def _stain(self, i: int) -> stains.StainModel:
        sd = self.slides[i]
        return self.stain_target if self.stain_target is not None and sd.stain is not None else sd.stain

    def release(self) -> None:
        for sd in self.slides:
            sd.release()

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [−1, 1], float32 (n, 3, M, M), and s (n,)."""
        imgs, ss = zip(*(self.sample(rng) for _ in range(n)), strict=True)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x.contiguous(), torch.tensor(ss, dtype=torch.float32)

    def describe(self) -> list[dict]:
        return [
            {
                "name": sd.name,
                "path": str(sd.slide.path) if sd.slide.path else None,
                "sha256": sd.slide.sha256() if sd.slide.path else None,
                "mpp": sd.slide.mpp,
                "size": [sd.slide.width, sd.slide.height],
                "tissue_fraction": round(float(sd.mask.mean()), 4),
            }
            for sd in self.slides
        ]


def slide_names(slides: list[SlideData]) -> str:
    return ", ".join(Path(s.name).name for s in slides)
