"""Macenko stain vectors and stain normalisation (Macenko et al., ISBI 2009).

Optical density OD = −ln(I / I₀) is linear in the stain concentrations, OD = HE·C. Macenko
finds the plane of the two largest principal directions of the tissue ODs and takes the
robust extreme angles in it as the haematoxylin and eosin vectors. Normalisation maps
concentrations from a source's stain basis to a reference's, scaled by robust maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WsigenError

#: The reference widely used with Macenko's method (H and E columns; natural-log OD, I₀ = 240).
REFERENCE_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_C = np.array([1.9705, 1.0308])


@dataclass(frozen=True)
class StainModel:
    """``he`` (3, 2): unit OD vectors of H and E; ``max_c``: 99th-percentile concentrations."""

    he: np.ndarray
    max_c: np.ndarray
    io: float = 240.0

    def to_dict(self) -> dict:
        return {
            "he": self.he.round(6).tolist(),
            "max_c": self.max_c.round(6).tolist(),
            "io": self.io,
        }


REFERENCE = StainModel(REFERENCE_HE / np.linalg.norm(REFERENCE_HE, axis=0), REFERENCE_MAX_C)


def optical_density(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """OD = −ln((I + 1) / I₀) per channel, float64, shape (…, 3)."""
    return -np.log((rgb.astype(np.float64) + 1) / io)


def fit_macenko(
    rgb: np.ndarray,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    max_pixels: int = 1_000_000,
    rng: np.random.Generator | None = None,
) -> StainModel:
    """Stain vectors of an RGB uint8 image: pixels with ‖OD‖ > β, angles at the α/100−α percentiles.

    The paper drops pixels of low OD intensity; thresholding the norm (rather than every channel,
    as some ports do) keeps pure eosin, whose red OD is near zero.
    """
    od = optical_density(rgb, io).reshape(-1, 3)
    od = od[np.linalg.norm(od, axis=1) > beta]
    if len(od) < 100:
        raise WsigenError(
            f"too little stained tissue to estimate stain vectors ({len(od)} pixels with "
            f"OD > {beta})"
        )
    if len(od) > max_pixels:
        rng = rng or np.random.default_rng(0)
        od = od[rng.choice(len(od), max_pixels, replace=False)]
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [1, 2]]  # two largest principal directions
    plane *= np.where(
        plane.sum(axis=0) < 0, -1, 1
    )  # eigenvector signs are arbitrary: point into OD > 0
    t = od @ plane
    phi = np.arctan2(t[:, 1], t[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs more red than eosin does
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    he = he * np.where(he.sum(axis=0) < 0, -1, 1)
    he = he / np.linalg.norm(he, axis=0)
    c = concentrations(od, he)
    max_c = np.percentile(c, 99, axis=0)
    return StainModel(he, np.maximum(max_c, 1e-6), io)


def concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray:
    """Least-squares C with OD ≈ C·HEᵀ; od (n, 3) → (n, 2)."""
    return od @ np.linalg.pinv(he).T


def normalise(rgb: np.ndarray, source: StainModel, target: StainModel = REFERENCE) -> np.ndarray:
    """Re-render ``rgb`` (stained as ``source``) with the stains and amounts of ``target``."""
    shape = rgb.shape
    od = optical_density(rgb, source.io).reshape(-1, 3)
    c = concentrations(od, source.he) * (target.max_c / source.max_c)
    out = target.io * np.exp(-c @ target.he.T) - 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)
