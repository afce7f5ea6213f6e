"""--state-dtype float16 against float32: error of the final image and state memory, one run each.

Same model, size, seed and options; only the dtype the state is held in between steps differs.
Reports PSNR, mean and max absolute difference of the final uint8 image, the fraction of pixels
that differ, and the state bytes per pixel.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import save

from wsigen import api
from wsigen.slides.store import SlideStore


def final(out: Path) -> np.ndarray:
    s = SlideStore.open(out)
    return np.asarray(s.stage_array(len(s.info["stages"]) - 1)[:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", default="256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    images, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in ("float32", "float16"):
            out = Path(tmp) / f"{dt}.zarr"
            t0 = time.perf_counter()
            api.sample(out, a.size, model=a.model, seed=a.seed, state_dtype=dt, threads=a.threads,
                       checkpoint_every=0)
            walls[dt] = time.perf_counter() - t0
            images[dt] = final(out)
    x, y = (images[k].astype(np.float64) for k in ("float32", "float16"))
    diff = np.abs(x - y)
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    res = {"model": a.model, "size": a.size, "seed": a.seed, "psnr_db": psnr,
           "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
           "fraction_differing": float((diff > 0).mean()), "state_bytes_per_px": {"float32": 12, "float16": 6},
           "wall_s": walls}
    print(f"{a.model} {a.size}: float16 state vs float32 — PSNR {psnr:.1f} dB, mean |Δ| {diff.mean():.3f}, "
          f"max |Δ| {diff.max():.0f} grey levels, {100 * (diff > 0).mean():.1f} % of values differ; "
          f"state 6 vs 12 bytes/px; wall {walls['float16']:.1f} s vs {walls['float32']:.1f} s")
    save("state_dtype", res)


if __name__ == "__main__":
    main()
