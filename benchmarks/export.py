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
        ty = fy - iy
        ty = ty * ty * (3 - 2 * ty)
        a = self.grid[iy] * (1 - ty)[:, None] + self.grid[iy + 1] * ty[:, None]
        fx = np.arange(self.width, dtype=np.float32) / self.cell
        ix = fx.astype(np.int64)
        tx = fx - ix
        tx = tx * tx * (3 - 2 * tx)
        return a[:, ix] * (1 - tx) + a[:, ix + 1] * tx


def tissue_band(noises: list[ValueNoise], y0: int, y1: int, rng: np.random.Generator) -> np.ndarray:
    """(3, y1 − y0, W) uint8: tissue where the coarse noise is high, stain mix from finer noise."""
    mask, stroma, nuclei = (n.rows(y0, y1) for n in noises)
    t = np.clip(0.35 * stroma + 0.9 * (nuclei > 0.72) * (nuclei - 0.72) / 0.28 + 0.1, 0, 1)
    rgb = PINK[:, None, None] * (1 - t) + PURPLE[:, None, None] * t
    edge = np.clip((mask - 0.42) / 0.06, 0, 1)  # soft tissue border
    rgb = rgb * edge + BG[:, None, None] * (1 - edge)
    rgb += rng.normal(0, 3, rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def build_store(path: Path, size: int, mpp: float = 0.5, seed: int = 0) -> dict:
    """A complete one-stage store of ``size``² synthetic tissue, pyramid included; timings."""
    import torch

    from wsigen.store import CHUNK, SlideStore

    rng = np.random.default_rng(seed)
    noises = [ValueNoise(size, size, c, rng) for c in (2048, 96, 12)]
    info = {"torch_version": torch.__version__,
            "config": {"width": size, "height": size, "mpp": mpp, "model": "benchmark-noise",
                       "seed": seed, "steps": None, "guided_steps": None},
            "key": {"seed": seed}, "model": {"name": "benchmark-noise", "sha256": "0" * 64},
            "seed": seed, "mpp_per_stage": [mpp]}
    t0 = time.perf_counter()
    s = SlideStore.create(path, stages=[{"index": 0, "height": size, "width": size, "mpp": mpp,
                                         "path": "0"}], final=(size, size), info=info, overwrite=True)
    for y in range(0, size, CHUNK):
        s.write_rows(0, y, tissue_band(noises, y, min(y + CHUNK, size), rng))
    s.mark_stage_complete(0)
    t1 = time.perf_counter()
    s.finalize(mpp, path.name)
    t2 = time.perf_counter()
    return {"write_level0_s": round(t1 - t0, 2), "pyramid_s": round(t2 - t1, 2),
            "store_bytes": s.disk_bytes()}


# -- the two contenders, each run in a child process --------------------------------------------
def child_wsigen(store: str, out: str, quality: int, tile: int, workers: int | None) -> dict:
    from wsigen.export import export

    t0 = time.perf_counter()
    r = export(store, out, format="ome-tiff", compression="jpeg", quality=quality, tile=tile,
               workers=workers, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "bytes": r["bytes"], "levels": r["levels"]}


def child_vips(store: str, out: str, quality: int, tile: int) -> dict:
    import pyvips
    import zarr

    a = zarr.open_group(store, mode="r")["0"]
    h, w = a.shape[1:]
    px = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, 512):  # the same pixels, in memory before the clock starts
        px[y : y + 512] = np.asarray(a[:, y : y + 512, :]).transpose(1, 2, 0)
    im = pyvips.Image.new_from_memory(px.data, w, h, 3, "uchar")
    t0 = time.perf_counter()
    im.tiffsave(out, pyramid=True, tile=True, compression="jpeg", Q=quality, tile_width=tile,
                tile_height=tile, bigtiff=True)
    return {"seconds": time.perf_counter() - t0, "bytes": os.path.getsize(out),
            "input_in_memory_bytes": px.nbytes}


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
        d["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
        print(f"building a {a.size}² store in {work} …", file=sys.stderr)
        build = build_store(store, a.size)
        print(f"  {build}", file=sys.stderr)
        args = (str(store), str(ours), str(a.quality), str(a.tile), str(a.workers))
        w = run_child("wsigen", *args)
        print(f"wsigen: {w}", file=sys.stderr)
        v = None
        if not a.big:
            v = run_child("vips", str(store), str(theirs), str(a.quality), str(a.tile), "0")
            print(f"libvips: {v}", file=sys.stderr)
        import imagecodecs
        import pyvips
        import tifffile

        result = {
            "benchmark": "export", "size": a.size, "format": "ome-tiff", "compression": "jpeg",
            "quality": a.quality, "tile": a.tile, "store": build, "wsigen": w, "libvips": v,
            "ratio_wsigen_over_libvips": round(w["seconds"] / v["seconds"], 3) if v else None,
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
            print(f"wsigen {w['seconds']:.1f} s, libvips {v['seconds']:.1f} s: "
                  f"ratio {result['ratio_wsigen_over_libvips']:.2f}× → {out}", file=sys.stderr)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
