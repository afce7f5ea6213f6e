"""Classifier-free guidance (Ho & Salimans 2022) of a class-conditional denoiser.

D(x; σ, s, c, w) = D_∅ + w·(D_c − D_∅), D_∅ the "no class" call (label −1) of the same network.
w = 1 is the conditional denoiser itself (one evaluation), w = 0 the class-free one; any other w
evaluates both in one batched forward pass (the batch doubled: [x; x] with labels [c; ∅]). The
sampler applies it to the denoiser output, so the relaxed projection acts on the guided D.
"""

from __future__ import annotations

import torch
from torch import nn

NO_CLASS = -1


def combine(d_free: torch.Tensor, d_class: torch.Tensor, w: float) -> torch.Tensor:
    """D_∅ + w·(D_c − D_∅), literally (w = 1: D_c itself)."""
    if w == 1:
        return d_class
    return (d_class - d_free).mul_(float(w)).add_(d_free)


def evaluations(w: float | None) -> int:
    """Network evaluations per denoiser call: 2 for w ∉ {0, 1} (None: no class, 1)."""
    return 1 if w is None or w in (0, 1) else 2


class ClassGuided(nn.Module):
    """A denoiser D(x, σ, s, labels) as a class-free-looking D(x, σ, s) drawing class ``label``.

    Per-sample network (GroupNorm per sample), so the doubled batch gives each half what a
    separate call would, and the batch composition stays a function of the sampler's batches.
    """

    def __init__(self, denoiser: nn.Module, label: int, guidance: float = 1.0):
        super().__init__()
        if label < 0:
            raise ValueError(f"class label must be ≥ 0 (got {label})")
        self.denoiser, self.label, self.guidance = denoiser, int(label), float(guidance)
        self.pixelwise = getattr(denoiser, "pixelwise", False)
        self._labels: dict = {}  # (batch, device) → the label tensor of a call: made once per shape

    def labels(self, b: int, device: torch.device) -> torch.Tensor:
        """The labels of a call on ``b`` patches: c (w = 1) or ∅ (w = 0) for each, else [c]·b + [∅]·b."""
        key = (b, device)
        t = self._labels.get(key)
        if t is None:
            if self.guidance in (0, 1):
                t = torch.full((b,), self.label if self.guidance == 1 else NO_CLASS, dtype=torch.long)
            else:
                t = torch.tensor([self.label, NO_CLASS], dtype=torch.long).repeat_interleave(b)
            t = self._labels[key] = t.to(device)
        return t

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mpp: torch.Tensor) -> torch.Tensor:
        b, w = x.shape[0], self.guidance
        labels = self.labels(b, x.device)
        if w in (0, 1):
            return self.denoiser(x, sigma, mpp, labels)
        # one σ (or µm/px) for all is broadcast by the denoiser; one per patch is repeated for [x; x]
        sig = sigma if sigma.numel() == 1 else sigma.reshape(-1).repeat(2)
        s = mpp if mpp.numel() == 1 else mpp.reshape(-1).repeat(2)
        d = self.denoiser(torch.cat([x, x]), sig, s, labels)
        return combine(d[b:], d[:b], w)
