"""Run a slide's stages into its store: stage 0, then each guided stage, then the pyramid.

Between the pure cascade (``cascade.diffuse``) and the store. A ``Topology`` says which patch
rows this process owns and moves rows between processes; the single-process one owns all
(``distributed.DistTopology`` is the multi-process one).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import numpy as np
import torch

from .. import faults
from ..errors import WsigenError
from ..method import gridshift, keys
from ..method.canvas import Band, GuideBand, quantize_, to_uint8
from ..method.cascade import Settings, StageContext, StagePlan, diffuse, stage_patch_count
from ..slides.checkpoint import LoadedModel
from ..slides.store import CHUNK, STATE, SlideStore, bounded_map, default_workers
from . import stopping

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


def io_workers() -> int:
    """Threads for the noise fill, the state read, uint8 conversion and chunk writes.

    ``WSIGEN_IO_WORKERS`` if set, else min(8, CPUs) (``store.default_workers``).
    """
    v = os.environ.get("WSIGEN_IO_WORKERS", "").strip()
    if not v:
        return default_workers()
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise WsigenError(f"WSIGEN_IO_WORKERS must be a positive integer (got {v!r})")
    return n


def overlap_min_pixels() -> int:
    """Stages with fewer pixels run their store I/O serially. ``WSIGEN_OVERLAP_MIN_PIXELS``,
    default 2048². At 1024² the two paths measure within noise of each other (docs/performance.md,
    "Scaling"), so this only keeps small stages on the simpler path."""
    v = os.environ.get("WSIGEN_OVERLAP_MIN_PIXELS", str(2048 * 2048))
    try:
        return max(0, int(v))
    except ValueError:
        raise WsigenError(f"WSIGEN_OVERLAP_MIN_PIXELS must be an integer (got {v!r})") from None


def overlap_default() -> bool:
    """Overlap store I/O with compute unless ``WSIGEN_OVERLAP`` is 0/false/no/off."""
    return os.environ.get("WSIGEN_OVERLAP", "1").strip().lower() not in ("0", "false", "no", "off")


# Work blocks of the pools, small so that memory in flight does not grow with the slide (and
# what each thread's malloc arena keeps stays small): _NOISE_COLS columns of a noise-tile row
# (3 MB of float32) or of a state chunk row, _WRITE_COLS of a chunk row (whole chunks, 3 MB of
# uint8); uint8 conversion runs on ≤ _CONVERT_PX pixels at a time (3 MB float32 temporaries).
_NOISE_COLS = 1024
_WRITE_COLS = 2048
_CONVERT_PX = 1 << 18


def _drain(it) -> None:
    for _ in it:
        pass


def fill_noise(ctx: StageContext, band: Band, workers: int = 1) -> None:
    """x_0 = σ_max·ε in place, by noise-tile row × column block on ``workers`` threads.

    ε is keyed per tile (design.md §2), so the bytes depend neither on the split nor on the
    order; numpy's generators and torch's copies release the GIL, so the threads run in parallel.
    """
    sigma = ctx.settings.sigma_max

    def one(block) -> None:
        (a, b), (x0, x1) = block
        eps = keys.initial_noise(ctx.seed, ctx.stage, ctx.height, ctx.width, a, b, x0, x1)
        band.rows(a, b)[:, :, x0:x1].copy_(torch.from_numpy(eps).mul_(sigma))

    blocks = ((r, c) for r in _tile_rows(band.y0, band.y1, keys.NOISE_TILE)
              for c in _tile_rows(0, band.width, _NOISE_COLS))
    _drain(bounded_map(one, blocks, workers, ahead=workers))


def _read_state(store: SlideStore, band: Band, workers: int = 1) -> None:
    """The saved mid-stage state into ``band``, by chunk row × column block on ``workers`` threads."""
    x = store.group[STATE]
    cols = max(x.chunks[2], _NOISE_COLS // x.chunks[2] * x.chunks[2])

    def one(block) -> None:
        (a, b), (x0, x1) = block
        band.rows(a, b)[:, :, x0:x1].copy_(torch.from_numpy(np.asarray(x[:, a:b, x0:x1])))

    blocks = ((r, c) for r in _tile_rows(band.y0, band.y1, x.chunks[1])
              for c in _tile_rows(0, band.width, cols))
    _drain(bounded_map(one, blocks, workers, ahead=workers))


def _tile_rows(y0: int, y1: int, t: int):
    """[y0, y1) cut at multiples of t."""
    a = y0
    while a < y1:
        b = min((a // t + 1) * t, y1)
        yield a, b
        a = b


_scratch = threading.local()


def _scratch_tensor(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of ``n`` elements, reused from block to block (no allocation per block:
    freed blocks would linger in each thread's malloc arena)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


def _to_uint8_into(src: torch.Tensor, out: np.ndarray) -> None:
    """``out[...] = canvas.to_uint8(src)`` for (3, n, w), a column block at a time.

    On the CPU ``to_uint8``'s arithmetic (``canvas.quantize_``) runs in place in a per-thread
    buffer, so the bytes are the same (tests/test_io_overlap.py) and no float temporaries are
    allocated per block.
    """
    dst = torch.from_numpy(out)
    step = max(CHUNK, _CONVERT_PX // max(src.shape[1], 1))
    for x0 in range(0, src.shape[2], step):
        s = src[:, :, x0 : x0 + step]
        if s.device.type != "cpu":  # convert on the device, copy only the bytes
            dst[:, :, x0 : x0 + step].copy_(torch.from_numpy(to_uint8(s)))
            continue
        t = _scratch_tensor("float", s.numel(), torch.float32).view(s.shape)
        dst[:, :, x0 : x0 + step].copy_(quantize_(t.copy_(s)))


class _WriteBehind:
    """One stage's uint8 output written on background threads (``_write_blocks``).

    ``join`` waits and raises the first write error in the caller's thread; ``cancel`` submits
    no more blocks and waits for those in flight (each chunk is written whole or not at all).
    Nothing here records the stage as complete: the caller does, after ``join``.
    """

    def __init__(self, store: SlideStore, stage: int, data: np.ndarray, workers: int):
        self.stage = stage
        self._stop = threading.Event()
        self._error: BaseException | None = None
        arr = store.stage_array(stage)

        def one(y: int, e: int, x0: int, x1: int) -> None:
            store.write_block(stage, y, x0, data[:, y:e, x0:x1])

        def main() -> None:
            try:
                _write_blocks(one, arr, 0, data.shape[1], workers, self._stop)
            except BaseException as e:  # handed to the main thread by join()
                self._error = e

        self._thread = threading.Thread(target=main, name=f"wsigen-write-stage-{stage}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


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
                   for i in range(settings.steps))
        progress.start(total_patches(ctxs), done)
    L = len(plans) - 1
    pending: _WriteBehind | None = None  # the stage being written behind, not yet marked complete
    carried: tuple[int, np.ndarray] | None = None  # (stage, its uint8 output): the next guide

    def settle(wait: bool = True) -> None:
        """Mark the stage written behind complete once its chunks are all written (or now: wait)."""
        nonlocal pending
        if pending is None or not (wait or pending.done()):
            return
        p, pending = pending, None
        p.join()  # a write error surfaces here, in the main thread
        _trim_heap()
        _complete_stage(store, p.stage, topo)

    try:
        for ctx in ctxs:
            l = ctx.stage
            if not todo[l]:
                continue
            resume = state_stage == l and 0 < state_step < settings.steps
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
                    prefetch = pool.submit(_read_guide, store, ctx, g0, g1)
                    pool.shutdown(wait=False)
                else:
                    guide = _read_guide(store, ctx, g0, g1)
            try:
                band = _initial_band(store, ctx, topo, start, resume, checkpoint_every, state_device,
                                     stage_workers)
            finally:
                if prefetch is not None:
                    futures_wait([prefetch])
            if prefetch is not None:
                guide = prefetch.result()
            if topo.rank == 0:  # patches of steps done before an interruption count as progress
                progress.advance(sum(stage_patch_count(ctx, i) for i in range(start)))

            def on_patches(step: int, n: int, ctx=ctx) -> None:
                settle(wait=False)
                progress.stage(ctx.stage, L + 1, step, settings.steps)
                progress.advance(n)  # this rank's patches; a distributed Progress adds up all ranks

            def on_step(step: int, band: Band, ctx=ctx) -> Band:
                n = step + 1
                settle(wait=False)
                if checkpoint_every and n % checkpoint_every == 0 and n < settings.steps:
                    settle()  # the last stage is complete before a checkpoint of this one
                    band = save_state(store, ctx, band, n, topo)
                faults.point("step", ctx.stage, step)
                stop = should_stop() or stopping.pending() is not None
                if topo.world > 1:
                    stop = topo.all_sum(int(stop)) > 0  # every rank stops at the same step
                if stop:
                    settle()
                    if n < settings.steps and not (checkpoint_every and n % checkpoint_every == 0):
                        band = save_state(store, ctx, band, n, topo)  # nothing computed is lost
                    stopping.stop_now()
                return band

            with stopping.graceful():
                band = diffuse(ctx, band, guide, start_step=start, pick_rows=topo.pick_rows,
                               regroup=topo.regroup, on_patches=on_patches, on_step=on_step)
            settle()  # the last stage's writes end before this stage's begin
            guide = carried = None
            if behind and big and l < L:
                arr = store.stage_array(l)
                data = _stage_uint8(arr.shape[1], arr.shape[2], arr.chunks[1], band, topo, workers)
                del band
                topo.release()
                _trim_heap()
                carried = (l, data)
                pending = _WriteBehind(store, l, data, workers)
            else:
                write_stage(store, ctx, band, l == L, final_size, topo, stage_workers)
                del band
                topo.release()
                _trim_heap()
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


def _trim_heap() -> None:
    """Hand the freed band back to the system before the next, larger one is allocated.

    A band of tens of MB can be carved from free heap space instead of being mapped on its own;
    freed, glibc keeps it (and what the I/O threads' arenas freed) resident, adding to the next
    stage's peak (−50 MB at 4096²). ``malloc_trim`` returns it; elsewhere this does nothing.
    """
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL("libc.so.6").malloc_trim
            _libc.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(0)


_libc = None


def _read_guide(store: SlideStore, ctx: StageContext, g0: int, g1: int) -> GuideBand:
    return GuideBand(g0, g1, store.read_rows(ctx.stage - 1, g0, g1)[:, :, : ctx.width // ctx.k])


def _complete_stage(store: SlideStore, l: int, topo: Topology) -> None:
    """Every rank has written all of stage l: record it and drop its checkpoint."""
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
        spans.append(topo.stage_rows(ctx.height, _state_chunk(ctx)))
    band = topo.allocate(ctx.height, ctx.width, y0, y1, hull(spans), state_device,
                         ctx.settings.state_torch_dtype)
    if resume:
        _read_state(store, band, workers)
    else:
        fill_noise(ctx, band, workers)
    _trim_heap()  # what the pool's threads freed
    return band


def _state_chunk(ctx: StageContext) -> int:
    return min(CHUNK, max(ctx.height, ctx.width))


def _state_array(store: SlideStore):
    return store.array("state/x") if hasattr(store, "array") else store.group["state/x"]


def save_state(store: SlideStore, ctx: StageContext, band: Band, step: int, topo: Topology) -> Band:
    """Write the state (in its dtype) after ``step`` steps, chunk-aligned per process, then record it."""
    arr = (store.begin_state(ctx.stage, ctx.height, ctx.width, dtype=ctx.settings.state_dtype)
           if topo.rank == 0 else None)
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
                final_size: tuple[int, int], topo: Topology, workers: int = 1) -> None:
    """Convert to uint8 and write chunk-aligned rows; stage 0 is cropped from its M × M patch.

    Blocks of whole chunks are converted and written on ``workers`` threads, at most
    2 × ``workers`` queued and ``workers`` in memory (``_write_blocks``).
    """
    arr = store.stage_array(ctx.stage)
    a, b = topo.stage_rows(arr.shape[1], arr.chunks[1])
    band = topo.regroup(band, a, min(b, band.height), kind="write")

    def one(y: int, e: int, x0: int, x1: int) -> None:
        shape = (3, e - y, x1 - x0)
        data = _scratch_tensor("uint8", math.prod(shape), torch.uint8).view(shape).numpy()
        _to_uint8_into(band.rows(y, e)[:, :, x0:x1], data)
        store.write_block(ctx.stage, y, x0, data)

    _write_blocks(one, arr, a, b, workers)


def _write_blocks(fn: Callable[[int, int, int, int], None], arr, a: int, b: int, workers: int,
                  stop: threading.Event | None = None) -> None:
    """``fn(y, e, x0, x1)`` for every block of chunk rows [a, b) of ``arr``, on ``workers`` threads.

    A block is one chunk row × ``_WRITE_COLS`` columns (whole chunks), so memory in flight does not
    grow with the width. ``faults.point("chunk-row", y)`` is called in row order, once row y and
    every row before it are written — as when everything ran serially. ``stop``: submit no more.
    """
    c, cx, w = arr.chunks[1], arr.chunks[2], arr.shape[2]
    cols = max(cx, _WRITE_COLS // cx * cx)

    def blocks():
        for y in range(a, b, c):
            for x0 in range(0, w, cols):
                if stop is not None and stop.is_set():
                    return
                yield y, min(y + c, b), x0, min(x0 + cols, w)

    def one(blk: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        fn(*blk)
        return blk

    for y, _, _, x1 in bounded_map(one, blocks(), workers):
        if x1 == w:
            faults.point("chunk-row", y)


def _stage_uint8(h: int, w: int, c: int, band: Band, topo: Topology, workers: int) -> np.ndarray:
    """This process's rows of the stage output (h × w, chunk rows of c) as uint8, as stored."""
    a, b = topo.stage_rows(h, c)
    band = topo.regroup(band, a, min(b, band.height), kind="write")
    out = np.empty((3, b - a, w), dtype=np.uint8)

    def one(block) -> None:
        (y, e), (x0, x1) = block
        _to_uint8_into(band.rows(y, e)[:, :, x0:x1], out[:, y - a : e - a, x0:x1])

    blocks = ((r, cs) for r in _tile_rows(a, b, c) for cs in _tile_rows(0, w, _WRITE_COLS))
    _drain(bounded_map(one, blocks, workers, ahead=workers))
    return out


def default_threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1
