"""Deep Zoom tiles from a level source: the index arithmetic and the pixels, no HTTP.

Deep Zoom numbers levels from 0 (1×1 px) up to ``max_level`` (full resolution); here ``d`` counts
halvings down from full resolution (``d = max_level − level``), as the store numbers its pyramid.
Level ``d`` is ⌈W/2^d⌉ × ⌈H/2^d⌉, exactly the store's level sizes, so a tile of a level the source
has is a crop of it. Levels the source lacks (below the store's smallest level, or between an SVS's
4× levels) are the store's own 2×2 mean (``downsample2``) of the next finer one, computed in
256² blocks that are cached, so a thumbnail of a big array is computed once and never whole.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from PIL import Image

from ..slides.store import downsample2

TILE = 254  # Deep Zoom's customary size: with the overlap a full tile is 256 px wide
OVERLAP = 1  # one shared pixel per side keeps the viewer's blending free of seams
BLOCK = 256  # computed (virtual) levels are made and cached in blocks of this side
JPEG_QUALITY = 90

# reader(x0, y0, x1, y1) → (3, y1 − y0, x1 − x0) uint8: a box inside one level
Reader = Callable[[int, int, int, int], np.ndarray]


def max_level(width: int, height: int) -> int:
    """The Deep Zoom level that is full resolution: ⌈log2(longest side)⌉."""
    return max(0, math.ceil(math.log2(max(width, height))))


def level_size(width: int, height: int, d: int) -> tuple[int, int]:
    """(width, height) after ``d`` halvings, rounded up (odd edges are kept, as in the store)."""
    f = 1 << d
    return -(-width // f), -(-height // f)


def tile_grid(width: int, height: int, d: int, tile: int = TILE) -> tuple[int, int]:
    """(columns, rows) of tiles at ``d`` halvings."""
    w, h = level_size(width, height, d)
    return -(-w // tile), -(-h // tile)


def tile_box(width: int, height: int, level: int, col: int, row: int, tile: int = TILE,
             overlap: int = OVERLAP) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) that Deep Zoom tile (level, col, row) shows, None when out of range."""
    top = max_level(width, height)
    if not 0 <= level <= top or col < 0 or row < 0:
        return None
    d = top - level
    cols, rows = tile_grid(width, height, d, tile)
    if col >= cols or row >= rows:
        return None
    w, h = level_size(width, height, d)
    x0, y0 = max(col * tile - overlap, 0), max(row * tile - overlap, 0)
    return x0, y0, min((col + 1) * tile + overlap, w), min((row + 1) * tile + overlap, h)


class LRU:
    """A byte-bounded least-recently-used map, safe to share between threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, n) = self._items.popitem(last=False)
                self.bytes -= n

    def lookup(self, key):
        hit = self.get(key)
        return None if hit is None else hit[0]

    def drop(self, prefix: tuple) -> None:
        """Forget every key that starts with ``prefix`` (a layer that changed)."""
        with self._lock:
            for k in [k for k in self._items if k[: len(prefix)] == prefix]:
                self.bytes -= self._items.pop(k)[1]


class Pyramid:
    """A Deep Zoom image: the levels a source has (``readers[d]``) and 2×2 means for the rest.

    ``cache`` holds computed blocks under ``(key, d, by, bx)``; pass ``cache=None`` for an array
    that may still change (an incomplete store), so nothing of it is ever kept.
    """

    def __init__(self, width: int, height: int, readers: dict[int, Reader], key: tuple = (),
                 cache: LRU | None = None):
        if 0 not in readers:
            raise ValueError("a pyramid needs its full-resolution level (d = 0)")
        self.width, self.height = width, height
        self.readers, self.key, self.cache = readers, key, cache
        self.max_level = max_level(width, height)
        self._making: dict[tuple, threading.Event] = {}  # blocks being computed now, by key
        self._making_lock = threading.Lock()

    def region(self, d: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """(3, y1 − y0, x1 − x0) uint8: the box of level ``d`` (inside the level)."""
        if d in self.readers:
            return self.readers[d](x0, y0, x1, y1)
        out = np.empty((3, y1 - y0, x1 - x0), np.uint8)
        for by in range(y0 // BLOCK, (y1 - 1) // BLOCK + 1):
            for bx in range(x0 // BLOCK, (x1 - 1) // BLOCK + 1):
                b = self._block(d, by, bx)
                oy, ox = by * BLOCK, bx * BLOCK
                sy0, sx0 = max(y0, oy), max(x0, ox)
                sy1, sx1 = min(y1, oy + b.shape[1]), min(x1, ox + b.shape[2])
                out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = b[:, sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
        return out

    def _block(self, d: int, by: int, bx: int) -> np.ndarray:
        key = (*self.key, d, by, bx)
        if self.cache is None:
            return self._make(d, by, bx)
        if (hit := self.cache.lookup(key)) is not None:
            return hit
        # a page asks for several coarse tiles at once: each block is computed by one thread only
        # (for a big array without a pyramid the first overview reads all of it)
        with self._making_lock:
            busy = self._making.get(key)
            if busy is None:
                self._making[key] = threading.Event()
        if busy is not None:
            busy.wait()
            if (hit := self.cache.lookup(key)) is not None:
                return hit
            return self._make(d, by, bx)  # evicted already, or the other thread failed
        try:
            block = self._make(d, by, bx)
            self.cache.put(key, block, block.nbytes)
            return block
        finally:
            with self._making_lock:
                self._making.pop(key).set()

    def _make(self, d: int, by: int, bx: int) -> np.ndarray:
        # the finer level's 2× box, clipped to it: downsample2 repeats an odd edge as the store does
        fw, fh = level_size(self.width, self.height, d - 1)
        fx0, fy0 = 2 * bx * BLOCK, 2 * by * BLOCK
        return downsample2(self.region(d - 1, fx0, fy0, min(fx0 + 2 * BLOCK, fw), min(fy0 + 2 * BLOCK, fh)))

    def tile(self, level: int, col: int, row: int, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray | None:
        """(3, h, w) pixels of a Deep Zoom tile, None when it does not exist."""
        box = tile_box(self.width, self.height, level, col, row, tile, overlap)
        if box is None:
            return None
        return self.region(self.max_level - level, *box)


def encode(chw: np.ndarray, fmt: str, quality: int = JPEG_QUALITY) -> bytes:
    """A tile as JPEG (4:4:4, so stain colours are not smeared) or lossless PNG."""
    img = Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), "RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)  # tiles are made per request: speed over size
    else:
        raise ValueError(f"unknown tile format {fmt!r}")
    return buf.getvalue()
