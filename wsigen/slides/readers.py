"""Reading slides and images as RGB uint8 regions in level-0 coordinates, with their µm/px.

Whole-slide formats go through OpenSlide (SVS, NDPI, MRXS, generic tiled TIFF, …), OME-TIFF and
other TIFFs through tifffile (lazily, via zarr), everything else (PNG, JPEG, …) through pyvips.
Every image comes out as RGB uint8: greyscale is replicated, alpha is flattened over the
background colour, 16-bit and float data are scaled. Resizing is an exact area (box) average,
the same operator as the sampler's k×k average pooling, so a guide and a downsampled slide agree.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import WsigenError

WHITE = (255, 255, 255)
#: Suffixes a folder is searched for when slides are given as a folder.
IMAGE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".vms",
    ".vmu",
    ".scn",
    ".svslide",
    ".bif",
    ".tif",
    ".tiff",
    ".btf",
    ".png",
    ".jpg",
    ".jpeg",
)
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


def to_rgb8(a: np.ndarray, background=WHITE, what: str = "image") -> np.ndarray:
    """(h, w[, c]) array of any common dtype → (h, w, 3) uint8 RGB, alpha over background."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise WsigenError(f"{what}: cannot make an RGB image from an array of shape {a.shape}")
    c = a.shape[2]
    if c not in (1, 2, 3, 4):
        raise WsigenError(
            f"{what} has {c} channels; only grey, grey+alpha, RGB and RGBA can be read "
            "as RGB (convert it first)"
        )
    if a.dtype == np.uint8:
        f = None
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
        f = None
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        f = (a.astype(np.float32) - max(info.min, 0)) / (info.max - max(info.min, 0))
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)  # floats are taken as [0, 1]
    else:
        raise WsigenError(f"{what}: unsupported pixel type {a.dtype}")
    if f is not None:
        a = np.rint(np.clip(np.nan_to_num(f), 0, 1) * 255).astype(np.uint8)
    if c in (2, 4):
        alpha = a[:, :, -1:].astype(np.float32) / 255
        rgb = a[:, :, :-1].astype(np.float32)
        bg = (
            np.asarray(background, np.float32)[: rgb.shape[2]]
            if c == 4
            else np.float32(np.mean(background))
        )
        a = np.rint(rgb * alpha + bg * (1 - alpha)).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def area_resize(
    a: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int
) -> np.ndarray:
    """Exact area average of the (fractional) box (x0, y0, x1, y1) of ``a`` onto out_h × out_w.

    The integral image of a piecewise-constant image is piecewise bilinear, so interpolating it
    linearly gives exact box sums for any fractional box: anti-aliased for any reduction factor.
    """
    x0, y0, x1, y1 = box
    h, w = a.shape[:2]
    s = np.zeros((h + 1, w + 1, a.shape[2]), np.float64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])

    def interp(s: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
        n = s.shape[axis] - 1
        edges = np.clip(edges, 0, n)
        i = np.minimum(np.floor(edges).astype(np.int64), n - 1)
        f = (edges - i).reshape([-1 if d == axis else 1 for d in range(s.ndim)])
        return np.take(s, i, axis=axis) * (1 - f) + np.take(s, i + 1, axis=axis) * f

    s = interp(s, np.linspace(y0, y1, out_h + 1), 0)
    s = interp(s, np.linspace(x0, x1, out_w + 1), 1)
    sums = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
    area = ((y1 - y0) / out_h) * ((x1 - x0) / out_w)
    return np.clip(np.rint(sums / area), 0, 255).astype(np.uint8)


class Slide:
    """An image pyramid: ``levels`` are (width, height, downsample); level 0 is full resolution."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        levels: list[tuple[int, int, float]],
        mpp: float | None,
        background=WHITE,
    ):
        self.path = Path(path) if path is not None else None
        self.levels = levels
        self.width, self.height = levels[0][0], levels[0][1]
        self.mpp = mpp
        self.background = tuple(int(v) for v in background)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, {self.width}x{self.height}, mpp={self.mpp})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of ``level`` in that level's coordinates, inside the image."""
        raise TypeError(f"{type(self).__name__} does not implement _read")

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like ``_read`` but any box: what lies outside the image is background."""
        lw, lh, _ = self.levels[level]
        out = np.empty((h, w, 3), np.uint8)
        out[:] = np.asarray(self.background, np.uint8)
        ax0, ay0, ax1, ay1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = self._read(
                level, ax0, ay0, ax1 - ax0, ay1 - ay0
            )
        return out

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 at ``level``: (x, y) in level-0 pixels, (w, h) at the level."""
        if not 0 <= level < len(self.levels):
            raise WsigenError(
                f"{self.path}: level {level} does not exist ({len(self.levels)} levels)"
            )
        if w < 1 or h < 1:
            raise WsigenError(f"region size must be positive (got {w}x{h})")
        d = self.levels[level][2]
        return self._read_level(
            level, int(math.floor(x / d)), int(math.floor(y / d)), int(w), int(h)
        )

    def best_level(self, factor: float) -> int:
        """The coarsest level whose downsample does not exceed ``factor`` (never upsample one)."""
        best = 0
        for i, (_, _, d) in enumerate(self.levels):
            if d <= factor * (1 + 1e-6) and d >= self.levels[best][2]:
                best = i
        return best

    def read_scaled(
        self, x: float, y: float, w: float, h: float, out_w: int, out_h: int
    ) -> np.ndarray:
        """The level-0 box (x, y, w, h) area-averaged to out_h × out_w from the best level."""
        lvl = self.best_level(min(w / out_w, h / out_h))
        d = self.levels[lvl][2]
        bx0, by0, bx1, by1 = x / d, y / d, (x + w) / d, (y + h) / d
        ix0, iy0 = math.floor(bx0), math.floor(by0)
        ix1, iy1 = max(math.ceil(bx1), ix0 + 1), max(math.ceil(by1), iy0 + 1)
        region = self._read_level(lvl, ix0, iy0, ix1 - ix0, iy1 - iy0)
        return area_resize(region, (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0), out_w, out_h)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image, longest side ``max_side`` (never upscaled)."""
        f = max(self.width, self.height) / max_side
        if f <= 1:
            return self.read_region(0, 0, self.width, self.height)
        tw, th = max(1, round(self.width / f)), max(1, round(self.height / f))
        return self.read_scaled(0, 0, self.width, self.height, tw, th)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


class ArraySlide(Slide):
    """An in-memory image with a 2× area-average pyramid (PNG/JPEG, or a cached small slide)."""

    def __init__(
        self, rgb: np.ndarray, mpp: float | None, path=None, background=WHITE, min_side: int = 256
    ):
        pyramid = [np.ascontiguousarray(rgb)]
        while min(pyramid[-1].shape[:2]) >= 2 * min_side:
            a = pyramid[-1]
            h2, w2 = a.shape[0] // 2, a.shape[1] // 2
            pyramid.append(area_resize(a, (0, 0, 2 * w2, 2 * h2), w2, h2))
        self.pyramid = pyramid
        # level i is an exact 2^i reduction of the top-left part that divides evenly
        levels = [(a.shape[1], a.shape[0], float(2**i)) for i, a in enumerate(pyramid)]
        super().__init__(path, levels, mpp, background)

    def _read(self, level, x, y, w, h):
        return self.pyramid[level][y : y + h, x : x + w]


class OpenSlideSlide(Slide):
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
        return to_rgb8(np.asarray(img), self.background, str(self.path))


class TiffSlide(Slide):
    """TIFF / OME-TIFF via tifffile: levels from the series' pyramid, pixels lazily via zarr."""

    def __init__(self, path: Path, tf, mpp: float | None):
        import zarr

        self._tf = tf
        series = tf.series[0]
        self._arrays = []
        levels = []
        for i, lvl in enumerate(series.levels):
            axes = lvl.axes.upper()
            if "Y" not in axes or "X" not in axes:
                raise WsigenError(f"{path}: the image has no Y/X axes ({lvl.axes})")
            arr = zarr.open(series.aszarr(level=i), mode="r")
            self._arrays.append((arr, axes))
            h, w = lvl.shape[axes.index("Y")], lvl.shape[axes.index("X")]
            levels.append((w, h, None))
        w0 = levels[0][0]
        levels = [(w, h, w0 / w) for w, h, _ in levels]
        arr, axes = self._arrays[0]
        ch = [arr.shape[axes.index(a)] for a in "CS" if a in axes]
        nch = math.prod(ch) if ch else 1
        if nch not in (1, 2, 3, 4):
            raise WsigenError(
                f"{path} has {nch} channels; only grey, grey+alpha, RGB and RGBA can be "
                "read as RGB (convert it first)"
            )
        if mpp is None:
            mpp = _tiff_mpp(tf)
        super().__init__(path, levels, mpp)

    def close(self):
        self._tf.close()

    def _read(self, level, x, y, w, h):
        arr, axes = self._arrays[level]
        sel = tuple(
            slice(y, y + h)
            if a == "Y"
            else slice(x, x + w)
            if a == "X"
            else slice(None)
            if a in "CS"
            else 0
            for a in axes
        )
        a = np.asarray(arr[sel])
        kept = [ax for ax in axes if ax in "YXCS"]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "CS"]
        a = a.transpose(order)
        a = a.reshape(a.shape[0], a.shape[1], -1)
        return to_rgb8(a, self.background, str(self.path))


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


def _open_vips(path: Path, mpp: float | None) -> ArraySlide:
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


def open_image(
    path: str | os.PathLike, mpp: float | None = None, require_mpp: bool = True
) -> Slide:
    """Open a slide or image; ``mpp`` overrides the file's µm/px (needed where it has none)."""
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise WsigenError(f"mpp must be a positive number (got {mpp!r})")
    if not path.exists():
        raise WsigenError(f"image not found: {path}")
    from .dicom_read import is_dicom_folder, open_dicom  # a DICOM WSI series folder (dicom_read.py)

    if path.is_dir() and not is_dicom_folder(path):
        raise WsigenError(f"{path} is a folder, not an image")
    if path.is_file() and path.stat().st_size == 0:
        raise WsigenError(f"{path} is empty (0 bytes)")
    slide = open_dicom(path, mpp, Slide) if path.is_dir() else _open_any(path, mpp)
    if slide.width < 1 or slide.height < 1:
        slide.close()
        raise WsigenError(f"{path} has no pixels ({slide.width}x{slide.height})")
    if require_mpp and slide.mpp is None:
        slide.close()
        raise WsigenError(
            f"{path} does not say how many µm a pixel is; give it explicitly "
            "(mpp=…, --mpp on the command line)"
        )
    return slide


def _open_any(path: Path, mpp: float | None) -> Slide:
    is_tiff = path.suffix.lower() in (".tif", ".tiff", ".btf", ".ome.tif")
    if is_tiff or path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        tf = _try_tifffile(path)
        # vendor TIFFs (Aperio, Philips, Ventana…) go to OpenSlide; plain and OME-TIFFs to tifffile
        if tf is not None and (tf.is_ome or _openslide_format(path) in (None, "generic-tiff")):
            try:
                return TiffSlide(path, tf, mpp)
            except WsigenError:
                tf.close()
                raise
            except Exception as e:
                tf.close()
                raise WsigenError(f"cannot read {path}: {e}") from None
        if tf is not None:
            tf.close()
    fmt = _openslide_format(path)
    if fmt is not None:
        import openslide

        try:
            return OpenSlideSlide(path, openslide.OpenSlide(str(path)), mpp)
        except openslide.OpenSlideError as e:
            raise WsigenError(f"cannot read {path} as a {fmt} slide: {e}") from None
    if is_tiff:
        raise WsigenError(f"cannot read {path}: not a readable TIFF")
    return _open_vips(path, mpp)


def _try_tifffile(path: Path):
    import tifffile

    try:
        tf = tifffile.TiffFile(str(path))
        _ = tf.series[0].shape
        return tf
    except Exception:
        return None


def _openslide_format(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def find_images(paths) -> list[Path]:
    """Files and folders (searched recursively for IMAGE_SUFFIXES) → a list of image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise WsigenError(
                    f"no slides or images in folder {p} (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise WsigenError(f"not found: {p}")
    return out


def cached(slide: Slide, max_pixels: int = 64 * 2**20) -> Slide:
    """An in-memory copy of a slide that is small enough (random patch reads become cheap)."""
    if isinstance(slide, ArraySlide) or slide.width * slide.height > max_pixels:
        return slide
    rgb = slide.read_region(0, 0, slide.width, slide.height)
    return ArraySlide(rgb, slide.mpp, slide.path, slide.background)
