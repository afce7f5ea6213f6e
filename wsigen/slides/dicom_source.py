"""The store's levels as a wsidicom ``Source``: what ``WsiDicom(source).save`` writes from.

Each level is an ``ImageData`` of raw RGB tiles (tile = the store's chunk, so a tile is one
chunk file decoded), read on demand from wsidicom's worker threads: no level is ever held
whole. Datasets come from wsidicom's own metadata schema (``WsiDataset.create_instance_dataset``).

Backpressure: wsidicom 0.36 bounds its encoder's input queue, but its dispatcher hands every
task on to a thread pool whose own queue is unbounded, so with a slow codec (JPEG-LS, JPEG 2000)
raw tiles pile up there (measured: 0.8–1.2 GB at 16384², and it would grow with the level).
``TileSlots`` closes the loop: a tile is read only when a slot is free, and the encoder
(wrapped by ``bounded_encoder``) frees the slot once the tile is encoded.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian
from wsidicom.codec import Encoder
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData, WsiDataset, WsiInstance
from wsidicom.metadata import ImageType
from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
from wsidicom.source import Source

from .. import faults


class TileSlots(threading.Semaphore):
    """Tiles read from the store and not yet encoded, at most ``n`` (shared by all levels).

    ``n`` must exceed what wsidicom's readers can hold before they hand a batch on (one batch
    of 2 tiles per reader thread), or they would wait for each other."""


def bounded_encoder(encoder: Encoder, slots: TileSlots) -> Encoder:
    """``encoder`` that frees a tile slot after each encode (same class and settings)."""

    class Bounded(type(encoder)):
        def encode(self, pixels):
            try:
                return super().encode(pixels)
            finally:
                slots.release()

    return Bounded(encoder.settings)


class StoreLevel(ImageData):
    """One store level, (3, H, W) uint8, as uncompressed tiles of ``tile`` px."""

    def __init__(self, arr, spacing_mm: SizeMm, tile: int, chunk_reader=None, slots: TileSlots | None = None):
        super().__init__(Encoder.create(ExplicitVRLittleEndian, 8, "RGB"))
        self._arr, self._spacing, self._tile, self._slots = arr, spacing_mm, tile, slots
        # tile = chunk: decode the chunk file straight (exporting.chunk_reader), else zarr reads
        same = tuple(getattr(arr, "chunks", ())) == (3, tile, tile)
        self._read = chunk_reader(arr) if chunk_reader is not None and same else None

    transfer_syntax = property(lambda self: UID(ExplicitVRLittleEndian))
    image_size = property(lambda self: Size(self._arr.shape[2], self._arr.shape[1]))
    tile_size = property(lambda self: Size(self._tile, self._tile))
    pixel_spacing = property(lambda self: self._spacing)
    imaged_size = property(lambda self: None)  # wsidicom derives it: size × spacing
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: "RGB")
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)  # the schema's default (slide centre)
    thread_safe = property(lambda self: True)  # chunk reads use per-thread buffers
    lossy_compression = property(lambda self: None)  # the store is the original: never compressed
    transcoder = property(lambda self: None)

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        faults.point("export-tile")
        if self._slots is not None:
            # bounded wait: after a failure elsewhere nobody frees slots, and wsidicom's reader
            # must get on to notice the cancellation (a slow codec just loosens the bound by one)
            self._slots.acquire(timeout=10)
        t, h, w = self._tile, self._arr.shape[1], self._arr.shape[2]
        y, x = tile_point.y * t, tile_point.x * t
        if self._read is not None:
            chw = self._read(tile_point.y, tile_point.x)[:, : min(t, h - y), : min(t, w - x)]
        else:
            chw = np.asarray(self._arr[:, y : y + t, x : x + t])
        return padded(chw, t)

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self.get_decoded_tile(tile, z, path).tobytes()


class StoreSource(Source):
    """Level instances over the store's pyramid; no label, overview or thumbnail."""

    def __init__(self, levels: list, mpp: float, metadata, tile: int, chunk_reader=None,
                 slots: TileSlots | None = None):
        super().__init__()
        # ICC profile: Type 1C for colour images; the schema inserts an sRGB one when asked to
        base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, require_icc_profile=True)
        self._base = WsiDataset(copy.deepcopy(base))
        h0, w0 = levels[0].shape[1:]
        self._levels = []
        for i, arr in enumerate(levels):
            h, w = arr.shape[1:]
            # exact per-axis ratios, so every level images the same physical area (odd sizes too)
            spacing = SizeMm(mpp * w0 / w / 1000, mpp * h0 / h / 1000)
            data = StoreLevel(arr, spacing, tile, chunk_reader, slots)
            # create_instance_dataset fills in the dataset it is given: one copy per level
            self._levels.append(WsiInstance.create_instance(data, copy.deepcopy(base), ImageType.VOLUME, i))

    base_dataset = property(lambda self: self._base)
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: [])
    overview_instances = property(lambda self: [])
    thumbnail_instances = property(lambda self: [])
    annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass


def padded(chw: np.ndarray, size: int) -> np.ndarray:
    """(3, h, w) → (size, size, 3), edge pixels repeated (keeps JPEG ringing off the border)."""
    _, h, w = chw.shape
    t = np.empty((size, size, 3), np.uint8)
    t[:h, :w] = chw.transpose(1, 2, 0)
    if h < size:
        t[h:, :w] = t[h - 1 : h, :w]
    if w < size:
        t[:, w:] = t[:, w - 1 : w]
    return t
