"""One real slide on the device, beside what ``plan`` predicts for it (issue 19).

Samples ``--size``² with ``--model`` through ``wsigen.sample`` and records the wall time, network
evaluations per second, the share of the wall time outside the network's forward passes (each
pass timed with a device synchronisation: an upper bound on the network's share), the peak GPU
memory, and ``wsigen.plan``'s estimate for the same slide at the measured rate; then the
65536² estimate on ``--gpus`` GPUs at that rate — a model, since one GPU cannot test NCCL.

    python benchmarks/gpu/sample.py --model M --size 8192 --precision bf16 --out sample.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import timed_denoiser  # noqa: E402

import wsigen  # noqa: E402
from wsigen.slides import checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=4, help="GPUs of the 65536² estimate")
    ap.add_argument("--class-name", default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    original, timed = checkpoint.load_model, {}

    def load(spec="default", patch=None):
        lm = original(spec, patch)
        lm.denoiser = timed.setdefault("m", timed_denoiser(lm.denoiser))
        return lm

    checkpoint.load_model = load
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cls = {"class_name": a.class_name, "guidance": a.guidance} if a.class_name else {}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        s = wsigen.sample(Path(d) / "s.zarr", a.size, model=a.model, mpp=a.mpp, steps=a.steps, batch=a.batch,
                          precision=a.precision, device=a.device, **cls)
        wall = time.perf_counter() - t
    checkpoint.load_model = original
    m = timed["m"]
    rate = s["evaluations"] / wall
    plan_kw = dict(model=a.model, mpp=a.mpp, steps=a.steps, batch=a.batch, guidance=a.guidance if cls else None)
    here = wsigen.plan(a.size, throughput=rate, **plan_kw)
    big = wsigen.plan(65536, world=a.gpus, throughput=rate, **plan_kw)
    row = {
        "size": a.size, "model": a.model, "precision": a.precision, "batch": a.batch, "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None, **cls,
        "wall_s": round(wall, 3), "evaluations": s["evaluations"], "evaluations_per_s": round(rate, 2),
        "network_s": round(m.seconds, 3), "network_calls": m.calls,
        "network_evaluations_per_s": round(s["evaluations"] / max(m.seconds, 1e-9), 2),
        "outside_network_share": round(1 - m.seconds / wall, 4),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "plan_evaluations": here["evaluations"], "plan_estimated_s": round(here["estimated_seconds"], 3),
        "plan_65536": {"gpus": a.gpus, "evaluations": big["evaluations"],
                       "estimated_s": round(big["estimated_seconds"], 1),
                       "note": "a model: the measured single-GPU rate over the 65536² plan; NCCL and "
                               f"--gpus {a.gpus} were not run"},
    }
    Path(a.out).write_text(json.dumps(row, indent=2))
    print(f"{a.size}² on {a.device} ({a.precision}, batch {a.batch}): {wall:.1f} s, {rate:,.1f} evaluations/s "
          f"({row['network_evaluations_per_s']:,.1f} inside the network), {row['outside_network_share']:.1%} "
          f"outside the network, peak GPU memory {(row['peak_gpu_memory_bytes'] or 0) / 2**30:.2f} GiB; "
          f"plan: {here['evaluations']:,} evaluations (run: {s['evaluations']:,}); 65536² on {a.gpus} GPUs at this "
          f"rate: {big['estimated_seconds'] / 3600:.2f} h (a model)")
    if here["evaluations"] != s["evaluations"]:
        raise SystemExit("plan and the run disagree on the evaluations")


if __name__ == "__main__":
    main()
