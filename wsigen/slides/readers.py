"""Reading slides and images as RGB uint8 regions in level-0 coordinates, with their µm/px.

Whole-slide formats go through OpenSlide (SVS, NDPI, MRXS, generic tiled TIFF, …), OME-TIFF and
other TIFFs through tifffile (lazily, via zarr), everything else (PNG, JPEG, …) through pyvips
(``backends``). Every image comes out as RGB uint8 (``pixels.to_rgb8``); resizing is an exact
area average (``pixels.area_resize``). ``_open_any`` is the one place that picks a backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import WsigenError
from .backends import (
    MAX_TRUSTED_DPI_MPP,
    MAX_UNTILED_PIXELS,
    OpenSlideSlide,
    TiffSlide,
    open_vips,
    openslide_format,
    try_tifffile,
)
from .pixels import WHITE, area_resize, to_rgb8
from .planes import Planes
from .slide import ArraySlide, Slide, cached

# The reading API lives here; the types and helpers are defined beside it.
__all__ = ["IMAGE_SUFFIXES", "MAX_TRUSTED_DPI_MPP", "MAX_UNTILED_PIXELS", "WHITE", "ArraySlide",
           "OpenSlideSlide", "Planes", "Slide", "TiffSlide", "area_resize", "cached", "find_images", "open_image",
           "to_rgb8"]

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


def open_image(
    path: str | os.PathLike, mpp: float | None = None, require_mpp: bool = True,
    planes: Planes | None = None,
) -> Slide:
    """Open a slide or image; ``mpp`` overrides the file's µm/px (needed where it has none).

    An image with several planes (pages, Z, T, channels stored as pages) is refused unless
    ``planes`` picks one (``--page``) or three (``--channels``): ``slides.planes``.
    """
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
    slide = open_dicom(path, mpp, Slide) if path.is_dir() else _open_any(path, mpp, planes)
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


def _open_any(path: Path, mpp: float | None, planes: Planes | None = None) -> Slide:
    """The backend for a file: the one place that decides (a new format adds its test here)."""
    is_tiff = path.suffix.lower() in (".tif", ".tiff", ".btf", ".ome.tif")
    if is_tiff or path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        tf = try_tifffile(path)
        # vendor TIFFs (Aperio, Philips, Ventana…) go to OpenSlide; plain and OME-TIFFs to tifffile
        if tf is not None and (tf.is_ome or openslide_format(path) in (None, "generic-tiff")):
            try:
                return TiffSlide(path, tf, mpp, planes)
            except WsigenError:
                tf.close()
                raise
            except Exception as e:
                tf.close()
                raise WsigenError(f"cannot read {path}: {e}") from None
        if tf is not None:
            tf.close()
    if planes is not None and planes.indices() != (0,):
        raise WsigenError(f"{path} has one plane; {planes.flag()} picks planes it does not have")
    fmt = openslide_format(path)
    if fmt is not None:
        import openslide

        try:
            return OpenSlideSlide(path, openslide.OpenSlide(str(path)), mpp)
        except openslide.OpenSlideError as e:
            raise WsigenError(f"cannot read {path} as a {fmt} slide: {e}") from None
    if is_tiff:
        raise WsigenError(f"cannot read {path}: not a readable TIFF")
    return open_vips(path, mpp)


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
