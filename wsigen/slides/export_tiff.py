"""The TIFF family of exports: pyramidal OME-TIFF (levels in SubIFDs), OpenSlide-readable generic
tiled TIFF and Aperio-style SVS (with its thumbnail), one TIFF file each, written by tifffile from
pre-encoded tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..version import __version__
from .export_meta import aperio_description, description_text, ome_xml
from .export_tiles import Codec, encoded_tiles
from .pyramid import downsample2


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
