"""A stage's store I/O beside the compute: the noise fill, mid-stage state, uint8 conversion and chunk
writes on a pool of threads, and the write-behind of a finished stage (docs/architecture.md, "Store
I/O beside the compute"). Bytes never depend on the number of threads: noise is keyed per tile and
conversion is elementwise.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from .. import faults
from ..errors import WsigenError
from ..method import keys
from ..method.canvas import Band, GuideBand, quantize_, to_uint8
from ..method.stages import StageContext
from ..slides.store import CHUNK, HISTORY, STATE, SlideStore, bounded_map, default_workers
from .topology import Topology


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
    s = ctx.settings
    sigma = s.sigma_max if s.start_sigma is None else s.start_sigma  # a part-way start adds A†y after

    def one(block) -> None:
        (a, b), (x0, x1) = block
        eps = keys.initial_noise(ctx.seed, ctx.stage, ctx.height, ctx.width, a, b, x0, x1)
        band.rows(a, b)[:, :, x0:x1].copy_(torch.from_numpy(eps).mul_(sigma))

    blocks = ((r, c) for r in tile_rows(band.y0, band.y1, keys.NOISE_TILE)
              for c in tile_rows(0, band.width, _NOISE_COLS))
    _drain(bounded_map(one, blocks, workers, ahead=workers))


def read_state(store: SlideStore, band: Band, workers: int = 1) -> None:
    """The saved mid-stage state into ``band``, by chunk row × column block on ``workers`` threads
    (and a multistep solver's history from ``state/d`` when the band has room for it).

    A missing chunk would read as zeros: refused instead (``SlideStore.trust_marks`` checks first).
    """
    x = store.group[STATE]
    hist = None
    if band.data.shape[0] > 3:
        if HISTORY not in store.group:
            raise WsigenError(f"{store.path}: the checkpoint lacks the multistep history (state/d); "
                              f"the store is damaged")
        hist = store.group[HISTORY]
    for name in (STATE,) + ((HISTORY,) if hist is not None else ()):
        gaps = store.missing_chunks(name)
        if gaps:
            raise WsigenError(f"{store.path}: the checkpoint {name} lacks {gaps} chunks; refusing to read "
                              "it as zeros")
    cols = max(x.chunks[2], _NOISE_COLS // x.chunks[2] * x.chunks[2])

    def one(block) -> None:
        (a, b), (x0, x1) = block
        band.rows(a, b)[:, :, x0:x1].copy_(torch.from_numpy(np.asarray(x[:, a:b, x0:x1])))
        if hist is not None:
            band.history(a, b)[:, :, x0:x1].copy_(torch.from_numpy(np.asarray(hist[:, a:b, x0:x1])))

    blocks = ((r, c) for r in tile_rows(band.y0, band.y1, x.chunks[1])
              for c in tile_rows(0, band.width, cols))
    _drain(bounded_map(one, blocks, workers, ahead=workers))


def tile_rows(y0: int, y1: int, t: int):
    """[y0, y1) cut at multiples of t."""
    a = y0
    while a < y1:
        b = min((a // t + 1) * t, y1)
        yield a, b
        a = b


_scratch = threading.local()


def scratch_tensor(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of ``n`` elements, reused from block to block (no allocation per block:
    freed blocks would linger in each thread's malloc arena)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


def to_uint8_into(src: torch.Tensor, out: np.ndarray) -> None:
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
        t = scratch_tensor("float", s.numel(), torch.float32).view(s.shape)
        dst[:, :, x0 : x0 + step].copy_(quantize_(t.copy_(s)))


class WriteBehind:
    """One stage's uint8 output written on background threads (``write_blocks``).

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
                write_blocks(one, arr, 0, data.shape[1], workers, self._stop)
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


_libc = None


def trim_heap() -> None:
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


def read_guide(store: SlideStore, ctx: StageContext, g0: int, g1: int) -> GuideBand:
    return GuideBand(g0, g1, store.read_rows(ctx.stage - 1, g0, g1)[:, :, : ctx.width // ctx.k])


def state_chunk(ctx: StageContext) -> int:
    return min(CHUNK, max(ctx.height, ctx.width))


def save_state(store: SlideStore, ctx: StageContext, band: Band, step: int, topo: Topology) -> Band:
    """Write the state (in its dtype) after ``step`` steps, chunk-aligned per process, then record it."""
    multi = ctx.settings.multistep
    arr = hist = None
    if topo.rank == 0:
        arr = store.begin_state(ctx.stage, ctx.height, ctx.width, dtype=ctx.settings.state_dtype)
        if multi:
            hist = store.history_array(ctx.height, ctx.width, arr.chunks[1], dtype=ctx.settings.state_dtype)
    topo.barrier()
    if arr is None:
        arr = store.array(STATE)
        if multi:
            hist = store.array(HISTORY)
    a, b = topo.stage_rows(ctx.height, arr.chunks[1])
    band = topo.regroup(band, a, b, kind="state")
    c = arr.chunks[1]
    for y in range(a, b, c):
        e = min(y + c, b)
        arr[:, y:e, :] = band.rows(y, e).cpu().numpy()
        if hist is not None:  # the history moves with the rows and is saved beside x
            hist[:, y:e, :] = band.history(y, e).cpu().numpy()
        faults.point("state-chunk", y)
    for name in (STATE,) + ((HISTORY,) if hist is not None else ()):
        store.sync_rows(name, range(a // c, -(-b // c)))  # this process's chunks, before the record
    topo.barrier()
    if topo.rank == 0:
        store.commit_state(ctx.stage, step)
    topo.barrier()
    return band


def write_stage(store: SlideStore, ctx: StageContext, band: Band, final: bool,
                final_size: tuple[int, int], topo: Topology, workers: int = 1) -> None:
    """Convert to uint8 and write chunk-aligned rows; stage 0 is cropped from its M × M patch.

    Blocks of whole chunks are converted and written on ``workers`` threads, at most
    2 × ``workers`` queued and ``workers`` in memory (``write_blocks``).
    """
    arr = store.stage_array(ctx.stage)
    a, b = topo.stage_rows(arr.shape[1], arr.chunks[1])
    band = topo.regroup(band, a, min(b, band.height), kind="write")

    def one(y: int, e: int, x0: int, x1: int) -> None:
        shape = (3, e - y, x1 - x0)
        data = scratch_tensor("uint8", math.prod(shape), torch.uint8).view(shape).numpy()
        to_uint8_into(band.rows(y, e)[:, :, x0:x1], data)
        store.write_block(ctx.stage, y, x0, data)

    write_blocks(one, arr, a, b, workers)


def write_blocks(fn: Callable[[int, int, int, int], None], arr, a: int, b: int, workers: int,
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


def stage_uint8(h: int, w: int, c: int, band: Band, topo: Topology, workers: int) -> np.ndarray:
    """This process's rows of the stage output (h × w, chunk rows of c) as uint8, as stored."""
    a, b = topo.stage_rows(h, c)
    band = topo.regroup(band, a, min(b, band.height), kind="write")
    out = np.empty((3, b - a, w), dtype=np.uint8)

    def one(block) -> None:
        (y, e), (x0, x1) = block
        to_uint8_into(band.rows(y, e)[:, :, x0:x1], out[:, y - a : e - a, x0:x1])

    blocks = ((r, cs) for r in tile_rows(a, b, c) for cs in tile_rows(0, w, _WRITE_COLS))
    _drain(bounded_map(one, blocks, workers, ahead=workers))
    return out
