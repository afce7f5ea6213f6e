"""Training-patch read rate: M × M patches at s ~ U(mpp-min, mpp-max) from 32768² slides.

What the training loop does between optimizer steps (``training.data.PatchSampler.sample``:
a random s, a tissue position, a read from the best pyramid level, the exact area resize, an
augmentation), timed on its own. Unless ``--slide`` is given, it builds two slides of the same
pixels from real tissue, 32768² at 0.25 µm/px, JPEG-tiled (256², quality 90), with 2× levels:

* ``loader-32768.tif`` — a pyramidal TIFF, levels in SubIFDs (read by tifffile via zarr);
* ``loader-32768.svs`` — an Aperio SVS (levels as directories, a thumbnail second): OpenSlide.

The tissue is ``tests/data/cmu_small_region.svs`` (2220 × 2967), a 2048² crop repeated; every
tile is its own JPEG, so decoding costs what it does on a scan. The slides are cached under
``--work`` (building them takes a minute or two). ``--workers N`` runs N reading processes at
once (each opens its own slides after the fork) and reports patches/s per process and in total.

    .venv/bin/python benchmarks/loader.py --json
    .venv/bin/python benchmarks/loader.py --workers 2 --seconds 20
    .venv/bin/python benchmarks/loader.py --slide my.svs --mpp-max 8
    .venv/bin/python benchmarks/loader.py --via-loader --workers 2   # through training's DataLoader
    .venv/bin/python benchmarks/loader.py --morphology               # each patch with its nuclei mask
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "data" / "cmu_small_region.svs"
SIDE, MPP, TILE, PERIOD = 32768, 0.25, 256, 2048


class Periodic:
    """A (3, SIDE/2^k, SIDE/2^k) array-like: the 2^k-reduced crop repeated (for ``encoded_tiles``)."""

    def __init__(self, base: np.ndarray, side: int):
        self.base, self.shape = base, (3, side, side)
        self.period, self.chunks = base.shape[1], (3, TILE, TILE)

    def __getitem__(self, sel):
        sel = sel if isinstance(sel, tuple) else (sel,)
        sel = tuple(sel) + (slice(None),) * (3 - len(sel))
        ys = np.arange(self.shape[1])[sel[1]] % self.period
        xs = np.arange(self.shape[2])[sel[2]] % self.period
        return self.base[sel[0]][:, ys][:, :, xs]


def _levels(side: int) -> list[Periodic]:
    import tifffile  # not OpenSlide: a GPU machine may not have it

    from wsigen.slides.pyramid import downsample2

    rgb = tifffile.imread(SOURCE)[460 : 460 + PERIOD, 86 : 86 + PERIOD, :3]
    base = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    out = []
    while side >= 512 or not out:
        out.append(Periodic(base, side))
        side //= 2
        base = downsample2(base)
    return out


def build(path: Path, fmt: str, full: int = SIDE) -> None:
    """Write the benchmark slide (``tif`` or ``svs``) to ``path`` atomically."""
    import tifffile

    from wsigen.slides.export_tiles import Codec, encoded_tiles

    codec, levels = Codec("jpeg", 90), _levels(full)
    tmp = path.with_suffix(path.suffix + ".part")
    common = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", planarconfig="contig",
                  resolutionunit="CENTIMETER", metadata=None, **codec.tiff_args())
    t0 = time.perf_counter()
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, lvl in enumerate(levels):
            side = lvl.shape[1]
            s = MPP * full / side
            kw = dict(common, shape=(side, side, 3), resolution=(1e4 / s, 1e4 / s))
            if fmt == "tif":
                kw.update(subifds=len(levels) - 1) if i == 0 else kw.update(subfiletype=1)
            else:
                head = f"Aperio Image Library wsigen-benchmark\r\n{full}x{full}"
                kw["description"] = (
                    f"{head} [0,0 {full}x{full}] ({TILE}x{TILE}) JPEG/RGB Q=90|AppMag = 40|MPP = {MPP}"
                    if i == 0 else f"{head} -> {side}x{side} - |MPP = {s}")
            tif.write(encoded_tiles(lvl, TILE, codec, os.cpu_count() or 1), **kw)
            if fmt == "svs" and i == 0:  # Aperio's second directory: a stripped thumbnail
                th = np.ascontiguousarray(levels[-1][:].transpose(1, 2, 0))
                tif.write(th, photometric="rgb", rowsperstrip=th.shape[0], metadata=None,
                          description=f"Aperio Image Library wsigen-benchmark\r\n{full}x{full} -> "
                                      f"{th.shape[1]}x{th.shape[0]} - |MPP = {MPP * full / th.shape[1]}")
    tmp.rename(path)
    print(f"built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)


def slides(work: Path, side: int = SIDE, formats=("tif", "svs")) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fmt in (("tifffile", "tif"), ("openslide", "svs")):
        if fmt not in formats:
            continue
        p = work / f"loader-{side}.{fmt}"
        if not p.exists():
            build(p, fmt, side)
        out[name] = p
    return out


def check_backends(paths: dict[str, Path]) -> None:
    """The TIFF opens with tifffile, the SVS with OpenSlide, and both give the same pixels."""
    from wsigen.slides import readers

    with readers.open_image(paths["tifffile"]) as a, readers.open_image(paths["openslide"]) as b:
        assert isinstance(a, readers.TiffSlide), type(a)
        assert isinstance(b, readers.OpenSlideSlide), type(b)
        assert a.levels == b.levels and a.mpp == b.mpp == MPP, (a.levels, b.levels, a.mpp, b.mpp)
        for lvl in (0, 3):
            ra = a.read_region(5000, 7000, 300, 200, level=lvl)
            rb = b.read_region(5000, 7000, 300, 200, level=lvl)
            assert np.array_equal(ra, rb), f"level {lvl}: tifffile and OpenSlide pixels differ"


def _sampler(path, args):
    """The training sampler of one slide (``--morphology``: stain vectors fitted, nuclei masks)."""
    from wsigen.training import data

    sd = data.load_slides([str(path)], mpp=args.mpp, fit_stains=args.morphology)
    return data.PatchSampler(sd, args.patch, args.mpp_min, args.mpp_max, nuclei=args.morphology)


def _read(sampler, rng) -> None:
    img, _, i = sampler.draw(rng)
    if sampler.nuclei:
        sampler.nuclei_mask(img, i)


def _reader(path: str, args, seconds: float, rank: int, start, q) -> None:
    """One reading process: open the slide here (never across a fork), read patches for a while."""
    sampler = _sampler(path, args)
    rng = np.random.default_rng([args.seed, rank])
    _read(sampler, rng)  # warm: first tiles, caches, imports
    start.wait()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        _read(sampler, rng)
        n += 1
    q.put((n / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / n))


def measure_loader(path: Path, args) -> dict:
    """Patches/s through the training loader itself: ``--workers`` DataLoader processes, one
    consumer (what ``wsigen train --loader-workers N`` gives the optimizer)."""
    from wsigen.training import loader

    sampler = _sampler(path, args)
    batch = 8
    b = loader.Batches(sampler, args.seed, 0, batch, 0, 10**6, args.workers, "cpu")
    try:
        next(b)  # workers started, first batches read
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            next(b)
            n += batch
        rate = n / (time.perf_counter() - t0)
    finally:
        b.close()
    return {"slide": str(path), "loader_workers": args.workers, "total": round(rate, 2)}


def measure(path: Path, args) -> dict:
    ctx = mp.get_context("fork")  # the parent has opened no slide: nothing is shared
    q, start = ctx.Queue(), ctx.Barrier(args.workers)
    ps = [ctx.Process(target=_reader, args=(str(path), args, args.seconds, r, start, q))
          for r in range(args.workers)]
    for p in ps:
        p.start()
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    rates, cpu = [r for r, _ in got], [c for _, c in got]
    # CPU ms per patch (all threads of the process) shows what a patch costs on a busy machine
    return {"slide": str(path), "per_process": [round(r, 2) for r in sorted(rates)],
            "mean_per_process": round(float(np.mean(rates)), 2), "total": round(float(sum(rates)), 2),
            "cpu_ms_per_patch": round(float(np.mean(cpu)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", action="append", help="measure this slide (repeatable) instead")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "wsigen-loader")
    ap.add_argument("--patch", type=int, default=512)
    ap.add_argument("--mpp-min", type=float, default=0.25)
    ap.add_argument("--mpp-max", type=float, default=16.0)
    ap.add_argument("--mpp", type=float, default=None, help="µm/px of slides that do not say")
    ap.add_argument("--workers", type=int, default=1, help="reading processes at once")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--via-loader", action="store_true",
                    help="read through the training DataLoader with --workers loader processes")
    ap.add_argument("--morphology", action="store_true",
                    help="with each patch its nuclei mask (what --morphology-weight adds)")
    ap.add_argument("--side", type=int, default=SIDE, help="side of the built slides (power of 2)")
    ap.add_argument("--build-only", action="store_true",
                    help="only build the pyramidal TIFF (no OpenSlide needed) and print its path")
    args = ap.parse_args()
    if args.build_only:
        print(slides(args.work, args.side, formats=("tif",))["tifffile"])
        return
    if args.slide:
        paths = {Path(p).name: Path(p) for p in args.slide}
    else:
        paths = slides(args.work, args.side)
        check_backends(paths)
    res = {"patch": args.patch, "mpp": [args.mpp_min, args.mpp_max], "workers": args.workers,
           "morphology": args.morphology,
           "seconds": args.seconds, "cpu_count": os.cpu_count(), "paths": {}}
    for name, p in paths.items():
        if args.via_loader:
            res["paths"][name] = r = measure_loader(p, args)
            if not args.json:
                print(f"{name:10s} {r['total']:7.1f} patches/s through the loader "
                      f"({args.workers} loader worker(s))")
            continue
        res["paths"][name] = measure(p, args)
        if not args.json:
            r = res["paths"][name]
            print(f"{name:10s} {r['mean_per_process']:7.1f} patches/s per process, "
                  f"{r['total']:7.1f} in total ({args.workers} process(es)), "
                  f"{r['cpu_ms_per_patch']:.1f} CPU ms per patch")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
