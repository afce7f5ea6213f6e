"""Store I/O beside the compute: the serial path (WSIGEN_OVERLAP=0) against the overlapped one
(threaded noise fill, conversion and chunk writes, guide prefetch, stage l written behind
stage l+1) for a whole multi-stage run, Gaussian model, patch 64.

Each run is a fresh child process, the two modes alternating; the best of ``--repeat`` is kept.
Measured in the child: wall of ``api.sample`` (start-up excluded), time inside ``diffuse``
(compute), the stage transitions (everything between two stages' compute: noise fill, guide,
conversion and writes of the last stage, completion records), the tail (last stage's writes and
the pyramid) and peak RSS above the post-import baseline. Then, in this process, the two pieces
on their own at the final size: noise fill and the writing of one stage, 1 thread against
``io_workers()``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import save

CHILD = r"""
import json, resource, sys, tempfile, time
import torch
import wsigen.api as api
from wsigen.run import sampler, stageio
torch.set_num_threads(int(sys.argv[3]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size, steps, device, idle = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4], float(sys.argv[5])
if idle:  # stand-in for an accelerator: every denoiser call also waits, CPU idle and GIL free
    from wsigen.slides import checkpoint
    load = checkpoint.load_model

    def load_model(*a, **k):
        lm = load(*a, **k)
        lm.denoiser.register_forward_hook(lambda *_: time.sleep(idle / 1000))
        return lm

    checkpoint.load_model = load_model
spans = []
real = sampler.diffuse

def diffuse(ctx, *a, **k):
    t = time.perf_counter()
    try:
        return real(ctx, *a, **k)
    finally:
        spans.append((ctx.stage, t, time.perf_counter()))

sampler.diffuse = diffuse
with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    s = api.sample(d + "/s.zarr", size, model="gaussian", patch=64, steps=steps, device=device,
                   skip_background=False, checkpoint_every=0)
    t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
compute = sum(b - a for _, a, b in spans)
gaps = [spans[0][1] - t0] + [spans[i][1] - spans[i - 1][2] for i in range(1, len(spans))]
print(json.dumps({"wall_s": t1 - t0, "compute_s": compute, "transitions_s": sum(gaps),
                  "transition_s_per_stage": gaps, "tail_s": t1 - spans[-1][2],
                  "stages": len(spans), "rss_above_baseline": peak - base,
                  "state_bytes": 3 * size * size * 4, "evaluations": s["evaluations"]}))
"""


def child(size: int, steps: int, threads: int, device: str, idle_ms: float, overlap: bool) -> dict:
    env = {**os.environ, "WSIGEN_NO_PROGRESS": "1", "WSIGEN_OVERLAP": "1" if overlap else "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(steps), str(threads), device,
                          str(idle_ms)],
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pieces(size: int, repeat: int, threads: int) -> dict:
    """Noise fill and the writing of a size² stage alone: 1 thread vs io_workers()."""
    import torch

    from wsigen.method.canvas import Band
    from wsigen.method.stages import Settings, StageContext
    from wsigen.nets import GaussianDenoiser
    from wsigen.run import sampler, stageio
    from wsigen.slides.store import SlideStore

    torch.set_num_threads(threads)  # as in the runs (intra-op threads would compete with the pool's)
    s = Settings(steps=8, guided_steps=6).validate()
    ctx = StageContext(denoiser=GaussianDenoiser(), settings=s, seed=0, stage=0, height=size, width=size,
                       mpp=1.0, patch=64, k=2, background=(0.9, 0.9, 0.9), device=torch.device("cpu"))
    band = Band(size, size, 0, size, torch.empty(3, size, size))
    band.data.uniform_(-1, 1)
    n = stageio.io_workers()
    out = {"io_workers": n}
    with tempfile.TemporaryDirectory() as d:
        info = {"torch_version": "", "config": {}, "key": {}, "model": {"name": "bench"}, "seed": 0,
                "mpp_per_stage": [1.0]}
        store = SlideStore.create(d + "/w.zarr", stages=[{"index": 0, "height": size, "width": size,
                                                           "mpp": 1.0}], final=(size, size), info=info)
        for name, fn in (("noise_fill", lambda w: stageio.fill_noise(ctx, band, w)),
                         ("stage_write", lambda w: stageio.write_stage(store, ctx, band, True, (size, size),
                                                                       sampler.Topology(), w))):
            for w in (1, n):
                best = min(_timed(fn, w) for _ in range(repeat))
                out[f"{name}_s_{'serial' if w == 1 else 'threads'}"] = best
            out[f"{name}_speedup"] = out[f"{name}_s_serial"] / out[f"{name}_s_threads"]
    return out


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the compute")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (the compute; I/O is on the CPU)")
    ap.add_argument("--idle-ms", type=float, default=0.0,
                    help="make every denoiser call also sleep this long (CPU idle, GIL released): a "
                         "stand-in for an accelerator on a machine without one")
    a = ap.parse_args()
    runs = {"serial": [], "overlap": []}
    for _ in range(a.repeat):
        for mode in runs:
            r = child(a.size, a.steps, a.threads, a.device, a.idle_ms, mode == "overlap")
            runs[mode].append(r)
            print(f"{mode:>8}: wall {r['wall_s']:6.2f} s, compute {r['compute_s']:6.2f} s, transitions "
                  f"{r['transitions_s']:5.2f} s, tail {r['tail_s']:5.2f} s, peak RSS +"
                  f"{r['rss_above_baseline'] / 1e6:,.0f} MB")
    # best of the repeats, each figure on its own
    fastest = {m: {k: min(r[k] for r in rs) for k in ("wall_s", "transitions_s", "tail_s", "compute_s")}
               for m, rs in runs.items()}
    ratios = {k: fastest["serial"][k] / fastest["overlap"][k] for k in ("wall_s", "transitions_s", "tail_s")}
    rss = {m: max(r["rss_above_baseline"] for r in rs) for m, rs in runs.items()}
    goal = 1.5 * runs["serial"][0]["state_bytes"] + 100e6
    print(f"{a.size}², {a.steps} steps, {runs['serial'][0]['stages']} stages, idle {a.idle_ms:g} ms per call, "
          f"best of {a.repeat}: "
          f"serial / overlapped = {ratios['wall_s']:.2f}× whole run, "
          f"{ratios['transitions_s']:.2f}× stage transitions, {ratios['tail_s']:.2f}× tail")
    print(f"peak RSS above baseline: serial {rss['serial'] / 1e6:,.0f} MB, overlapped "
          f"{rss['overlap'] / 1e6:,.0f} MB (goal ≤ {goal / 1e6:,.0f} MB)")
    p = pieces(a.size, a.repeat, a.threads)
    print(f"alone at {a.size}²: noise fill {p['noise_fill_s_serial']:.2f} → {p['noise_fill_s_threads']:.2f} s "
          f"({p['noise_fill_speedup']:.2f}×), stage write {p['stage_write_s_serial']:.2f} → "
          f"{p['stage_write_s_threads']:.2f} s ({p['stage_write_speedup']:.2f}×) with {p['io_workers']} threads")
    name = f"io_overlap-{a.size}" + (f"-idle{a.idle_ms:g}ms" if a.idle_ms else "")
    save(name, {"size": a.size, "steps": a.steps, "threads": a.threads, "device": a.device,
                "idle_ms": a.idle_ms, "repeat": a.repeat, "runs": runs, "best": fastest, "ratios": ratios,
                "peak_rss_above_baseline": rss, "rss_goal": goal, "pieces": p})


if __name__ == "__main__":
    main()
