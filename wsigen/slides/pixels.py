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
        alpha = a[:, :, -1:].astype(np.float32) / 255
        rgb = a[:, :, :-1].astype(np.float32)
        bg = (
            np.asarray(background, np.float32)[: rgb.shape[2]]
            if c == 4
            else np.float32(np.mean(background))
        )
        a = np.rint(rgb * alpha + bg * (1 - alpha)).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def area_resize(
    a: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int
) -> np.ndarray:
    """Exact area average of the (fractional) box (x0, y0, x1, y1) of ``a`` onto out_h × out_w.

    The integral image of a piecewise-constant image is piecewise bilinear, so interpolating it
    linearly gives exact box sums for any fractional box: anti-aliased for any reduction factor.
    """
    x0, y0, x1, y1 = box
    h, w = a.shape[:2]
    s = np.zeros((h + 1, w + 1, a.shape[2]), np.float64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])

    def interp(s: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
        n = s.shape[axis] - 1
        edges = np.clip(edges, 0, n)
        i = np.minimum(np.floor(edges).astype(np.int64), n - 1)
        f = (edges - i).reshape([-1 if d == axis else 1 for d in range(s.ndim)])
        return np.take(s, i, axis=axis) * (1 - f) + np.take(s, i + 1, axis=axis) * f

    s = interp(s, np.linspace(y0, y1, out_h + 1), 0)
    s = interp(s, np.linspace(x0, x1, out_w + 1), 1)
    sums = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
    area = ((y1 - y0) / out_h) * ((x1 - x0) / out_w)
    return np.clip(np.rint(sums / area), 0, 255).astype(np.uint8)
