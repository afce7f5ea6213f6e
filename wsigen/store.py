"""The slide store (design.md §4 "Store", binding): one zarr v3 group that is an OME-NGFF 0.5 image.

Arrays are written first and metadata last; the store says ``complete: true`` only after every
chunk of every level exists. zarr's LocalStore writes each chunk to a temporary file and renames
it, so a chunk is written whole or not at all (tests/test_store.py checks this).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .errors import WsigenError

CHUNK = 512
PYRAMID_MIN = 1024
STATE = "state/x"


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def prepare_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; never delete what is not ours."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume to continue it")
        if p.is_dir() and (_is_store(p) or not any(p.iterdir())):
            shutil.rmtree(p)
        else:
            raise WsigenError(f"refusing to overwrite {p}: it is not a wsigen store")
    parent = p.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise WsigenError(f"cannot create {p}: {parent} is not a directory")
    return p


def level_shapes(height: int, width: int, min_side: int = PYRAMID_MIN) -> list[tuple[int, int]]:
    """Level 0 and its 2× reductions (ceil) down to max side ≤ min_side."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample2(a: np.ndarray) -> np.ndarray:
    """Integer 2×2 mean (round half up) of (C, H, W) uint8; an odd edge repeats its last row/column."""
    c, h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    s = a.astype(np.uint16)
    s = s[:, 0::2, 0::2] + s[:, 1::2, 0::2] + s[:, 0::2, 1::2] + s[:, 1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def ngff_attrs(shapes: list[tuple[int, int]], mpp: float, name: str) -> dict:
    """OME-NGFF 0.5 'ome' attributes: axes c, y, x; scales in µm; RGB rendering hints."""
    datasets = [
        {"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * 2**i, mpp * 2**i]}]}
        for i in range(len(shapes))
    ]
    colours = ["FF0000", "00FF00", "0000FF"]
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
        }],
        "omero": {
            "channels": [
                {"label": lab, "color": col, "active": True,
                 "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for lab, col in zip(("R", "G", "B"), colours, strict=True)
            ],
            "rdefs": {"model": "color"},
        },
    }


class SlideStore:
    """One slide: ``0 … n`` (final image and pyramid), ``stages/l`` (guides), ``state/`` (mid-stage)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group

    # -- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path, *, stages: list[dict], final: tuple[int, int], info: dict,
               chunk: int = CHUNK, overwrite: bool = False) -> SlideStore:
        """Create the arrays of every stage and level 0; ``info`` becomes the 'wsigen' attributes."""
        p = prepare_output(path, overwrite)
        g = zarr.open_group(str(p), mode="w-", zarr_format=3)
        store = cls(p, g)
        for st in stages[:-1]:
            store._array(f"stages/{st['index']}", (st["height"], st["width"]), chunk)
        store._array("0", final, chunk)
        attrs = {"version": __version__, "synthetic": True, **info,
                 "stages": stages, "stages_complete": [], "complete": False}
        g.attrs["wsigen"] = attrs
        return store

    def _array(self, name: str, shape: tuple[int, int], chunk: int, dtype="uint8") -> zarr.Array:
        c = min(chunk, max(shape))
        return self.group.create_array(name, shape=(3, *shape), chunks=(3, c, c), dtype=dtype,
                                       fill_value=0, dimension_names=["c", "y", "x"], overwrite=True)

    @classmethod
    def open(cls, path, mode: str = "r") -> SlideStore:
        p = Path(path)
        if not p.exists():
            raise WsigenError(f"store not found: {p}")
        try:
            g = zarr.open_group(str(p), mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for foreign or broken stores
            raise WsigenError(f"{p} is not a readable zarr v3 store ({type(e).__name__})") from None
        info = g.attrs.get("wsigen")
        if not isinstance(info, dict) or "stages" not in info or "complete" not in info:
            raise WsigenError(f"{p} is not a wsigen slide store (no 'wsigen' attributes)")
        return cls(p, g)

    # -- attributes -----------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return dict(self.group.attrs["wsigen"])

    def update_info(self, **changes) -> None:
        self.group.attrs["wsigen"] = {**self.info, **changes}

    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    @property
    def stages(self) -> list[dict]:
        return self.info["stages"]

    def stage_name(self, l: int) -> str:
        return "0" if l == len(self.stages) - 1 else f"stages/{l}"

    def stage_array(self, l: int) -> zarr.Array:
        try:
            return self.group[self.stage_name(l)]
        except KeyError:
            raise WsigenError(f"{self.path}: stage {l} array is missing; the store is damaged") from None

    def stage_complete(self, l: int) -> bool:
        return l in self.info["stages_complete"]

    def mark_stage_complete(self, l: int) -> None:
        done = sorted(set(self.info["stages_complete"]) | {l})
        self.update_info(stages_complete=done)

    # -- pixels ---------------------------------------------------------------------------
    def read_rows(self, l: int, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.stage_array(l)[:, y0:y1, :])

    def write_rows(self, l: int, y0: int, data: np.ndarray) -> None:
        arr = self.stage_array(l)
        c = arr.chunks[1]
        if y0 % c or (y0 + data.shape[1] != arr.shape[1] and data.shape[1] % c):
            raise ValueError(f"rows [{y0}, {y0 + data.shape[1]}) are not chunk-aligned ({c})")
        arr[:, y0 : y0 + data.shape[1], : data.shape[2]] = data

    # -- mid-stage state ------------------------------------------------------------------
    def state_info(self) -> dict | None:
        return self.info.get("state")

    def begin_state(self, stage: int, height: int, width: int, chunk: int = CHUNK) -> zarr.Array:
        arr = self.group.get(STATE)
        if arr is None or arr.shape != (3, height, width):
            arr = self._array(STATE, (height, width), chunk, dtype="float32")
        return arr

    def commit_state(self, stage: int, step: int) -> None:
        """Record that state/ holds stage ``stage`` after ``step`` steps (written before this)."""
        self.update_info(state={"stage": stage, "step": step})

    def drop_state(self) -> None:
        self.update_info(state=None)
        if "state" in self.group:
            del self.group["state"]

    # -- finishing ------------------------------------------------------------------------
    def build_pyramid(self, min_side: int = PYRAMID_MIN) -> list[tuple[int, int]]:
        """Levels 1 … n from level 0, chunk by chunk (memory: one 2×2 block of chunks)."""
        base = self.group["0"]
        shapes = level_shapes(base.shape[1], base.shape[2], min_side)
        c = base.chunks[1]
        for i in range(1, len(shapes)):
            src = self.group[str(i - 1)]
            dst = self._array(str(i), shapes[i], c)
            h, w = shapes[i]
            for y in range(0, h, c):
                for x in range(0, w, c):
                    block = np.asarray(src[:, 2 * y : 2 * (y + c), 2 * x : 2 * (x + c)])
                    dst[:, y : y + c, x : x + c] = downsample2(block)[:, : min(c, h - y), : min(c, w - x)]
        return shapes

    def finalize(self, mpp: float, name: str, drop_stages: bool = False) -> None:
        """Pyramid, then NGFF metadata, then ``complete: true`` — in that order."""
        shapes = self.build_pyramid()
        self.group.attrs["ome"] = ngff_attrs(shapes, mpp, name)
        if drop_stages and "stages" in self.group:
            del self.group["stages"]
        self.update_info(levels=[list(s) for s in shapes], stages_dropped=drop_stages, complete=True)

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
