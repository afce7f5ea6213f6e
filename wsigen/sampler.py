"""Run a slide's stages into its store: stage 0, then each guided stage, then the pyramid.

Between the pure cascade (``cascade.diffuse``) and the store. A ``Topology`` says which patch
rows this process owns and moves rows between processes; the single-process one owns all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import faults
from .canvas import Band, GuideBand, to_uint8
from .cascade import Settings, StageContext, StagePlan, diffuse, initial_band, stage_patch_count
from .checkpoint import LoadedModel
from .store import SlideStore


class Topology:
    """One process that owns every row (the distributed version overrides these)."""

    rank, world = 0, 1

    def pick_rows(self, rows: list[int]) -> list[int]:
        return rows

    def regroup(self, band: Band, y0: int, y1: int) -> Band:
        if not band.y0 <= y0 <= y1 <= band.y1:
            raise RuntimeError(f"band [{band.y0}, {band.y1}) lacks rows [{y0}, {y1})")
        return band

    def stage_rows(self, height: int, chunk: int) -> tuple[int, int]:
        """Chunk-aligned rows this process writes at the end of a stage."""
        return 0, height

    def guide_rows(self, ctx: StageContext, start_step: int) -> tuple[int, int]:
        """Canvas rows of the stage this process may touch in any remaining step."""
        return 0, ctx.height

    def barrier(self) -> None:
        pass

    def all_sum(self, value: int) -> int:
        return value


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


def run(store: SlideStore, model: LoadedModel, plans: list[StagePlan], settings: Settings,
        seed: int, device: torch.device, final_size: tuple[int, int],
        topo: Topology | None = None, progress: Progress | None = None,
        checkpoint_every: int = 0, state_device: str | torch.device = "cpu",
        should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Sample every stage not yet complete; returns counters (evaluations, patches, ...)."""
    topo = topo or Topology()
    progress = progress or Progress()
    ctxs = contexts(model, plans, settings, seed, device)
    stats = {"evaluations": 0, "patches": 0, "skipped": 0}
    done = sum(stage_patch_count(c, i) for c in ctxs if store.stage_complete(c.stage)
               for i in range(settings.steps))
    progress.start(total_patches(ctxs), done)
    L = len(plans) - 1
    for ctx in ctxs:
        l = ctx.stage
        if store.stage_complete(l):
            continue
        start = 0
        st = store.state_info()
        y0, y1 = topo.guide_rows(ctx, 0)
        if st and st.get("stage") == l and 0 < st.get("step", 0) < settings.steps:
            start = st["step"]
            y0, y1 = topo.guide_rows(ctx, start)
            data = torch.from_numpy(np.asarray(store.group["state/x"][:, y0:y1, :])).to(state_device)
            band = Band(ctx.height, ctx.width, y0, y1, data)
        else:
            band = initial_band(ctx, y0, y1, state_device)
        guide = None
        if l > 0:
            # The guide is read as stored (uint8), never a float copy kept from the last stage.
            g0, g1 = y0 // ctx.k, -(-y1 // ctx.k)
            guide = GuideBand(g0, g1, store.read_rows(l - 1, g0, g1)[:, :, : ctx.width // ctx.k])
        # Patches already done in skipped steps count as progress.
        progress.advance(sum(stage_patch_count(ctx, i) for i in range(start)))

        def on_patches(step: int, n: int, ctx=ctx) -> None:
            progress.stage(ctx.stage, L + 1, step, settings.steps)
            progress.advance(topo.all_sum(n) if topo.world > 1 else n)

        def on_step(step: int, band: Band, ctx=ctx) -> Band:
            n = step + 1
            if checkpoint_every and n % checkpoint_every == 0 and n < settings.steps:
                band = save_state(store, ctx, band, n, topo)
            if should_stop():
                raise KeyboardInterrupt
            return band

        band = diffuse(ctx, band, guide, start_step=start, pick_rows=topo.pick_rows,
                       regroup=topo.regroup, on_patches=on_patches, on_step=on_step)
        write_stage(store, ctx, band, l == L, final_size, topo)
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


def save_state(store: SlideStore, ctx: StageContext, band: Band, step: int, topo: Topology) -> Band:
    """Write the float32 state after ``step`` steps, chunk-aligned per process, then record it."""
    arr = store.begin_state(ctx.stage, ctx.height, ctx.width) if topo.rank == 0 else None
    topo.barrier()
    if arr is None:
        arr = store.group["state/x"]
    a, b = topo.stage_rows(ctx.height, arr.chunks[1])
    band = topo.regroup(band, a, b)
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
    band = topo.regroup(band, a, min(b, band.height))
    for y in range(a, b, c):
        e = min(y + c, b)
        store.write_rows(ctx.stage, y, to_uint8(band.rows(y, e)[:, :, :w]))
        faults.point("chunk-row", y)


def default_threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1
