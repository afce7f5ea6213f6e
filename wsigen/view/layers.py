"""What the viewer shows of a slide: its layers (Deep Zoom pyramids) and the facts the page prints.

A finished store is one layer, ``final``, over its pyramid. A store still being sampled shows each
stage marked complete as a layer of its own (``stage0`` …), and ``final`` only once the store says
``complete``; the store is reopened on every refresh because zarr caches attributes. A file that
``wsigen.slides.readers`` opens (OME-TIFF, SVS, TIFF, …) is one layer, ``image``. Stores are only
ever opened read-only: the viewer never writes to, locks or creates anything in them.
"""

from __future__ import annotations

import math
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WsigenError
from ..slides.readers import open_image
from ..slides.store import SlideStore
from .tiles import LRU, Pyramid

REFRESH_S = 0.5  # reopen a store at most this often, however many pages poll it


@dataclass
class Layer:
    name: str  # the URL segment: final, stageN or image
    title: str
    width: int
    height: int
    mpp: float | None
    pyramid: Pyramid
    gen: str  # changes when the array is recreated (a run started again with --overwrite)

    def public(self, final_um: float | None) -> dict:
        return {"name": self.name, "title": self.title, "width": self.width, "height": self.height,
                "mpp": self.mpp, "max_level": self.pyramid.max_level, "url": f"tiles/{self.name}/{self.gen}",
                # OpenSeadragon places layers in one world: width 1 = the final image's width in µm
                "world_width": (self.width * self.mpp / final_um) if (final_um and self.mpp) else 1.0}


@dataclass
class Snapshot:
    layers: dict[str, Layer]
    facts: dict  # whitelisted attributes only: the configuration holds input paths
    live: bool = False  # a store still being written: keep polling
    when: float = field(default_factory=time.monotonic)


def _array_reader(arr, key: tuple, cache: LRU):
    """Boxes of a complete (3, h, w) zarr array, through a cache of decoded chunks.

    A 256² tile lies across up to four 512² chunks, and a pan asks for the neighbours next, so
    each chunk is decoded once rather than for every tile that touches it.
    """
    _, ch, cw = arr.chunks
    _, h, w = arr.shape

    def chunk(cy: int, cx: int) -> np.ndarray:
        k = (*key, "chunk", cy, cx)
        if (hit := cache.lookup(k)) is None:
            hit = np.asarray(arr[:, cy * ch : min((cy + 1) * ch, h), cx * cw : min((cx + 1) * cw, w)])
            cache.put(k, hit, hit.nbytes)
        return hit

    def read(x0, y0, x1, y1):
        out = np.empty((3, y1 - y0, x1 - x0), np.uint8)
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                oy, ox = cy * ch, cx * cw
                sy0, sx0, sy1, sx1 = max(y0, oy), max(x0, ox), min(y1, oy + ch), min(x1, ox + cw)
                out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = chunk(cy, cx)[:, sy0 - oy : sy1 - oy,
                                                                                sx0 - ox : sx1 - ox]
        return out

    return read


def _generation(path: Path) -> str:
    """A token of when an array was created: its metadata file is written once, at creation."""
    try:
        st = (path / "zarr.json").stat()
    except OSError:
        return "00000000"
    return f"{zlib.crc32(f'{st.st_ino}:{st.st_mtime_ns}'.encode()):08x}"


def _num(v):
    return v if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _text(v, limit: int = 200):
    return v[:limit] if isinstance(v, str) else None


def store_facts(store: SlideStore) -> dict:
    """The attributes the page may show, each checked for type: nothing else leaves the store."""
    i = store.info
    last = store.stages[-1]
    model = i.get("model") if isinstance(i.get("model"), dict) else {}
    cfg = i.get("config") if isinstance(i.get("config"), dict) else {}
    state = i.get("state") if isinstance(i.get("state"), dict) else None
    return {
        "kind": "store", "name": store.path.name[:200], "width": last["width"], "height": last["height"],
        "mpp": _num(last["mpp"]), "synthetic": i.get("synthetic") is not False,
        "model": _text(model.get("name")), "model_sha256": _text(i.get("model_sha256"), 64),
        "seed": _num(i.get("seed")), "version": _text(i.get("version"), 40),
        "steps": _num(cfg.get("steps")), "guided_steps": _num(cfg.get("guided_steps")),
        "class": _text(cfg.get("class"), 100), "guidance": _num(cfg.get("guidance")),
        "complete": bool(i.get("complete")),
        "stages": [{"index": s["index"], "width": s["width"], "height": s["height"], "mpp": s["mpp"]}
                   for s in store.stages],
        "stages_complete": [l for l in i.get("stages_complete", []) if isinstance(l, int)],
        "state": {"stage": state["stage"], "step": state["step"]} if state else None,
        # a probe of the store's write lock (never taking it): who writes it, if anyone
        "writer": None if i.get("complete") else _text(_writer(store), 120),
    }


def _writer(store: SlideStore) -> str | None:
    holder = store.writer()
    return holder.describe() if holder is not None else None


def store_layers(store: SlideStore, cache: LRU) -> dict[str, Layer]:
    g = store.group
    last = len(store.stages) - 1
    out: dict[str, Layer] = {}
    for st in store.stages:
        l = st["index"]
        name = store.stage_name(l)
        if not store.stage_complete(l) or name not in g or (l == last and store.complete):
            continue
        gen = _generation(store.path / name)
        arr = g[name]
        key = ("store", f"stage{l}", gen)
        out[f"stage{l}"] = Layer(f"stage{l}", f"stage {l} ({st['width']}×{st['height']} at {st['mpp']:g} µm/px)",
                                 st["width"], st["height"], float(st["mpp"]),
                                 Pyramid(st["width"], st["height"], {0: _array_reader(arr, (*key, 0), cache)},
                                         key, cache), gen)
    if store.complete:
        top = store.stages[-1]
        gen = _generation(store.path / "0")
        key = ("store", "final", gen)
        readers = {int(n): _array_reader(g[n], (*key, int(n)), cache) for n in store.level_names()}
        out["final"] = Layer("final", "final image", top["width"], top["height"], float(top["mpp"]),
                             Pyramid(top["width"], top["height"], readers, key, cache), gen)
    return out


def file_layer(path: Path, cache: LRU) -> tuple[Layer, dict]:
    """One layer over an image file: its levels that are exact 2^d reductions, 2×2 means between."""
    slide = open_image(path, require_mpp=False)
    lock = threading.Lock()  # tifffile shares one file handle between the levels

    def reader(level: int, ds: float):
        def read(x0, y0, x1, y1):
            with lock:  # (x, y) in level-0 pixels; +½ keeps floor(x / ds) from rounding down
                hwc = slide.read_region((x0 + 0.5) * ds, (y0 + 0.5) * ds, x1 - x0, y1 - y0, level=level)
            return np.ascontiguousarray(hwc.transpose(2, 0, 1))

        return read

    readers = {}
    for i, (w, h, ds) in enumerate(slide.levels):
        d = round(math.log2(ds)) if ds > 0 else -1
        want_w, want_h = -(-slide.width // (1 << max(d, 0))), -(-slide.height // (1 << max(d, 0)))
        # a level is used only where it is a 2^d reduction to the pixel (OpenSlide may floor sizes)
        if d >= 0 and d not in readers and abs(ds - 2**d) < 1e-3 * ds and abs(w - want_w) <= 1 and abs(h - want_h) <= 1:
            readers[d] = reader(i, ds)
    gen = _generation(path) if path.is_dir() else f"{zlib.crc32(str(path.stat().st_mtime_ns).encode()):08x}"
    layer = Layer("image", path.name, slide.width, slide.height, slide.mpp,
                  Pyramid(slide.width, slide.height, readers, ("file", gen), cache), gen)
    facts = {"kind": "file", "name": path.name[:200], "width": slide.width, "height": slide.height,
             "mpp": slide.mpp, "complete": True, "synthetic": None}
    return layer, facts


class Source:
    """A slide the server shows; ``snapshot()`` is what it holds now (stores are reread)."""

    def __init__(self, path: str | os.PathLike, cache: LRU):
        self.path = Path(path)
        self.cache = cache
        self._lock = threading.Lock()
        self.is_store = (self.path / "zarr.json").is_file()
        if self.is_store:
            self._snap = self._read_store()
        elif self.path.is_dir():
            raise WsigenError(f"{self.path} is a folder but not a zarr store (no zarr.json)")
        else:
            layer, facts = file_layer(self.path, cache)
            self._snap = Snapshot({"image": layer}, facts)

    def _read_store(self) -> Snapshot:
        store = SlideStore.open(self.path, mode="r")
        facts = store_facts(store)
        return Snapshot(store_layers(store, self.cache), facts, live=not facts["complete"])

    def snapshot(self, fresh: bool = False) -> Snapshot:
        """The layers now; a live store is reopened (``fresh``) at most every REFRESH_S seconds."""
        with self._lock:
            snap = self._snap
            if not (self.is_store and snap.live and fresh and time.monotonic() - snap.when >= REFRESH_S):
                return snap
            try:
                new = self._read_store()
            except WsigenError:  # mid-rewrite or removed: keep showing what we had
                return snap
            for name, layer in snap.layers.items():  # a layer that went away or was recreated
                if name not in new.layers or new.layers[name].gen != layer.gen:
                    self.cache.drop(layer.pyramid.key)
            self._snap = new
            return new

    def public(self) -> dict:
        snap = self.snapshot(fresh=True)
        f = snap.facts
        final_um = (f["width"] * f["mpp"]) if f.get("mpp") else None
        return {**f, "live": snap.live, "world_um": final_um,
                "layers": [l.public(final_um) for l in snap.layers.values()]}
