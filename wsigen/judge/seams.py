"""Checks of the cascade itself in a wsigen store, per stage: seam scores on the fixed grid and on the
shifted grids the steps used, and how closely each stage's k×k means match its guide (PSNR).

Large stages are judged on a keyed random sample of whole-chunk row bands.
"""

from __future__ import annotations

import math

import numpy as np

from ..method import gridshift, schedules
from . import Progress, metrics


def _bands(height: int, band: int, budget_rows: int, key: list[int]) -> list[int]:
    starts = list(range(0, height, band))
    keep = max(1, budget_rows // band)
    if keep >= len(starts):
        return starts
    rng = np.random.default_rng(np.random.SeedSequence(key))
    return sorted(rng.choice(starts, keep, replace=False).tolist())


def stage_metrics(store, max_pixels: int = 2**26, progress: Progress | None = None,
                  band: int | None = None) -> list[dict]:
    """Seam scores (fixed grid and last step's grid) and guide PSNR for every stored stage."""
    info = store.info
    cfg = info.get("config") or {}
    m = int(cfg.get("patch") or 0)
    k = int(((info.get("model") or {}).get("config") or {}).get("k", 2))
    seed, base_steps = int(cfg.get("seed", 0)), int(cfg.get("steps", 0))
    stage_steps = tuple(cfg["stage_steps"]) if cfg.get("stage_steps") else None
    shift = bool(cfg.get("grid_shift", True))
    stages = info["stages"]
    out = []
    for st in stages:
        l = st["index"]
        row = {"stage": l, "mpp": st["mpp"], "height": st["height"], "width": st["width"]}
        name = store.stage_name(l)
        if name not in store.group:
            row["note"] = "not stored (dropped)"
            out.append(row)
            continue
        arr = store.group[name]
        _, h, w = arr.shape
        row.update(height=h, width=w)
        rows_per = math.lcm(band or arr.chunks[1], k)  # whole chunks, whole k×k pooling blocks
        starts = _bands(h, rows_per, max(rows_per, max_pixels // max(w, 1)), [seed, 0x5EA, l])
        row["sampled_rows"] = round(min(1.0, len(starts) * rows_per / h), 4)
        # each stage's own step count (--stage-steps; stores without it: N for every stage)
        steps = schedules.stage_step_count(base_steps, stage_steps, l, len(stages) - 1)
        # stage 0 is one unshifted patch; the last step is N − 1
        last = gridshift.grid_offset(seed, l, steps - 1, m, k, shift and l > 0) if m and steps else (0, 0)
        grids = {"fixed_grid": (0, 0), "last_step_grid": last}
        if m and steps and l > 0 and shift:  # every step's grid: seams left by any one step
            grids |= {f"step {i}": gridshift.grid_offset(seed, l, i, m, k) for i in range(steps)}
        seams = metrics.SeamCounter(h, w, m, grids, k, levels=l) if m and l > 0 else None
        prev_name = store.stage_name(l - 1) if l > 0 else None
        guide = store.group[prev_name] if prev_name and prev_name in store.group else None
        se, n = 0.0, 0
        for j, y0 in enumerate(starts):
            rows = np.asarray(arr[:, y0 : y0 + rows_per, :])
            if seams is not None:
                seams.add(rows, y0)
            if guide is not None:
                _, gh, gw = guide.shape
                ph, pw = min(rows.shape[1] // k, gh - y0 // k), min(w // k, gw)
                if ph > 0 and pw > 0:
                    pooled = metrics.avgpool(rows[:, : ph * k, : pw * k], k)
                    g = np.asarray(guide[:, y0 // k : y0 // k + ph, :pw]).astype(np.float64)
                    se += float(((pooled - g) ** 2).sum())
                    n += pooled.size
            if progress:
                progress(f"stage {l}", j + 1, len(starts))
        if seams is not None:
            sc = seams.scores()
            row["seams"] = {"fixed_grid": sc["fixed_grid"],
                            "last_step_grid": {**sc["last_step_grid"], "offset": list(last)}}
            per_step = [(i, sc[f"step {i}"]) for i in range(steps) if f"step {i}" in sc]
            per_step = [(i, v) for i, v in per_step if v["score"] is not None]
            if per_step:
                i, worst = max(per_step, key=lambda t: t[1]["score"])
                row["seams"]["worst_step_grid"] = {**worst, "step": i,
                                                   "offset": list(grids[f"step {i}"])}
                row["seams"]["mean_step_score"] = float(np.mean([v["score"] for _, v in per_step]))
        else:
            row["seams"] = None
            row["note"] = "one patch (no grid lines)" if l == 0 else "patch size unknown"
        row["guide_psnr_db"] = metrics.psnr(se / n) if n else None
        out.append(row)
    return out
