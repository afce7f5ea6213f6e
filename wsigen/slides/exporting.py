"""Export a slide store as pyramidal OME-TIFF, OpenSlide TIFF, Aperio-style SVS, Deep Zoom or PNG.

Levels are the store's own. Encoder threads read tiles from the store (chunk files when a tile
is a chunk, else bands of tile rows) and encode them with imagecodecs; tifffile writes the
encoded tiles in order. At most a few tiles per thread (or two bands) are in memory, whatever
the image size. Every format records that the slide is synthetic, the model hash and the seed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import imagecodecs
import numpy as np

from .. import faults
from ..errors import UsageError, WsigenError
from ..version import __version__
from .store import SlideStore, bounded_map, default_workers, downsample2

FORMATS = ("ome-tiff", "tiff", "svs", "dzi", "png", "dicom")
COMPRESSIONS = ("jpeg", "deflate", "zstd", "none")
PNG_MAX_SIDE = 4096  # PNG without --level/--max-size: the largest level that fits this
SMALL_BYTES = 256 * 2**20  # a level this small may be held in memory (PNG, DZI)
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
WSIGEN_NS = "https://wsigen/synthetic-slide"


# -- tile codecs ---------------------------------------------------------------------------------
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


# -- metadata ------------------------------------------------------------------------------------
def provenance(store: SlideStore) -> dict:
    """What every format records: synthetic, model hash, seed (and enough to find the rest)."""
    d = store.describe()
    return {"synthetic": True, "software": f"wsigen {__version__}", "model": d["model"],
            "model_sha256": d["model_sha256"], "seed": d["seed"], "mpp": d["mpp"],
            "width": d["width"], "height": d["height"], "complete": d["complete"],
            "stages_complete": d["stages_complete"], "steps": d["steps"],
            "guided_steps": d["guided_steps"]}


def _ascii(v) -> str:
    return str(v).encode("ascii", "replace").decode().replace("|", "/").replace("\n", " ")


def description_text(meta: dict) -> str:
    """Human- and machine-readable ImageDescription for the generic TIFF (ASCII JSON)."""
    return "wsigen synthetic whole-slide image (not a patient sample) " + json.dumps(meta, sort_keys=True)


def ome_xml(meta: dict, width: int, height: int, mpp: float, name: str) -> str:
    """OME-XML (2016-06) for one RGB image; levels live in SubIFDs, which OME-TIFF finds itself."""
    values = "".join(f"<M K={quoteattr(k)}>{escape(json.dumps(v) if not isinstance(v, str) else v)}</M>"
                     for k, v in sorted(meta.items()))
    desc = (f"Synthetic H&E whole-slide image generated by wsigen {__version__} (not a patient "
            f"sample); model sha256 {meta['model_sha256']}; seed {meta['seed']}")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_NS} {OME_NS}/ome.xsd" Creator={quoteattr(f"wsigen {__version__}")}>'
        f'<Image ID="Image:0" Name={quoteattr(name)}>'
        f"<Description>{escape(desc)}</Description>"
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SignificantBits="8" '
        f'Interleaved="true" BigEndian="false" SizeX="{width}" SizeY="{height}" SizeC="3" SizeZ="1" '
        f'SizeT="1" PhysicalSizeX="{mpp!r}" PhysicalSizeXUnit="µm" PhysicalSizeY="{mpp!r}" '
        f'PhysicalSizeYUnit="µm">'
        '<Channel ID="Channel:0:0" SamplesPerPixel="3"><LightPath/></Channel>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        "</Pixels>"
        '<AnnotationRef ID="Annotation:0"/>'
        "</Image>"
        "<StructuredAnnotations>"
        f'<MapAnnotation ID="Annotation:0" Namespace="{WSIGEN_NS}"><Value>{values}</Value></MapAnnotation>'
        "</StructuredAnnotations>"
        "</OME>"
    )


def aperio_description(meta: dict, width: int, height: int, tile: int, codec: Codec, mpp: float,
                       name: str) -> str:
    """Aperio ImageDescription: 'Aperio' first, then 'key = value' fields split by '|'.

    OpenSlide reads MPP as openslide.mpp-x/y and AppMag as openslide.objective-power; AppMag
    follows the scanner convention 20× ≈ 0.5 µm/px.
    """
    comp = f"JPEG/RGB Q={codec.quality}" if codec.name == "jpeg" else codec.name.upper()
    fields = {"AppMag": f"{10 / mpp:g}", "MPP": f"{mpp:.6g}", "Filename": name,
              "Synthetic": "true", "Software": f"wsigen {__version__}", "Model": meta["model"],
              "ModelSHA256": meta["model_sha256"], "Seed": meta["seed"],
              "Complete": str(meta["complete"]).lower()}
    head = (f"Aperio Image Library wsigen {__version__}\r\n"
            f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) {comp}")
    return head + "".join(f"|{k} = {_ascii(v)}" for k, v in fields.items())


# -- choosing what to export ---------------------------------------------------------------------
def open_for_export(store: str | os.PathLike, partial: bool) -> SlideStore:
    s = SlideStore.open(store)
    if not s.complete and not partial:
        done, total = len(s.info.get("stages_complete", [])), len(s.stages)
        raise WsigenError(f"{store} is incomplete ({done} of {total} stages, pyramid "
                          f"{'built' if s.info.get('levels') else 'not built'}); finish it with "
                          f"`wsigen sample --resume -o {store}` or pass --partial to export what exists")
    return s


def pick_level(shapes: list[tuple[int, int]], level: int | None, max_size: int | None) -> int:
    """``level`` itself, or the largest level whose longer side is ≤ ``max_size``."""
    if level is not None:
        if not 0 <= level < len(shapes):
            raise UsageError(f"--level {level} does not exist; the store has levels 0–{len(shapes) - 1}")
        return level
    if max_size is None:
        return 0
    for i, (h, w) in enumerate(shapes):
        if max(h, w) <= max_size:
            return i
    h, w = shapes[-1]
    raise UsageError(f"no level fits --max-size {max_size}: the smallest is {w}x{h} px")


@contextmanager
def _atomic_path(out: Path):
    """A temporary name beside ``out``; renamed to ``out`` only when the writer succeeded."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _check_output(out: Path, overwrite: bool, extra: list[Path]) -> None:
    for p in [out, *extra]:
        if p.exists() or p.is_symlink():
            if not overwrite:
                raise WsigenError(f"output {p} exists; pass --overwrite to replace it")
            if p.is_dir() and not (p / "wsigen.json").is_file():
                raise WsigenError(f"refusing to overwrite {p}: it is not a wsigen export")
    if not out.absolute().parent.is_dir():
        raise WsigenError(f"cannot write {out}: {out.absolute().parent} is not a directory")


# -- TIFF family ---------------------------------------------------------------------------------
def write_tiff(path: Path, levels: list, fmt: str, codec: Codec, tile: int, mpp: float, meta: dict,
               name: str, workers: int) -> None:
    """Write the pyramid ``levels`` ((3, H, W) arrays, largest first) as one TIFF file."""
    import tifffile

    h0, w0 = levels[0].shape[1:]
    # Classic TIFF offsets end at 4 GiB; padded tiles, uncompressed, bound what is written.
    raw = sum(3 * -(-a.shape[1] // tile) * -(-a.shape[2] // tile) * tile * tile for a in levels)
    bigtiff = fmt == "ome-tiff" or raw > 2**32 - 2**28
    common = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", planarconfig="contig",
                  resolutionunit="CENTIMETER", metadata=None, software=f"wsigen {__version__}",
                  **codec.tiff_args())
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=False) as tif:
        for i, arr in enumerate(levels):
            h, w = arr.shape[1:]
            s = mpp * w0 / w  # µm/px of this level (exact ratios, also for odd sizes)
            kw = dict(common, shape=(h, w, 3), resolution=(1e4 / s, 1e4 / s))
            if fmt == "ome-tiff":
                if i == 0:
                    kw.update(subifds=len(levels) - 1,
                              description=ome_xml(meta, w0, h0, mpp, name).encode("utf-8"))
                else:
                    kw.update(subfiletype=1)
            elif fmt == "tiff":
                kw.update(description=description_text(meta) if i == 0 else f"wsigen level {i}",
                          subfiletype=0 if i == 0 else 1)
            else:  # svs: level 0, thumbnail, then the other levels (Aperio's directory order)
                kw.update(description=aperio_description(meta, w0, h0, tile, codec, mpp, name)
                          if i == 0 else f"Aperio Image Library wsigen {__version__}\r\n"
                                         f"{w0}x{h0} -> {w}x{h} - |Synthetic = true")
            tif.write(encoded_tiles(arr, tile, codec, workers), **kw)
            if fmt == "svs" and i == 0:
                _svs_thumbnail(tif, levels, codec, w0, h0)


def _svs_thumbnail(tif, levels: list, codec: Codec, w0: int, h0: int) -> None:
    """Aperio's second directory: a small stripped image (OpenSlide's 'thumbnail')."""
    small = levels[-1]
    if max(small.shape[1:]) > 2 * 1024:  # a --partial store without pyramid: no thumbnail
        return
    t = np.asarray(small[:])
    while max(t.shape[1:]) > 1024:
        t = downsample2(t)
    t = np.ascontiguousarray(t.transpose(1, 2, 0))
    args = codec.tiff_args()
    if codec.name == "jpeg":
        args["compressionargs"] = {"level": codec.quality}
    tif.write(t, photometric="rgb", rowsperstrip=t.shape[0], metadata=None, software=f"wsigen {__version__}",
              description=f"Aperio Image Library wsigen {__version__}\r\n{w0}x{h0} -> "
                          f"{t.shape[1]}x{t.shape[0]} - |Synthetic = true", **args)


# -- Deep Zoom and PNG (libvips) -----------------------------------------------------------------
@contextmanager
def vips_image(arr, mpp: float, tmpdir: Path, small_bytes: int = SMALL_BYTES):
    """A pyvips image of one level: from memory if small, else via a temporary tiled TIFF."""
    import pyvips

    h, w = arr.shape[1:]
    if 3 * h * w <= small_bytes:
        a = np.ascontiguousarray(np.asarray(arr[:]).transpose(1, 2, 0))
        yield pyvips.Image.new_from_memory(a.data, w, h, 3, "uchar").copy(xres=1e3 / mpp, yres=1e3 / mpp)
        return
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix=".wsigen-export-") as d:
        tmp = Path(d) / "level.tif"
        write_tiff(tmp, [arr], "tiff", Codec("none"), 512, mpp, {"synthetic": True}, "tmp",
                   default_workers())
        yield pyvips.Image.new_from_file(str(tmp), access="sequential")


def _vips_meta(im, meta: dict, mpp: float):
    import pyvips

    im = im.copy(xres=1e3 / mpp, yres=1e3 / mpp)  # libvips resolution: pixels per mm
    for n, (k, v) in enumerate([("Software", f"wsigen {__version__}"),
                                ("Description", "synthetic whole-slide image (not a patient sample)"),
                                ("wsigen", json.dumps(meta, sort_keys=True))]):
        im.set_type(pyvips.GValue.gstr_type, f"png-comment-{n}-{k}", v)
    return im


def write_png(path: Path, arr, mpp: float, meta: dict, small_bytes: int = SMALL_BYTES) -> None:
    with vips_image(arr, mpp, path.absolute().parent, small_bytes) as im:
        _vips_meta(im, meta, mpp).pngsave(str(path), compression=6)


def write_dzi(base: Path, arr, codec: Codec, tile: int, mpp: float, meta: dict,
              small_bytes: int = SMALL_BYTES) -> None:
    """``base``.dzi and ``base``_files/ (Deep Zoom, libvips dzsave) with ``wsigen.json`` inside."""
    suffix = f".jpeg[Q={codec.quality}]" if codec.name == "jpeg" else ".png"
    with vips_image(arr, mpp, base.absolute().parent, small_bytes) as im:
        im.dzsave(str(base), tile_size=tile, overlap=0, suffix=suffix, layout="dz")
    Path(f"{base}_files", "wsigen.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


# -- entry point ---------------------------------------------------------------------------------
def export(store: str | os.PathLike, out: str | os.PathLike, format: str = "ome-tiff",
           compression: str | None = None, quality: int = 90, tile: int = 512,
           level: int | None = None, max_size: int | None = None, partial: bool = False,
           overwrite: bool = False, workers: int | None = None, uid_root: str = "2.25.") -> dict:
    """Export a slide store to ``out``; returns a summary (format, levels written, bytes)."""
    fmt = format.lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {format})")
    if compression is None:
        compression = "deflate" if fmt == "png" else "jpeg"
    compression = compression.lower()
    if fmt == "dicom":  # DICOM WSI: its own transfer syntaxes and UIDs (slides/dicom.py)
        from . import dicom

        dicom.check_options(compression, uid_root)
    elif compression not in COMPRESSIONS:
        raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)} (got {compression})")
    if fmt == "png" and compression != "deflate":
        raise UsageError("png is always deflate-compressed (lossless); drop --compression")
    if fmt == "dzi" and compression not in ("jpeg", "none", "deflate"):
        raise UsageError("dzi tiles are jpeg or png: use --compression jpeg, or deflate/none for png tiles")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must lie in 1–100 (got {quality})")
    if tile < 16 or tile % 16 or tile > 8192:
        raise UsageError(f"--tile must be a multiple of 16 between 16 and 8192 (got {tile})")
    workers = workers or default_workers()
    codec = Codec(compression, quality)

    out = Path(out)
    base = out.with_suffix("") if fmt == "dzi" and out.suffix.lower() == ".dzi" else out
    if fmt == "dzi":
        out = base.with_name(base.name + ".dzi")
    extra = [Path(f"{base}_files")] if fmt == "dzi" else []
    _check_output(out, overwrite, extra)

    s = open_for_export(store, partial)
    names = s.level_names()
    arrays = [s.level_array(int(n)) for n in names]
    shapes = [tuple(a.shape[1:]) for a in arrays]
    if fmt == "png" and level is None and max_size is None:
        max_size = PNG_MAX_SIDE
    first = pick_level(shapes, level, max_size)
    arrays = arrays[first:]
    mpp = s.mpp * shapes[0][1] / shapes[first][1]
    meta = provenance(s)  # describes what is exported: its level, µm/px and size
    meta.update(level=first, mpp=mpp, height=shapes[first][0], width=shapes[first][1])
    name = Path(s.path).name

    if fmt in ("ome-tiff", "tiff", "svs"):
        with _atomic_path(out) as tmp:
            write_tiff(tmp, arrays, fmt, codec, tile, mpp, meta, name, workers)
        written = len(arrays)
    elif fmt == "dicom":  # a folder, written beside the output and renamed (slides/dicom.py)
        dicom.write_dicom(out, arrays, mpp, meta, name, compression, quality, tile, workers, uid_root, chunk_reader)
        written = len(arrays)
    elif fmt == "png":
        with _atomic_path(out) as tmp:
            write_png(tmp, arrays[0], mpp, meta)
        written = 1
    else:
        for p in [out, *extra]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        with tempfile.TemporaryDirectory(dir=out.absolute().parent, prefix=".wsigen-dzi-") as d:
            tb = Path(d) / base.name
            write_dzi(tb, arrays[0], codec, tile, mpp, meta)
            os.replace(f"{tb}_files", extra[0])
            os.replace(f"{tb}.dzi", out)
        written = 1
    h, w = shapes[first]
    return {"output": str(out), "format": fmt, "compression": compression,
            "quality": quality if compression == "jpeg" else None, "tile": tile, "level": first,
            "levels": written, "width": w, "height": h, "mpp": mpp, "complete": s.complete,
            "bytes": _size(out) + sum(_size(p) for p in extra)}


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0
