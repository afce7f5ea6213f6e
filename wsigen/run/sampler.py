"""Run a slide's stages into its store: stage 0, then each guided stage, then the pyramid.

Between the pure cascade (``cascade.diffuse``) and the store. A ``Topology`` says which patch
rows this process owns and moves rows between processes; the single-process one owns all
(``distributed.DistTopology`` is the multi-process one).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import numpy as np
import torch

from .. import faults
from ..method.canvas import Band, GuideBand
from ..method.cascade import add_guide_, diffuse
from ..method.stages import Settings, StageContext, StagePlan, stage_patch_count
from ..slides.checkpoint import LoadedModel
from ..slides.store import SlideStore
from . import stopping
from .oom import OutOfMemoryStop
from .stageio import (
    WriteBehind,
    fill_noise,
    io_workers,
    overlap_default,
    overlap_min_pixels,
    read_guide,
    read_state,
    save_state,
    stage_uint8,
    state_chunk,
    trim_heap,
    write_stage,
)
from .topology import Topology, band_rows, hull


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
            denoiser=model.denoiser, settings=settings.for_stage(p.index, len(plans) - 1), seed=seed, stage=p.index,
            height=m if first else p.height, width=m if first else p.width, mpp=p.mpp,
            patch=m, k=k, background=bg, device=device, guided=not first,
            shift=settings.grid_shift and not first))
    return out


def channels_arg(settings: Settings) -> dict:
    """``allocate``'s channel count, given only for a multistep solver (x plus its history)."""
    return {"channels": settings.channels} if settings.multistep else {}


def total_patches(ctxs: list[StageContext]) -> int:
    return sum(stage_patch_count(c, i) for c in ctxs for i in range(c.settings.steps))


def run(store: SlideStore, model: LoadedModel, plans: list[StagePlan], settings: Settings,
        seed: int, device: torch.device, final_size: tuple[int, int],
        topo: Topology | None = None, progress: Progress | None = None,
        checkpoint_every: int = 0, state_device: str | torch.device = "cpu",
        should_stop: Callable[[], bool] = lambda: False, overlap: bool | None = None,
        workers: int | None = None) -> dict:
    """Sample every stage not yet complete; returns counters (evaluations, patches, ...).

    With several processes every rank calls this; each holds only the band its patch rows need.

    ``overlap`` (default: ``WSIGEN_OVERLAP``, on) runs the store I/O beside the compute: noise
    fill, state read, conversion and chunk writes on ``workers`` threads (default
    ``io_workers()``), the guide read in the background while the noise is drawn and, with one
    process, stage l's chunk writes behind stage l+1 (its guide is then stage l's uint8 output,
    kept in memory: the same bytes as stored). Off, every step is serial (the reference path).
    """
    topo = topo or Topology()
    progress = progress or Progress()
    overlap = overlap_default() if overlap is None else overlap
    workers = (workers or io_workers()) if overlap else 1
    behind = overlap and topo.world == 1  # write-behind across stages (one process)
    min_pixels = overlap_min_pixels()  # smaller stages: serial I/O
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
                   for i in range(c.settings.steps))
        progress.start(total_patches(ctxs), done)
    L = len(plans) - 1
    pending: WriteBehind | None = None  # the stage being written behind, not yet marked complete
    carried: tuple[int, np.ndarray] | None = None  # (stage, its uint8 output): the next guide

    def settle(wait: bool = True) -> None:
        """Mark the stage written behind complete once its chunks are all written (or now: wait)."""
        nonlocal pending
        if pending is None or not (wait or pending.done()):
            return
        p, pending = pending, None
        p.join()  # a write error surfaces here, in the main thread
        trim_heap()
        _complete_stage(store, p.stage, topo)

    try:
        for ctx in ctxs:
            l = ctx.stage
            if not todo[l]:
                continue
            resume = state_stage == l and 0 < state_step < ctx.settings.steps
            start = state_step if resume else 0
            big = overlap and ctx.height * ctx.width >= min_pixels
            stage_workers = workers if big else 1
            guide, prefetch = None, None
            if l > 0:
                # The guide as stored (uint8), never a float copy kept from the last stage: read
                # back (in the background while the noise is drawn), or the uint8 output of the
                # stage just written behind — byte for byte what the store holds.
                y0, y1 = topo.guide_rows(ctx, start)
                g0, g1 = y0 // ctx.k, -(-y1 // ctx.k)
                if carried is not None and carried[0] == l - 1:
                    guide = GuideBand(g0, g1, carried[1][:, g0:g1, : ctx.width // ctx.k])
                elif big:
                    pool = ThreadPoolExecutor(1, thread_name_prefix="wsigen-guide")
                    prefetch = pool.submit(read_guide, store, ctx, g0, g1)
                    pool.shutdown(wait=False)
                else:
                    guide = read_guide(store, ctx, g0, g1)
            try:
                band = _initial_band(store, ctx, topo, start, resume, checkpoint_every, state_device,
                                     stage_workers)
            finally:
                if prefetch is not None:
                    futures_wait([prefetch])
            if prefetch is not None:
                guide = prefetch.result()
            if l > 0 and not resume and ctx.settings.start_sigma is not None:
                add_guide_(band, guide, ctx.k)  # the part-way start: x_0 = A†y + S·ε
            if topo.rank == 0:  # patches of steps done before an interruption count as progress
                progress.advance(sum(stage_patch_count(ctx, i) for i in range(start)))

            def on_patches(step: int, n: int, ctx=ctx) -> None:
                settle(wait=False)
                progress.stage(ctx.stage, L + 1, step, ctx.settings.steps)
                progress.advance(n)  # this rank's patches; a distributed Progress adds up all ranks

            steps_done = [start]
            saved = [start]  # the step of this stage's last checkpoint (0: none)

            def on_step(step: int, band: Band, ctx=ctx, steps_done=steps_done, saved=saved) -> Band:
                n = step + 1
                steps_done[0] = n
                settle(wait=False)
                if checkpoint_every and n % checkpoint_every == 0 and n < ctx.settings.steps:
                    settle()  # the last stage is complete before a checkpoint of this one
                    band = save_state(store, ctx, band, n, topo)
                    saved[0] = n
                faults.point("step", ctx.stage, step)
                stop = should_stop() or stopping.pending() is not None
                if topo.world > 1:
                    stop = topo.all_sum(int(stop)) > 0  # every rank stops at the same step
                if stop:
                    settle()
                    if n < ctx.settings.steps and not (checkpoint_every and n % checkpoint_every == 0):
                        band = save_state(store, ctx, band, n, topo)  # nothing computed is lost
                    stopping.stop_now()
                return band

            try:
                with stopping.graceful():
                    band = diffuse(ctx, band, guide, start_step=start, pick_rows=topo.pick_rows,
                                   regroup=topo.regroup, on_patches=on_patches, on_step=on_step)
            except torch.OutOfMemoryError:
                # Patches went back into the band in place: it is half one step, half the next and
                # is never saved. The store still holds the last checkpoint (or the stage start).
                del band
                settle()  # the stage written behind is complete: the resume starts at this one
                raise OutOfMemoryStop(l, steps_done[0], settings.steps, settings.batch, saved[0],
                                      store.resume_command()) from None
            settle()  # the last stage's writes end before this stage's begin
            guide = carried = None
            if behind and big and l < L:
                arr = store.stage_array(l)
                data = stage_uint8(arr.shape[1], arr.shape[2], arr.chunks[1], band, topo, workers)
                del band
                topo.release()
                trim_heap()
                carried = (l, data)
                pending = WriteBehind(store, l, data, workers)
            else:
                write_stage(store, ctx, band, l == L, final_size, topo, stage_workers)
                del band
                topo.release()
                trim_heap()
                _complete_stage(store, l, topo)
            for key in stats:
                stats[key] += ctx.stats[key]
        settle()
    except BaseException:
        if pending is not None:  # never marked complete; the rows in flight finish whole
            pending.cancel()
        raise
    progress.close()
    return stats


def _complete_stage(store: SlideStore, l: int, topo: Topology) -> None:
    """Every rank has written all of stage l: record it and drop its checkpoint.

    Each rank forces its own chunks to disk first; rank 0 then the folders and the mark.
    """
    arr = store.stage_array(l)
    a, b = topo.stage_rows(arr.shape[1], arr.chunks[1])
    c = arr.chunks[1]
    store.sync_rows(store.stage_name(l), range(a // c, -(-b // c)))
    topo.barrier()
    if topo.rank == 0:
        store.mark_stage_complete(l)
        st = store.state_info()
        if st and st["stage"] <= l:
            store.drop_state()
    topo.barrier()
    faults.point("stage", l)


def _initial_band(store: SlideStore, ctx: StageContext, topo: Topology, start: int, resume: bool,
                  checkpoint_every: int, state_device, workers: int = 1) -> Band:
    """Exactly the rows step ``start`` needs: x_0 = σ_max·ε, or the saved state on resume."""
    y0, y1 = band_rows(topo, ctx, start)
    arr = store.stage_array(ctx.stage)
    spans = [band_rows(topo, ctx, i) for i in range(start, ctx.settings.steps)]
    spans.append(topo.stage_rows(arr.shape[1], arr.chunks[1]))
    if checkpoint_every:
        spans.append(topo.stage_rows(ctx.height, state_chunk(ctx)))
    band = topo.allocate(ctx.height, ctx.width, y0, y1, hull(spans), state_device,
                         ctx.settings.state_torch_dtype, **channels_arg(ctx.settings))
    if resume:
        read_state(store, band, workers)
    else:
        fill_noise(ctx, band, workers)
    trim_heap()  # what the pool's threads freed
    return band


