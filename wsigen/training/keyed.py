"""Training's keyed randomness: every draw is a function of (seed, step, rank, what it is for).

Nothing global is drawn, so a resumed run repeats the uninterrupted one without any generator
snapshot (design.md §2 "Determinism").
"""

from __future__ import annotations

import numpy as np
import torch

from ..method import keys

# sub-keys of the keyed RNG for training draws
DATA, PREVIEW = 0, 1


def step_rng(seed: int, step: int, rank: int, what: int) -> np.random.Generator:
    """The generator of one step's draws on one rank (patches, then σ and noise)."""
    return keys.rng(seed, keys.TRAIN, what, step, rank)


def preview_rng(seed: int) -> np.random.Generator:
    """The same preview noise at every step, so previews show the model changing, not the noise."""
    return keys.rng(seed, keys.TRAIN, PREVIEW)


def torch_generator(g: np.random.Generator, device) -> torch.Generator:
    """A torch generator on ``device`` seeded from the next draw of ``g``."""
    t = torch.Generator(device=device)
    t.manual_seed(int(g.integers(2**62)))
    return t
