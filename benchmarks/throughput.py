"""Denoiser throughput: patches/s at 512² for the default architecture and a ~30 GFLOP UNet,
per precision, batch size and variant (eager, channels-last, torch.compile), on the device at hand."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import save

from wsigen.run import accel
from wsigen.run.throughput import measure_throughput
from wsigen.slides.checkpoint import build_denoiser, make_config


def configs() -> dict:
    """The bundled default model's architecture, and a UNet of about 30 GFLOP per 512² patch."""
    from wsigen.slides.checkpoint import default_model_path, read_config

    return {
        "default": read_config(default_model_path())["arch"],
        "unet-30gflop": {"name": "unet", "width": 12, "mults": [1, 2, 4, 4], "blocks": 1, "attn_levels": [3]},
    }


def flops(net, patch: int, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, patch, patch, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, torch.tensor([1.0], device=device), torch.tensor([1.0], device=device))
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patch", type=int, default=512)
    ap.add_argument("--batches", default=None, help="comma-separated [default: 1,4 on CPU; 1,8,32 on GPU]")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--variants", default="eager,channels-last,compile",
                    help="comma-separated among eager, channels-last, compile, compile+channels-last")
    ap.add_argument("--precisions", default=None, help="comma-separated [default: fp32,bf16,fp16 on GPU; fp32,bf16]")
    ap.add_argument("--compile-batch", type=int, default=None,
                    help="compiled variants at this one batch size only (each shape compiles anew)")
    ap.add_argument("--compile-precisions", default=None, help="compiled variants at these precisions only")
    ap.add_argument("--configs", default=None, help="comma-separated among default, unet-30gflop [default: both]")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = (a.precisions.split(",") if a.precisions else
                  ["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16"])
    batches = [int(b) for b in (a.batches or ("1,8,32" if dev.type == "cuda" else "1")).split(",")]
    rows = []
    wanted = a.configs.split(",") if a.configs else None
    for name, arch in configs().items():
        if wanted and name not in wanted:
            continue
        base = build_denoiser(make_config(arch, patch=a.patch)).to(dev).eval()
        gf = flops(base, a.patch, dev) / 1e9
        for variant in a.variants.split(","):
            net = accel.prepare(build_denoiser(make_config(arch, patch=a.patch)), dev,
                                channels_last="channels-last" in variant, compile="compile" in variant)
            compiled = "compile" in variant
            for prec in precisions:
                if compiled and a.compile_precisions and prec not in a.compile_precisions.split(","):
                    continue
                for b in ([a.compile_batch] if compiled and a.compile_batch else batches):
                    # the first call of a compiled net compiles it (excluded: measure_throughput warms up)
                    tp = measure_throughput(net, a.patch, b, dev, prec, seconds=a.seconds)
                    rows.append({"config": name, "gflop_per_patch": gf, "precision": prec, "batch": b,
                                 "variant": variant, "patches_per_s": tp, "device": dev.type})
                    print(f"{name:>13} ({gf:6.1f} GFLOP/patch) {variant:>22} {prec} batch {b:>3}: "
                          f"{tp:8.2f} patches/s", flush=True)
    path = save(f"throughput-{dev.type}", {"patch": a.patch, "rows": rows})
    if a.out:
        Path(a.out).write_text(path.read_text())


if __name__ == "__main__":
    main()
