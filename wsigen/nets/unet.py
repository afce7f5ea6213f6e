"""A UNet F(x; c_noise, log s[, c]) conditioned on noise level and µm/px (sinusoidal embeddings)
and, when built with ``classes`` > 0, on a tissue class.

The class embedding is a learned vector per class added to the noise/µm/px features before the
embedding MLP; label −1 ("no class") adds nothing, so a no-class call is exactly the class-free
network's call (classifier-free guidance trains both in one network by label dropout).

Width, depth (channel multipliers), residual blocks per level and attention levels are
configurable. GroupNorm works per sample, so a patch's output does not depend on its batch-mates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    width: int = 32
    mults: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    attn_levels: tuple[int, ...] = ()  # level index (0 = full resolution) with self-attention
    emb_freqs: int = 16
    dropout: float = 0.0
    #: number of tissue classes (0: class-free; the checkpoint config names them)
    classes: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mults"], d["attn_levels"] = list(self.mults), list(self.attn_levels)
        if not self.classes:  # class-free configs (and their checkpoints) read as before
            del d["classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        keys = {"width", "mults", "blocks", "attn_levels", "emb_freqs", "dropout", "classes"}
        unknown = set(d) - keys - {"name", "extra"}
        if unknown:
            raise ValueError(f"unknown UNet config fields: {sorted(unknown)}")
        kw = {k: d[k] for k in keys if k in d}
        for k in ("mults", "attn_levels"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        cfg = cls(**kw)
        if cfg.width < 4 or cfg.width % 4 or not cfg.mults or cfg.blocks < 1:
            raise ValueError("UNet config needs width ≥ 4 (multiple of 4), mults, blocks ≥ 1")
        if not isinstance(cfg.classes, int) or isinstance(cfg.classes, bool) or cfg.classes < 0:
            raise ValueError(f"classes must be an integer ≥ 0 (got {cfg.classes!r})")
        if any(not 0 <= a < len(cfg.mults) for a in cfg.attn_levels):
            raise ValueError("attn_levels must index the levels of mults")
        return cfg


def sinusoidal(v: torch.Tensor, n: int, max_freq: float = 64.0) -> torch.Tensor:
    """[cos, sin] of v at n geometric frequencies from 1 to max_freq (rad per unit)."""
    freqs = torch.exp(torch.linspace(0, math.log(max_freq), n, device=v.device))
    arg = v.float().reshape(-1, 1) * freqs
    return torch.cat([arg.cos(), arg.sin()], dim=1)


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.drop(h))


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x; c_noise, log s) → same shape as x."""

    def __init__(self, cfg: UNetConfig = UNetConfig(), channels: int = 3):
        super().__init__()
        self.cfg = cfg
        w, nf = cfg.width, cfg.emb_freqs
        emb = 4 * w
        self.emb = nn.Sequential(nn.Linear(4 * nf, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.classes:
            self.class_emb = nn.Embedding(cfg.classes, 4 * nf)
            nn.init.normal_(self.class_emb.weight, std=0.5)
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        chans, ch = [w], w
        for lvl, m in enumerate(cfg.mults):
            for _ in range(cfg.blocks):
                self.down.append(ResBlock(ch, w * m, emb, cfg.dropout))
                ch = w * m
                chans.append(ch)
                if lvl in cfg.attn_levels:
                    self.down.append(Attention(ch))
            if lvl < len(cfg.mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, cfg.dropout), ResBlock(ch, ch, emb, cfg.dropout)])
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(cfg.mults))):
            for _ in range(cfg.blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), w * cfg.mults[lvl], emb, cfg.dropout))
                ch = w * cfg.mults[lvl]
                if lvl in cfg.attn_levels:
                    self.up.append(Attention(ch))
            if lvl > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (len(self.cfg.mults) - 1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, log_mpp: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: class index per sample, −1 for "no class" (None: no class for any)."""
        nf = self.cfg.emb_freqs
        e = torch.cat([sinusoidal(c_noise, nf), sinusoidal(log_mpp, nf, max_freq=16.0)], dim=1)
        e = self._add_class(e, labels)
        e = self.emb(e.to(x.dtype))
        h = self.inp(x)
        skips = [h]
        for m in self.down:
            if isinstance(m, ResBlock):
                h = m(h, e)
                skips.append(h)
            elif isinstance(m, Attention):
                h = m(h)
                skips[-1] = h
            else:
                h = m(h)
                skips.append(h)
        for m in self.mid:
            h = m(h, e)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1), e)
            else:
                h = m(h)
        return self.out(F.silu(self.out_norm(h)))

    def _add_class(self, e: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or not labels.numel():
            return e
        labels = labels.reshape(-1).to(torch.long)
        lo, hi = (int(v) for v in torch.aminmax(labels))  # one device sync for every check below
        if not self.cfg.classes:
            if hi >= 0:
                raise ValueError("a class label was given to a class-free network")
            return e
        if hi >= self.cfg.classes or lo < -1:
            raise ValueError(f"class labels must lie in −1…{self.cfg.classes - 1}")
        if not self.training and hi < 0:
            # every sample "no class": exactly the class-free call. (Training always uses the
            # embedding, adding zeros there, so that DDP sees it used in every step.)
            return e
        c = self.class_emb(labels.clamp(min=0).to(e.device)).to(e.dtype)
        return e + torch.where((labels >= 0).to(e.device)[:, None], c, torch.zeros_like(c))
