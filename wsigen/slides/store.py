"""The slide store (design.md §4 "Store", binding): one zarr v3 group that is an OME-NGFF 0.5 image.

Level ``0`` is the last stage's output; ``1 … n`` are its integer 2×2 means down to ≤ 1024 px;
earlier stages live under ``stages/``, the mid-stage checkpoint under ``state/``. Arrays are
written first and metadata last: the store says ``complete: true`` only after every chunk of
every level exists on disk.

Concurrency rule: one writer per chunk (processes write disjoint, chunk-aligned row ranges) and
one writer of attributes (rank 0). zarr's LocalStore writes every key to a temporary file and
renames it over the key, so a chunk is written whole or not at all (tests/test_store.py kills a
write midway to check it).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .. import faults
from ..errors import WsigenError
from ..version import __version__
from . import pyramid
from .parallel import bounded_map, default_workers  # noqa: F401  (run.sampler imports both from here)
from .pyramid import PYRAMID_MIN, downsample2, level_shapes  # noqa: F401  (the NGFF metadata names store.downsample2)

CHUNK = 512
STATE = "state/x"
HISTORY = "state/d"  # a multistep solver's previous data prediction, beside state/x
# What the "wsigen" attributes must say besides what the store adds (design.md §4).
REQUIRED_INFO = ("torch_version", "config", "key", "model", "seed", "mpp_per_stage")
# Every chunk is stored, even an all-zero one, so "every chunk exists" is checkable by listing;
# the zstd checksum makes a damaged chunk an error instead of wrong pixels.
_ARRAY_CONFIG = {"write_empty_chunks": True}
_CODEC = ZstdCodec(level=1, checksum=True)  # level 1: 5× faster to write than 3, as small here


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr v3 store (a wsigen store or not: the attributes say which)."""
    return (Path(path) / "zarr.json").is_file()


def prepare_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; never delete what is not ours."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume to continue it")
        if p.is_dir() and not p.is_symlink() and (is_store(p) or not any(p.iterdir())):
            shutil.rmtree(p)
        else:
            raise WsigenError(f"refusing to overwrite {p}: it is not a wsigen store")
    parent = p.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise WsigenError(f"cannot create {p}: {parent} is not a directory")
    return p


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
            "type": "mean",
            "metadata": {"method": "wsigen.slides.store.downsample2",
                         "description": "integer 2x2 mean, round half up; odd edges repeat"},
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


def _damage(info: dict) -> str | None:
    """What is wrong with the 'wsigen' attributes the code relies on, or None."""
    stages = info.get("stages")
    if not isinstance(stages, list) or not stages:
        return "stages is not a list"
    for i, st in enumerate(stages):
        if not (isinstance(st, dict) and st.get("index") == i
                and all(isinstance(st.get(k), int) and st[k] > 0 for k in ("height", "width"))
                and isinstance(st.get("mpp"), int | float) and st["mpp"] > 0):
            return f"stage {i} is malformed"
    done = info.get("stages_complete")
    if not isinstance(done, list) or not all(isinstance(l, int) for l in done):
        return "stages_complete is not a list of stage numbers"
    if not isinstance(info.get("complete"), bool):
        return "complete is not true or false"
    state = info.get("state")
    if state is not None and not (isinstance(state, dict) and isinstance(state.get("stage"), int)
                                  and isinstance(state.get("step"), int)):
        return "state is malformed"
    return None


class SlideStore:
    """One slide: ``0 … n`` (final image and pyramid), ``stages/l`` (guides), ``state/`` (mid-stage)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group

    # -- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path, *, stages: list[dict], final: tuple[int, int], info: dict,
               chunk: int = CHUNK, overwrite: bool = False) -> SlideStore:
        """Create the arrays of every stage and level 0; ``info`` becomes the 'wsigen' attributes."""
        missing = [k for k in REQUIRED_INFO if k not in info]
        if missing:
            raise ValueError(f"store info lacks {', '.join(missing)}")
        if [st["index"] for st in stages] != list(range(len(stages))):
            raise ValueError("stages must be numbered 0 … L in order")
        if (stages[-1]["height"], stages[-1]["width"]) != tuple(final):
            raise ValueError(f"last stage {stages[-1]['height']}x{stages[-1]['width']} ≠ final {final}")
        p = prepare_output(path, overwrite)
        g = zarr.open_group(str(p), mode="w-", zarr_format=3)
        store = cls(p, g)
        for st in stages[:-1]:
            store._array(f"stages/{st['index']}", (st["height"], st["width"]), chunk)
        store._array("0", tuple(final), chunk)
        model = info["model"]
        sha = model.get("sha256") if isinstance(model, dict) else None
        # Attributes last: a store is recognisable as ours only once its arrays exist.
        g.attrs["wsigen"] = {"version": __version__, "synthetic": True, "model_sha256": sha, **info,
                             "stages": stages, "stages_complete": [], "state": None,
                             "complete": False}
        return store

    def _array(self, name: str, shape: tuple[int, int], chunk: int, dtype="uint8") -> zarr.Array:
        c = min(chunk, max(shape))
        arr = self.group.create_array(name, shape=(3, *shape), chunks=(3, c, c), dtype=dtype,
                                      fill_value=0, compressors=_CODEC, dimension_names=["c", "y", "x"],
                                      overwrite=True, config=_ARRAY_CONFIG)
        return arr

    @classmethod
    def open(cls, path, mode: str = "r") -> SlideStore:
        p = Path(path)
        if not p.exists():
            raise WsigenError(f"store not found: {p}")
        if not is_store(p):
            raise WsigenError(f"{p} is not a zarr v3 store (no zarr.json)")
        try:
            g = zarr.open_group(str(p), mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for foreign or broken stores
            raise WsigenError(f"{p} is not a readable zarr v3 store ({type(e).__name__})") from None
        info = g.attrs.get("wsigen")
        if not isinstance(info, dict) or "stages" not in info or "complete" not in info:
            raise WsigenError(f"{p} is not a wsigen slide store (no 'wsigen' attributes)")
        problem = _damage(info)
        if problem:
            raise WsigenError(f"{p}: the store's 'wsigen' attributes are damaged ({problem}); "
                              f"sample it again with --overwrite")
        return cls(p, g)

    # -- attributes -----------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return dict(self.group.attrs["wsigen"])

    def update_info(self, **changes) -> None:
        """Rewrite the 'wsigen' attributes (zarr.json is replaced atomically, like a chunk)."""
        faults.point("metadata")
        self.group.attrs["wsigen"] = {**self.info, **changes}

    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    @property
    def stages(self) -> list[dict]:
        return self.info["stages"]

    @property
    def mpp(self) -> float:
        return float(self.stages[-1]["mpp"])

    def stage_name(self, l: int) -> str:
        return "0" if l == len(self.stages) - 1 else f"stages/{l}"

    def array(self, name: str) -> zarr.Array:
        try:
            arr = self.group[name]
        except KeyError:
            raise WsigenError(f"{self.path}: array {name} is missing; the store is damaged") from None
        return arr.with_config(_ARRAY_CONFIG)

    def stage_array(self, l: int) -> zarr.Array:
        return self.array(self.stage_name(l))

    def stage_complete(self, l: int) -> bool:
        return l in self.info["stages_complete"]

    def mark_stage_complete(self, l: int) -> None:
        done = sorted(set(self.info["stages_complete"]) | {l})
        self.update_info(stages_complete=done)

    # -- pixels ---------------------------------------------------------------------------
    def read_rows(self, l: int, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.stage_array(l)[:, y0:y1, :])

    def write_rows(self, l: int, y0: int, data: np.ndarray) -> None:
        """Write whole chunk rows (full width) of stage ``l``: no chunk is shared with another writer."""
        self.write_block(l, y0, 0, data, full_width=True)

    def write_block(self, l: int, y0: int, x0: int, data: np.ndarray, full_width: bool = False) -> None:
        """Write whole chunks of stage ``l`` from (y0, x0): the block starts on chunk boundaries and
        ends on one or at the array's edge, so no chunk is shared with another block or writer."""
        arr = self.stage_array(l)
        c, cx = arr.chunks[1], arr.chunks[2]
        h, w = arr.shape[1], arr.shape[2]
        n, m = data.shape[1], data.shape[2]
        if data.shape[0] != 3 or (full_width and m != w) or data.dtype != arr.dtype:
            raise ValueError(f"rows of shape {data.shape} ({data.dtype}) do not fit stage {l} "
                             f"of shape {arr.shape} ({arr.dtype})")
        if y0 % c or (y0 + n != h and n % c) or y0 + n > h:
            raise ValueError(f"rows [{y0}, {y0 + n}) are not chunk-aligned ({c}) in {h} rows")
        if x0 % cx or (x0 + m != w and m % cx) or x0 + m > w:
            raise ValueError(f"columns [{x0}, {x0 + m}) are not chunk-aligned ({cx}) in {w} columns")
        arr[:, y0 : y0 + n, x0 : x0 + m] = data

    # -- mid-stage state ------------------------------------------------------------------
    def state_info(self) -> dict | None:
        return self.info.get("state")

    def begin_state(self, stage: int, height: int, width: int, chunk: int = CHUNK,
                    dtype: str = "float32") -> zarr.Array:
        """The array to write a new checkpoint into; the old checkpoint stops counting first.

        The new checkpoint overwrites the old one chunk by chunk, so a crash in between must not
        leave a record pointing at a mixture of two steps: the record is cleared before any chunk
        is written, and a resume then restarts the stage (same bytes, more time). Keeping two
        copies instead would double the largest file set of a run (51 GB at 65536²).
        """
        if self.state_info() is not None:
            self.update_info(state=None)
        arr = self.group.get(STATE)
        if arr is None or arr.shape != (3, height, width) or arr.dtype != np.dtype(dtype):
            arr = self._array(STATE, (height, width), chunk, dtype=dtype)
        return arr.with_config(_ARRAY_CONFIG)

    def history_array(self, height: int, width: int, chunk: int = CHUNK, dtype: str = "float32") -> zarr.Array:
        """The multistep history's array of the checkpoint being written (``begin_state`` first)."""
        arr = self.group.get(HISTORY)
        if arr is None or arr.shape != (3, height, width) or arr.dtype != np.dtype(dtype):
            arr = self._array(HISTORY, (height, width), chunk, dtype=dtype)
        return arr.with_config(_ARRAY_CONFIG)

    def commit_state(self, stage: int, step: int) -> None:
        """Record that state/ holds stage ``stage`` after ``step`` steps (all chunks written before)."""
        self.update_info(state={"stage": stage, "step": step})

    def drop_state(self) -> None:
        self.update_info(state=None)
        if "state" in self.group:
            del self.group["state"]

    # -- levels ---------------------------------------------------------------------------
    def level_names(self) -> list[str]:
        """Pyramid levels present: those recorded at finalize, else the consecutive arrays 0, 1, …"""
        levels = self.info.get("levels")
        if levels:
            return [str(i) for i in range(len(levels))]
        names, i = [], 0
        while str(i) in self.group:
            names.append(str(i))
            i += 1
        return names

    def level_array(self, i: int) -> zarr.Array:
        return self.array(str(i))

    def missing_chunks(self, name: str) -> int:
        """How many chunks of array ``name`` have no file (listing only, nothing is read)."""
        arr = self.group[name]
        grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
        expected = math.prod(grid)
        root = self.path / name / "c"
        found = 0
        if root.is_dir():
            for _, _, files in os.walk(root):
                found += sum(1 for f in files if not f.endswith(".partial"))
        return expected - found

    def build_pyramid(self, min_side: int = PYRAMID_MIN, workers: int | None = None) -> list[tuple[int, int]]:
        """Levels 1 … n from level 0, chunk by chunk (memory: a 2×2 block of chunks per worker)."""
        base = self.group["0"]
        shapes = level_shapes(base.shape[1], base.shape[2], min_side)
        c = base.chunks[1]
        for i in range(1, len(shapes)):
            src = self.array(str(i - 1))
            dst = self._array(str(i), shapes[i], c).with_config(_ARRAY_CONFIG)
            pyramid.halve_into(src, dst, c, i, workers or default_workers())
        return shapes

    # -- finishing ------------------------------------------------------------------------
    def finalize(self, mpp: float, name: str, drop_stages: bool = False,
                 min_side: int = PYRAMID_MIN, workers: int | None = None) -> None:
        """Pyramid, check that every chunk exists, NGFF metadata, then ``complete: true``."""
        todo = [st["index"] for st in self.stages if not self.stage_complete(st["index"])]
        if todo:
            raise WsigenError(f"{self.path}: stages {todo} are not complete; cannot finalize")
        shapes = self.build_pyramid(min_side, workers)
        arrays = [str(i) for i in range(len(shapes))]
        if "stages" in self.group:
            arrays += [f"stages/{st['index']}" for st in self.stages[:-1]]
        gaps = {n: m for n in arrays if (m := self.missing_chunks(n))}
        if gaps:
            raise WsigenError(f"{self.path}: chunks missing after writing ({gaps}); the store is damaged")
        self.group.attrs["ome"] = ngff_attrs(shapes, mpp, name)
        faults.point("metadata")  # between the NGFF metadata and the completion flag
        if drop_stages and "stages" in self.group:
            del self.group["stages"]
        if "state" in self.group:  # a checkpoint left by a run killed while writing it
            del self.group["state"]
        self._remove_partials()
        self.update_info(levels=[list(s) for s in shapes], stages_dropped=drop_stages, state=None,
                         complete=True)

    def _remove_partials(self) -> None:
        """Temporary files a killed writer left behind (never chunks: those are renamed in whole)."""
        for f in self.path.rglob("*.partial"):
            f.unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def describe(self) -> dict:
        """What ``wsigen info`` prints: size, µm/px, model, seed, stages, resumability, disk use."""
        i = self.info
        cfg = i.get("config", {})
        last = self.stages[-1]
        dropped = bool(i.get("stages_dropped"))
        stages = [{**st, "complete": self.stage_complete(st["index"]),
                   "present": st["index"] == len(self.stages) - 1 or (
                       not dropped and self.stage_name(st["index"]) in self.group)}
                  for st in self.stages]
        model = i.get("model", {})
        done = i.get("complete", False)
        return {
            "path": str(self.path), "complete": done, "synthetic": i.get("synthetic", True),
            "width": last["width"], "height": last["height"], "mpp": last["mpp"],
            "levels": [list(self.group[n].shape[1:]) for n in self.level_names()],
            "model": model.get("name") if isinstance(model, dict) else model,
            "model_sha256": i.get("model_sha256") or (model.get("sha256") if isinstance(model, dict) else None),
            "seed": i.get("seed"), "version": i.get("version"), "torch_version": i.get("torch_version"),
            "steps": cfg.get("steps"), "guided_steps": cfg.get("guided_steps"),
            "stages": stages, "stages_complete": i.get("stages_complete", []),
            "state": i.get("state"), "stages_dropped": dropped,
            "resume": None if done else f"wsigen sample --resume -o {self.path}",
            "disk_bytes": self.disk_bytes(),
        }


def info(store: str | os.PathLike) -> dict:
    """Describe a slide store (``wsigen info``): size, µm/px, model, seed, stages, how to resume."""
    return SlideStore.open(store).describe()
