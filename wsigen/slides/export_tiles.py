"""Tiles for the TIFF exporters: each tile read from the store (straight from its chunk file where a
tile is a chunk, else from bands of rows), padded and encoded with imagecodecs on worker threads.

At most a few tiles per thread (or two bands) are in memory, whatever the image size.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import faults
from .parallel import bounded_map


@dataclass(frozen=True)
class Codec:
    """How each tile is encoded, and the TIFF tags that say so (tifffile writes the tags)."""

    name: str  # jpeg | deflate | zstd | none
    quality: int = 90

    def jpeg_args(self) -> dict:
        """libjpeg-turbo settings: YCbCr, 4:4:4 at quality ≥ 90, else 4:2:0 (libvips' rule)."""
        return {"level": self.quality, "colorspace": "RGB", "outcolorspace": "YCBCR",
                "subsampling": (1, 1) if self.quality >= 90 else (2, 2)}

    def tiff_args(self) -> dict:
        if self.name == "jpeg":
            return {"compression": "jpeg", "subsampling": self.jpeg_args()["subsampling"]}
        if self.name == "deflate":
            return {"compression": "adobe_deflate", "predictor": True}
        if self.name == "zstd":
            return {"compression": "zstd", "predictor": True}
        return {"compression": None}

    def encode(self, tile: np.ndarray) -> bytes:
        """Encode one (h, w, 3) uint8 tile exactly as a TIFF reader will decode it."""
        import imagecodecs  # not at import: sampling (e.g. on a GPU machine) needs no codec library

        if self.name == "jpeg":
            return imagecodecs.jpeg8_encode(tile, **self.jpeg_args())
        if self.name == "none":
            return tile.tobytes()
        # Horizontal differencing (TIFF predictor 2) along x, per sample, as tifffile does.
        diff = imagecodecs.delta_encode(tile, axis=-2)
        if self.name == "deflate":
            return imagecodecs.deflate_encode(diff, level=6)
        return imagecodecs.zstd_encode(diff, level=3)


_scratch = threading.local()  # per-thread buffers: fresh 0.8 MB arrays per tile cost page faults


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    b = getattr(_scratch, name, None)
    if b is None or b.shape != shape:
        b = np.empty(shape, np.uint8)
        setattr(_scratch, name, b)
    return b


def pad_tile(tile: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(3, h, w) store pixels → (size, size, 3) contiguous, edge pixels repeated into the padding.

    Repeating the edge (instead of zeros) keeps JPEG ringing out of the visible border pixels.
    ``out`` (reused between calls) receives the pixels when given.
    """
    _, h, w = tile.shape
    t = np.empty((size, size, 3), np.uint8) if out is None else out
    for c in range(3):  # one plane at a time: ~4× faster than a transposing copy
        t[:h, :w, c] = tile[c]
    if h < size:
        t[h:, :w] = t[h - 1 : h, :w]
    if w < size:
        t[:, w:] = t[:, w - 1 : w]
    return t


def _bands(arr, rows: int) -> Iterator[np.ndarray]:
    """Bands of ``rows`` image rows, (3, rows, W), the next one read while this one is encoded."""
    h = arr.shape[1]
    with ThreadPoolExecutor(1) as reader:
        nxt = reader.submit(lambda y: np.asarray(arr[:, y : y + rows, :]), 0)
        for y in range(0, h, rows):
            band = nxt.result()
            if y + rows < h:
                nxt = reader.submit(lambda y: np.asarray(arr[:, y : y + rows, :]), y + rows)
            yield band


def chunk_reader(arr) -> Callable[[int, int], np.ndarray] | None:
    """(chunk row, chunk column) → that (3, c, c) chunk, decoded straight from its file.

    Only for arrays laid out as the store writes them (local files, bytes + zstd, uint8); else
    None and tiles come from zarr band reads. Reading chunk by chunk inside the encoder threads
    decodes in parallel and skips assembling bands: about half the CPU time of an export.
    """
    try:
        from zarr.codecs import BytesCodec, ZstdCodec
        from zarr.storage import LocalStore

        md, store = arr.metadata, arr.store
        codecs = md.codecs
        if not (isinstance(store, LocalStore) and arr.dtype == np.uint8 and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)):
            return None
        root, shape, fill = Path(store.root) / arr.path, tuple(arr.chunks), arr.fill_value
    except (AttributeError, ImportError, TypeError):
        return None

    def read(y: int, x: int) -> np.ndarray:
        """The chunk, in this thread's reused buffer (valid until its next call)."""
        buf = _buffer("chunk", shape)
        try:
            fd = os.open(root / md.encode_chunk_key((0, y, x)), os.O_RDONLY)
        except FileNotFoundError:  # never written (a --partial store): the fill value
            buf.fill(fill)
            return buf
        import imagecodecs

        try:  # decode straight from the page cache (a chunk file is never empty)
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as raw:
                imagecodecs.zstd_decode(raw, out=buf.reshape(-1))
        finally:
            os.close(fd)
        return buf

    return read


def encoded_tiles(arr, tile: int, codec: Codec, workers: int) -> Iterator[bytes]:
    """Every tile of a (3, H, W) array in TIFF order (row-major), encoded on ``workers`` threads."""
    chunk = arr.chunks[1] if hasattr(arr, "chunks") else tile
    h, w = arr.shape[1:]
    read = chunk_reader(arr) if chunk == tile and tuple(arr.chunks) == (3, tile, tile) else None
    if read is not None:  # tile = chunk: each thread reads, decodes and encodes its own tiles

        def one(yx):
            y, x = yx
            t = read(y // tile, x // tile)[:, : min(tile, h - y), : min(tile, w - x)]
            return codec.encode(pad_tile(t, tile, _buffer("tile", (tile, tile, 3))))

        cells = ((y, x) for y in range(0, h, tile) for x in range(0, w, tile))
        return _fault_points(bounded_map(one, cells, workers, 4 * workers))
    rows = math.lcm(tile, chunk) if math.lcm(tile, chunk) <= 4 * max(tile, chunk) else tile

    def tiles():
        for band in _bands(arr, rows):
            for ty in range(0, band.shape[1], tile):
                for x in range(0, band.shape[2], tile):
                    yield band[:, ty : ty + tile, x : x + tile]

    return _fault_points(bounded_map(lambda t: codec.encode(pad_tile(t, tile, _buffer("tile", (tile, tile, 3)))),
                                     tiles(), workers, 4 * workers))


def _fault_points(tiles: Iterator[bytes]) -> Iterator[bytes]:
    for t in tiles:
        faults.point("export-tile")
        yield t
