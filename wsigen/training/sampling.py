"""Preview samples during training: unguided Heun sampling of a few patches (a row per class of a
labelled model), as a PNG grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..method import canvas, edm


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """x ∈ [−1, 1] (…, 3, H, W) → uint8 channels last, by the package's one quantisation."""
    return np.moveaxis(canvas.to_uint8(x), -3, -1)


@torch.no_grad()
def sample_patches(
    denoiser, mpps, patch: int, sched: edm.Schedule, gen: torch.Generator, device, classes=None,
    repeat: int = 1,
) -> torch.Tensor:
    """Unguided Heun sampling of one patch per µm/px in ``mpps`` (for previews), of the class
    ``classes[i]`` for patch i where given (a class-conditional denoiser, guidance w = 1).
    ``repeat``: the first len(mpps)/repeat patches' noise is used again by each following group
    (a labelled model's rows then differ by their class alone)."""
    t = edm.karras_sigmas(sched)
    s = torch.tensor(mpps, dtype=torch.float32, device=device)
    x = (
        torch.randn((len(mpps) // repeat, 3, patch, patch), generator=gen, device=gen.device).to(device)
        * t[0]
    ).repeat(repeat, 1, 1, 1)
    extra = () if classes is None else (torch.tensor(classes, dtype=torch.long, device=device),)

    def denoise(x, sigma):
        return denoiser(x, torch.tensor(sigma, device=device), s, *extra)

    for i in range(sched.steps):
        x, _ = edm.solver_step(denoise, x, t[i], t[i + 1])
    return x.clamp(-1, 1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write ``rgb`` as PNG atomically (a reader never sees half a file)."""
    import imagecodecs

    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))
    os.replace(tmp, path)


def grid_image(tiles: np.ndarray, cols: int, pad: int = 2, value: int = 255) -> np.ndarray:
    """(n, h, w, c) tiles in rows of ``cols``, ``pad`` pixels of ``value`` around each."""
    n, h, w, c = tiles.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, np.uint8)
    for i, t in enumerate(tiles):
        r, q = divmod(i, cols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = t
    return out
