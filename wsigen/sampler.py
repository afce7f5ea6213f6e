"""Run a slide's stages into its store: stage 0, then each guided stage, then the pyramid.

Between the pure cascade (``cascade.diffuse``) and the store. A ``Topology`` says which patch
rows this process owns and moves rows between processes; the single-process one owns all
(``distributed.DistTopology`` is the multi-process one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import faults, gridshift, keys, stopping
from .canvas import Band, GuideBand, to_uint8
from .cascade import Settings, StageContext, StagePlan, diffuse, stage_patch_count
from .checkpoint import LoadedModel
from .store import CHUNK, SlideStore

Span = tuple[int, int]


class Topology:
    """One process that owns every row (``distributed.DistTopology`` overrides these)."""

    rank, world = 0, 1

    def pick_rows(self, rows: list[int]) -> list[int]:
        return rows

    def regroup(self, band: Band, y0: int, y1: int, kind: str = "step") -> Band:
        """A band holding canvas rows [y0, y1); collective when there are several processes."""
        if not band.y0 <= y0 <= y1 <= band.y1:
            raise RuntimeError(f"band [{band.y0}, {band.y1}) lacks rows [{y0}, {y1})")
        return band

    def allocate(self, height: int, width: int, y0: int, y1: int, reserve: Span,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Band:
        """An uninitialised band of rows [y0, y1); ``reserve``: every row it may hold this stage."""
        return Band(height, width, y0, y1, torch.empty(3, y1 - y0, width, device=device, dtype=dtype))

    def release(self) -> None:
        """Forget the stage's buffers."""

    def stage_rows(self, height: int, chunk: int) -> Span:
        """Chunk-aligned rows this process writes at the end of a stage."""
        return 0, height

    def guide_rows(self, ctx: StageContext, start_step: int) -> Span:
        """Canvas rows of the stage this process may touch in any remaining step."""
        return hull(band_rows(self, ctx, i) for i in range(start_step, ctx.settings.steps))

    def barrier(self) -> None:
        pass

    def all_sum(self, value: int) -> int:
        return value

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` on every rank (decisions read from the store are rank 0's)."""
        return values


def band_rows(topo: Topology, ctx: StageContext, step: int) -> Span:
    """Canvas rows this process's patch rows cover in ``step`` (empty span if it has none)."""
    rows, _ = ctx.grid(step)
    return gridshift.row_span(topo.pick_rows(rows), ctx.patch, ctx.height)


def hull(spans) -> Span:
    """Smallest span containing every non-empty span (0, 0 if there is none)."""
    spans = [s for s in spans if s[1] > s[0]]
    if not spans:
        return 0, 0
    return min(a for a, _ in spans), max(b for _, b in spans)


@dataclass
class Progress:
    """Callbacks the edge (terminal) implements; the defaults do nothing."""

    def start(self, total: int, done: int = 0) -> None: ...

    def stage(self, stage: int, num_stages: int, step: int, steps: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


def contexts(model: LoadedModel, plans: list[StagePlan], settings: Settings, seed: int,
             device: torch.device) -> list[StageContext]:
    cfg = model.config
    bg = tuple(v / 127.5 - 1 for v in cfg["background"])
    m, k = model.patch, cfg["k"]
    out = []
    for p in plans:
        first = p.index == 0
        out.append(StageContext(
            denoiser=model.denoiser, settings=settings, seed=seed, stage=p.index,
            height=m if first else p.height, width=m if first else p.width, mpp=p.mpp,
            patch=m, k=k, background=bg, device=device, guided=not first,
            shift=settings.grid_shift and not first))
    return out


def total_patches(ctxs: list[StageContext]) -> int:
    return sum(stage_patch_count(c, i) for c in ctxs for i in range(c.settings.steps))


def fill_noise(ctx: StageContext, band: Band) -> None:
    """x_0 = σ_max·ε in place, one noise-tile row at a time (ε keyed per tile, design.md §2)."""
    for a, b in _tile_rows(band.y0, band.y1, keys.NOISE_TILE):
        eps = keys.initial_noise(ctx.seed, ctx.stage, ctx.height, ctx.width, a, b)
        band.rows(a, b).copy_(torch.from_numpy(eps).mul_(ctx.settings.sigma_max))


def _tile_rows(y0: int, y1: int, t: int):
    """[y0, y1) cut at multiples of t."""
    a = y0
    while a < y1:
        b = min((a // t + 1) * t, y1)
        yield a, b
        a = b


def run(store: SlideStore, model: LoadedModel, plans: list[StagePlan], settings: Settings,
        seed: int, device: torch.device, final_size: tuple[int, int],
        topo: Topology | None = None, progress: Progress | None = None,
        checkpoint_every: int = 0, state_device: str | torch.device = "cpu",
        should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Sample every stage not yet complete; returns counters (evaluations, patches, ...).

    With several processes every rank calls this; each holds only the band its patch rows need.
    """
    topo = topo or Topology()
    progress = progress or Progress()
    ctxs = contexts(model, plans, settings, seed, device)
    stats = {"evaluations": 0, "patches": 0, "skipped": 0}
    # Rank 0 reads what is done; the others follow it (their view of the attributes may lag,
    # e.g. on a shared filesystem).
    st = store.state_info() or {}
    todo = topo.broadcast([int(not store.stage_complete(c.stage)) for c in ctxs]
                          + [int(st.get("stage", -1)), int(st.get("step", 0))])
    state_stage, state_step = todo[-2:]
    if topo.rank == 0:
        done = sum(stage_patch_count(c, i) for c in ctxs if not todo[c.stage]
                   for i in range(settings.steps))
        progress.start(total_patches(ctxs), done)
    L = len(plans) - 1
    for ctx in ctxs:
        l = ctx.stage
        if not todo[l]:
            continue
        resume = state_stage == l and 0 < state_step < settings.steps
        start = state_step if resume else 0
        band = _initial_band(store, ctx, topo, start, resume, checkpoint_every, state_device)
        guide = None
        if l > 0:
            # The guide is read as stored (uint8), never a float copy kept from the last stage.
            y0, y1 = topo.guide_rows(ctx, start)
            g0, g1 = y0 // ctx.k, -(-y1 // ctx.k)
            guide = GuideBand(g0, g1, store.read_rows(l - 1, g0, g1)[:, :, : ctx.width // ctx.k])
        if topo.rank == 0:  # patches of steps done before an interruption count as progress
            progress.advance(sum(stage_patch_count(ctx, i) for i in range(start)))

        def on_patches(step: int, n: int, ctx=ctx) -> None:
            progress.stage(ctx.stage, L + 1, step, settings.steps)
            progress.advance(n)  # this rank's patches; a distributed Progress adds up all ranks

        def on_step(step: int, band: Band, ctx=ctx) -> Band:
            n = step + 1
            if checkpoint_every and n % checkpoint_every == 0 and n < settings.steps:
                band = save_state(store, ctx, band, n, topo)
            faults.point("step", ctx.stage, step)
            stop = should_stop() or stopping.pending() is not None
            if topo.world > 1:
                stop = topo.all_sum(int(stop)) > 0  # every rank stops at the same step
            if stop:
                if n < settings.steps and not (checkpoint_every and n % checkpoint_every == 0):
                    band = save_state(store, ctx, band, n, topo)  # nothing computed is lost
                stopping.stop_now()
            return band

        with stopping.graceful():
            band = diffuse(ctx, band, guide, start_step=start, pick_rows=topo.pick_rows,
                           regroup=topo.regroup, on_patches=on_patches, on_step=on_step)
        write_stage(store, ctx, band, l == L, final_size, topo)
        del band, guide
        topo.release()
        topo.barrier()
        if topo.rank == 0:
            store.mark_stage_complete(l)
            if store.state_info():
                store.drop_state()
        topo.barrier()
        faults.point("stage", l)
        for key in stats:
            stats[key] += ctx.stats[key]
    progress.close()
    return stats


def _initial_band(store: SlideStore, ctx: StageContext, topo: Topology, start: int, resume: bool,
                  checkpoint_every: int, state_device) -> Band:
    """Exactly the rows step ``start`` needs: x_0 = σ_max·ε, or the saved state on resume."""
    y0, y1 = band_rows(topo, ctx, start)
    arr = store.stage_array(ctx.stage)
    spans = [band_rows(topo, ctx, i) for i in range(start, ctx.settings.steps)]
    spans.append(topo.stage_rows(arr.shape[1], arr.chunks[1]))
    if checkpoint_every:
        spans.append(topo.stage_rows(ctx.height, _state_chunk(ctx)))
    band = topo.allocate(ctx.height, ctx.width, y0, y1, hull(spans), state_device,
                         ctx.settings.state_torch_dtype)
    if resume:
        x = store.group["state/x"]
        for a, b in _tile_rows(y0, y1, x.chunks[1]):
            band.rows(a, b).copy_(torch.from_numpy(x[:, a:b, :]))
    else:
        fill_noise(ctx, band)
    return band


def _state_chunk(ctx: StageContext) -> int:
    return min(CHUNK, max(ctx.height, ctx.width))


def _state_array(store: SlideStore):
    return store.array("state/x") if hasattr(store, "array") else store.group["state/x"]


def save_state(store: SlideStore, ctx: StageContext, band: Band, step: int, topo: Topology) -> Band:
    """Write the state (in its dtype) after ``step`` steps, chunk-aligned per process, then record it."""
    arr = store.begin_state(ctx.stage, ctx.height, ctx.width, dtype=ctx.settings.state_dtype) if topo.rank == 0 else None
    topo.barrier()
    if arr is None:
        arr = _state_array(store)
    a, b = topo.stage_rows(ctx.height, arr.chunks[1])
    band = topo.regroup(band, a, b, kind="state")
    for y in range(a, b, arr.chunks[1]):
        e = min(y + arr.chunks[1], b)
        arr[:, y:e, :] = band.rows(y, e).cpu().numpy()
        faults.point("state-chunk", y)
    topo.barrier()
    if topo.rank == 0:
        store.commit_state(ctx.stage, step)
    topo.barrier()
    return band


def write_stage(store: SlideStore, ctx: StageContext, band: Band, final: bool,
                final_size: tuple[int, int], topo: Topology) -> None:
    """Convert to uint8 and write chunk-aligned rows; stage 0 is cropped from its M × M patch."""
    arr = store.stage_array(ctx.stage)
    h, w = arr.shape[1], arr.shape[2]
    c = arr.chunks[1]
    a, b = topo.stage_rows(h, c)
    band = topo.regroup(band, a, min(b, band.height), kind="write")
    for y in range(a, b, c):
        e = min(y + c, b)
        store.write_rows(ctx.stage, y, to_uint8(band.rows(y, e)[:, :, :w]))
        faults.point("chunk-row", y)


def default_threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1
