"""Training's keyed randomness: every draw is a function of (seed, step, rank, what it is for).

Nothing global is drawn, so a resumed run repeats the uninterrupted one without any generator
snapshot (design.md §2 "Determinism"). Each patch has its own key (seed, step, rank, index),
so whichever loader process reads it, and in whatever order, it is the same patch (its class
too: the class of a labelled run is drawn from the patch's key); σ and noise of the loss are keyed
per (step, rank, micro-batch), dropout masks per (step, rank, micro-batch), and whether a patch's
label is dropped per (step, rank, index), apart from the patch itself.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..method import keys

# sub-keys of the keyed RNG for training draws (DATA: the streams of train-states before
# issue 13, which drew a step's patches and noise from one generator; no longer drawn)
DATA, PREVIEW, PATCH, LOSS, DROPOUT, LABEL_DROP = 0, 1, 2, 3, 4, 5


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


def patch_rng(seed: int, step: int, rank: int, index: int) -> np.random.Generator:
    """The generator of patch ``index`` of ``step`` on ``rank`` (its s, position, augmentation)."""
    return keys.rng(seed, keys.TRAIN, PATCH, step, rank, index)


def label_dropped(seed: int, step: int, rank: int, index: int, p: float) -> bool:
    """Whether patch ``index`` of ``step`` on ``rank`` trains with "no class": Bernoulli(p), keyed."""
    return p > 0 and bool(keys.rng(seed, keys.TRAIN, LABEL_DROP, step, rank, index).random() < p)


def loss_generator(seed: int, step: int, rank: int, micro: int, device) -> torch.Generator:
    """σ and noise of the EDM loss for one micro-batch of a step on a rank."""
    return torch_generator(keys.rng(seed, keys.TRAIN, LOSS, step, rank, micro), device)


@contextlib.contextmanager
def dropout_masks(seed: int, step: int, rank: int, micro: int, device):
    """Dropout (torch's global generator) seeded by the key inside, restored after.

    ``nn.Dropout`` takes no generator, so the global one is forked, seeded from the key and
    restored: masks are a function of the key, and nothing else in the process is disturbed.
    """
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    k = int(keys.rng(seed, keys.TRAIN, DROPOUT, step, rank, micro).integers(2**62))
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(k)  # seeds the CPU and every CUDA generator
        yield
