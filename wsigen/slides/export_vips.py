"""Deep Zoom (DZI) and PNG exports, written by libvips from one level: the level in memory when it
is small, else streamed from a temporary tiled TIFF.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..version import __version__
from .export_tiff import write_tiff
from .export_tiles import Codec
from .parallel import default_workers

SMALL_BYTES = 256 * 2**20  # a level this small may be held in memory (PNG, DZI)


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
