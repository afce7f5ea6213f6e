"""Macenko: stain vectors recovered from images made of known vectors; normalisation maps stains."""

from __future__ import annotations

import numpy as np
import pytest

from wsigen.errors import WsigenError
from wsigen.judge import stains

# two H&E bases, unit columns (haematoxylin first)
HE_A = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
HE_B = np.array([[0.55, 0.15], [0.75, 0.85], [0.36, 0.50]])
HE_A, HE_B = HE_A / np.linalg.norm(HE_A, axis=0), HE_B / np.linalg.norm(HE_B, axis=0)


def render(c: np.ndarray, he: np.ndarray, io: float = 240.0) -> np.ndarray:
    """RGB uint8 from concentrations c (h, w, 2): I = I₀·exp(−HE·c) − 1 (inverse of the OD used)."""
    return np.clip(np.rint(io * np.exp(-c @ he.T) - 1), 0, 255).astype(np.uint8)


def concentrations(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.zeros((n, n, 2))
    # pure H, pure E and mixtures, as in tissue: nuclei, stroma, both
    kind = rng.integers(0, 3, (n, n))
    amount = rng.uniform(0.3, 1.5, (n, n))
    c[..., 0] = np.where(kind != 1, amount, 0) * rng.uniform(0.3, 1, (n, n)) ** (kind == 2)
    c[..., 1] = np.where(kind != 0, amount * 0.8, 0)
    return c


@pytest.mark.parametrize("he", [HE_A, HE_B])
def test_macenko_recovers_known_vectors(he):
    img = render(concentrations(), he)
    fit = stains.fit_macenko(img, alpha=0.1)
    cos = (fit.he * he).sum(axis=0)
    assert cos.min() > 0.999, (fit.he, he)


def test_macenko_identity_and_normalisation():
    c = concentrations(seed=1)
    src = render(c, HE_A)
    model_a = stains.fit_macenko(src, alpha=0.1)
    # normalising to its own stain model changes nothing (to rounding)
    same = stains.normalise(src, model_a, model_a)
    assert np.abs(same.astype(int) - src).max() <= 1
    # to another lab's stains: the same tissue as rendered with that lab's vectors
    model_b = stains.fit_macenko(render(c, HE_B), alpha=0.1)
    out = stains.normalise(src, model_a, model_b)
    want = render(c * (model_b.max_c / model_a.max_c), model_b.he)
    assert np.abs(out.astype(int) - want).mean() < 2.0
    assert np.abs(out.astype(int) - src).mean() > 5.0  # it did change the colours


def test_macenko_refuses_blank_image():
    with pytest.raises(WsigenError, match="tissue"):
        stains.fit_macenko(np.full((50, 50, 3), 250, np.uint8))
