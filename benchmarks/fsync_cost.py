"""What the durable marks cost: time in the fsyncs of a run, with and without ``fsync`` (issue 17).

    .venv/bin/python benchmarks/fsync_cost.py 4096 --work /tmp/fsync-bench

Times ``SlideStore.sync_rows``, ``sync_dirs`` and ``durable.write_json`` inside ``api.sample`` with
the analytic (gaussian) denoiser, alternating ``fsync=False`` / ``True``; prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

from wsigen import api
from wsigen.slides import durable
from wsigen.slides import store as st


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("size", type=int)
    ap.add_argument("--work", default="/tmp/wsigen-fsync-bench")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cost: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                cost[name] += time.perf_counter() - t
        return wrapper

    st.SlideStore.sync_rows = timed("sync_rows", st.SlideStore.sync_rows)
    st.SlideStore.sync_dirs = timed("sync_dirs", st.SlideStore.sync_dirs)
    durable.write_json = timed("write_json", durable.write_json)
    out = Path(a.work) / f"{a.size}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    for fsync in (False, True) * a.repeats:
        shutil.rmtree(out, ignore_errors=True)
        cost.clear()
        t = time.perf_counter()
        s = api.sample(out, a.size, model="gaussian", patch=64, steps=2, device="cpu", fsync=fsync,
                       checkpoint_every=0)
        print(json.dumps({"size": a.size, "fsync": fsync, "wall_s": round(time.perf_counter() - t, 2),
                          "stages": s["stages"], "fsync_s": {k: round(v, 3) for k, v in cost.items()},
                          "disk_MB": round(st.SlideStore.open(out).disk_bytes() / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
