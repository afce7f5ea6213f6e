"""Training throughput of the named networks: images/s of full optimizer steps (EDM loss,
backward, AdamW) on in-memory batches, so the figure is the model's, not the loader's.

For each ``--arch`` (default ``small`` and ``paper``) it runs warm-up steps, then as many steps
as fit in ``--seconds`` (at least one), and prints images/s. On the CPU the default budget keeps
the whole run near 5 minutes (``paper`` at 512² takes tens of seconds per image there); on a GPU
pass ``--device cuda --precision bf16`` (benchmarks/gpu/train.sh does).

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --arch paper --device cuda --precision bf16 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def measure(arch: str, batch: int, device: str, precision: str, seconds: float, warmup: int) -> dict:
    from wsigen.method import edm
    from wsigen.method.edm import EDMPrecond
    from wsigen.nets import UNet, archs

    a = archs.resolve(arch)
    torch.manual_seed(0)
    net = EDMPrecond(UNet(a.net), sigma_data=0.5).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(batch, 3, a.patch, a.patch, device=device, generator=g) * 2 - 1
    s = torch.full((batch,), 1.0, device=device)

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = edm.edm_loss(net, x, s, g)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    net.train()
    for _ in range(warmup):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        step()
        sync()
        n += 1
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    out = {"arch": arch, "patch": a.patch, "batch": batch, "device": device, "precision": precision,
           "parameters": params, "steps": n, "seconds": round(dt, 2),
           "images_per_s": round(n * batch / dt, 3)}
    if torch.device(device).type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="small, paper or FILE.json (repeatable)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 16 small, 1 paper on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                    help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per arch (default 60 CPU, 30 GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 GPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    seconds = args.seconds if args.seconds is not None else (30.0 if cuda else 60.0)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    rows = []
    for arch in args.arch or ["small", "paper"]:
        batch = args.batch or (16 if arch == "small" or cuda else 1)
        r = measure(arch, batch, args.device, precision, seconds, warmup)
        rows.append(r)
        if not args.json:
            print(f"{arch:6s} {r['patch']}² batch {batch} {precision} on {args.device}: "
                  f"{r['images_per_s']:.3f} images/s ({r['steps']} steps in {r['seconds']} s, "
                  f"{r['parameters']:,} parameters)", flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "runs": rows}))


if __name__ == "__main__":
    main()
