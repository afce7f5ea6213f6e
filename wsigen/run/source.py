"""The input of ``upscale``: an existing image (or slide region) that becomes stage 0.

The input (any image or slide region the readers open) is stored as ``stages/0`` together with its
file name and sha256; stages 1 … L run exactly as in ``sample`` after its first stage.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError, WsigenError
from ..slides.planes import Planes

if TYPE_CHECKING:
    from ..method.stages import StagePlan

ROWS_PER_READ = 512


@dataclass(frozen=True)
class Source:
    """The input region: file, level, level-0 region (x, y, w, h) and µm/px of the read pixels."""

    path: Path
    region: tuple[int, int, int, int]
    level: int
    width: int  # pixels as read (at ``level``)
    height: int
    mpp: float
    sha256: str
    mpp_given: float | None = None
    planes: Planes | None = None  # --page / --channels of an input with several planes

    def describe(self) -> dict:
        d = {"file": self.path.name, "path": str(self.path.absolute()), "sha256": self.sha256,
             "region": list(self.region), "level": self.level, "width": self.width,
             "height": self.height, "mpp": self.mpp, "mpp_given": self.mpp_given}
        if self.planes is not None:  # absent otherwise: the record stays as before
            d["planes"] = self.planes.describe()
        return d

    @classmethod
    def from_record(cls, d: dict) -> Source:
        """The inverse of ``describe`` (a store's ``config.input``)."""
        planes = Planes.from_record(d["planes"]) if d.get("planes") else None
        return cls(Path(d["path"]), tuple(d["region"]), d["level"], d["width"], d["height"], d["mpp"],
                   d["sha256"], d.get("mpp_given"), planes)


def parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"--region takes x,y,w,h in level-0 pixels (got {text!r})") from None
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise UsageError(f"--region must have x, y ≥ 0 and w, h ≥ 1 (got {text!r})")
    return x, y, w, h


def open_source(path, mpp: float | None = None, region=None, level: int = 0,
                planes: Planes | None = None) -> Source:
    from ..slides.readers import open_image

    if mpp is not None and not mpp > 0:
        raise UsageError(f"--mpp must be positive (got {mpp:g})")
    with open_image(path, mpp=mpp, planes=planes) as slide:
        if not 0 <= level < len(slide.levels):
            raise WsigenError(f"{path}: level {level} does not exist ({len(slide.levels)} levels)")
        x, y, w, h = region or (0, 0, slide.width, slide.height)
        if x + w > slide.width or y + h > slide.height:
            raise WsigenError(f"--region {x},{y},{w},{h} reaches outside the image "
                              f"({slide.width}x{slide.height} at level 0)")
        d = slide.levels[level][2]
        lw, lh = max(1, round(w / d)), max(1, round(h / d))
        src = Source(Path(path), (x, y, w, h), level, lw, lh, slide.mpp * d, slide.sha256(), mpp, planes)
        # Decode every pixel once before any output exists: truncated files and corrupt tiles
        # open lazily and would otherwise fail half-way through writing the store.
        for _ in input_bands(slide, src.describe(), 1024):
            pass
        return src


def input_bands(slide, inp: dict, rows: int):
    """(row0, (3, h, w) uint8) bands of the input region; decoding errors become WsigenError."""
    x, y, _, _ = inp["region"]
    d = slide.levels[inp["level"]][2]
    for r0 in range(0, inp["height"], rows):
        r1 = min(r0 + rows, inp["height"])
        try:
            px = slide.read_region(x, y + round(r0 * d), inp["width"], r1 - r0, level=inp["level"])
        except WsigenError:
            raise
        except Exception as e:  # codec errors of many kinds (imagecodecs, OpenSlide, libvips)
            raise WsigenError(f"cannot decode {slide.path} (rows {r0}–{r1} of level {inp['level']}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        yield r0, np.ascontiguousarray(px.transpose(2, 0, 1))


def factor_from(source: Source, k: int, factor: int | None, target_mpp: float | None) -> int:
    """L such that the output is k^L times the input; the factor must be a power of k."""
    if factor is not None and target_mpp is not None:
        raise UsageError("give --factor or --target-mpp, not both")
    if target_mpp is not None:
        if not target_mpp > 0:
            raise UsageError(f"--target-mpp must be positive (got {target_mpp:g})")
        f = source.mpp / target_mpp
    else:
        f = factor if factor is not None else k
    if f < 1:
        raise UsageError(f"the factor must be at least 1 (got {f:g})")
    L = round(math.log(f, k))
    if abs(k**L - f) > 1e-6 * f:
        raise UsageError(f"the factor must be a power of {k} (got {f:g}; nearest: "
                         f"{k ** math.floor(math.log(f, k))} or {k ** math.ceil(math.log(f, k))})")
    return L


def plans_for(source: Source, stages: int, k: int) -> list[StagePlan]:
    """Stage l of an upscale is the input scaled by k^l (stage 0 is the input itself)."""
    from ..method.stages import StagePlan

    return [StagePlan(l, source.height * k**l, source.width * k**l, source.mpp / k**l)
            for l in range(stages + 1)]


def check_range(plans: list[StagePlan], model_cfg: dict, allow_extrapolation: bool) -> None:
    lo, hi = model_cfg["mpp_range"]
    if allow_extrapolation:
        return
    if plans[0].mpp > hi:
        raise WsigenError(f"the input's {plans[0].mpp:g} µm/px is coarser than the model's trained range "
                          f"{lo:g}–{hi:g} µm/px; pass --allow-extrapolation to try anyway")
    if plans[-1].mpp < lo:
        raise WsigenError(f"the target {plans[-1].mpp:g} µm/px is finer than the model's trained range "
                          f"{lo:g}–{hi:g} µm/px; use a smaller --factor or pass --allow-extrapolation")


def write_input(store, source: Source) -> None:
    """Read the input region band by band and store it as stage 0 (then mark stage 0 complete).

    A forked worker reads through a new process: libvips (PNG, JPEG, … inputs) keeps a pool of
    threads that ``fork`` does not copy, so in a child of a process that has decoded with it (the
    launcher has, checking the input before it starts the workers) the next decode waits forever
    for threads that do not exist.
    """
    from . import processes

    if processes.forked_worker():
        _write_in_new_process(store.path, source.describe())
    else:
        _write_bands(store, source.describe())
    store.sync_rows(store.stage_name(0))  # the input's chunks on disk before the mark
    store.mark_stage_complete(0)


def _write_bands(store, inp: dict) -> None:
    from ..slides.readers import open_image

    path = Path(inp["path"])
    planes = Planes.from_record(inp["planes"]) if inp.get("planes") else None
    with open_image(path, mpp=inp["mpp_given"], require_mpp=False, planes=planes) as slide:
        if slide.sha256() != inp["sha256"]:
            raise WsigenError(f"{path} has changed since the store was started (sha256 differs)")
        arr = store.stage_array(0)
        rows = max(arr.chunks[1], ROWS_PER_READ // arr.chunks[1] * arr.chunks[1])
        for r0, band in input_bands(slide, inp, rows):
            store.write_rows(0, r0, band)


def _write_in_new_process(store_path, inp: dict) -> None:
    """``_write_bands`` in ``python -c``; its error comes back as this process's."""
    import json
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parents[2])  # wsigen importable as in this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    request = json.dumps({"store": str(Path(store_path).absolute()), "input": inp})
    r = subprocess.run([sys.executable, "-c", "from wsigen.run.source import _writer_main; _writer_main()"],
                       input=request, capture_output=True, text=True, env=env)
    if r.returncode == 0:
        return
    try:
        reply = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        reply = None
    if isinstance(reply, dict) and "message" in reply:
        raise (UsageError if reply.get("code") == 2 else WsigenError)(reply["message"])
    if r.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-r.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-r.returncode}"
    else:
        last = (r.stderr.strip().splitlines() or [""])[-1]
        how = f"failed (exit code {r.returncode}){': ' + last if last else ''}"
    raise WsigenError(f"the process reading {inp['file']} into stage 0 {how}")


def _writer_main() -> None:
    """Entry of the reading process: a JSON request on stdin, a JSON error on stdout."""
    import json
    import sys

    from .processes import die_with_parent

    die_with_parent()
    request = json.loads(sys.stdin.read())
    try:
        from ..slides.store import SlideStore

        _write_bands(SlideStore.open(request["store"], mode="r+"), request["input"])
    except Exception as e:
        if isinstance(e, WsigenError):
            reply = {"message": str(e), "code": e.exit_code}
        elif isinstance(e, OSError):
            where = f": {e.filename}" if e.filename else ""
            reply = {"message": f"writing stage 0 failed ({e.strerror or e}{where})", "code": 1}
        else:
            reply = {"message": f"reading the input failed: {type(e).__name__}: {e}", "code": 1}
        print(json.dumps(reply), flush=True)
        sys.exit(1)
