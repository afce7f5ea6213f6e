"""Colour and stain statistics of tissue pixels (RGB, optical density, Macenko H and E vectors), and
histogram distances between a generated and a reference set.
"""

from __future__ import annotations

import numpy as np

from ..errors import WsigenError
from . import metrics, stains
from .tissue import tissue_mask


def tissue_pixels(images: np.ndarray, max_pixels: int = 1_000_000, seed: int = 0) -> np.ndarray:
    px = images.reshape(-1, 3)[tissue_mask(images.reshape(-1, 1, 3)).ravel()]
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    return px


def reference_amounts(od: np.ndarray) -> list[float]:
    """Mean H and E amounts of tissue ODs in the *published* Macenko basis (``stains.REFERENCE``):
    one fixed basis for every slide, so two slides' numbers compare directly."""
    return stains.concentrations(od, stains.REFERENCE.he).mean(axis=0).round(4).tolist()


def colour_summary(px: np.ndarray) -> dict:
    od = stains.optical_density(px)
    d = {"pixels": int(len(px)), "rgb_mean": px.mean(axis=0).round(2).tolist(),
         "od_mean": od.mean(axis=0).round(4).tolist(),
         "od_p50": np.percentile(od, 50, axis=0).round(4).tolist(),
         "od_p99": np.percentile(od, 99, axis=0).round(4).tolist(),
         "amounts": reference_amounts(od)}
    try:
        fit = stains.fit_macenko(px.reshape(-1, 1, 3))
        d["stain"] = {"H": fit.he[:, 0].round(4).tolist(), "E": fit.he[:, 1].round(4).tolist(),
                      "max_concentration": fit.max_c.round(4).tolist()}
    except WsigenError as e:
        d["stain"] = None
        d["stain_error"] = str(e)
    return d


def colour_distances(gen: np.ndarray, ref: np.ndarray, sg: dict, sr: dict) -> dict:
    rgb_bins = np.arange(0, 257, 4, dtype=np.float64)
    od_bins = np.linspace(0, 3, 61)
    ogen, oref = stains.optical_density(gen), stains.optical_density(ref)
    d = {"rgb_w1": [], "rgb_js": [], "od_w1": [], "od_js": []}
    for c in range(3):
        hg, hr = np.histogram(gen[:, c], rgb_bins)[0], np.histogram(ref[:, c], rgb_bins)[0]
        d["rgb_w1"].append(round(metrics.hist_wasserstein1(hg, hr, rgb_bins), 3))
        d["rgb_js"].append(round(metrics.hist_js(hg, hr), 4))
        hg, hr = np.histogram(ogen[:, c], od_bins)[0], np.histogram(oref[:, c], od_bins)[0]
        d["od_w1"].append(round(metrics.hist_wasserstein1(hg, hr, od_bins), 4))
        d["od_js"].append(round(metrics.hist_js(hg, hr), 4))
    if sg.get("stain") and sr.get("stain"):
        d["H_angle_deg"] = round(metrics.angle_deg(sg["stain"]["H"], sr["stain"]["H"]), 2)
        d["E_angle_deg"] = round(metrics.angle_deg(sg["stain"]["E"], sr["stain"]["E"]), 2)
        # concentrations of both in the reference's stain basis: same axes, comparable amounts
        he = np.array([sr["stain"]["H"], sr["stain"]["E"]]).T
        cg, cr = stains.concentrations(ogen, he), stains.concentrations(oref, he)
        c_bins = np.linspace(-0.5, 3.5, 81)
        d["concentration_w1"], d["concentration_js"] = [], []
        for c in range(2):
            hg, hr = np.histogram(cg[:, c], c_bins)[0], np.histogram(cr[:, c], c_bins)[0]
            d["concentration_w1"].append(round(metrics.hist_wasserstein1(hg, hr, c_bins), 4))
            d["concentration_js"].append(round(metrics.hist_js(hg, hr), 4))
    return d
