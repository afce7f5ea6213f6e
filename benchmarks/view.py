"""Viewer benchmark: Deep Zoom tiles/s that ``wsigen view`` serves from a 16384² store.

The store is the export benchmark's synthetic tissue (``export.build_store``: smooth value noise in
H&E colours, written through ``SlideStore`` and finalized). The server runs in this process with
its defaults; ``--clients`` threads fetch tiles over keep-alive HTTP connections, as a browser does
(6 connections). Three workloads, each on a fresh server (cold caches):

- ``screen``: screens of 8 × 5 neighbouring full-resolution tiles at random places (a page
  filling a 2048 × 1280 view at 100 %: neighbours share chunks);
- ``full``: random distinct full-resolution tiles (no two share a chunk, the cache's worst case);
- ``session``: a random zoom walk, every level weighted alike (what a page asks for);
- ``warm``: the ``session`` tiles again (from the tile cache).

    .venv/bin/python benchmarks/view.py                       # 16384², results/view-16384.json
    .venv/bin/python benchmarks/view.py --store slide.zarr    # an existing store instead
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from common import save  # noqa: E402
from export import build_store  # noqa: E402

from wsigen.view import start, tiles  # noqa: E402


def fetch_all(port: int, paths: list[str], clients: int) -> dict:
    """Fetch ``paths`` with ``clients`` keep-alive connections; tiles/s and bytes."""
    todo = list(paths)
    lock = threading.Lock()
    sizes, errors = [], []

    def client():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if not todo:
                    break
                p = todo.pop()
            c.request("GET", p)
            r = c.getresponse()
            body = r.read()
            (sizes if r.status == 200 else errors).append(len(body))
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} tile requests failed")
    return {"tiles": len(sizes), "seconds": round(dt, 2), "tiles_per_s": round(len(sizes) / dt, 1),
            "mean_kB": round(sum(sizes) / len(sizes) / 1e3, 1)}


def tile_paths(lay: dict, fmt: str, n: int, rng: random.Random, levels: list[int]) -> list[str]:
    out = set()
    while len(out) < n:
        level = rng.choice(levels)
        cols, rows = tiles.tile_grid(lay["width"], lay["height"], lay["max_level"] - level)
        if cols * rows <= sum(1 for p in out if f"/{level}/" in p):
            continue  # this level is used up
        out.add(f"/{lay['url']}/{level}/{rng.randrange(cols)}_{rng.randrange(rows)}.{fmt}")
    return sorted(out, key=lambda _: rng.random())


def screen_paths(lay: dict, fmt: str, n: int, rng: random.Random, cols: int = 8, rows: int = 5) -> list[str]:
    """Whole screens (cols × rows tiles, ≈ 2048 × 1280 px) of full-resolution tiles at random places."""
    top = lay["max_level"]
    gc, gr = tiles.tile_grid(lay["width"], lay["height"], 0)
    out: list[str] = []
    while len(out) < n:
        c0, r0 = rng.randrange(gc - cols), rng.randrange(gr - rows)
        out += [f"/{lay['url']}/{top}/{c}_{r}.{fmt}" for r in range(r0, r0 + rows) for c in range(c0, c0 + cols)]
    return out[:n]


def run(store: Path, fmt: str, n: int, clients: int) -> dict:
    rng = random.Random(0)
    res = {}
    for name in ("screen", "full", "session"):
        srv = start(store, port=0, tile_format=fmt)
        try:
            c = http.client.HTTPConnection("127.0.0.1", srv.port)
            c.request("GET", "/info.json")
            lay = {l["name"]: l for l in json.loads(c.getresponse().read())["layers"]}["final"]
            top = lay["max_level"]
            if name == "screen":
                paths = screen_paths(lay, fmt, n, rng)
            else:
                paths = tile_paths(lay, fmt, n, rng, [top] if name == "full" else list(range(8, top + 1)))
            res[name] = fetch_all(srv.port, paths, clients)
            if name == "session":
                res["warm"] = fetch_all(srv.port, paths, clients)
        finally:
            srv.shutdown()
            srv.server_close()
        # the overview below level 8 (≤ 256 px, made by 2×2 means of the stored 1024² level), once
        if name == "session":
            srv = start(store, port=0, tile_format=fmt)
            try:
                res["overview"] = fetch_all(srv.port, [f"/{lay['url']}/{lv}/0_0.{fmt}" for lv in range(0, 8)], 1)
            finally:
                srv.shutdown()
                srv.server_close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--store", type=Path, help="an existing complete store (default: build one)")
    ap.add_argument("--tiles", type=int, default=600, help="tiles per workload")
    ap.add_argument("--clients", type=int, default=6, help="keep-alive connections (a browser opens 6)")
    args = ap.parse_args()
    work = None
    try:
        if args.store:
            from wsigen.slides.store import SlideStore

            store, built = args.store, {}
            args.size = SlideStore.open(store).stages[-1]["width"]
        else:
            work = Path(tempfile.mkdtemp(prefix="wsigen-view-bench-"))
            store = work / "bench.zarr"
            t0 = time.perf_counter()
            built = build_store(store, args.size)
            print(f"built {args.size}² store in {time.perf_counter() - t0:.1f} s")
        out = {"size": args.size, "clients": args.clients, "store": built}
        for fmt in ("jpeg", "png"):
            out[fmt] = run(store, fmt, args.tiles, args.clients)
            for k, v in out[fmt].items():
                print(f"{fmt:4} {k:8} {v['tiles_per_s']:8.1f} tiles/s ({v['tiles']} tiles, {v['mean_kB']} kB each)")
        save(f"view-{args.size}", out)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
