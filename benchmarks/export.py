"""Export benchmark: a 16384² store → JPEG OME-TIFF (wsigen) vs. libvips' pyramidal tiffsave.

The store is built from synthetic tissue-like pixels (smooth value noise in H&E colours on glass)
written chunk row by chunk row through ``SlideStore`` and finalized (pyramid), because sampling
16384² takes hours on a CPU. Each export then runs in a child process of its own, so its wall
time and peak RSS are its alone. libvips gets the same level-0 pixels from memory (its best case:
no store to read) and builds its own pyramid.

    .venv/bin/python benchmarks/export.py                  # 16384², results/export-16384.json
    .venv/bin/python benchmarks/export.py --size 65536 --big   # opt-in: wsigen only, ~30 GB disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
BG = np.array([242, 240, 244], np.float32)
PERIOD = 16384
PINK, PURPLE = np.array([232, 160, 200], np.float32), np.array([110, 50, 150], np.float32)


class ValueNoise:
    """Smooth 2-D noise: random values on a grid of ``cell`` px, bilinear with smoothstep."""

    def __init__(self, height: int, width: int, cell: int, rng: np.random.Generator):
        self.cell = cell
        self.grid = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
        self.width = width

    def rows(self, y0: int, y1: int) -> np.ndarray:
        fy = np.arange(y0, y1, dtype=np.float32) / self.cell
        iy = fy.astype(np.int64)
        ty = fy - np.floor(fy)
        ty = ty * ty * (3 - 2 * ty)
        a = self.grid[iy] * (1 - ty)[:, None] + self.grid[iy + 1] * ty[:, None]
        fx = np.arange(self.width, dtype=np.float32) / self.cell
        ix = fx.astype(np.int64)
        tx = fx - np.floor(fx)
        tx = tx * tx * (3 - 2 * tx)
        return a[:, ix] * (1 - tx) + a[:, ix + 1] * tx


class Grain:
    """Pixel noise (±4 grey levels): one random block, read at a random offset per band."""

    def __init__(self, rows: int, width: int, rng: np.random.Generator):
        self.block = rng.integers(-4, 5, (3, rows, width + 1024), dtype=np.int8).astype(np.float32)
        self.width, self.rng = width, rng

    def rows(self, n: int) -> np.ndarray:
        x = int(self.rng.integers(0, 1024))
        return self.block[:, :n, x : x + self.width]


def tissue_band(noises: list[ValueNoise], grain: Grain, y0: int, y1: int) -> np.ndarray:
    """(3, y1 − y0, W) uint8: tissue where the coarse noise is high, stain mix from finer noise."""
    mask, stroma, nuclei = (n.rows(y0, y1) for n in noises)
    t = np.clip(0.35 * stroma + 0.9 * np.maximum(nuclei - 0.72, 0) / 0.28 + 0.1, 0, 1)
    edge = np.clip((mask - 0.42) / 0.06, 0, 1)  # soft tissue border
    out = np.empty((3, y1 - y0, t.shape[1]), np.uint8)
    g = grain.rows(y1 - y0)
    for c in range(3):
        v = (PINK[c] + (PURPLE[c] - PINK[c]) * t - BG[c]) * edge + BG[c] + g[c] + 0.5
        np.clip(v, 0, 255, out=v)
        out[c] = v
    return out


def build_store(path: Path, size: int, mpp: float = 0.5, seed: int = 0) -> dict:
    """A complete one-stage store of ``size``² synthetic tissue, pyramid included; timings."""
    import torch

    from wsigen.slides.store import CHUNK, SlideStore

    rng = np.random.default_rng(seed)
    period = min(size, PERIOD)  # larger slides repeat a PERIOD² pattern (cheap to make)
    noises = [ValueNoise(period, period, c, rng) for c in (2048, 96, 12)]
    grain = Grain(CHUNK, period, rng)
    bands: dict[int, np.ndarray] = {}  # each band of the pattern, made once
    info = {"torch_version": torch.__version__,
            "config": {"width": size, "height": size, "mpp": mpp, "model": "benchmark-noise",
                       "seed": seed, "steps": None, "guided_steps": None},
            "key": {"seed": seed}, "model": {"name": "benchmark-noise", "sha256": "0" * 64},
            "seed": seed, "mpp_per_stage": [mpp]}
    t0 = time.perf_counter()
    stage = {"index": 0, "height": size, "width": size, "mpp": mpp, "path": "0"}
    s = SlideStore.create(path, stages=[stage], final=(size, size), info=info, overwrite=True)
    for y in range(0, size, CHUNK):
        p = y % period
        band = bands.get(p)
        if band is None:
            band = tissue_band(noises, grain, p, min(p + CHUNK, period))
            if size > period:
                bands[p] = band
        if size > period:
            band = np.tile(band, (1, 1, -(-size // period)))[:, :, :size]
        s.write_rows(0, y, band[:, : min(CHUNK, size - y)])
    s.mark_stage_complete(0)
    t1 = time.perf_counter()
    s.finalize(mpp, path.name)
    t2 = time.perf_counter()
    return {"write_level0_s": round(t1 - t0, 2), "pyramid_s": round(t2 - t1, 2),
            "store_bytes": s.disk_bytes()}


# -- the two contenders, each run in a child process --------------------------------------------
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_wsigen(store: str, out: str, quality: int, tile: int, workers: int | None) -> dict:
    import imagecodecs  # noqa: F401  (imports outside the clock, as for libvips)
    import tifffile  # noqa: F401

    from wsigen.slides.exporting import export

    c0, t0 = cpu_seconds(), time.perf_counter()
    r = export(store, out, format="ome-tiff", compression="jpeg", quality=quality, tile=tile,
               workers=workers, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
            "bytes": r["bytes"], "levels": r["levels"]}


def child_vips(store: str, out: str, quality: int, tile: int) -> dict:
    import pyvips
    import zarr

    t_load = time.perf_counter()
    a = zarr.open_group(store, mode="r")["0"]
    h, w = a.shape[1:]
    px = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, 512):  # the same pixels, in memory before the clock starts
        px[y : y + 512] = np.asarray(a[:, y : y + 512, :]).transpose(1, 2, 0)
    im = pyvips.Image.new_from_memory(px.data, w, h, 3, "uchar")
    c0, t0 = cpu_seconds(), time.perf_counter()
    im.tiffsave(out, pyramid=True, tile=True, compression="jpeg", Q=quality, tile_width=tile,
                tile_height=tile, bigtiff=True)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
            "load_from_store_seconds": t0 - t_load, "bytes": os.path.getsize(out),
            "input_in_memory_bytes": px.nbytes}


def summary(runs: list[dict]) -> dict:
    """Medians over the runs (wall and CPU seconds, peak RSS), sizes from the first."""
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    return {**runs[0], "seconds": round(med("seconds"), 3), "cpu_seconds": round(med("cpu_seconds"), 3),
            "min_seconds": round(min(r["seconds"] for r in runs), 3),
            "peak_rss_bytes": int(med("peak_rss_bytes")), "runs": len(runs)}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's, inherited
    through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, store, out, quality, tile, workers = sys.argv[2:8]
        if kind == "wsigen":
            d = child_wsigen(store, out, int(quality), int(tile), int(workers) or None)
        else:
            d = child_vips(store, out, int(quality), int(tile))
        d["peak_rss_bytes"] = peak_rss()
        print(json.dumps(d))
        return

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="encoder threads (0: wsigen's default)")
    ap.add_argument("--big", action="store_true", help="allow sizes above 16384 (wsigen only, no libvips)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the store and outputs")
    ap.add_argument("--reuse", action="store_true", help="reuse the store already in --work")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender (medians reported)")
    a = ap.parse_args()
    if a.size > 16384 and not a.big:
        raise SystemExit("sizes above 16384 need --big (about 30 GB of disk at 65536²)")
    work = a.work or Path(tempfile.mkdtemp(prefix="wsigen-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    need = 30e9 * (a.size / 65536) ** 2 + 1e9
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.0f} GB")
    store, ours, theirs = work / "bench.zarr", work / "wsigen.ome.tif", work / "vips.tif"
    try:
        if a.reuse and (store / "zarr.json").exists():
            from wsigen.slides.store import SlideStore

            s = SlideStore.open(store)
            if not s.complete or s.level_array(0).shape != (3, a.size, a.size):
                raise SystemExit(f"{store} is not a complete {a.size}² store; drop --reuse")
            build = {"reused": True, "store_bytes": s.disk_bytes()}
        else:
            print(f"building a {a.size}² store in {work} …", file=sys.stderr)
            build = build_store(store, a.size)
        print(f"  {build}", file=sys.stderr)
        args = (str(store), str(ours), str(a.quality), str(a.tile), str(a.workers))
        runs: dict[str, list[dict]] = {"wsigen": [], "libvips": []}
        for i in range(a.repeat):  # alternate, so that a busy spell hits both alike
            runs["wsigen"].append(run_child("wsigen", *args))
            print(f"wsigen  #{i}: {runs['wsigen'][-1]}", file=sys.stderr)
            if not a.big:
                runs["libvips"].append(run_child("vips", str(store), str(theirs), str(a.quality),
                                                 str(a.tile), "0"))
                print(f"libvips #{i}: {runs['libvips'][-1]}", file=sys.stderr)
        w, v = summary(runs["wsigen"]), summary(runs["libvips"]) if runs["libvips"] else None
        import imagecodecs
        import pyvips
        import tifffile

        result = {
            "benchmark": "export", "size": a.size, "format": "ome-tiff", "compression": "jpeg",
            "quality": a.quality, "tile": a.tile, "store": build, "wsigen": w, "libvips": v,
            "ratio_wsigen_over_libvips": round(w["seconds"] / v["seconds"], 3) if v else None,
            "cpu_ratio_wsigen_over_libvips": round(w["cpu_seconds"] / v["cpu_seconds"], 3) if v else None,
            "runs": runs,
            "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                        "python": platform.python_version(), "platform": platform.platform()},
            "versions": {"tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__,
                         "libvips": ".".join(str(pyvips.version(i)) for i in range(3))},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        out = ROOT / "results" / f"export-{a.size}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        if v:
            print(f"median of {a.repeat}: wsigen {w['seconds']:.2f} s ({w['cpu_seconds']:.2f} s CPU), "
                  f"libvips {v['seconds']:.2f} s ({v['cpu_seconds']:.2f} s CPU): ratio "
                  f"{result['ratio_wsigen_over_libvips']:.2f}× wall, "
                  f"{result['cpu_ratio_wsigen_over_libvips']:.2f}× CPU → {out}", file=sys.stderr)
        else:
            print(f"wsigen {w['seconds']:.1f} s, peak RSS {w['peak_rss_bytes'] / 1e9:.2f} GB → {out}",
                  file=sys.stderr)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
