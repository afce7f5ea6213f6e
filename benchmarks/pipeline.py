"""Pipeline cost: seconds per step of a 4096² stage with the analytic Gaussian model (patch 64)
divided by the time to read and write the float32 state once with numpy. Goal: ≤ 10×."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import save

from wsigen.method.canvas import GuideBand
from wsigen.method.cascade import diffuse, initial_band
from wsigen.method.stages import Settings, StageContext
from wsigen.nets import GaussianDenoiser
from wsigen.run import accel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-malloc-tune", action="store_true", help="glibc's default allocator settings")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.no_malloc_tune:
        accel.tune_host_allocator()  # as `wsigen sample` does
    h = w = a.size
    s = Settings(steps=a.steps, guided_steps=a.steps, batch=a.batch, skip_background=False)
    ctx = StageContext(GaussianDenoiser(), s, 0, 6, h, w, 1.0, 64, 2, (0.9, 0.9, 0.9), torch.device("cpu"))
    guide = GuideBand(0, h // 2, np.random.default_rng(0).integers(0, 255, (3, h // 2, w // 2), dtype=np.uint8))
    band = initial_band(ctx, 0, h)
    t0 = time.perf_counter()
    diffuse(ctx, band, guide)
    per_step = (time.perf_counter() - t0) / a.steps
    x = band.data.numpy()
    y = np.empty_like(x)
    y[:] = x  # touch the pages first
    io = min(_timed(lambda: np.copyto(y, x)) for _ in range(3))
    ratio = per_step / io
    print(f"{a.size}² stage, patch 64, gaussian: {per_step:.3f} s/step; numpy read+write of the "
          f"{x.nbytes / 1e6:.0f} MB state: {io:.4f} s; ratio {ratio:.1f}× (goal ≤ 10×)")
    save("pipeline", {"size": a.size, "seconds_per_step": per_step, "numpy_read_write_s": io,
                      "ratio": ratio, "patches_per_step": ctx.stats["patches"] / a.steps, "goal": 10})


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
