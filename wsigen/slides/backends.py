"""Format backends behind ``readers.open_image``: OpenSlide (vendor WSIs), tifffile (TIFF, OME-TIFF,
read lazily via zarr) and pyvips (PNG, JPEG, … decoded whole), each finding the file's µm/px.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import WsigenError
from .pixels import WHITE, to_rgb8
from .planes import Planes, plane_axis
from .slide import ArraySlide, Slide

#: Resolutions in inches (TIFF) or metres (PNG) are trusted only below this many µm/px:
#: 72/96/300/600 dpi defaults written by ordinary software are not a physical scale.
MAX_TRUSTED_DPI_MPP = 20.0
#: Untiled images (PNG, JPEG, …) are decoded whole; refuse headers claiming more pixels than this.
MAX_UNTILED_PIXELS = 2**30
_UNIT_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


class OpenSlideSlide(Slide):
    """Vendor whole-slide formats via OpenSlide; µm/px from openslide.mpp-x/y, background from the file."""

    def __init__(self, path: Path, osr, mpp: float | None):
        self._osr = osr
        bg = WHITE
        hexbg = osr.properties.get("openslide.background-color")
        if hexbg and re.fullmatch(r"[0-9a-fA-F]{6}", hexbg):
            bg = tuple(int(hexbg[i : i + 2], 16) for i in (0, 2, 4))
        levels = [
            (int(w), int(h), float(d))
            for (w, h), d in zip(osr.level_dimensions, osr.level_downsamples, strict=True)
        ]
        if mpp is None:
            mx, my = osr.properties.get("openslide.mpp-x"), osr.properties.get("openslide.mpp-y")
            vals = [float(v) for v in (mx, my) if v not in (None, "")]
            mpp = sum(vals) / len(vals) if vals else None
        super().__init__(path, levels, mpp, bg)

    def close(self):
        self._osr.close()

    def _read(self, level, x, y, w, h):
        d = self.levels[level][2]
        try:
            img = self._osr.read_region((int(round(x * d)), int(round(y * d))), level, (w, h))
        except Exception as e:  # openslide raises OpenSlideError subclasses and others
            raise WsigenError(f"{self.path}: cannot read region ({e})") from None
        if img.mode == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
            # opaque (inside the scanned area): Pillow drops alpha in C, ~5× faster than numpy's
            # strided 4→3-byte copy; pixels exactly as to_rgb8 would give
            return np.array(img.convert("RGB"))  # a writable copy, as to_rgb8 returns
        return to_rgb8(np.asarray(img), self.background, str(self.path))


class TiffSlide(Slide):
    """TIFF / OME-TIFF via tifffile: levels from the series' pyramid, pixels lazily via zarr."""

    def __init__(self, path: Path, tf, mpp: float | None, planes: Planes | None = None):
        import zarr

        self._tf = tf
        series = tf.series[0]
        self._arrays = []
        self._tiles = []  # per level: its TiffPage where tiles can be decoded directly, else None
        levels = []
        for i, lvl in enumerate(series.levels):
            axes = lvl.axes.upper()
            if "Y" not in axes or "X" not in axes:
                raise WsigenError(f"{path}: the image has no Y/X axes ({lvl.axes})")
            arr = zarr.open(series.aszarr(level=i), mode="r")
            self._arrays.append((arr, axes))
            self._tiles.append(_tile_page(lvl, axes))
            h, w = lvl.shape[axes.index("Y")], lvl.shape[axes.index("X")]
            levels.append((w, h, None))
        w0 = levels[0][0]
        levels = [(w, h, w0 / w) for w, h, _ in levels]
        arr, axes = self._arrays[0]
        # Axes beyond Y, X and samples with several entries need --page/--channels (slides.planes).
        self._pick = plane_axis(str(path), axes, tuple(arr.shape), tf.pages[0].extrasamples, planes)
        self._planes = planes
        if mpp is None:
            mpp = _tiff_mpp(tf)
        super().__init__(path, levels, mpp)

    def close(self):
        self._tf.close()

    def _read(self, level, x, y, w, h):
        page = self._tiles[level]
        if page is not None:
            return to_rgb8(_read_tiles(self._tf.filehandle, page, x, y, w, h), self.background,
                           str(self.path))
        arr, axes = self._arrays[level]
        picks = (None,) if self._pick is None else self._planes.indices()
        a = np.concatenate([self._plane(arr, axes, x, y, w, h, i) for i in picks], axis=2)
        return to_rgb8(a, self.background, str(self.path))

    def _plane(self, arr, axes, x, y, w, h, index):
        """(h, w, samples) of one plane: ``index`` on the picked axis, 0 on other extra axes."""
        sel = tuple(
            slice(y, y + h) if a == "Y"
            else slice(x, x + w) if a == "X"
            else index if i == self._pick
            else slice(None) if a == "S"
            else 0
            for i, a in enumerate(axes)
        )
        a = np.asarray(arr[sel])
        kept = [ax for i, ax in enumerate(axes) if ax in "YXS" and i != self._pick]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax == "S"]
        a = a.transpose(order)
        return a.reshape(a.shape[0], a.shape[1], -1)


def _tile_page(level, axes: str):
    """The level's one tiled, pixel-interleaved page (YX or YXS), whose tiles ``_read_tiles``
    decodes straight from the file; None for anything else (read through zarr).

    For random patch reads zarr's chunk machinery (asyncio, codec pipeline) costs about as much
    as the JPEG decoding itself: reading the tiles directly takes ~40 % less CPU per region.
    """
    try:
        page = level.keyframe
        ok = (len(level.pages) == 1 and axes in ("YX", "YXS") and page.is_tiled
              and page.tiledepth == 1 and (page.samplesperpixel == 1 or page.planarconfig == 1))
        return page if ok else None
    except (AttributeError, IndexError, TypeError):
        return None


def _read_tiles(fh, page, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [y, y+h) × [x, x+w) of a tiled page: each overlapping tile read and decoded once."""
    th, tw = page.tilelength, page.tilewidth
    across = -(-page.imagewidth // tw)
    spp = page.samplesperpixel
    out = np.zeros((h, w, spp), page.dtype)  # a missing tile (byte count 0) reads as 0
    offsets, counts, decode = page.dataoffsets, page.databytecounts, page.decode
    for ty in range(y // th, (y + h - 1) // th + 1):
        for tx in range(x // tw, (x + w - 1) // tw + 1):
            k = ty * across + tx
            if not counts[k]:
                continue
            fh.seek(offsets[k])
            tile = decode(fh.read(counts[k]), k, jpegtables=page.jpegtables)[0]
            tile = tile.reshape(tile.shape[-3], tile.shape[-2], spp)
            y0, x0 = ty * th, tx * tw
            a0, a1, b0, b1 = max(y, y0), min(y + h, y0 + th), max(x, x0), min(x + w, x0 + tw)
            out[a0 - y : a1 - y, b0 - x : b1 - x] = tile[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
    return out


def _tiff_mpp(tf) -> float | None:
    """µm/px from OME PhysicalSizeX/Y, else the TIFF resolution tags (see MAX_TRUSTED_DPI_MPP)."""
    if tf.is_ome and tf.ome_metadata:
        try:
            root = ET.fromstring(tf.ome_metadata)
            px = next(e for e in root.iter() if e.tag.endswith("Pixels"))
            vals = []
            for ax in ("X", "Y"):
                v = px.get(f"PhysicalSize{ax}")
                if v is not None:
                    unit = px.get(f"PhysicalSize{ax}Unit", "µm")
                    vals.append(float(v) * _UNIT_UM.get(unit, float("nan")))
            vals = [v for v in vals if math.isfinite(v) and v > 0]
            if vals:
                return sum(vals) / len(vals)
        except (ET.ParseError, StopIteration, ValueError):
            pass
    page = tf.pages[0]
    xr, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xr is None:
        return None
    num, den = xr.value if isinstance(xr.value, tuple) else (xr.value, 1)
    if not num or not den:
        return None
    px_per_unit = num / den
    u = int(unit.value) if unit is not None else 2  # TIFF default unit is the inch
    if u == 3:
        return 1e4 / px_per_unit
    if u == 2:
        mpp = 25400 / px_per_unit
        return mpp if mpp <= MAX_TRUSTED_DPI_MPP else None
    if u in (4, 5):  # millimetre, micrometre (TIFF extensions)
        return (1e3 if u == 4 else 1.0) / px_per_unit
    return None


def open_vips(path: Path, mpp: float | None) -> ArraySlide:
    import pyvips

    try:
        img = pyvips.Image.new_from_file(str(path), access="sequential")
        if img.width * img.height > MAX_UNTILED_PIXELS:
            raise WsigenError(
                f"{path} claims {img.width}x{img.height} pixels, more than the "
                f"{MAX_UNTILED_PIXELS:,} an untiled image may have here (a decompression bomb?); "
                "convert it to a tiled pyramidal TIFF"
            )
        if img.interpretation in ("cmyk", "lab", "labs", "lch", "xyz", "scrgb", "hsv"):
            img = img.colourspace("srgb")
        a = img.numpy()
    except pyvips.Error as e:
        first = str(e).strip().splitlines()
        raise WsigenError(
            f"cannot read {path}: {first[0] if first else 'unknown format'}"
        ) from None
    if mpp is None:
        # pyvips reports px/mm; PNG pHYs and JPEG dpi are only trusted when physically plausible
        try:
            xres = float(img.get("xres"))
            m = 1e3 / xres if xres > 0 else None
            mpp = m if m is not None and m <= MAX_TRUSTED_DPI_MPP else None
        except pyvips.Error:
            mpp = None
    return ArraySlide(to_rgb8(a, WHITE, str(path)), mpp, path)


def try_tifffile(path: Path):
    import tifffile

    try:
        tf = tifffile.TiffFile(str(path))
        _ = tf.series[0].shape
        return tf
    except Exception:
        return None


def openslide_format(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None
