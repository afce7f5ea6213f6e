"""One optimizer step: the keyed EDM loss of each micro-batch — with the patches' class labels and
the morphology weights where the run has them — a clipped, sanitised update, then the EMA.

σ, noise and dropout masks are keyed by (seed, step, rank, micro-batch) (:mod:`.keyed`). A
class-free run passes no labels and α = 0 no pixel weight: exactly the calls made before either
existed, so its weights are the same bytes.
"""

from __future__ import annotations

import contextlib

import torch

from ..method import edm
from . import keyed, morphology
from .config import TrainConfig, learning_rate
from .loader import Batch


class Denoiser:
    """The (maybe DDP-wrapped) denoiser as ``edm_loss`` wants it: D(x, σ, s) with ``sigma_data``,
    the micro-batch's class labels bound (None: the class-free call)."""

    def __init__(self, module, sigma_data: float, labels: torch.Tensor | None = None):
        self.module, self.sigma_data, self.labels = module, sigma_data, labels

    def __call__(self, x, sigma, mpp):
        if self.labels is None:
            return self.module(x, sigma, mpp)
        return self.module(x, sigma, mpp, self.labels)


def micro_loss(module, sigma_data: float, batch: Batch, part: slice, gen: torch.Generator,
               morphology_weight: float = 0.0) -> torch.Tensor:
    """The EDM loss of ``batch[part]``: labels if the batch has them, pixel weights if α > 0."""
    labels = None if batch.labels is None else batch.labels[part]
    extra = {}
    if morphology_weight:
        extra["pixel_weight"] = morphology.pixel_weights(batch.nuclei[part], morphology_weight)
    return edm.edm_loss(Denoiser(module, sigma_data, labels), batch.x[part], batch.s[part], gen, **extra)


def optimizer_step(acc, net, opt, cfg: TrainConfig, batch: Batch, step: int, rank: int, micro: int,
                   sigma_data: float) -> torch.Tensor:
    """A keyed batch, the EDM loss over ``cfg.grad_accum`` micro-batches, one update; the loss."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    net.train()
    loss = 0.0
    for m in range(cfg.grad_accum):  # micro-batches; gradients meet (DDP) at the last
        last_micro = m == cfg.grad_accum - 1
        part = slice(m * micro, (m + 1) * micro)
        gen = keyed.loss_generator(cfg.seed, step, rank, m, batch.x.device)
        with contextlib.nullcontext() if last_micro else acc.no_sync(net):
            with acc.autocast(), keyed.dropout_masks(cfg.seed, step, rank, m, batch.x.device):
                part_loss = micro_loss(net, sigma_data, batch, part, gen, cfg.morphology_weight)
            acc.backward(part_loss if cfg.grad_accum == 1 else part_loss / cfg.grad_accum)
        loss = loss + part_loss.detach() / cfg.grad_accum
    if cfg.grad_clip:
        acc.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    for p in net.parameters():  # a NaN/Inf gradient must not poison the weights
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema ← beta·ema + (1 − beta)·net for the parameters; buffers are copied."""
    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
        pe.copy_(pn.detach().lerp(pe, beta))
    for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
        be.copy_(bn)
