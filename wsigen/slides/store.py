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

import json
import math
import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .. import faults
from ..errors import WsigenError
from ..version import __version__
from . import durable, pyramid, store_meta, storelock
from .parallel import bounded_map, default_workers  # noqa: F401  (run.sampler imports both from here)
from .pyramid import PYRAMID_MIN, downsample2, level_shapes  # noqa: F401  (the NGFF metadata names store.downsample2)
from .store_meta import damage, is_store, ngff_attrs, prepare_output  # noqa: F401  (imported from here)

CHUNK = 512
STATE = "state/x"
HISTORY = "state/d"  # a multistep solver's previous data prediction, beside state/x
# What the "wsigen" attributes must say besides what the store adds (design.md §4).
REQUIRED_INFO = ("torch_version", "config", "key", "model", "seed", "mpp_per_stage")
# Every chunk is stored, even an all-zero one, so "every chunk exists" is checkable by listing;
# the zstd checksum makes a damaged chunk an error instead of wrong pixels.
_ARRAY_CONFIG = {"write_empty_chunks": True}
_CODEC = ZstdCodec(level=1, checksum=True)  # level 1: 5× faster to write than 3, as small here


class SlideStore:
    """One slide: ``0 … n`` (final image and pyramid), ``stages/l`` (guides), ``state/`` (mid-stage)."""

    def __init__(self, path: Path, group: zarr.Group, fsync: bool = True):
        self.path, self.group = path, group
        self.fsync = fsync  # False: --no-fsync (nothing is forced to disk; scratch runs)

    # -- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path, *, stages: list[dict], final: tuple[int, int], info: dict,
               chunk: int = CHUNK, overwrite: bool = False, fsync: bool = True) -> SlideStore:
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
        store = cls(p, g, fsync)
        for st in stages[:-1]:
            store._array(f"stages/{st['index']}", (st["height"], st["width"]), chunk)
        store._array("0", tuple(final), chunk)
        model = info["model"]
        sha = model.get("sha256") if isinstance(model, dict) else None
        # Attributes last: a store is recognisable as ours only once its arrays exist.
        if fsync:
            store._sync_tree(p)
        store._write_attrs(wsigen={"version": __version__, "synthetic": True, "model_sha256": sha, **info,
                                   "stages": stages, "stages_complete": [], "state": None,
                                   "complete": False})
        if fsync:
            durable.fsync_dir(p.absolute().parent)  # the store's own name
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
        problem = damage(info)
        if problem:
            raise WsigenError(f"{p}: the store's 'wsigen' attributes are damaged ({problem}); "
                              f"sample it again with --overwrite")
        return cls(p, g)

    # -- attributes -----------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return dict(self.group.attrs["wsigen"])

    def update_info(self, **changes) -> None:
        """Rewrite the 'wsigen' attributes: zarr.json is replaced atomically and durably."""
        faults.point("metadata")
        self._write_attrs(wsigen={**self.info, **changes})

    def _write_attrs(self, **attrs) -> None:
        """Set group attributes through ``durable.write_json`` (temporary file, fsync, rename, fsync
        of the folder), as zarr would write them but for the fsyncs; then reopen the group."""
        meta = self.path / "zarr.json"
        d = json.loads(meta.read_bytes())
        d["attributes"] = {**d.get("attributes", {}), **attrs}
        durable.write_json(meta, d, fsync=self.fsync, indent=zarr.config.get("json_indent"))
        mode = "r" if self.group.store.read_only else "r+"
        self.group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)

    # -- durability -----------------------------------------------------------------------
    def chunk_files(self, name: str, rows: range | None = None) -> list[Path]:
        """The chunk files of array ``name`` (of chunk rows ``rows``: c/0/ROW/COL)."""
        root = self.path / name / "c" / "0"
        if not root.is_dir():
            return []
        dirs = [root / str(r) for r in rows] if rows is not None else sorted(root.iterdir())
        return [f for d in dirs if d.is_dir() for f in d.iterdir() if not f.name.endswith(".partial")]

    def sync_rows(self, name: str, rows: range | None = None, workers: int | None = None) -> None:
        """fsync the chunks of chunk rows ``rows`` of ``name`` (all: None) and their folders.

        Each process syncs the rows it wrote; ``sync_dirs`` then the folders above them.
        """
        if not self.fsync:
            return
        files = self.chunk_files(name, rows)
        durable.fsync_all(files, workers or default_workers())
        for d in sorted({f.parent for f in files}):
            durable.fsync_dir(d)

    def sync_dirs(self, name: str) -> None:
        """fsync the folders that name array ``name``'s chunks, its zarr.json, up to the store."""
        if not self.fsync:
            return
        top = self.path / name
        for d in (top / "c" / "0", top / "c"):
            if d.is_dir():
                durable.fsync_dir(d)
        if (top / "zarr.json").is_file():
            durable.fsync_file(top / "zarr.json")
        d = top
        while True:
            durable.fsync_dir(d)
            if d == self.path:
                break
            d = d.parent

    def _sync_tree(self, root: Path) -> None:
        for d, _, files in os.walk(root, topdown=False):
            for f in files:
                durable.fsync_file(Path(d) / f)
            durable.fsync_dir(d)

    def trust_marks(self, log=None) -> None:
        """Check the marks a resume would trust against the chunks they cover (resume, rank 0).

        A stage marked complete with a missing chunk is sampled again (the same bytes); a
        committed ``state/`` with a missing chunk is refused (zarr would read it as zeros): its
        stage restarts from its first step.
        """
        i = self.info
        redo = [l for l in i["stages_complete"] if l < len(self.stages) and not i.get("stages_dropped")
                and self.stage_name(l) in self.group and self.missing_chunks(self.stage_name(l))]
        changes = {}
        if redo:
            changes["stages_complete"] = [l for l in i["stages_complete"] if l not in redo]
            if log:
                log(f"stages {redo} are marked complete but chunks are missing: sampling them again")
        st = i.get("state")
        if st is not None:
            gaps = self.missing_chunks(STATE) if STATE in self.group else None
            if gaps is not None and HISTORY in self.group:  # a multistep solver's history beside it
                gaps += self.missing_chunks(HISTORY)
            if gaps is None or gaps:
                changes["state"] = None
                if log:
                    log(f"refusing the checkpoint of stage {st['stage']} after step {st['step']}: "
                        f"{'its array is missing' if gaps is None else f'{gaps} chunks are missing'}; "
                        f"stage {st['stage']} restarts from its first step")
        if changes:
            self.update_info(**changes)

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
        """Record stage ``l`` as complete: only once every chunk exists and is on disk. Each writer
        has ``sync_rows``-ed the chunks it wrote before; here the folders, then the mark."""
        name = self.stage_name(l)
        gaps = self.missing_chunks(name)
        if gaps:
            raise WsigenError(f"{self.path}: {gaps} chunks of stage {l} are missing after writing it; "
                              "the store is damaged")
        self.sync_dirs(name)
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
        return self._checkpoint_array(STATE, height, width, chunk, dtype)

    def history_array(self, height: int, width: int, chunk: int = CHUNK, dtype: str = "float32") -> zarr.Array:
        """The multistep history's array of the checkpoint being written (``begin_state`` first)."""
        return self._checkpoint_array(HISTORY, height, width, chunk, dtype)

    def _checkpoint_array(self, name: str, height: int, width: int, chunk: int, dtype: str) -> zarr.Array:
        """``name`` of the checkpoint, reused when its shape and dtype fit, else made anew."""
        arr = self.group.get(name)
        if arr is None or arr.shape != (3, height, width) or arr.dtype != np.dtype(dtype):
            arr = self._array(name, (height, width), chunk, dtype=dtype)
        return arr.with_config(_ARRAY_CONFIG)

    def commit_state(self, stage: int, step: int) -> None:
        """Record that state/ holds stage ``stage`` after ``step`` steps (all chunks written and
        ``sync_rows``-ed by their writers before): the folders, then the record, durably."""
        names = [STATE] + ([HISTORY] if HISTORY in self.group else [])
        gaps = sum(self.missing_chunks(n) for n in names)
        if gaps:
            raise WsigenError(f"{self.path}: {gaps} chunks of the checkpoint are missing after writing it")
        for n in names:
            self.sync_dirs(n)
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
        for i in range(1, len(shapes)):  # the pyramid's chunks on disk before "complete"
            self.sync_rows(str(i), workers=workers)
            self.sync_dirs(str(i))
        self._write_attrs(ome=ngff_attrs(shapes, mpp, name))
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

    def writer(self):
        """The live writer of this store (``storelock.Holder``), or None: a probe, never a lock."""
        return storelock.probe(self.path)

    def resume_command(self) -> str:
        inp = self.info.get("config", {}).get("input")
        if isinstance(inp, dict) and inp.get("path"):
            return f"wsigen upscale {inp['path']} --resume -o {self.path}"
        return f"wsigen sample --resume -o {self.path}"

    def incomplete_note(self) -> str:
        """Why an incomplete store is so: "being written by PID@host since …" or "interrupted: …"."""
        holder = self.writer()
        if holder is not None:
            return f"being written by {holder.describe()}"
        return f"interrupted: resume with `{self.resume_command()}`"

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def describe(self) -> dict:
        """What ``wsigen info`` prints: size, µm/px, model, seed, stages, resumability, disk use."""
        return store_meta.describe(self)


def info(store: str | os.PathLike) -> dict:
    """Describe a slide store (``wsigen info``): size, µm/px, model, seed, stages, how to resume."""
    from .dicom_read import describe, is_dicom_folder  # a DICOM export folder (dicom_read.py)

    if is_dicom_folder(store):
        return describe(store)
    return SlideStore.open(store).describe()
