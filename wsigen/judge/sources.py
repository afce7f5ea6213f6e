"""The slides a judge looks at: a wsigen store (its final image and pyramid) or any image file that
``wsigen.slides.readers`` opens, behind one ``Slide`` interface, and what a title or report says of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import WsigenError
from ..slides import readers
from ..slides.store import SlideStore, is_store


class StoreSlide(readers.Slide):
    """A wsigen store through the ``readers.Slide`` interface: levels 0 … n of the final image."""

    def __init__(self, store):
        self.store = store
        g = store.group
        self._arrays = []
        i = 0
        while str(i) in g:
            self._arrays.append(g[str(i)])
            i += 1
        if not self._arrays:
            raise WsigenError(f"{store.path} has no image (level 0 is missing)")
        _, h0, w0 = self._arrays[0].shape
        levels = [(a.shape[2], a.shape[1], w0 / a.shape[2]) for a in self._arrays]
        info = store.info
        mpp = (info.get("config") or {}).get("mpp") or info["stages"][-1]["mpp"]
        bg = ((info.get("model") or {}).get("config") or {}).get("background", readers.WHITE)
        super().__init__(store.path, levels, float(mpp), bg)

    def _read(self, level, x, y, w, h):
        chw = np.asarray(self._arrays[level][:, y : y + h, x : x + w])
        return np.ascontiguousarray(chw.transpose(1, 2, 0))


def open_slide(path: str | os.PathLike, mpp: float | None = None, planes=None) -> readers.Slide:
    """A wsigen store or an image file; ``mpp`` overrides (or supplies) the µm/px; ``planes``
    (``slides.planes.Planes``) picks the plane(s) of an image with several."""
    if is_store(path):
        store = SlideStore.open(path)
        if not store.complete:
            raise WsigenError(f"{path} is not complete (its pyramid is not built yet): "
                              f"{store.incomplete_note()}")
        s = StoreSlide(store)
        if mpp is not None:
            s.mpp = mpp
        return s
    return readers.open_image(path, mpp=mpp, require_mpp=False, planes=planes)


def exported_info(path) -> dict | None:
    """An export's provenance as a store's attributes (``{"config": {"class", "guidance"}, …}``),
    or None for a file that is not one of our TIFF-family exports."""
    from ..slides.export_meta import read_provenance

    prov = read_provenance(path) if Path(path).is_file() else None
    if prov is None:
        return None
    return {"config": {"class": prov.get("class"), "guidance": prov.get("guidance")},
            "seed": prov.get("seed"), "model_sha256": prov.get("model_sha256")}


def describe(slide: readers.Slide) -> dict:
    """Name, size, µm/px and (for stores) provenance: what a figure title and a report show."""
    d = {"path": str(slide.path), "name": Path(slide.path).name if slide.path else "image",
         "width": slide.width, "height": slide.height, "mpp": slide.mpp}
    if isinstance(slide, StoreSlide):
        info = slide.store.info
        cfg = info.get("config") or {}
        d.update(synthetic=True, seed=info.get("seed"), model=(info.get("model") or {}).get("name"),
                 model_sha256=(info.get("model") or {}).get("sha256"), grid_shift=cfg.get("grid_shift"),
                 guidance=cfg.get("guidance"))
        d["class"] = cfg.get("class")  # None for a class-free slide
    return d
