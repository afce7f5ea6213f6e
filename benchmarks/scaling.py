"""Scaling: time per output megapixel and peak RSS above the post-import baseline at
1024² … 8192² (Gaussian model, patch 64), each size in a fresh process, start-up excluded
(a 128² warm-up sample first: lazy imports, codec and thread pools); sizes up to 2048² take the
best of 3 runs, since a 1024² run lasts well under a second.
Goals: time per megapixel flat within ±20 %; RSS ≤ 1.5 × state bytes + 100 MB."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import save

CHILD = r"""
import json, sys, time, tempfile, resource
import torch
import wsigen.api as api
torch.set_num_threads(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size, steps, repeat = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
walls = []
with tempfile.TemporaryDirectory() as d:
    api.sample(d + "/warm.zarr", 128, model="gaussian", patch=64, steps=steps, device="cpu",
               skip_background=False)
    for i in range(repeat):
        t = time.perf_counter()
        s = api.sample(d + f"/s{i}.zarr", size, model="gaussian", patch=64, steps=steps, device="cpu",
                       skip_background=False)
        walls.append(time.perf_counter() - t)
wall = min(walls)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"size": size, "wall_s": wall, "walls_s": walls, "rss_above_baseline": peak - base,
                  "state_bytes": 3 * size * size * 4, "evaluations": s["evaluations"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    rows = []
    for size in (int(v) for v in a.sizes.split(",")):
        repeat = 3 if size <= 2048 else 1
        out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(a.steps), str(repeat)],
                             capture_output=True,
                             text=True, check=True, cwd=tempfile.gettempdir(),
                             env={**__import__("os").environ, "WSIGEN_NO_PROGRESS": "1"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["s_per_mpx"] = r["wall_s"] / (size * size / 1e6)
        r["rss_goal"] = 1.5 * r["state_bytes"] + 100e6
        rows.append(r)
        print(f"{size:>6}²: {r['wall_s']:7.2f} s, {r['s_per_mpx']:.3f} s/Mpx, peak RSS +"
              f"{r['rss_above_baseline'] / 1e6:,.0f} MB (goal ≤ {r['rss_goal'] / 1e6:,.0f} MB)")
    per = [r["s_per_mpx"] for r in rows]
    spread = max(per) / min(per)
    print(f"time per megapixel: max/min = {spread:.2f} (goal ≤ 1.2/0.8 = 1.5)")
    save("scaling", {"steps": a.steps, "rows": rows, "s_per_mpx_max_over_min": spread})


if __name__ == "__main__":
    main()
