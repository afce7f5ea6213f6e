"""``wsigen evaluate``: how good and how private a generated slide is, as one report (a dict).

Weight-free metrics: seam scores and guide consistency per stage (wsigen stores only), colour
and Macenko stain statistics against reference slides. With feature-network weights supplied
by the user: FID, KID and improved precision/recall on tissue patches at several µm/px, and
the feature-space half of the memorisation audit (nearest training patch vs held-out real).
This module opens the slides and puts the report together; each part is computed beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np

from ..errors import UsageError, WsigenError
from ..slides import readers
from . import Progress, classes, metrics
from .colour import colour_distances, colour_summary, tissue_pixels
from .features import ARCHS, device_for, extract_features, load_feature_net
from .memorisation import memorisation
from .options import Options
from .patches import PatchSet, default_mpps, footprint, sample_patches
from .seams import stage_metrics
from .sources import StoreSlide, describe, exported_info, is_store, open_slide

# -- slides -------------------------------------------------------------------------------------


def _stores_under(folder: Path) -> list[Path]:
    """The stores anywhere below ``folder`` (e.g. refs/<class>/x.zarr), not looking inside a store."""
    found: list[Path] = []
    for q in sorted(folder.iterdir()):
        if q.is_dir():
            found.extend([q] if is_store(q) else _stores_under(q))
    return found


def expand(paths) -> list[Path]:
    """Stores stay as they are; a folder gives the stores below it, or else its images."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_store(p):
            out.append(p)
        elif p.is_dir():
            stores = _stores_under(p)
            out.extend(stores or readers.find_images([p]))
        elif p.exists():
            out.append(p)
        else:
            raise WsigenError(f"not found: {p}")
    return out


def _open_all(paths, role: str, planes=None) -> list[readers.Slide]:
    slides = []
    for p in expand(paths):
        s = open_slide(p, planes=planes)
        if s.mpp is None:
            s.close()
            raise WsigenError(f"{role} slide {p} does not record its µm/px; patches are compared at "
                              "equal µm/px, so it cannot be used (export it with its resolution)")
        slides.append(_in_memory(s))
    return slides


def _in_memory(s: readers.Slide) -> readers.Slide:
    """Small slides are read once into memory: thousands of patch reads then cost little."""
    if isinstance(s, StoreSlide) or s.width * s.height > 32 * 2**20:
        return s
    c = readers.cached(s)
    if c is not s:
        s.close()
    return c


# -- the whole report ---------------------------------------------------------------------------


def evaluate(path, reference=(), training=(), options: Options | None = None,
             progress: Progress | None = None) -> dict:
    """Evaluate one generated slide (a store or an exported image); returns the report."""
    o = options or Options()
    if o.patch_size < 8:
        raise UsageError(f"--patch-size must be at least 8 (got {o.patch_size})")
    if o.patches < 2:
        raise UsageError(f"--patches must be at least 2 (got {o.patches})")
    if o.features_arch not in ARCHS:
        raise UsageError(f"--features-arch must be one of {', '.join(ARCHS)} (got {o.features_arch!r})")
    with contextlib.ExitStack() as opened:
        slide = opened.enter_context(open_slide(path, planes=o.planes))
        if slide.mpp is None:
            raise WsigenError(f"{path} does not record its µm/px; evaluation needs it")
        ref_paths = expand(reference)
        if isinstance(slide, StoreSlide):
            cls, source = classes.slide_class(slide.store.info, o.slide_class)
        else:  # an export of a class-conditional store carries its class in its provenance
            cls, source = classes.slide_class(exported_info(path), o.slide_class, "export provenance")
        sel = classes.select(ref_paths, reference, o.reference_labels, cls, source)
        refs = [opened.enter_context(s) for s in _open_all(ref_paths, "reference", o.planes)]
        trains = [opened.enter_context(s) for s in _open_all(training, "training", o.planes)]
        if o.output_dir:
            Path(o.output_dir).mkdir(parents=True, exist_ok=True)
        report = clean(_report(slide, refs, trains, o, progress, sel))
    if o.output_dir:
        (Path(o.output_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _report(slide, all_refs, trains, o: Options, progress: Progress | None,
            sel: classes.Selection) -> dict:
    notes: list[str] = []
    refs = [all_refs[i] for i in sel.chosen]  # every metric compares with these (per class: its own)
    report: dict = {"slide": describe(slide), "options": {
        "patch_size": o.patch_size, "patches": o.patches, "seed": o.seed,
        "references": [str(s.path) for s in refs], "training_data": [str(s.path) for s in trains]},
        "references": sel.record()}
    if sel.note():
        notes.append(sel.note())

    # 1. the cascade itself: seams and guide consistency (stores only)
    if isinstance(slide, StoreSlide):
        report["stages"] = stage_metrics(slide.store, o.stage_max_pixels, progress)
    else:
        report["stages"] = None
        notes.append("not a wsigen store: seam and guide metrics need the stages (evaluate the .zarr)")

    # 2. which µm/px the patch metrics use
    mpps = sorted(o.mpps) if o.mpps else default_mpps(slide, o.patch_size)
    mpps = [m for m in mpps if footprint(slide, m, o.patch_size)]
    if not mpps:
        notes.append(f"the slide is too small for {o.patch_size} px patches at the requested µm/px; "
                     "patch metrics skipped (use a smaller --patch-size)")
    report["mpps"] = mpps
    gen_sets = {m: sample_patches([slide], m, o.patch_size, o.patches, o.seed, o.min_tissue)
                for m in mpps}
    ref_sets = {m: sample_patches(refs, m, o.patch_size, o.patches, o.seed + 1, o.min_tissue)
                for m in mpps} if refs else {}
    for m in mpps:
        if len(gen_sets[m]) < 2:
            notes.append(f"{m:g} µm/px: fewer than two tissue patches in the generated slide")
        if refs and len(ref_sets[m]) < 2:
            notes.append(f"{m:g} µm/px: the reference slides give fewer than two tissue patches "
                         "(finer µm/px than they have, or too small)")

    # 3. colour and stains, on tissue pixels of the finest scale's patches
    if mpps and len(gen_sets[mpps[0]]):
        m0 = mpps[0]
        pg = tissue_pixels(gen_sets[m0].array(), seed=o.seed)
        col = {"mpp": m0, "generated": colour_summary(pg) if len(pg) else None}
        if refs and len(ref_sets[m0]):
            pr = tissue_pixels(ref_sets[m0].array(), seed=o.seed)
            col["reference"] = colour_summary(pr) if len(pr) else None
            if len(pg) and len(pr):
                col["distances"] = colour_distances(pg, pr, col["generated"], col["reference"])
        elif not refs:
            notes.append("no --reference slides: colour statistics of the generated slide only, "
                         "no distances")
        if sel.labels and len(pg):
            def patches_of(idx):  # the selected references' patches are those drawn above
                if tuple(idx) == sel.chosen:
                    return ref_sets[m0]
                return sample_patches([all_refs[i] for i in idx], m0, o.patch_size, o.patches,
                                      o.seed + 1, o.min_tissue)

            done = (col["reference"], col["distances"]) if "distances" in col else None
            col["by_class"] = classes.by_class(pg, col["generated"], sel, patches_of, o.seed, done)
        report["colour"] = col
    else:
        report["colour"] = None

    # 4. feature-space metrics
    net = None
    if o.features:
        dev = device_for(o.device)
        net, netinfo = load_feature_net(o.features, o.features_arch, o.features_size)
        net.to(dev)
        report["features"] = {"network": netinfo, "scales": []}
    else:
        report["features"] = None
        notes.append("no --features weights: FID, KID, precision/recall and feature-space "
                     "memorisation distances are not computed (weight-free metrics only)")
    feats: dict = {}

    def f_of(kind: str, m: float, ps: PatchSet) -> np.ndarray:
        if (kind, m) not in feats:
            feats[kind, m] = extract_features(net, ps.array(), dev, o.batch, progress,
                                              f"features {kind} {m:g} µm/px")
        return feats[kind, m]

    if net is not None and refs:
        for m in mpps:
            g, r = gen_sets[m], ref_sets[m]
            row = {"mpp": m, "n_generated": len(g), "n_reference": len(r)}
            if len(g) >= 2 and len(r) >= 2:
                fg, fr = f_of("generated", m, g), f_of("reference", m, r)
                row["fid"] = metrics.fid(fr, fg)
                kid_m, kid_s = metrics.kid(fr, fg, seed=o.seed)
                row["kid"], row["kid_std"] = kid_m, kid_s
                if len(g) > 3 and len(r) > 3:
                    row["precision"], row["recall"] = metrics.precision_recall(fr, fg, k=3)
            report["features"]["scales"].append(row)
        small = min((min(r["n_generated"], r["n_reference"]) for r in report["features"]["scales"]),
                    default=0)
        if small and small < 2048:
            notes.append(f"FID from {small} patches per set (< 2048 features): biased upwards; compare "
                         "only numbers computed with the same --patches (KID is unbiased)")
    elif net is not None:
        notes.append("no --reference slides: FID, KID and precision/recall need real patches")

    # 5. memorisation audit
    if trains:
        report["memorisation"] = memorisation(gen_sets, trains, refs, ref_sets, o, net,
                                              (lambda k, m, ps: f_of(k, m, ps)) if net else None,
                                              progress, notes)
    else:
        report["memorisation"] = None
    report["notes"] = notes
    return report


def clean(v):
    """JSON-ready: numpy scalars to Python, inf/NaN to None (e.g. PSNR of identical images)."""
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
