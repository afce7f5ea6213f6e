"""The guided, grid-shifted step loop of one stage (Harb et al., Algorithm 1 over a canvas).

``diffuse`` runs the N solver steps of one stage over a band of the canvas, patch by patch on a
grid that shifts every step (the stages themselves are planned in ``stages``). No files or
terminals here: guides come in as arrays, progress leaves through callbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from . import edm, gridshift, keys, schedules
from .canvas import Band, GuideBand
from .gridshift import Patch
from .guidance import pinv, project_
from .stages import StageContext, ceil_div

#: Pixels of one row segment handled as one tensor (at least one network batch; rounded to
#: whole batches). 2¹⁹ px = 128 patches of 64², one batch of 512².
SEGMENT_PIXELS = 1 << 19

# Hook type: given the band and the canvas rows the next step needs, return a band holding them.
Regroup = Callable[[Band, int, int], Band]
RowPicker = Callable[[list[int]], list[int]]


def _local_regroup(band: Band, y0: int, y1: int) -> Band:
    if not band.y0 <= y0 <= y1 <= band.y1:
        raise RuntimeError(f"band [{band.y0}, {band.y1}) lacks rows [{y0}, {y1})")
    return band


def _autocast(ctx: StageContext):
    if ctx.settings.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if ctx.settings.precision == "bf16" else torch.float16
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)


def segment_cap(batch: int, patch: int) -> int:
    """Most patches in one row segment: whole batches, about SEGMENT_PIXELS, at least one batch."""
    return batch * max(1, SEGMENT_PIXELS // (patch * patch * batch))


def row_segments(n: int, batch: int, patch: int) -> list[tuple[int, int]]:
    """Split a row of n patches into near-equal segments of whole network batches.

    The split depends only on (n, batch, patch), so with background skipping the batches a
    segment forms (its non-glass patches, left to right) are the same in every process.
    """
    batches = ceil_div(n, batch)
    parts = ceil_div(batches, segment_cap(batch, patch) // batch)
    out, a = [], 0
    for j in range(parts):  # the first (batches mod parts) segments take one batch more
        b = min(n, a + batch * (batches // parts + (j < batches % parts)))
        out.append((a, b))
        a = b
    return out


def to_patches(strip: torch.Tensor, m: int) -> torch.Tensor:
    """(C, M, n·M) strip → (n, C, M, M) patches."""
    c, _, w = strip.shape
    return strip.reshape(c, m, w // m, m).permute(2, 0, 1, 3).contiguous()


def pad_noise(ctx: StageContext, step: int) -> torch.Tensor:
    """ε of the padding at step ``step``: one (1, 3, M, M) draw keyed by (seed, stage, step).

    Every padded patch of the step uses it. No network sees two patches at once, so what each
    patch sees is unchanged from independent draws, at one draw per step instead of one per
    padded patch (docs/architecture.md, "Padding noise").
    """
    m = ctx.patch
    eps = keys.normal((3, m, m), ctx.seed, keys.PAD_NOISE, ctx.stage, step)
    return torch.from_numpy(eps).to(ctx.device)[None]


class _Segment:
    """Consecutive patches of one patch row as one (n, 3, M, M) tensor: gather, pad, guide, scatter.

    Everything but the network works on the whole segment at once (one strided copy to gather,
    one to scatter); padding is b + t·ε (``pad_noise``), set only in the patches that have any.
    """

    def __init__(self, ctx: StageContext, step: int, y0: int, xs: list[int], band: Band,
                 guide: GuideBand | None, eps: torch.Tensor | None = None):
        self.ctx, self.band, self.y0, self.x0 = ctx, band, y0, xs[0]
        m, k, dev, n = ctx.patch, ctx.k, ctx.device, len(xs)
        assert all(b - a == m for a, b in zip(xs, xs[1:], strict=False)), "a segment is contiguous"
        self.n = n
        self.ya, self.yb = max(y0, 0), min(y0 + m, ctx.height)
        self.xa, self.xb = max(self.x0, 0), min(self.x0 + n * m, ctx.width)
        self.bg = ctx.bg
        self.mask = self.eps = None
        padded = [j for j, x0 in enumerate(xs)
                  if not (y0 >= 0 and y0 + m <= ctx.height and x0 >= 0 and x0 + m <= ctx.width)]
        self._pads = _runs(padded)  # a prefix and/or a suffix of the segment, or all of it
        if padded:
            mask = torch.zeros(1, m, n * m, dtype=torch.bool)
            mask[:, self.ya - y0 : self.yb - y0, self.xa - self.x0 : self.xb - self.x0] = True
            self.mask = to_patches(mask, m).to(dev)
            self.eps = eps if eps is not None else pad_noise(ctx, step)
        self.y = None
        if guide is not None:
            mk = m // k
            g = torch.empty(3, mk, n * mk, dtype=torch.float32)
            g[:] = self.bg.cpu().reshape(3, 1, 1)
            src = guide.data[:, self.ya // k - guide.y0 : self.yb // k - guide.y0, self.xa // k : self.xb // k]
            g[:, (self.ya - y0) // k : (self.yb - y0) // k, (self.xa - self.x0) // k : (self.xb - self.x0) // k] = (
                torch.from_numpy(np.ascontiguousarray(src)).to(torch.float32).mul_(1 / 127.5).sub_(1))
            self.y = to_patches(g, mk).to(dev)

    def _pieces(self):
        """(patch slice, column slice within the patch, canvas column slice) covering the valid
        columns: one piece for the patches lying wholly inside, one for each cut patch."""
        m, x0, n = self.ctx.patch, self.x0, self.n
        first = 0 if x0 >= 0 else 1  # first patch wholly inside, and one past the last
        last = min(n, (self.ctx.width - x0) // m)
        out = []
        if first > 0:
            right = min(x0 + m, self.ctx.width)
            out.append((slice(0, 1), slice(-x0, right - x0), slice(0, right)))
        if last > first:
            out.append((slice(first, last), slice(0, m), slice(x0 + first * m, x0 + last * m)))
        if last < n and (last > 0 or first == 0):
            a = x0 + last * m
            out.append((slice(last, last + 1), slice(0, self.ctx.width - a), slice(a, self.ctx.width)))
        return out

    def _copies(self, x: torch.Tensor, history: bool = False):
        """Pairs (patch view, band view) of the valid region, both shaped (3, rows, j, cols)."""
        rows = (self.band.history if history else self.band.rows)(self.ya, self.yb)
        ry = slice(self.ya - self.y0, self.yb - self.y0)
        for js, cs, bs in self._pieces():
            pv = x[js].permute(1, 2, 0, 3)[:, ry, :, cs]
            c, r, j, w = pv.shape
            yield pv, rows[:, :, bs].reshape(c, r, j, w) if j == 1 else rows[:, :, bs].unflatten(2, (j, w))

    def _remote(self) -> bool:
        """The network runs on an accelerator while the state stays in host memory."""
        return self.ctx.device.type == "cuda" and self.band.data.device.type == "cpu"

    def gather(self, t: float) -> torch.Tensor:
        m, n = self.ctx.patch, self.n
        remote = self._remote()
        if remote:  # assemble in pinned host memory, then one asynchronous upload
            x = self.ctx.staging((n, 3, m, m))
        else:
            x = torch.empty(n, 3, m, m, dtype=torch.float32, device=self.band.data.device)
        # padding pixels stay uninitialised here: ``reset`` sets every one of them (torch.where
        # selects, so whatever was in the memory never reaches a value)
        for pv, bv in self._copies(x):
            pv.copy_(bv)
        if remote:
            x = x.to(self.ctx.device, non_blocking=True)
        return self.reset(x, t)

    def gather_history(self) -> torch.Tensor:
        """The multistep history (previous data prediction) of the segment; 0 in the padding,
        where whatever the step computes is discarded."""
        m, n = self.ctx.patch, self.n
        h = torch.zeros(n, 3, m, m, dtype=torch.float32, device=self.band.data.device)
        for pv, bv in self._copies(h, history=True):
            pv.copy_(bv)
        return h.to(self.ctx.device)

    def scatter_history(self, u: torch.Tensor) -> None:
        """Store the segment's data prediction (valid region) as the next step's history."""
        u = u.to(self.band.data.device)
        for pv, bv in self._copies(u, history=True):
            bv.copy_(pv)

    def reset(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Padding is not state: set it (in place) to b + t·ε for the next evaluation's noise level."""
        if self.mask is None:
            return x
        fill = self.bg + t * self.eps
        for a, b in self._pads:
            x[a:b] = torch.where(self.mask[a:b], x[a:b], fill)
        return x

    def scatter(self, x: torch.Tensor) -> None:
        """Write back only the valid region; whatever the step computed in the padding is discarded."""
        if self._remote():  # one download into pinned memory (stream-ordered after the upload)
            host = self.ctx.staging(tuple(x.shape))
            host.copy_(x, non_blocking=True)
            torch.cuda.current_stream(x.device).synchronize()
            x = host
        for pv, bv in self._copies(x):
            bv.copy_(pv)


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted indices → maximal runs [a, b)."""
    runs: list[tuple[int, int]] = []
    for j in idx:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


class GlassMap:
    """Which guide pixels are background glass, with O(1) queries for any patch (summed-area table)."""

    def __init__(self, guide: GuideBand, background_u8: tuple[int, int, int], tolerance: float):
        b = np.asarray(background_u8, dtype=np.int16).reshape(3, 1, 1)
        tissue = (np.abs(guide.data.astype(np.int16) - b) > tolerance).any(axis=0)
        sat = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = tissue.cumsum(0).cumsum(1)
        self.sat, self.y0 = sat, guide.y0

    def is_glass(self, p: Patch, ctx: StageContext) -> bool:
        """True when every guide pixel under the patch's valid region is glass (padding is glass)."""
        k = ctx.k
        ya, yb, xa, xb = p.valid(ctx.height, ctx.width)
        a, b, c, d = ya // k - self.y0, yb // k - self.y0, xa // k, xb // k
        s = self.sat
        return int(s[b, d] - s[a, d] - s[b, c] + s[a, c]) == 0


def diffuse(
    ctx: StageContext,
    band: Band,
    guide: GuideBand | None,
    start_step: int = 0,
    pick_rows: RowPicker | None = None,
    regroup: Regroup = _local_regroup,
    on_patches: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, Band], Band | None] | None = None,
) -> Band:
    """Run steps start_step … N−1 of one stage over ``band`` and return the band.

    For each step: the keyed offset gives the grid; this process takes the patch rows
    ``pick_rows`` chooses (all by default), ``regroup`` makes the band hold their rows, and each
    row is cut into batches of ``settings.batch`` patches left to right (fixed composition,
    design.md §6), each advanced by one guided Heun/Euler step and written back in place.
    With background skipping, patches whose guide is glass everywhere skip the network: their
    denoiser output is taken to be A†y, so the ODE still advances consistently.
    """
    s = ctx.settings
    t = s.sigmas()
    m = ctx.patch
    heun = s.solver == "heun"
    mpp = torch.tensor([ctx.mpp], dtype=torch.float32, device=ctx.device)
    glass_map = None
    if s.skip_background and guide is not None and ctx.guided:
        bg_u8 = tuple(int(round((v + 1) * 127.5)) for v in ctx.background)
        glass_map = GlassMap(guide, bg_u8, s.background_tolerance)
    for i in range(start_step, s.steps):
        rows, cols = ctx.grid(i)
        mine = pick_rows(rows) if pick_rows else rows
        band = regroup(band, *gridshift.row_span(mine, m, ctx.height))
        project_now = ctx.guided and guide is not None and s.projected(i, t)  # Algorithm 1's relaxation
        eps = pad_noise(ctx, i)
        segments = row_segments(len(cols), s.batch, m)
        for y0 in mine:
            for a, b in segments:
                xs = cols[a:b]
                glass = [glass_map.is_glass(Patch(y0, x0, m), ctx) for x0 in xs] if glass_map else None
                _advance(ctx, i, t, y0, xs, glass, band, guide, project_now, heun, mpp, eps)
            if on_patches:
                on_patches(i, len(cols))
        if on_step:
            band = on_step(i, band) or band
    return band


def _advance(ctx: StageContext, i: int, t: list[float], y0: int, xs: list[int], glass: list[bool] | None,
             band: Band, guide: GuideBand | None, project_now: bool, heun: bool,
             mpp: torch.Tensor, eps: torch.Tensor | None = None) -> None:
    """One solver step for consecutive patches of one row, written back in place.

    The network sees fixed batches of ``settings.batch`` non-glass patches, left to right;
    glass patches take u = A†y without the network.
    """
    glass_idx = [j for j, g in enumerate(glass) if g] if glass else []
    active = [j for j in range(len(xs)) if not glass or not glass[j]]
    seg = _Segment(ctx, i, y0, xs, band, guide if (project_now or glass_idx) else None, eps)
    b = ctx.settings.batch
    chunks = [active[c : c + b] for c in range(0, len(active), b)]
    pixelwise = getattr(ctx.denoiser, "pixelwise", False)

    def denoise(x, sigma):
        sig = torch.tensor([sigma], device=ctx.device)
        with torch.no_grad(), _autocast(ctx):
            if (len(chunks) == 1 and len(active) == len(xs)) or pixelwise:
                # one call: the whole segment is one batch, or batches cannot matter (a pixel-wise
                # model gives the same values in any batch; glass patches are replaced below)
                u = ctx.denoiser(x, sig, mpp).float()
            else:
                u = torch.empty_like(x)
                for idx in chunks:
                    sel = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] == len(idx) - 1 else idx
                    u[sel] = ctx.denoiser(x[sel], sig, mpp).float()
        if glass_idx:
            u[glass_idx] = pinv(seg.y[glass_idx], ctx.k)
        if project_now:
            if u.data_ptr() == x.data_ptr():
                u = u.clone()
            project_(u, seg.y, ctx.k)
        return u

    x = seg.gather(t[i])
    if ctx.settings.multistep:
        # DPM-Solver++(2M): one evaluation; the data prediction (projected, as u in Algorithm 1)
        # becomes the history of the next step. First order at the stage's first and last step.
        u = denoise(x, t[i])
        last = t[i + 1] == 0
        prev = seg.gather_history() if i > 0 and not last else None
        x = schedules.dpmpp2m_update(x, u, prev, t[i - 1] if i > 0 else None, t[i], t[i + 1])
        if not last:
            seg.scatter_history(u)
        n_eval = 1
    else:
        x, n_eval = edm.solver_step(denoise, x, t[i], t[i + 1], heun=heun, reset=seg.reset)
    seg.scatter(x)
    ctx.stats["evaluations"] += n_eval * len(active)
    ctx.stats["patches"] += len(xs)
    ctx.stats["skipped"] += len(glass_idx)


def initial_band(ctx: StageContext, y0: int, y1: int, state_device="cpu",
                 guide: GuideBand | None = None) -> Band:
    """x_0 = σ_max·ε for canvas rows [y0, y1), ε keyed per tile (design.md §2); with a part-way
    start x_0 = A†y + S·ε (``add_guide_``). A multistep solver's history rides along as channels 3…5."""
    s = ctx.settings
    eps = keys.initial_noise(ctx.seed, ctx.stage, ctx.height, ctx.width, y0, y1)
    top = s.sigma_max if s.start_sigma is None else s.start_sigma
    data = torch.from_numpy(eps).mul_(top).to(state_device, s.state_torch_dtype)
    if s.multistep:
        data = torch.cat([data, torch.zeros_like(data)])
    band = Band(ctx.height, ctx.width, y0, y1, data)
    if s.start_sigma is not None and guide is not None and ctx.guided:
        add_guide_(band, guide, ctx.k)
    return band


def add_guide_(band: Band, guide: GuideBand, k: int, rows: int = 256) -> None:
    """x += A†y in place (nearest upsampling of the stored guide), ``rows`` canvas rows at a time.

    The part-way start of a guided stage (SDEdit; Chung et al. 2022): the band already holds S·ε.
    """
    for a in range(band.y0, band.y1, rows):
        b = min(a + rows, band.y1)
        g = guide.data[:, a // k - guide.y0 : -(-b // k) - guide.y0, : band.width // k]
        y = torch.from_numpy(np.ascontiguousarray(g)).to(torch.float32).mul_(1 / 127.5).sub_(1)
        up = y.repeat_interleave(k, 1).repeat_interleave(k, 2)[:, a - (a // k) * k : a - (a // k) * k + b - a]
        x = band.rows(a, b)
        x.add_(up.to(x.device, x.dtype))
