"""Record the array bytes of a few fixed runs (every chunk of every level and stage, never zarr.json).

Used around refactors that must not change behaviour (issue: one coherent shape): run it before and
after the change and compare the two JSON files — ``--compare OLD.json`` exits 1 on any difference.

    .venv/bin/python benchmarks/record_bytes.py --out before.json
    .venv/bin/python benchmarks/record_bytes.py --out after.json --compare before.json

The tiny UNet is made once by ``wsigen model init`` into ``--work`` and reused when it is there,
so both runs use the same weights even if the initialiser changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def chunk_hashes(store: Path) -> dict[str, str]:
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file() and p.name != "zarr.json" and "/c/" in f"/{p.relative_to(store).as_posix()}":
            out[p.relative_to(store).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def wsigen(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from wsigen.cli import main; main()", *args]
    e = {**os.environ, "WSIGEN_NO_PROGRESS": "1", **(env or {})}
    r = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)}\n{r.stderr}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/wsigen-record-bytes")
    ap.add_argument("--compare")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny.safetensors"
    if not tiny.exists():
        wsigen("model", "init", "-o", str(tiny), "--width", "8", "--mults", "1,2", "--patch", "32",
               "--mpp-min", "0.25", "--mpp-max", "256", "--final-mpp", "2", "--steps", "6",
               "--guided-steps", "4", "--seed", "3")
    png = work / "small.png"
    if not png.exists():
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(5)
        img = (rng.random((48, 40, 3)) * 60 + 150).astype("uint8")
        Image.fromarray(img).save(png)
    runs: dict[str, list[list[str]]] = {
        "gaussian-1": [["sample", "--model", "gaussian", "--patch", "64", "--size", "384x320", "--mpp", "1",
                        "--steps", "6", "--threads", "1", "--seed", "2"]],
        "gaussian-2w": [["sample", "--model", "gaussian", "--patch", "64", "--size", "384x320", "--mpp", "1",
                         "--steps", "6", "--threads", "1", "--seed", "2", "--workers", "2", "--device", "cpu"]],
        "tiny-1": [["sample", "--model", str(tiny), "--size", "160", "--threads", "1", "--seed", "4"]],
        "tiny-2w": [["sample", "--model", str(tiny), "--size", "160", "--threads", "1", "--seed", "4",
                     "--workers", "2", "--device", "cpu"]],
        "tiny-fp16state": [["sample", "--model", str(tiny), "--size", "160", "--threads", "1", "--seed", "9",
                            "--state-dtype", "float16", "--no-channels-last", "--batch", "3"]],
        "upscale": [["upscale", str(png), "--model", str(tiny), "--mpp", "8", "--factor", "4", "--threads", "1",
                     "--seed", "1"]],
        "upscale-2w": [["upscale", str(png), "--model", str(tiny), "--mpp", "8", "--factor", "4", "--threads", "1",
                        "--seed", "1", "--workers", "2", "--device", "cpu"]],
    }
    results: dict[str, dict[str, str]] = {}
    for name, cmds in runs.items():
        out = work / f"{name}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        for c in cmds:
            wsigen(*c, "-o", str(out))
        results[name] = chunk_hashes(out)
    # interrupted (SIGKILL at the 9th step) and resumed, with a mid-stage checkpoint every 2 steps
    out = work / "resumed.zarr"
    shutil.rmtree(out, ignore_errors=True)
    base = ["sample", "--model", str(tiny), "--size", "160", "--threads", "1", "--seed", "4",
            "--checkpoint-every", "2", "-o", str(out)]
    r = wsigen(*base, env={"WSIGEN_FAULT": "step:9"}, check=False)
    if r.returncode == 0:
        raise SystemExit("the fault did not fire")
    wsigen("sample", "--resume", "-o", str(out))
    results["tiny-killed-resumed"] = chunk_hashes(out)
    if results["tiny-killed-resumed"] != results["tiny-1"]:
        raise SystemExit("killed-and-resumed differs from the uninterrupted run")
    Path(a.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{sum(len(v) for v in results.values())} chunks in {len(results)} runs → {a.out}")
    if a.compare:
        old = json.loads(Path(a.compare).read_text())
        bad = [f"{run}/{p}" for run in old for p in set(old[run]) | set(results.get(run, {}))
               if old[run].get(p) != results.get(run, {}).get(p)]
        if bad or set(old) != set(results):
            print(f"DIFFERENT: {len(bad)} chunks, e.g. {bad[:5]}")
            raise SystemExit(1)
        print("identical to", a.compare)


if __name__ == "__main__":
    main()
