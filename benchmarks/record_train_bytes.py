"""Record the bytes a few fixed-seed, class-free training runs write (weights, optimizer state,
preview), to show a change leaves class-free training as it was.

    .venv/bin/python benchmarks/record_train_bytes.py --out after.json \
        --compare benchmarks/reference/train-bytes-before-classes.json

Three tiny runs on two generated PNGs (4 steps each): in-process patch reading; two loader
processes with two gradient-accumulation micro-batches; stain normalisation to the published
reference. The reference file was recorded at commit 259993f, before class conditioning
(issue 15) touched the training code; ``--compare`` exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FILES = ("model.safetensors", "train-state/model.safetensors", "train-state/ema.safetensors",
         "train-state/optimizer.safetensors", "preview.png")
TINY = dict(patch=16, width=8, mults=(1, 2), batch=4, lr=2e-3, lr_warmup=1, preview_every=3,
            checkpoint_every=1000, slide_mpp=1.0, sample_steps=4, seed=3, device="cpu", dropout=0.2,
            max_steps=4)
RUNS = {"in-process": dict(loader_workers=0),
        "2-loaders-accum-2": dict(loader_workers=2, grad_accum=2),
        "stain-normalised": dict(loader_workers=0, stain_normalise="standard")}


def make_slide(path: Path, seed: int, size: int = 256) -> Path:
    """Pink tissue with round purple nuclei on the left half, glass on the right."""
    import imagecodecs

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (240, 238, 245), np.uint8)
    half = np.array([225, 150, 190]) + rng.normal(0, 12, (size, size // 2, 3))
    yy, xx = np.mgrid[:size, : size // 2]
    for cy, cx in rng.integers(0, size, (60, 2)):
        half[(yy - cy) ** 2 + (xx - cx // 2) ** 2 < 16] = (90, 60, 150)
    img[:, : size // 2] = np.clip(half, 0, 255).astype(np.uint8)
    path.write_bytes(imagecodecs.png_encode(img))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    a = ap.parse_args()
    import torch

    from wsigen.training import train

    torch.set_num_threads(1)
    os.environ["WSIGEN_NO_PROGRESS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="wsigen-train-bytes-"))
    try:
        slides = [make_slide(work / "s.png", 0), make_slide(work / "t.png", 1)]
        results = {}
        for name, kw in RUNS.items():
            out = work / name
            train(slides, out, progress=False, **TINY, **kw)
            results[name] = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in FILES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    n = sum(len(v) for v in results.values())
    print(f"{n} files of {len(results)} runs → {a.out}")
    if a.compare:
        old = json.loads(Path(a.compare).read_text())
        diff = [f"{r}/{f}" for r in sorted(set(old) | set(results))
                for f in FILES if old.get(r, {}).get(f) != results.get(r, {}).get(f)]
        if diff:
            print(f"differ from {a.compare}: {', '.join(diff)}")
            return 1
        print(f"identical to {a.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
