"""Overhead: the share of sampling wall time spent outside denoiser forward passes, with the
default model (or --model). Goal: ≤ 5 %."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import save, timed_denoiser

from wsigen import api
from wsigen.slides import checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    original = checkpoint.load_model
    timed = {}

    def load(spec="default", patch=None):
        lm = original(spec, patch)
        lm.denoiser = timed.setdefault("m", timed_denoiser(lm.denoiser))
        return lm

    checkpoint.load_model = load
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        s = api.sample(d + "/s.zarr", a.size, model=a.model, steps=a.steps, device="auto",
                       threads=a.threads)
        wall = time.perf_counter() - t
    m = timed["m"]
    share = 1 - m.seconds / wall
    print(f"model {a.model}: {s['width']}² in {wall:.1f} s, forward passes {m.seconds:.1f} s "
          f"({m.calls} calls, {s['evaluations']} evaluations); outside the network: {share:.1%} (goal ≤ 5 %)")
    save("overhead", {"model": a.model, "size": s["width"], "wall_s": wall, "forward_s": m.seconds,
                      "overhead_share": share, "evaluations": s["evaluations"], "goal": 0.05})


if __name__ == "__main__":
    main()
