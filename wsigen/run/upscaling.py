"""Super-resolve an existing image: it becomes stage 0, and the guided stages add detail.

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

if TYPE_CHECKING:
    from ..method.cascade import StagePlan

ROWS_PER_READ = 512
# Set in forked worker processes: the input is read in a new process (see ``write_input``).
_READ_IN_FRESH_PROCESS = False


@dataclass
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

    def describe(self) -> dict:
        return {"file": self.path.name, "path": str(self.path.absolute()), "sha256": self.sha256,
                "region": list(self.region), "level": self.level, "width": self.width,
                "height": self.height, "mpp": self.mpp, "mpp_given": self.mpp_given}


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


def open_source(path, mpp: float | None = None, region=None, level: int = 0) -> Source:
    from ..slides.readers import open_image

    if mpp is not None and not mpp > 0:
        raise UsageError(f"--mpp must be positive (got {mpp:g})")
    with open_image(path, mpp=mpp) as slide:
        if not 0 <= level < len(slide.levels):
            raise WsigenError(f"{path}: level {level} does not exist ({len(slide.levels)} levels)")
        x, y, w, h = region or (0, 0, slide.width, slide.height)
        if x + w > slide.width or y + h > slide.height:
            raise WsigenError(f"--region {x},{y},{w},{h} reaches outside the image "
                              f"({slide.width}x{slide.height} at level 0)")
        d = slide.levels[level][2]
        lw, lh = max(1, round(w / d)), max(1, round(h / d))
        src = Source(Path(path), (x, y, w, h), level, lw, lh, slide.mpp * d, slide.sha256(), mpp)
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


def plans_for(cfg: dict, k: int) -> list[StagePlan]:
    from ..method.cascade import StagePlan

    inp = cfg["input"]
    L = cfg["upscale_stages"]
    return [StagePlan(l, inp["height"] * k**l, inp["width"] * k**l, inp["mpp"] / k**l) for l in range(L + 1)]


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


def read_in_fresh_process(on: bool = True) -> None:
    """From now on ``write_input`` reads in a new process (called in forked workers)."""
    global _READ_IN_FRESH_PROCESS
    _READ_IN_FRESH_PROCESS = on


def write_input(store, cfg: dict) -> None:
    """Read the input region band by band and store it as stage 0 (then mark stage 0 complete).

    A forked worker reads through a new process: libvips (PNG, JPEG, … inputs) keeps a pool of
    threads that ``fork`` does not copy, so in a child of a process that has decoded with it (the
    launcher has, checking the input before it starts the workers) the next decode waits forever
    for threads that do not exist.
    """
    if _READ_IN_FRESH_PROCESS:
        _write_in_new_process(store.path, cfg["input"])
    else:
        _write_bands(store, cfg["input"])
    store.mark_stage_complete(0)


def _write_bands(store, inp: dict) -> None:
    from ..slides.readers import open_image

    path = Path(inp["path"])
    with open_image(path, mpp=inp["mpp_given"], require_mpp=False) as slide:
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

    here = str(Path(__file__).resolve().parents[1])  # wsigen importable as in this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    request = json.dumps({"store": str(Path(store_path).absolute()), "input": inp})
    r = subprocess.run([sys.executable, "-c", "from wsigen.run.upscaling import _writer_main; _writer_main()"],
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

    from .launch import _die_with_parent

    _die_with_parent()
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


def upscale(input: str | os.PathLike, out: str | os.PathLike, *, factor: int | None = None,
            target_mpp: float | None = None, mpp: float | None = None, region=None, level: int = 0,
            model: str | None = None, resume: bool = False, overwrite: bool = False,
            workers: int | None = None, gpus: int | None = None, device: str = "auto",
            progress=None, log=None, **options) -> dict | None:
    """Add detail to an existing image stage by stage; writes the same store as ``sample``.

    ``workers``/``gpus``/``device`` spread the guided stages over processes as in ``sample``
    (the same bytes for any number). Returns the summary (None on ranks other than 0 of an
    externally launched job).
    """
    from . import launch

    job = launch.make_job(out, workers=workers, gpus=gpus, device=device, resume=resume,
                          overwrite=overwrite, progress=progress, log=log,
                          command=f"wsigen upscale {input}", model=model, **options)
    if not resume:
        src = open_source(input, mpp=mpp, level=level,
                          region=parse_region(region) if isinstance(region, str) else region)
        # the model's k from its config: no torch work in a process that forks workers
        k = launch._model_config(job.options)["k"]
        L = factor_from(src, k, factor, target_mpp)
        f = k**L
        job.options.update(size=(src.width * f, src.height * f), mpp=src.mpp / f,
                           source={"input": src.describe(), "upscale_stages": L})
    return launch.run_job(job)
