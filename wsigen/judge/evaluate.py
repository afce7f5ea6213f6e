"""``wsigen evaluate``: how good and how private a generated slide is, as one report (a dict).

Weight-free metrics: seam scores and guide consistency per stage (wsigen stores only), colour
and Macenko stain statistics against reference slides. With feature-network weights supplied
by the user: FID, KID and improved precision/recall on tissue patches at several µm/px, and
the feature-space half of the memorisation audit (nearest training patch vs held-out real).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError, WsigenError
from ..slides import readers
from . import metrics
from .preview import StoreSlide, describe, is_store, open_slide, tissue_boxes, tissue_mask

Progress = Callable[[str, int, int], None]  # (what, done, total)
ARCHS = ("auto", "inception", "inception-fid", "resnet50")
PIXEL_SIDE = 32  # pixel-space distances compare patches area-averaged to at most this side


@dataclass
class Options:
    """What to compute and how much of it (defaults are the command line's)."""

    mpps: list[float] | None = None  # µm/px of patch metrics; default: s_L × (1, 4, 16) that fit
    patch_size: int = 256
    patches: int = 256  # per slide set and µm/px
    training_patches: int = 10000  # at most, per µm/px, for the memorisation audit
    seed: int = 0
    device: str = "auto"
    batch: int = 16
    features: str | None = None
    features_arch: str = "auto"
    features_size: int | None = None  # network input side; default: the architecture's own
    stage_max_pixels: int = 2**26  # per stage for seams/guide; bigger stages are sampled in bands
    min_tissue: float = 0.5
    output_dir: str | None = None  # report.json and closest-pairs images


# -- slides -------------------------------------------------------------------------------------


def expand(paths) -> list[Path]:
    """Stores stay as they are; folders without zarr.json are searched for images."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_store(p):
            out.append(p)
        elif p.is_dir():
            stores = sorted(q for q in p.iterdir() if is_store(q))
            out.extend(stores or readers.find_images([p]))
        elif p.exists():
            out.append(p)
        else:
            raise WsigenError(f"not found: {p}")
    return out


def _open_all(paths, role: str) -> list[readers.Slide]:
    slides = []
    for p in expand(paths):
        s = open_slide(p)
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


# -- per-stage metrics (stores only) ------------------------------------------------------------


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
    from ..method import gridshift

    info = store.info
    cfg = info.get("config") or {}
    m = int(cfg.get("patch") or 0)
    k = int(((info.get("model") or {}).get("config") or {}).get("k", 2))
    seed, steps = int(cfg.get("seed", 0)), int(cfg.get("steps", 0))
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


# -- patches ------------------------------------------------------------------------------------


@dataclass
class PatchSet:
    """Patches of ``size`` px at one µm/px, with where each came from (slide index, x, y level 0)."""

    mpp: float
    size: int
    images: list[np.ndarray] = field(default_factory=list)
    where: list[tuple[int, float, float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def array(self) -> np.ndarray:
        if not self.images:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack(self.images)


def footprint(slide: readers.Slide, mpp: float, size: int) -> float | None:
    """Level-0 side of a ``size`` px patch at ``mpp``, or None where the slide cannot give one."""
    if slide.mpp is None or mpp < slide.mpp * (1 - 1e-6):
        return None
    f = size * mpp / slide.mpp
    return f if f <= min(slide.width, slide.height) else None


def sample_patches(slides: list[readers.Slide], mpp: float, size: int, n: int, seed: int,
                   min_tissue: float = 0.5, stride: float | None = None,
                   x_ranges: list[tuple[float, float]] | None = None,
                   max_count: int | None = None) -> PatchSet:
    """``n`` random tissue patches spread evenly over the slides, or, with ``stride`` (in
    footprints), every tissue patch on a grid: the finest of stride, 2·stride, … up to 1 that
    gives at most ``max_count`` (then a keyed random ``max_count`` of them). ``x_ranges`` limits
    each slide's patches to columns [a, b) in level-0 pixels."""
    ps = PatchSet(mpp, size)
    ps.names = [Path(s.path).name if s.path else f"slide {i}" for i, s in enumerate(slides)]
    usable = [(i, s, f) for i, s in enumerate(slides) if (f := footprint(s, mpp, size))]
    plan: list[tuple[int, float, float, float]] = []  # (slide, x, y, footprint)
    if stride is not None:
        st = stride
        while True:
            plan = [(i, x, y, f) for i, s, f in usable
                    for x, y in tissue_boxes(s, f, 0, seed, min_tissue, stride=st * f,
                                             x_range=x_ranges[i] if x_ranges else None)]
            if max_count is None or len(plan) <= max_count or st >= 1:
                break
            st = min(2 * st, 1.0)
        if max_count is not None and len(plan) > max_count:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B5]))
            plan = [plan[j] for j in np.sort(rng.choice(len(plan), max_count, replace=False))]
    else:
        for j, (i, s, f) in enumerate(usable):
            want = n // len(usable) + (1 if j < n % len(usable) else 0)
            xr = x_ranges[i] if x_ranges else None
            boxes = tissue_boxes(s, f, want, seed + 7919 * i, min_tissue, x_range=xr)
            plan += [(i, x, y, f) for x, y in boxes]
    for i, x, y, f in plan:
        ps.images.append(slides[i].read_scaled(x, y, f, f, size, size))
        ps.where.append((i, x, y))
    return ps


def default_mpps(slide: readers.Slide, size: int) -> list[float]:
    return [slide.mpp * f for f in (1, 4, 16) if footprint(slide, slide.mpp * f, size)]


# -- colour -------------------------------------------------------------------------------------


def tissue_pixels(images: np.ndarray, max_pixels: int = 1_000_000, seed: int = 0) -> np.ndarray:
    px = images.reshape(-1, 3)[tissue_mask(images.reshape(-1, 1, 3)).ravel()]
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    return px


def colour_summary(px: np.ndarray) -> dict:
    from . import stains

    od = stains.optical_density(px)
    d = {"pixels": int(len(px)), "rgb_mean": px.mean(axis=0).round(2).tolist(),
         "od_mean": od.mean(axis=0).round(4).tolist(),
         "od_p50": np.percentile(od, 50, axis=0).round(4).tolist(),
         "od_p99": np.percentile(od, 99, axis=0).round(4).tolist()}
    try:
        fit = stains.fit_macenko(px.reshape(-1, 1, 3))
        d["stain"] = {"H": fit.he[:, 0].round(4).tolist(), "E": fit.he[:, 1].round(4).tolist(),
                      "max_concentration": fit.max_c.round(4).tolist()}
    except WsigenError as e:
        d["stain"] = None
        d["stain_error"] = str(e)
    return d


def colour_distances(gen: np.ndarray, ref: np.ndarray, sg: dict, sr: dict) -> dict:
    from . import stains

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


# -- feature networks ---------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from safetensors, or from a PyTorch file with ``torch.load(weights_only=True)``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise WsigenError(f"feature weights not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WsigenError(f"{p}: cannot read safetensors weights ({e})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and version errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WsigenError(f"{p}: cannot read PyTorch weights with weights_only=True ({first}); "
                              "convert them to safetensors") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):  # common training wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WsigenError(f"{p} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def detect_arch(state: dict) -> str:
    if "Mixed_7c.branch_pool.conv.weight" in state:
        fc = state.get("fc.weight")
        return "inception-fid" if fc is not None and fc.shape[0] == 1008 else "inception"
    if "layer4.2.conv3.weight" in state and "layer3.5.conv3.weight" in state:
        return "resnet50"
    raise WsigenError("feature weights match no supported architecture (Inception-v3 or ResNet-50 "
                      "with torchvision's parameter names); pass --features-arch if they are one")


def build_feature_net(arch: str, num_classes: int = 1000):
    from ..nets.inception import Inception3
    from ..nets.resnet import ResNet50

    if arch in ("inception", "inception-fid"):
        return Inception3(num_classes=num_classes, aux_logits=True, fid=arch == "inception-fid")
    if arch == "resnet50":
        return ResNet50(num_classes=num_classes)
    raise UsageError(f"--features-arch must be one of {', '.join(ARCHS)} (got {arch!r})")


# Heads that feature extraction never uses: absent or differently shaped, they are ignored.
_HEADS = ("fc.", "AuxLogits.")


def load_feature_net(path, arch: str = "auto", input_size: int | None = None):
    """(network in eval mode, description) for user-supplied weights; every trunk weight must load."""
    import torch

    state = read_state_dict(path)
    arch = detect_arch(state) if arch == "auto" else arch
    fc = state.get("fc.weight")
    with torch.device("meta"):  # no random initialisation: every weight that is used comes from the file
        net = build_feature_net(arch, int(fc.shape[0]) if fc is not None else 1000)
    net = net.to_empty(device="cpu")
    for t in net.state_dict().values():  # heads the file lacks stay defined (zeros), never used
        t.zero_()
    own = net.state_dict()
    trunk = [k for k in own if not k.startswith(_HEADS) and not k.endswith("num_batches_tracked")]
    missing = [k for k in trunk if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(_HEADS)]
    wrong = [k for k in trunk if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise WsigenError(f"{path}: weights do not fit {arch}: " + "; ".join(parts))
    bad = [k for k in trunk if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise WsigenError(f"{path}: weights contain NaN/Inf ({bad[0]})")
    load = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    net.load_state_dict(load, strict=False)
    if input_size:
        net.input_size = int(input_size)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return net.eval(), {"arch": arch, "weights": str(path), "sha256": h.hexdigest(),
                        "input_size": net.input_size, "dim": net.features_dim}


def extract_features(net, images: np.ndarray, device, batch: int = 16,
                     progress: Progress | None = None, what: str = "features") -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float()
            out.append(net(net.prepare(x)).double().cpu().numpy())
            if progress:
                progress(what, min(i + batch, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros((0, net.features_dim))


# -- memorisation -------------------------------------------------------------------------------


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

    from .preview import _font, _text

    order = np.argsort(relative)[:count]
    s = max(112, min(gen.size, 192))  # small patches are enlarged (nearest) to stay readable
    gap, margin = 14, 12
    font, small = _font(13), _font(11)
    cols = min(4, len(order))
    rows = math.ceil(len(order) / max(cols, 1))
    cell_w, cap = 2 * s + 4, 34
    fig = Image.new("RGB", (max(2 * margin + cols * cell_w + (cols - 1) * gap, 640),
                            52 + rows * (s + cap + gap) + margin), (255, 255, 255))
    dr = ImageDraw.Draw(fig)
    _text(dr, (margin, 8), title or "closest generated / training pairs", font, (0, 0, 0))
    _text(dr, (margin, 28), "each pair: generated patch (left), its nearest training patch (right); "
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
        _text(dr, (ox, oy + s + 3), f"d = {d[g]:.1f}, r = {relative[g]:.2f}" + ("  near copy" if copy else ""),
              small, (214, 39, 40) if copy else (0, 0, 0))
        _text(dr, (ox, oy + s + 18), f"{name} ({x:.0f}, {y:.0f})", small, (90, 90, 90))
    return fig


# -- the whole report ---------------------------------------------------------------------------


def _device(name: str):
    from ..run.devices import resolve_device

    return resolve_device(name)


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
    if o.output_dir:
        Path(o.output_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as opened:
        slide = opened.enter_context(open_slide(path))
        if slide.mpp is None:
            raise WsigenError(f"{path} does not record its µm/px; evaluation needs it")
        refs = [opened.enter_context(s) for s in _open_all(reference, "reference")]
        trains = [opened.enter_context(s) for s in _open_all(training, "training")]
        report = clean(_report(slide, refs, trains, o, progress))
    if o.output_dir:
        (Path(o.output_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _report(slide, refs, trains, o: Options, progress: Progress | None) -> dict:
    notes: list[str] = []
    report: dict = {"slide": describe(slide), "options": {
        "patch_size": o.patch_size, "patches": o.patches, "seed": o.seed,
        "references": [str(s.path) for s in refs], "training_data": [str(s.path) for s in trains]}}

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
        report["colour"] = col
    else:
        report["colour"] = None

    # 4. feature-space metrics
    net = None
    if o.features:
        dev = _device(o.device)
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


def held_out_split(slide: readers.Slide, fp: float, share: float = 0.2) -> float:
    """Column x such that about ``share`` of the slide's tissue lies right of it (held out), with
    room for one patch of side ``fp`` on either side."""
    from .preview import tissue_map

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
            ft = extract_features(net, train.array(), _device(o.device), o.batch, progress,
                                  f"features training {m:g} µm/px")
            fg_, _ = nearest(f_of("generated", m, g), ft)
            fh_, _ = nearest(f_of("reference", m, held) if refs else
                             extract_features(net, held.array(), _device(o.device), o.batch), ft)
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
