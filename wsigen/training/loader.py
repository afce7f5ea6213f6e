"""Training batches from loader processes: a torch DataLoader over keyed patches, prefetching.

Item j of the dataset is patch ``j % local_batch`` of step ``start + j // local_batch`` on this
rank, drawn from its own key (``keyed.patch_rng``), so the batches are the same for 0, 1 or N
loader workers and across a resume. Workers are forked after the parent has closed its slide
handles (``PatchSampler.release``); each opens its own on first read, and in-memory slides are
shared copy-on-write. Pixels travel as uint8 (4× less than float) and become [−1, 1] floats on
the training device; a labelled run's class labels (after keyed label dropout) and the nuclei
masks of the morphology-weighted loss travel with them (uint8 too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import PatchSampler

#: Batches each loader worker keeps ready ahead of the optimizer.
PREFETCH = 4


def default_workers(processes_per_machine: int = 1) -> int:
    """min(4, CPUs per training process): the loader workers when none are asked for."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus // max(processes_per_machine, 1)))


class Batch(NamedTuple):
    """One step's patches on one rank: x (n, 3, M, M) in [−1, 1], s (n,), and where the run has
    them the class labels (n,) (−1: no class) and the nuclei masks (n, M, M) uint8."""

    x: torch.Tensor
    s: torch.Tensor
    labels: torch.Tensor | None = None
    nuclei: torch.Tensor | None = None


class PatchDataset(Dataset):
    """The keyed patches of steps start … stop−1 of one rank, in order."""

    def __init__(self, sampler: PatchSampler, seed: int, rank: int, local_batch: int, start: int, stop: int,
                 label_dropout: float = 0.0):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.local_batch, self.start, self.stop = local_batch, start, stop
        self.label_dropout = label_dropout

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.local_batch

    def __getitem__(self, j: int):
        step, index = self.start + j // self.local_batch, j % self.local_batch
        img, s, label, nuclei = self.sampler.keyed_item(self.seed, step, self.rank, index, self.label_dropout)
        return (torch.from_numpy(np.ascontiguousarray(img)), s, label,
                None if nuclei is None else torch.from_numpy(nuclei))


def _collate(items):
    imgs, ss, labels, nuclei = zip(*items, strict=True)
    return (torch.stack(imgs), torch.tensor(ss, dtype=torch.float32),
            None if labels[0] is None else torch.tensor(labels, dtype=torch.long),
            None if nuclei[0] is None else torch.stack(nuclei))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a loader worker decodes and resizes; torch threads would compete


class Batches:
    """Iterator of a :class:`Batch` on ``device`` per step, timing its waits."""

    def __init__(self, sampler: PatchSampler, seed: int, rank: int, local_batch: int, start: int,
                 stop: int, workers: int, device, label_dropout: float = 0.0):
        self.device = torch.device(device)
        self.waited = 0.0  # seconds spent waiting for a batch (the data-wait share of the bar)
        ds = PatchDataset(sampler, seed, rank, local_batch, start, stop, label_dropout)
        if workers > 0:
            sampler.release()  # no slide handle may cross the fork
        self._loader = DataLoader(
            ds, batch_size=local_batch, shuffle=False, num_workers=workers, collate_fn=_collate,
            prefetch_factor=PREFETCH if workers else None, worker_init_fn=_worker_init if workers else None,
            multiprocessing_context="fork" if workers and os.name == "posix" else None,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        self._it: Iterator | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self._loader)
        imgs, s, labels, nuclei = next(self._it)
        nb = self.device.type == "cuda"
        # NCHW in uint8 first (a quarter of the bytes to move), then one float pass: same values
        x = imgs.to(self.device, non_blocking=nb).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1)
        batch = Batch(x, s.to(self.device, non_blocking=nb),
                      None if labels is None else labels.to(self.device, non_blocking=nb),
                      None if nuclei is None else nuclei.to(self.device, non_blocking=nb))
        self.waited += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        """Stop the workers now (a stopped run must not wait for prefetched batches)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
