"""DICOM export benchmark: a 16384² store → DICOM WSI (JPEG baseline, JPEG-LS and JPEG 2000
lossless) beside wsigen's JPEG OME-TIFF, each in a child process of its own (wall, CPU, bytes,
peak RSS). The store is benchmarks/export.py's synthetic tissue (no sampling).

    .venv/bin/python benchmarks/export_dicom.py                    # 16384² → results/export-dicom-16384.json
    .venv/bin/python benchmarks/export_dicom.py --size 65536 --big --only dicom-jpeg   # ~20 GB disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import build_store, cpu_seconds, peak_rss  # noqa: E402  (the same store and meters)

ROOT = Path(__file__).resolve().parent
RUNS = {"ome-tiff-jpeg": ("ome-tiff", "jpeg"), "dicom-jpeg": ("dicom", "jpeg"),
        "dicom-jpegls": ("dicom", "jpegls"), "dicom-jpeg2000": ("dicom", "jpeg2000")}


def child(store: str, out: str, fmt: str, compression: str, workers: int) -> dict:
    import pydicom  # noqa: F401  (imports outside the clock)
    import wsidicom  # noqa: F401

    from wsigen.slides.exporting import export

    c0, t0 = cpu_seconds(), time.perf_counter()
    r = export(store, out, format=fmt, compression=compression, quality=90, workers=workers or None,
               overwrite=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(cpu_seconds() - c0, 2),
            "bytes": r["bytes"], "levels": r["levels"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        store, out, fmt, compression, workers = sys.argv[2:7]
        d = child(store, out, fmt, compression, int(workers))
        d["peak_rss_bytes"] = peak_rss()
        print(json.dumps(d))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=0, help="encoder threads (0: wsigen's default)")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--big", action="store_true", help="allow sizes above 16384")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one]")
    a = ap.parse_args()
    if a.size > 16384 and not a.big:
        raise SystemExit("sizes above 16384 need --big (about 20 GB of disk at 65536²)")
    work = a.work or Path(tempfile.mkdtemp(prefix="wsigen-bench-dicom-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = work / "bench.zarr"
        print(f"building a {a.size}² store in {work} …", file=sys.stderr)
        build = build_store(store, a.size)
        results = {}
        for name in a.only:
            fmt, comp = RUNS[name]
            out = work / (name + (".ome.tif" if fmt == "ome-tiff" else ""))
            r = subprocess.run([sys.executable, __file__, "_child", str(store), str(out), fmt, comp,
                                str(a.workers)], capture_output=True, text=True, check=False)
            if r.returncode:
                raise SystemExit(f"{name} failed:\n{r.stderr}")
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        import wsidicom

        result = {"benchmark": "export-dicom", "size": a.size, "store": build, "runs": results,
                  "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
                  "versions": {"wsidicom": wsidicom.__version__}, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = ROOT / "results" / f"export-dicom-{a.size}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        for name, r in results.items():
            print(f"| {name} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['bytes'] / 1e6:,.0f} MB | "
                  f"{r['peak_rss_bytes'] / 1e6:,.0f} MB |")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
