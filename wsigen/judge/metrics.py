"""Image-quality and privacy metrics as pure functions of arrays (no files, no networks).

Seam score and guide PSNR judge the cascade itself; Fréchet distance (FID), unbiased
polynomial-kernel MMD (KID, Bińkowski et al. 2018) and k-NN manifold precision/recall
(Kynkäänniemi et al. 2019) compare feature sets; histogram distances compare colour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# -- seams ---------------------------------------------------------------------------------


def grid_lines(n: int, offset: int, patch: int) -> np.ndarray:
    """Positions p ∈ (0, n) of grid lines offset + jM: the pair (p − 1, p) straddles a line."""
    first = offset % patch or patch
    return np.arange(first, n, patch, dtype=np.int64)


def block_order(pos: np.ndarray, k: int, levels: int) -> np.ndarray:
    """For pair positions p: the largest j ≤ levels with k^j | p.

    In stage l of the cascade, the guides of stages l−1, l−2, … fix the means of blocks of
    k, k², … pixels, so pairs across block edges of higher order differ more, seams or not.
    """
    v = np.zeros(pos.shape, np.int64)
    if k < 2:
        return v
    q = k
    for j in range(1, levels + 1):
        v[pos % q == 0] = j
        q *= k
    return v


class SeamCounter:
    """Streams row bands of a (3, H, W) image and compares adjacent-pixel differences.

    For each named grid (oy, ox): the mean |I(p) − I(p−1)| over pairs straddling a grid line
    o + jM, divided by the mean over the other pairs, both axes pooled (≈ 1: no seams).
    ``score`` compares like with like: other pairs of the same block order (``block_order``:
    grid lines always lie on block edges of a guided stage, and those edges differ more
    without any seam), weighted as the grid's pairs are. ``score_all_pairs`` divides by the
    mean over all other pairs.
    """

    def __init__(self, height: int, width: int, patch: int, grids: dict[str, tuple[int, int]],
                 k: int = 1, levels: int = 0):
        self.h, self.w, self.m, self.k, self.levels = height, width, patch, k, levels
        self.lines = {name: (grid_lines(height, oy, patch), grid_lines(width, ox, patch))
                      for name, (oy, ox) in grids.items()}
        # per grid, axis (y, x), stratum: [seam sum, seam count, other sum, other count]
        self.acc = {name: np.zeros((2, levels + 1, 4), np.float64) for name in grids}
        self._last_row: np.ndarray | None = None
        self._next_y = 0
        self._xs = np.arange(1, width)
        self._vx = block_order(self._xs, k, levels)

    def add(self, rows: np.ndarray, y0: int) -> None:
        """Rows [y0, y0 + h) of the image, (3, h, W); consecutive bands also count the pair between."""
        # integer images give exact sums (band order cannot change the result); channels are
        # summed, not averaged: every ratio below divides the factor 3 away
        a = rows.astype(np.int16) if np.issubdtype(rows.dtype, np.integer) else rows.astype(np.float64)
        h = a.shape[1]
        acc_t = np.int64 if a.dtype == np.int16 else np.float64
        col_sums = np.abs(np.diff(a, axis=2)).sum(axis=(0, 1), dtype=acc_t)  # pair (p−1, p), p = 1…W−1
        dy = np.abs(np.diff(a, axis=1)).sum(axis=(0, 2), dtype=acc_t)  # pair (p−1, p), p = y0+1…
        ys = np.arange(y0 + 1, y0 + h)
        if self._last_row is not None and self._next_y == y0:
            dy = np.concatenate([[np.abs(a[:, 0] - self._last_row).sum(dtype=acc_t)], dy])
            ys = np.concatenate([[y0], ys])
        self._last_row, self._next_y = a[:, -1], y0 + h
        vy = block_order(ys, self.k, self.levels)
        for name, (ly, lx) in self.lines.items():
            acc = self.acc[name]
            acc[0] += self._strata(dy, ys, vy, ly, self.w)
            acc[1] += self._strata(col_sums, self._xs, self._vx, lx, h)

    def _strata(self, sums, pos, order, lines, per) -> np.ndarray:
        seam = np.isin(pos, lines)
        out = np.zeros((self.levels + 1, 4))
        for j in range(self.levels + 1):
            s, o = seam & (order == j), ~seam & (order == j)
            out[j] = [sums[s].sum(), s.sum() * per, sums[o].sum(), o.sum() * per]
        return out

    def scores(self) -> dict[str, dict]:
        out = {}
        for name, acc in self.acc.items():
            both = acc.sum(axis=0)
            out[name] = {"score": _stratified(both), "score_all_pairs": _ratio(both.sum(axis=0)),
                         "y": _stratified(acc[0]), "x": _stratified(acc[1]),
                         "lines": [len(self.lines[name][0]), len(self.lines[name][1])]}
        return out


def _ratio(a: np.ndarray) -> float | None:
    seam_sum, seam_n, other_sum, other_n = a
    if seam_n == 0 or other_n == 0 or other_sum == 0:
        return None
    return float((seam_sum / seam_n) / (other_sum / other_n))


def _stratified(strata: np.ndarray) -> float | None:
    """Seam mean over the expected mean of other pairs with the seams' mix of block orders."""
    seam_sum, seam_n = strata[:, 0].sum(), strata[:, 1].sum()
    if seam_n == 0:
        return None
    expected = 0.0
    for j in range(len(strata)):
        n_j = strata[j, 1]
        if n_j == 0:
            continue
        i = j  # no other pairs of this order: fall back to the nearest lower order that has some
        while i > 0 and strata[i, 3] == 0:
            i -= 1
        if strata[i, 3] == 0:
            return None
        expected += n_j * strata[i, 2] / strata[i, 3]
    if expected == 0:
        return None
    return float(seam_sum / expected)


def seam_score(image: np.ndarray, offset: tuple[int, int], patch: int, k: int = 1,
               levels: int = 0) -> float | None:
    """Seam score of a whole (3, H, W) image for grid lines at offset + jM (see SeamCounter)."""
    c = SeamCounter(image.shape[1], image.shape[2], patch, {"g": offset}, k, levels)
    c.add(image, 0)
    return c.scores()["g"]["score"]


# -- guide consistency ----------------------------------------------------------------------


def avgpool(image: np.ndarray, k: int) -> np.ndarray:
    """k × k mean of (C, H, W) (H, W multiples of k), float64: the sampler's operator A."""
    c, h, w = image.shape
    return image.reshape(c, h // k, k, w // k, k).astype(np.float64).mean(axis=(2, 4))


def psnr(mse: float, peak: float = 255.0) -> float:
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


# -- feature-set distances ------------------------------------------------------------------


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017).

    tr (Σ₁Σ₂)^½ = tr (Σ₁^½ Σ₂ Σ₁^½)^½, a symmetric PSD square root, so eigh suffices (no scipy,
    no complex parts from a non-symmetric sqrtm).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r1 = _sqrtm_psd(s1)
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    d = mu1 - mu2
    return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (n, d) feature sets.

    With fewer samples than dimensions (patch-FID with a few hundred patches of 2048-d
    features) the covariances have low rank: Σᵢ = AᵢᵀAᵢ/(nᵢ − 1) for the centred samples Aᵢ, the
    non-zero eigenvalues of Σ₁Σ₂ are the squared singular values of A₁A₂ᵀ/√((n₁−1)(n₂−1)), so
    tr (Σ₁Σ₂)^½ is that matrix's nuclear norm: exact, and no d × d eigendecomposition.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    n1, n2, d = len(x), len(y), x.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(*mean_cov(x), *mean_cov(y))
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    c1, c2 = n1 - 1, n2 - 1
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt(c1 * c2)
    dm = x.mean(axis=0) - y.mean(axis=0)
    return float(max(dm @ dm + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * tr_sqrt, 0.0))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel) -> float:
    """Unbiased MMD² with the polynomial kernel (k(a, b) = (aᵀb/d + 1)³ by default)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least two samples per set")
    kxx, kyy, kxy = (polynomial_kernel(a, b, **kernel) for a, b in ((x, x), (y, y), (x, y)))
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of unbiased MMD² over random subsets."""
    if max(len(real), len(fake)) <= subset_size:
        return mmd2_unbiased(real, fake), 0.0
    n = min(len(real), len(fake), subset_size)
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(real[rng.choice(len(real), n, replace=False)],
                          fake[rng.choice(len(fake), n, replace=False)]) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def pairwise_distances(x: np.ndarray, y: np.ndarray, block: int = 2048) -> np.ndarray:
    """Euclidean distances (len(x), len(y)), float64, computed in row blocks."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    yy = (y * y).sum(axis=1)
    out = np.empty((len(x), len(y)))
    for i in range(0, len(x), block):
        xb = x[i : i + block]
        d2 = (xb * xb).sum(axis=1)[:, None] + yy[None, :] - 2 * xb @ y.T
        out[i : i + block] = np.sqrt(np.clip(d2, 0, None))
    return out


def knn_radii(x: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour within the set (itself excluded)."""
    d = pairwise_distances(x, x)
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples (got {len(x)})")
    return np.partition(d, k, axis=1)[:, k]  # index 0 is the sample itself (distance 0)


def coverage_fraction(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of queries inside at least one ball B(manifold_i, radii_i)."""
    d = pairwise_distances(queries, manifold)
    return float((d <= radii[None, :]).any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes on the real manifold) and recall (reals on the fake manifold)."""
    precision = coverage_fraction(real, knn_radii(real, k), fake)
    recall = coverage_fraction(fake, knn_radii(fake, k), real)
    return precision, recall


# -- colour histograms ----------------------------------------------------------------------


def wasserstein1(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    """Earth mover's distance between two 1-D samples, via their histograms on ``bins``."""
    ha, _ = np.histogram(a, bins=bins)
    hb, _ = np.histogram(b, bins=bins)
    return hist_wasserstein1(ha, hb, bins)


def hist_wasserstein1(ha: np.ndarray, hb: np.ndarray, bins: np.ndarray) -> float:
    ca = np.cumsum(ha) / max(ha.sum(), 1)
    cb = np.cumsum(hb) / max(hb.sum(), 1)
    return float((np.abs(ca - cb)[:-1] * np.diff(bins)[:-1]).sum())


def hist_js(ha: np.ndarray, hb: np.ndarray) -> float:
    """Jensen–Shannon divergence (bits, in [0, 1]) between two histograms."""
    p = ha / max(ha.sum(), 1)
    q = hb / max(hb.sum(), 1)
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def angle_deg(u: Iterable[float], v: Iterable[float]) -> float:
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    c = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))
