"""Morphology-weighted loss (Moghadam et al., "prioritized morphology weighting"): the EDM loss
of a pixel is multiplied by 1 + α·m(x), m the nuclei mask of the clean patch, normalised so that
each patch's mean weight is 1 (α = 0: the plain loss; the loop then passes no weight at all).

m is where the haematoxylin concentration of the patch (Macenko's decomposition OD = HE·C, with
the stain vectors fitted once on the slide's thumbnail, or the published reference where that
fit fails) reaches :data:`H_THRESHOLD` of the slide's robust maximum (its 99th percentile).
A relative threshold follows each slide's staining strength, as Macenko's normalisation does;
half the maximum is what separates nuclei from the lighter haematoxylin of cytoplasm and stroma
on real H&E (docs/training.md). The mask is computed in the loader process, from the uint8 patch
alone, so it is the same bytes for any number of loader workers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..judge import stains

#: Nuclei: haematoxylin concentration ≥ this share of the slide's 99th-percentile concentration
#: (with the published reference stains, 0.5 × 1.9705 ≈ 0.99 in natural-log OD units).
H_THRESHOLD = 0.5


def haematoxylin_lut(stain: stains.StainModel) -> np.ndarray:
    """(3, 256) float32 table: entry [c, v] is channel c's share of the H concentration of value v.

    The concentration is the first row of pinv(HE) applied to the pixel's OD; OD is a function of
    one channel value, so the sum of three table look-ups gives it without a float image.
    """
    od = -np.log((np.arange(256, dtype=np.float64) + 1) / stain.io)  # stains.optical_density
    row = np.linalg.pinv(stain.he)[0]
    return (row[:, None] * od[None, :]).astype(np.float32)


def nuclei_mask(rgb: np.ndarray, stain: stains.StainModel, lut: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W): 1 where the haematoxylin concentration of ``rgb`` (H, W, 3) is nuclear."""
    lut = haematoxylin_lut(stain) if lut is None else lut
    # each channel made contiguous first: the look-ups then run about twice as fast
    h = lut[0][np.ascontiguousarray(rgb[..., 0])]
    h += lut[1][np.ascontiguousarray(rgb[..., 1])]
    h += lut[2][np.ascontiguousarray(rgb[..., 2])]
    return (h >= np.float32(H_THRESHOLD * float(stain.max_c[0]))).view(np.uint8)


def pixel_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, 1, H, W) float32 weights (1 + α·m) / mean(1 + α·m) of uint8 masks (B, H, W)."""
    w = mask.to(torch.float32).unsqueeze(1).mul_(alpha).add_(1)
    return w / w.mean(dim=(1, 2, 3), keepdim=True)
