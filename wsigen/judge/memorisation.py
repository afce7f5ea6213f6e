"""The memorisation audit: each generated patch's nearest training patches against a held-out real
patch's, in pixel space (and feature space with a network), and the figure of the closest pairs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..slides import readers
from . import metrics
from .drawing import draw_text, load_font
from .features import device_for, extract_features
from .options import Options
from .patches import PatchSet, footprint, sample_patches
from .tissue import tissue_map

PIXEL_SIDE = 32  # pixel-space distances compare patches area-averaged to at most this side


def pixel_vectors(images: np.ndarray, side: int = PIXEL_SIDE) -> np.ndarray:
    """Patches as vectors, area-averaged to at most ``side`` px per side, float32 in 0…255."""
    n, s = images.shape[0], images.shape[1]
    if s <= side:
        return images.reshape(n, -1).astype(np.float32)
    out = np.stack([readers.area_resize(im, (0, 0, s, s), side, side) for im in images])
    return out.reshape(n, -1).astype(np.float32)


def nearest(queries: np.ndarray, base: np.ndarray, n: int = 50,
            block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Distances to, and indices of, each query's ``n`` nearest neighbours in ``base``, nearest first."""
    n = min(n, len(base))
    dist = np.empty((len(queries), n))
    idx = np.empty((len(queries), n), np.int64)
    for i in range(0, len(queries), block):
        d = metrics.pairwise_distances(queries[i : i + block], base)
        if n < d.shape[1]:
            part = np.argpartition(d, n - 1, axis=1)[:, :n]
        else:
            part = np.tile(np.arange(d.shape[1]), (len(d), 1))
        dp = np.take_along_axis(d, part, axis=1)
        order = np.argsort(dp, axis=1)
        idx[i : i + block] = np.take_along_axis(part, order, axis=1)
        dist[i : i + block] = np.take_along_axis(dp, order, axis=1)
    return dist, idx


def _stats(v: np.ndarray) -> dict:
    return {"min": float(v.min()), "p05": float(np.percentile(v, 5)), "median": float(np.median(v))}


def nn_summary(d_gen: np.ndarray, d_held: np.ndarray) -> dict:
    """Generated → training vs held-out → training, from each query's sorted k-NN distances.

    ``distance``: to the nearest training patch. ``relative``: that distance over the mean
    distance to the k nearest (Carlini et al. 2023): a copy is much closer to its source than to
    anything else (≪ 1), while a bland patch, close to everything in L2, stays near 1. A
    generated patch is a *near copy* when its relative distance is below every held-out real
    patch's and below ¾ of their median; one near copy flags the set.
    """
    rg = d_gen[:, 0] / np.maximum(d_gen.mean(axis=1), 1e-12)
    rh = d_held[:, 0] / np.maximum(d_held.mean(axis=1), 1e-12)
    threshold = float(min(rh.min(), 0.75 * np.median(rh)))
    copies = int((rg < threshold).sum())
    return {
        "k": int(d_gen.shape[1]),
        "distance": {"generated": _stats(d_gen[:, 0]), "held_out": _stats(d_held[:, 0]),
                     "median_ratio": float(np.median(d_gen[:, 0]) / max(np.median(d_held[:, 0]), 1e-12))},
        "relative": {"generated": _stats(rg), "held_out": _stats(rh), "threshold": threshold},
        "fraction_below_held_out_p05": float((rg < np.percentile(rh, 5)).mean()),
        "near_copies": copies,
        "suspicious": copies > 0,
    }


def pairs_figure(gen: PatchSet, train: PatchSet, d: np.ndarray, idx: np.ndarray,
                 relative: np.ndarray, threshold: float, count: int = 8, title: str = ""):
    """The ``count`` generated patches relatively closest to a training patch, each beside it."""
    from PIL import Image, ImageDraw

    order = np.argsort(relative)[:count]
    s = max(112, min(gen.size, 192))  # small patches are enlarged (nearest) to stay readable
    gap, margin = 14, 12
    font, small = load_font(13), load_font(11)
    cols = min(4, len(order))
    rows = math.ceil(len(order) / max(cols, 1))
    cell_w, cap = 2 * s + 4, 34
    fig = Image.new("RGB", (max(2 * margin + cols * cell_w + (cols - 1) * gap, 640),
                            52 + rows * (s + cap + gap) + margin), (255, 255, 255))
    dr = ImageDraw.Draw(fig)
    draw_text(dr, (margin, 8), title or "closest generated / training pairs", font, (0, 0, 0))
    draw_text(dr, (margin, 28), "each pair: generated patch (left), its nearest training patch (right); "
          "d = RMS difference (0–255), r = d / mean of the k nearest", small, (90, 90, 90))
    for j, g in enumerate(order):
        r, c = divmod(j, cols)
        ox, oy = margin + c * (cell_w + gap), 52 + r * (s + cap + gap)
        t = idx[g]
        for k, im in enumerate((gen.images[g], train.images[t])):
            pil = Image.fromarray(im)
            if pil.width != s:
                up = pil.width < s
                pil = pil.resize((s, s), Image.Resampling.NEAREST if up else Image.Resampling.BOX)
            fig.paste(pil, (ox + k * (s + 4), oy))
        copy = relative[g] < threshold
        if copy:
            dr.rectangle([ox - 3, oy - 3, ox + cell_w + 2, oy + s + 2], outline=(214, 39, 40), width=3)
        si, x, y = train.where[t]
        name = train.names[si]
        name = name if len(name) <= 24 else name[:21] + "…"
        draw_text(dr, (ox, oy + s + 3), f"d = {d[g]:.1f}, r = {relative[g]:.2f}" + ("  near copy" if copy else ""),
              small, (214, 39, 40) if copy else (0, 0, 0))
        draw_text(dr, (ox, oy + s + 18), f"{name} ({x:.0f}, {y:.0f})", small, (90, 90, 90))
    return fig


def held_out_split(slide: readers.Slide, fp: float, share: float = 0.2) -> float:
    """Column x such that about ``share`` of the slide's tissue lies right of it (held out), with
    room for one patch of side ``fp`` on either side."""
    shape, sat = tissue_map(slide)
    cols = sat[-1, 1:] - sat[-1, :-1]  # tissue pixels per thumbnail column
    total = cols.sum()
    if total == 0:
        x = (1 - share) * slide.width
    else:
        c = np.searchsorted(np.cumsum(cols), (1 - share) * total)
        x = c * slide.width / shape[1]
    return float(min(max(x, fp), slide.width - fp))


def memorisation(gen_sets, trains, refs, ref_sets, o: Options, net, f_of, progress, notes) -> dict:
    """Nearest training patch of each generated and each held-out real patch, same µm/px."""
    res = {"held_out": "reference slides" if refs else
           # no held-out slides: hold out the right-most fifth of every training slide's tissue
           # (patches from the same slide are alike, so this errs towards *not* flagging)
           "the right-most fifth of each training slide's tissue (no --reference given)",
           "pixel_side": PIXEL_SIDE, "k": 50, "scales": [], "pairs_images": []}
    for m in gen_sets:
        g = gen_sets[m]
        fps = [footprint(t, m, o.patch_size) or 0.0 for t in trains]
        splits = [t.width if refs else held_out_split(t, fp)
                  for t, fp in zip(trains, fps, strict=True)]
        train = sample_patches(trains, m, o.patch_size, 0, o.seed + 2, o.min_tissue, stride=0.25,
                               x_ranges=[(0.0, x) for x in splits], max_count=o.training_patches)
        held = ref_sets[m] if refs else sample_patches(
            trains, m, o.patch_size, o.patches, o.seed + 3, o.min_tissue,
            x_ranges=[(x, t.width) for x, t in zip(splits, trains, strict=True)])
        row = {"mpp": m, "n_generated": len(g), "n_training": len(train), "n_held_out": len(held)}
        if len(g) == 0 or len(train) == 0 or len(held) == 0:
            row["note"] = "not enough tissue patches at this µm/px"
            res["scales"].append(row)
            continue
        tv = pixel_vectors(train.array())
        dg, ig = nearest(pixel_vectors(g.array()), tv)
        dh, _ = nearest(pixel_vectors(held.array()), tv)
        scale = 1.0 / math.sqrt(tv.shape[1])  # RMS difference per value, 0…255 units
        row["pixel"] = nn_summary(dg * scale, dh * scale)
        if f_of is not None:
            ft = extract_features(net, train.array(), device_for(o.device), o.batch, progress,
                                  f"features training {m:g} µm/px")
            fg_, _ = nearest(f_of("generated", m, g), ft)
            fh_, _ = nearest(f_of("reference", m, held) if refs else
                             extract_features(net, held.array(), device_for(o.device), o.batch), ft)
            row["feature"] = nn_summary(fg_, fh_)
        if o.output_dir:
            p = Path(o.output_dir) / f"closest-pairs-{m:g}um.png"
            title = f"Memorisation audit: generated patches closest to a training patch, at {m:g} µm/px"
            rel = dg[:, 0] / np.maximum(dg.mean(axis=1), 1e-12)
            pairs_figure(g, train, dg[:, 0] * scale, ig[:, 0], rel, row["pixel"]["relative"]["threshold"],
                         title=title).save(p, optimize=True)
            res["pairs_images"].append(str(p))
        res["scales"].append(row)
    if not o.output_dir:
        notes.append("pass -o DIR to save the closest generated/training pairs as images")
    return res
