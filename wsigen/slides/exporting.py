"""Export a slide store as pyramidal OME-TIFF, OpenSlide TIFF, Aperio-style SVS, Deep Zoom or PNG.

This module checks the options, picks the levels and makes the output appear whole or not at all;
``_write`` hands the levels to the format's writer (``export_tiff``, ``export_vips``). Levels are
the store's own; every format records that the slide is synthetic, the model hash and the seed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, WsigenError
from .export_meta import provenance
from .export_tiff import write_tiff
from .export_tiles import Codec, chunk_reader
from .export_vips import write_dzi, write_png
from .parallel import default_workers
from .store import SlideStore

FORMATS = ("ome-tiff", "tiff", "svs", "dzi", "png", "dicom")
COMPRESSIONS = ("jpeg", "deflate", "zstd", "none")
PNG_MAX_SIDE = 4096  # PNG without --level/--max-size: the largest level that fits this


# -- choosing what to export ---------------------------------------------------------------------
def open_for_export(store: str | os.PathLike, partial: bool) -> SlideStore:
    s = SlideStore.open(store)
    if not s.complete and not partial:
        done, total = len(s.info.get("stages_complete", [])), len(s.stages)
        raise WsigenError(f"{store} is incomplete ({done} of {total} stages, pyramid "
                          f"{'built' if s.info.get('levels') else 'not built'}; {s.incomplete_note()}); "
                          f"pass --partial to export what exists")
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
    codec = None if fmt == "dicom" else Codec(compression, quality)

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

    if fmt == "dicom":  # a folder, written beside the output and renamed (slides/dicom.py)
        dicom.write_dicom(out, arrays, mpp, meta, name, compression, quality, tile, workers, uid_root, chunk_reader)
        written = len(arrays)
    else:
        written = _write(fmt, out, extra, base, arrays, codec, tile, mpp, meta, name, workers)
    h, w = shapes[first]
    return {"output": str(out), "format": fmt, "compression": compression,
            "quality": quality if compression == "jpeg" else None, "tile": tile, "level": first,
            "levels": written, "width": w, "height": h, "mpp": mpp, "complete": s.complete,
            "bytes": _size(out) + sum(_size(p) for p in extra)}


def _write(fmt: str, out: Path, extra: list[Path], base: Path, arrays: list, codec: Codec, tile: int,
           mpp: float, meta: dict, name: str, workers: int) -> int:
    """Write ``arrays`` (levels, largest first) in ``fmt``; returns how many levels were written.

    The one place that picks a format's writer: a new format adds its branch here and its name to
    FORMATS. ``out`` appears only when the writer succeeded.
    """
    if fmt in ("ome-tiff", "tiff", "svs"):
        with _atomic_path(out) as tmp:
            write_tiff(tmp, arrays, fmt, codec, tile, mpp, meta, name, workers)
        return len(arrays)
    if fmt == "png":
        with _atomic_path(out) as tmp:
            write_png(tmp, arrays[0], mpp, meta)
        return 1
    # dzi: a file and a folder, moved into place from a temporary folder beside them
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
    return 1


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0
