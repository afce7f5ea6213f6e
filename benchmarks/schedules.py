"""Quality of the schedule options against the paper's schedule (issue: a third of the evaluations).

For every setting: denoiser evaluations, wall time and, against ``paper`` on the same seeds, the
last stage's guide PSNR, fixed-grid seam score, radially averaged power spectrum per octave band,
mean colour and Macenko stain vectors; the seed-to-seed spread of ``paper`` itself for scale; and,
for the pure solver changes, the pixel error against Heun N = 160 on a fixed grid at 256².
The default model (64² patches) at 512² over 4 seeds and one 1024² seed (``--quick``: 2 seeds at
256², no 1024², reference Heun N = 80). Also prints the evaluation ratio of ``plan`` at 65536²
(gaussian, M = 512), writes ``benchmarks/results/schedules.json`` and a crop picture.

    .venv/bin/python benchmarks/schedules.py [--quick] [--seeds 4] [--crop docs/img/schedules-crop.png]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from wsigen import api  # noqa: E402
from wsigen.judge import colour, metrics, stains  # noqa: E402
from wsigen.judge.seams import stage_metrics  # noqa: E402
from wsigen.slides.store import SlideStore  # noqa: E402

#: Settings compared with ``paper`` (sample keyword arguments).
SETTINGS = {
    "paper": {"preset": "paper"},
    "fast": {"preset": "fast"},
    "fast, model σ_r": {"solver": "dpmpp2m", "start_sigma": 2.0, "stage_steps": "10,12"},
    "heun N=20": {"steps": 20, "guided_steps": 14, "solver": "heun"},
    "dpmpp2m N=20": {"steps": 20, "guided_steps": 14, "solver": "dpmpp2m"},
    "start σ=2, heun 12": {"solver": "heun", "steps": 40, "start_sigma": 2.0, "stage_steps": "12"},
}
#: Pure solver changes, against Heun N = 160 on a fixed grid (256²).
SOLVER_RUNS = [("heun", 20), ("heun", 40), ("dpmpp2m", 20), ("dpmpp2m", 40), ("euler", 40)]


def last_stage(path) -> np.ndarray:
    s = SlideStore.open(path)
    return s.read_rows(len(s.info["stages"]) - 1, 0, s.info["stages"][-1]["height"])


def spectrum_bands(img: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of the grey image, summed per octave band 1–2, 2–4, … cycles."""
    g = img.astype(np.float64).mean(axis=0)
    g -= g.mean()
    p = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    h, w = g.shape
    yy, xx = np.indices((h, w))
    r = np.hypot(yy - h // 2, xx - w // 2)
    bands, lo = [], 1.0
    while lo * 2 <= min(h, w) / 2:
        sel = (r >= lo) & (r < 2 * lo)
        bands.append(p[sel].mean())
        lo *= 2
    return np.array(bands)


def measure(path, wall: float, evals: int) -> dict:
    s = SlideStore.open(path)
    rows = stage_metrics(s)
    last = rows[-1]
    img = last_stage(path)
    px = colour.tissue_pixels(img.transpose(1, 2, 0)[None], max_pixels=200_000)
    try:
        fit = stains.fit_macenko(px.reshape(-1, 1, 3))
        he = fit.he
    except Exception:  # too little tissue for a stain fit
        he = None
    return {"evaluations": evals, "wall_s": wall, "guide_psnr_db": last["guide_psnr_db"],
            "seam_fixed": (last["seams"] or {}).get("fixed_grid", {}).get("score"),
            "spectrum": spectrum_bands(img).tolist(), "rgb_mean": img.reshape(3, -1).mean(axis=1).tolist(),
            "stain_he": None if he is None else he.tolist()}


def run(work: Path, name: str, opts: dict, size: int, seed: int, **extra) -> dict:
    out = work / f"{name.replace(' ', '_')}-{size}-{seed}.zarr"
    t0 = time.perf_counter()
    s = api.sample(out, size, seed=seed, device="cpu", threads=1, overwrite=True, skip_background=False,
                   **{**opts, **extra})
    return {**measure(out, time.perf_counter() - t0, s["evaluations"]), "path": str(out)}


def compare(r: dict, ref: dict) -> dict:
    """Differences of one run against ``paper`` on the same seed."""
    band = np.array(r["spectrum"]) / np.array(ref["spectrum"])
    d = {"psnr_diff_db": r["guide_psnr_db"] - ref["guide_psnr_db"],
         "band_ratio_worst": float(band[np.argmax(np.abs(band - 1))]),
         "band_ratios": band.round(3).tolist(),
         "colour_diff": float(np.abs(np.array(r["rgb_mean"]) - np.array(ref["rgb_mean"])).max())}
    if r["stain_he"] is not None and ref["stain_he"] is not None:
        a, b = np.array(r["stain_he"]), np.array(ref["stain_he"])
        d["stain_angle_deg"] = max(metrics.angle_deg(a[:, j], b[:, j]) for j in range(2))
    return d


def solver_errors(work: Path, size: int, ref_steps: int) -> dict:
    """Mean |Δ| (grey levels) of the last stage against Heun N = ref_steps, fixed grid, same seed."""
    common = dict(model="default", grid_shift=False)
    ref = last_stage(run(work, f"ref{ref_steps}", {"steps": ref_steps, "guided_steps": round(ref_steps * 0.7)},
                         size, 0, **common)["path"]).astype(np.float64)
    out = {}
    for solver, n in SOLVER_RUNS:
        r = run(work, f"{solver}{n}", {"steps": n, "guided_steps": round(n * 0.7), "solver": solver}, size, 0,
                **common)
        out[f"{solver} N={n}"] = {"evaluations": r["evaluations"],
                                  "mean_abs_grey": float(np.abs(last_stage(r["path"]) - ref).mean())}
    return out


def crop_picture(a_path: str, b_path: str, out: Path, side: int = 256) -> None:
    from PIL import Image

    a, b = last_stage(a_path), last_stage(b_path)
    y, x = (a.shape[1] - side) // 2, (a.shape[2] - side) // 2
    pair = np.concatenate([a[:, y : y + side, x : x + side], np.full((3, side, 8), 255, np.uint8),
                           b[:, y : y + side, x : x + side]], axis=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pair.transpose(1, 2, 0)).resize((2 * (2 * side + 8), 2 * side), Image.NEAREST).save(out)


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds at 256², no 1024², reference Heun N = 80")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--crop", type=Path, default=None, help="side-by-side crop (paper | fast), PNG")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    size, seeds = (256, a.seeds or 2) if a.quick else (512, a.seeds or 4)
    work = a.work or Path(tempfile.mkdtemp(prefix="wsigen-schedules-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    paper_plan = api.plan("65536", model="gaussian", patch=512, preset="paper")["evaluations"]
    fast_plan = api.plan("65536", model="gaussian", patch=512, preset="fast")["evaluations"]
    print(f"plan 65536², gaussian, M = 512: paper {paper_plan:,}, fast {fast_plan:,} "
          f"({fast_plan / paper_plan:.3f}×)")

    runs = {name: [run(work, name, opts, size, s) for s in range(seeds)] for name, opts in SETTINGS.items()}
    big = {}
    if not a.quick:
        big = {name: run(work, name, SETTINGS[name], 1024, 0) for name in ("paper", "fast")}
    solver = solver_errors(work, 128 if a.quick else 256, 80 if a.quick else 160)

    paper = runs["paper"]
    spread = [compare(x, y) for x, y in itertools.combinations(paper, 2)]
    rows = []
    for name, rs in runs.items():
        cmp = [compare(r, p) for r, p in zip(rs, paper, strict=True)] if name != "paper" else spread
        rows.append({
            "setting": name, "evaluations": float(np.mean([r["evaluations"] for r in rs])),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
            "guide_psnr_db": float(np.mean([r["guide_psnr_db"] for r in rs])),
            "seam_fixed": float(np.mean([r["seam_fixed"] for r in rs])),
            "psnr_diff_db": float(np.mean([c["psnr_diff_db"] for c in cmp])) if name != "paper" else None,
            "band_worst": max((c["band_ratio_worst"] for c in cmp), key=lambda v: abs(v - 1)),
            "colour_diff": max(c["colour_diff"] for c in cmp),
            "stain_angle_deg": max((c.get("stain_angle_deg", 0.0) for c in cmp), default=None),
            "per_seed": cmp})
    p_ev = rows[0]["evaluations"]
    print(f"\n{size}², default model, {seeds} seeds; differences against paper on the same seed "
          f"(paper's row: the seed-to-seed spread of paper itself)\n")
    print("| setting | evaluations | × paper | wall s | guide PSNR dB | Δ PSNR dB | fixed-grid seam | "
          "worst spectrum band ratio | max Δ mean colour | max Δ stain angle ° |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['setting']} | {r['evaluations']:,.0f} | {r['evaluations'] / p_ev:.3f} | {r['wall_s']:.1f} | "
              f"{r['guide_psnr_db']:.2f} | {fmt(r['psnr_diff_db'], '+.2f')} | {r['seam_fixed']:.3f} | "
              f"{r['band_worst']:.3f} | {r['colour_diff']:.2f} | {fmt(r['stain_angle_deg'], '.2f')} |")
    if big:
        c = compare(big["fast"], big["paper"])
        print(f"\n1024², seed 0: paper {big['paper']['evaluations']:,} evals {big['paper']['wall_s']:.0f} s, "
              f"PSNR {big['paper']['guide_psnr_db']:.2f}, seam {big['paper']['seam_fixed']:.3f}; fast "
              f"{big['fast']['evaluations']:,} evals {big['fast']['wall_s']:.0f} s, PSNR "
              f"{big['fast']['guide_psnr_db']:.2f}, seam {big['fast']['seam_fixed']:.3f}, worst band "
              f"{c['band_ratio_worst']:.3f}, Δ colour {c['colour_diff']:.2f}")
    print(f"\nsolver error, fixed grid, {128 if a.quick else 256}², mean |Δ| grey levels against Heun "
          f"N = {80 if a.quick else 160}:")
    for k, v in solver.items():
        print(f"  {k:14s} {v['evaluations']:>7,} evals  {v['mean_abs_grey']:.3f}")
    fast = rows[1]
    ok = {"evaluations ≤ 0.35× (plan 65536²)": fast_plan <= 0.35 * paper_plan,
          "guide PSNR within 1 dB": abs(fast["psnr_diff_db"]) <= 1,
          "fixed-grid seam 0.9–1.1": 0.9 <= fast["seam_fixed"] <= 1.1,
          "every band within ±15 %": abs(fast["band_worst"] - 1) <= 0.15,
          "mean colour within 3 grey levels": fast["colour_diff"] <= 3}
    print("\nfast against the targets: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in ok.items()))
    if a.crop:
        crop_picture(paper[0]["path"], runs["fast"][0]["path"], a.crop, side=min(256, size // 2))
        print(f"crop (paper | fast, seed 0) → {a.crop}")
    total = time.perf_counter() - t_all
    print(f"total {total / 60:.1f} min")
    save("schedules-quick" if a.quick else "schedules",
         {"size": size, "seeds": seeds, "plan_65536": {"paper": paper_plan, "fast": fast_plan},
          "rows": rows, "big": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in big.items()},
          "solver_errors": solver, "targets_met": ok, "total_s": total})


if __name__ == "__main__":
    main()
