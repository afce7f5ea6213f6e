"""Pixel arithmetic every reader shares: any common array → RGB uint8, and the exact area (box) resize.

The area resize is the same operator as the sampler's k×k average pooling, so a guide and a
downsampled slide agree.
"""

from __future__ import annotations

import numpy as np

from ..errors import WsigenError

WHITE = (255, 255, 255)


def to_rgb8(a: np.ndarray, background=WHITE, what: str = "image") -> np.ndarray:
    """(h, w[, c]) array of any common dtype → (h, w, 3) uint8 RGB, alpha over background."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise WsigenError(f"{what}: cannot make an RGB image from an array of shape {a.shape}")
    c = a.shape[2]
    if c not in (1, 2, 3, 4):
        raise WsigenError(
            f"{what} has {c} channels; only grey, grey+alpha, RGB and RGBA can be read "
            "as RGB (convert it first)"
        )
    if a.dtype == np.uint8:
        f = None
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
        f = None
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        f = (a.astype(np.float32) - max(info.min, 0)) / (info.max - max(info.min, 0))
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)  # floats are taken as [0, 1]
    else:
        raise WsigenError(f"{what}: unsupported pixel type {a.dtype}")
    if f is not None:
        a = np.rint(np.clip(np.nan_to_num(f), 0, 1) * 255).astype(np.uint8)
    if c in (2, 4):
        a = _over_background(a, background)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _over_background(a: np.ndarray, background) -> np.ndarray:
    """uint8 colour + alpha → colour composited over ``background``, rounded to nearest.

    Slides are opaque almost everywhere (OpenSlide's RGBA is 255 inside the scanned area), so
    opaque pixels are just sliced out; only the others are blended, in exact integer arithmetic:
    round((v·α + b·(255 − α)) / 255) fits uint16 and agrees with the float blend to ±1 level.
    """
    alpha = a[:, :, -1]
    rgb = a[:, :, :-1]
    if alpha.min() == 255:
        return rgb
    bg = np.asarray(background, np.float64)
    bg = bg[: rgb.shape[2]] if rgb.shape[2] == 3 else np.array([np.mean(bg)])
    bg = np.rint(bg).astype(np.uint16)
    out = rgb.copy()
    part = alpha < 255
    al = alpha[part].astype(np.uint16)[:, None]
    out[part] = ((rgb[part].astype(np.uint16) * al + bg * (255 - al) + 127) // 255).astype(np.uint8)
    return out


def _edges(lo: float, hi: float, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The n + 1 output edges on an axis of ``size`` pixels: the pixel each lies in, and how far."""
    e = np.clip(np.linspace(lo, hi, n + 1), 0, size)
    i = np.minimum(np.floor(e).astype(np.intp), size - 1)  # e = size lies at the end of the last
    return i, e - i


def _axis0_sums(a: np.ndarray, lo: float, hi: float, n: int, acc, ft) -> np.ndarray:
    """Sums of ``a`` over the n fractional row intervals splitting [lo, hi): (n, ...) in ``ft``.

    Whole rows are summed in ``acc`` (exact integers for uint8 input); the two partial edge rows
    are then added with their fractional weights: S(e) = C[i] + f·a[i] for the prefix sum C, so
    S(e_{k+1}) − S(e_k) = (rows i_k … i_{k+1}−1) − f_k·a[i_k] + f_{k+1}·a[i_{k+1}]. One
    reduction per output row beats ``np.add.reduceat`` (a casting loop) several times over.
    """
    i, f = _edges(lo, hi, n, a.shape[0])
    whole = np.empty((n, *a.shape[1:]), acc)
    add, bounds = np.add.reduce, i.tolist()
    for k in range(n):  # the ufunc itself: np.sum's wrapper would cost more than the sums here
        add(a[bounds[k] : bounds[k + 1]], axis=0, dtype=acc, out=whole[k])
    edge = a[i].astype(ft) * f.astype(ft).reshape(-1, *[1] * (a.ndim - 1))
    out = whole.astype(ft, copy=False)
    out -= edge[:-1]
    out += edge[1:]
    return out


def area_resize(
    a: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int
) -> np.ndarray:
    """Exact area average of the (fractional) box (x0, y0, x1, y1) of ``a`` onto out_h × out_w.

    Separable: every output pixel is Σ wy(y)·wx(x)·a[y, x] with weight 1 for pixels wholly
    inside its box and the covered fraction at the edges, so rows are reduced first (integer
    sums of whole rows, fractional edges in floating point), then columns of the much smaller
    result. Anti-aliased for any reduction factor, and no full-region float64 copy: float32
    while the sums stay far below its 2^24 exact-integer range (within a 64×64 box), float64 for
    larger reductions. Agrees with the integral-image formulation to ±1 grey level (rounding).
    """
    x0, y0, x1, y1 = box
    h, w = a.shape[:2]
    fy, fx = (y1 - y0) / out_h, (x1 - x0) / out_w
    small = (fy + 2) * (fx + 2) <= 66 * 66
    ft = np.float32 if small else np.float64
    # whole-row sums of uint8 are exact integers; other dtypes (rare here) sum in ``ft``
    acc = (np.int32 if (fy + 2) * 255 < 2**31 else np.int64) if a.dtype == np.uint8 else ft
    rows = _axis0_sums(a, y0, y1, out_h, acc, ft)  # (out_h, w, c)
    cols = _axis0_sums(np.ascontiguousarray(rows.transpose(1, 0, 2)), x0, x1, out_w, ft, ft)
    cols *= ft(1 / (fy * fx))
    np.rint(cols, out=cols)
    np.clip(cols, 0, 255, out=cols)
    out = np.empty((out_h, out_w, cols.shape[2]), np.uint8)
    np.copyto(out, cols.transpose(1, 0, 2), casting="unsafe")  # exact: integers in [0, 255]
    return out
