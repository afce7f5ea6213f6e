"""Class conditioning, demonstrated (issue 15): two synthetic slide classes, a small labelled model,
and the class statistic of its slides per class and guidance w over several seeds.

The classes are made here, as H&E-like TIFFs at 1 µm/px (Beer–Lambert with the published Macenko
H and E vectors), in folders ``A/`` and ``B/`` so that ``--labels folders`` reads them:

- **A, "normal"**: pink stroma (eosin), little background haematoxylin, sparse small nuclei;
- **B, "tumour"**: more haematoxylin in the stroma, dense larger and darker nuclei.

The **class statistic** is the mean haematoxylin amount of the tissue pixels (‖OD‖ > 0.15) in the
fixed published Macenko basis (``wsigen.judge.stains.REFERENCE``): one basis for every slide, so
numbers compare across slides; measured on a store's final image (level 0). It is printed first
for the training slides themselves (whole slides and random crops of the sample size), which must
separate; then a model is trained with ``labels="folders", label_dropout=0.1``, and for each
class and w ∈ {0, 1, 3} over ``--seeds`` seeds one slide is sampled and measured. PASS when the
per-seed values of the two classes do not overlap at w = 1, nor at w = 3, and the difference of the
class means at w = 3 is at least that at w = 1 (w = 0 is the unconditional model: both classes
draw the same slide for a seed). Writes ``benchmarks/results/conditional.json`` and, with
``--picture``, one slide per class and w.

    .venv/bin/python benchmarks/conditional.py                # the demonstration (≈ 15 min on 2 cores)
    .venv/bin/python benchmarks/conditional.py --quick        # fewer steps and seeds: a smoke run
    .venv/bin/python benchmarks/conditional.py --data-only    # the classes and their statistic only
    .venv/bin/python benchmarks/conditional.py --estimate     # time a short class-free training run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

import wsigen  # noqa: E402
from wsigen.judge import stains  # noqa: E402

MPP = 1.0  # µm/px of the synthetic training slides
TISSUE_OD = 0.15  # ‖OD‖ above which a pixel is tissue (the training sampler's threshold)
GUIDANCE = (0.0, 1.0, 3.0)
# One thread for training and sampling, and the patches read in the training process: these tiny
# networks gain little from a second thread, and on a shared 2-core machine under load two threads
# were 3–10× slower than one (measured: 0.11 vs 0.5–1.2 s per training step at load 4).
THREADS = 1


# -- the two classes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How a class is stained and how its nuclei look (amounts in the published H, E basis)."""

    stroma_h: float  # background haematoxylin of the stroma
    stroma_e: float  # eosin of the stroma
    nucleus_h: float  # haematoxylin inside a nucleus
    radius: tuple[float, float]  # nucleus radius range, µm
    coverage: float  # fraction of the tissue covered by nuclei (before overlaps)


CLASSES = {
    "A": Profile(stroma_h=0.08, stroma_e=0.75, nucleus_h=0.95, radius=(2.5, 3.5), coverage=0.05),
    "B": Profile(stroma_h=0.25, stroma_e=0.55, nucleus_h=1.30, radius=(4.0, 6.0), coverage=0.30),
}


def smooth(rng: np.random.Generator, side: int, cell: float) -> np.ndarray:
    """(side, side) smooth noise in [0, 1] with features about ``cell`` px across (bicubic upsampling
    of a coarse uniform grid: no SciPy needed)."""
    import torch

    n = max(2, int(np.ceil(side / cell)) + 3)
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, n, n)).astype(np.float32))
    m = int(cell)  # a margin cut off: bicubic edges overshoot
    up = torch.nn.functional.interpolate(coarse, size=(side + 2 * m,) * 2, mode="bicubic", align_corners=False)
    f = up[0, 0, m:m + side, m:m + side].numpy()
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def synth_slide(p: Profile, side: int, seed: int) -> np.ndarray:
    """An H&E-like (side, side, 3) uint8 slide of class profile ``p`` at ``MPP``: a tissue blob on
    glass, fibrous stroma, and elliptical nuclei of the class's size and density."""
    rng = np.random.default_rng(seed)
    tissue = smooth(rng, side, side / 3) > 0.3
    fib = smooth(rng, side, 6 / MPP)
    c_h = p.stroma_h * (0.7 + 0.6 * smooth(rng, side, 10 / MPP))
    c_e = p.stroma_e * (0.7 + 0.6 * fib)
    r_lo, r_hi = (r / MPP for r in p.radius)
    n = int(p.coverage * side * side / (np.pi * ((r_lo + r_hi) / 2) ** 2))
    ys, xs = rng.uniform(0, side, n), rng.uniform(0, side, n)
    for y, x, a, ecc, th, dark in zip(ys, xs, rng.uniform(r_lo, r_hi, n), rng.uniform(0.7, 1.0, n),
                                      rng.uniform(0, np.pi, n), rng.uniform(0.85, 1.15, n), strict=True):
        y0, y1 = int(max(0, y - a - 1)), int(min(side, y + a + 2))
        x0, x1 = int(max(0, x - a - 1)), int(min(side, x + a + 2))
        if not tissue[int(min(y, side - 1)), int(min(x, side - 1))] or y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u, v = (xx - x) * np.cos(th) + (yy - y) * np.sin(th), -(xx - x) * np.sin(th) + (yy - y) * np.cos(th)
        inside = (u / a) ** 2 + (v / (a * ecc)) ** 2 <= 1
        c_h[y0:y1, x0:x1][inside] = p.nucleus_h * dark
        c_e[y0:y1, x0:x1][inside] *= 0.3
    c = np.stack([c_h, c_e], axis=-1) * tissue[..., None]
    rgb = 240 * np.exp(-c @ stains.REFERENCE.he.T) - 1
    rgb = np.where(tissue[..., None], rgb, np.array([242.0, 240.0, 244.0]))
    rgb += rng.normal(0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_slides(root: Path, per_class: int, side: int, seed: int = 0) -> dict[str, list[Path]]:
    """``per_class`` TIFFs per class in ``root/A``, ``root/B`` (µm/px in the resolution tags)."""
    import tifffile

    out: dict[str, list[Path]] = {}
    for ci, (name, p) in enumerate(sorted(CLASSES.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(per_class):
            path = root / name / f"{name}{i}.tif"
            tifffile.imwrite(path, synth_slide(p, side, seed * 1000 + ci * 100 + i), photometric="rgb",
                             resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", tile=(256, 256))
            out[name].append(path)
    return out


# -- the class statistic -------------------------------------------------------------------------


def h_amount(rgb: np.ndarray) -> float:
    """Mean haematoxylin amount of the tissue pixels (‖OD‖ > 0.15) in the published Macenko basis;
    NaN when there is no tissue."""
    od = stains.optical_density(rgb.reshape(-1, 3))
    od = od[np.linalg.norm(od, axis=1) > TISSUE_OD]
    if not len(od):
        return float("nan")
    return float(stains.concentrations(od, stains.REFERENCE.he)[:, 0].mean())


def read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def store_rgb(path: Path) -> np.ndarray:
    """The final image (level 0) of a wsigen store as (H, W, 3)."""
    from wsigen.slides.store import SlideStore

    return np.asarray(SlideStore.open(path).level_array(0)[:]).transpose(1, 2, 0)


def real_statistics(slides: dict[str, list[Path]], size: int, crops: int, seed: int) -> dict:
    """The statistic of each training slide, and of ``crops`` random size² crops per class that are
    at least half tissue (what a sampled slide of that size is compared with)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, paths in slides.items():
        images = [read_tiff(p) for p in paths]
        crop_vals: list[float] = []
        while len(crop_vals) < crops:
            im = images[len(crop_vals) % len(images)]
            y, x = (int(rng.integers(0, s - size + 1)) for s in im.shape[:2])
            c = im[y:y + size, x:x + size]
            if (np.linalg.norm(stains.optical_density(c), axis=-1) > TISSUE_OD).mean() >= 0.5:
                crop_vals.append(h_amount(c))
        out[name] = {"slides": [round(h_amount(im), 4) for im in images], "crops": _summary(crop_vals)}
    return out


def _summary(vals) -> dict:
    v = np.asarray(vals, dtype=np.float64)
    ok = v[np.isfinite(v)]
    d = {"values": [round(float(x), 4) for x in v], "mean": None, "min": None, "max": None}
    if len(ok):
        d.update(mean=round(float(ok.mean()), 4), min=round(float(ok.min()), 4), max=round(float(ok.max()), 4))
    return d


def separation(a: dict, b: dict) -> dict:
    """B above A: the gap between the classes' per-seed values (> 0: no overlap) and the difference
    of their means."""
    if a["min"] is None or b["min"] is None:
        return {"gap": None, "mean_difference": None, "overlap": True}
    gap = b["min"] - a["max"]
    return {"gap": round(gap, 4), "mean_difference": round(b["mean"] - a["mean"], 4), "overlap": gap <= 0}


# -- the two calls the lead wires in (labelled training; class-conditional sampling) ---------------


def train_model(slides_dir: Path, out: Path, *, labels: bool, steps: int, patch: int, width: int,
                batch: int, mpp_max: float, seed: int = 0) -> dict:
    """A small UNet on the synthetic slides; ``labels``: class-conditional (folder names, label
    dropout 0.1), else class-free (today's training, used by ``--estimate``)."""
    options = dict(max_steps=steps, patch=patch, width=width, mults=(1, 2), batch=batch, seed=seed,
                   device="cpu", mpp_min=MPP, mpp_max=mpp_max, final_mpp=MPP, recommended_size=4 * patch,
                   preview_every=0, checkpoint_every=steps, log_every=max(1, steps // 20),
                   loader_workers=0, lr_warmup=min(200, max(1, steps // 5)))
    if labels:
        options.update(labels="folders", label_dropout=0.1)  # issue 15's options (being built)
    return wsigen.train([slides_dir], out, overwrite=True, progress=False, **options)


def sample_slide(out: Path, model: Path, size: int, *, class_name: str | None, guidance: float | None,
                 seed: int, steps: int) -> Path:
    """One size² slide at ``MPP`` of class ``class_name`` with guidance w (None, None: class-free)."""
    import torch

    kw = {} if class_name is None else {"class_name": class_name, "guidance": guidance}
    wsigen.sample(out, size, model=str(model), seed=seed, steps=steps, mpp=MPP, device="cpu",
                  threads=torch.get_num_threads(), overwrite=True, **kw)
    return out


# -- reporting -----------------------------------------------------------------------------------


def print_table(title: str, rows: dict[str, dict], key: str = "values") -> None:
    print(title)
    for name, s in rows.items():
        vals = " ".join(f"{v:.3f}" for v in s[key])
        print(f"  {name:<12} mean {s['mean']:.3f}  min {s['min']:.3f}  max {s['max']:.3f}   [{vals}]")


def picture(path: Path, stores: dict[tuple[str, float], Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({c for c, _ in stores})
    ws = sorted({w for _, w in stores})
    fig, axes = plt.subplots(len(names), len(ws), figsize=(2.2 * len(ws), 2.3 * len(names)), squeeze=False)
    for i, c in enumerate(names):
        for j, w in enumerate(ws):
            ax = axes[i][j]
            ax.imshow(store_rgb(stores[c, w]))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"class {c}, w = {w:g}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"→ {path}")


# -- the run -------------------------------------------------------------------------------------


def measure_data(args, work: Path, result: dict) -> bool:
    """Make the classes and measure them; True when the statistic separates their crops."""
    t0 = time.perf_counter()
    slides = make_slides(work / "slides", args.slides, args.slide_side)
    real = real_statistics(slides, args.size, crops=16, seed=1)
    result["data_seconds"] = round(time.perf_counter() - t0, 2)
    result["training_slides"] = real
    for name, r in real.items():
        print(f"class {name}: whole training slides {' '.join(f'{v:.3f}' for v in r['slides'])}")
    print_table(f"training slides, 16 random {args.size}² crops (≥ ½ tissue) per class (H amount):",
                {k: v["crops"] for k, v in real.items()})
    sep = result["training_separation"] = separation(real["A"]["crops"], real["B"]["crops"])
    print(f"  gap {sep['gap']:.3f}, difference of means {sep['mean_difference']:.3f}  "
          f"({result['data_seconds']} s to make and measure)")
    return not sep["overlap"]


def estimate(args, work: Path, result: dict) -> None:
    """A short class-free training run and two samples, projected to the full run."""
    t0 = time.perf_counter()
    train_model(work / "slides", work / "free", labels=False, steps=args.estimate_steps, patch=args.patch,
                width=args.width, batch=args.batch, mpp_max=MPP * args.size / args.patch)
    per_step = (time.perf_counter() - t0) / args.estimate_steps
    t0 = time.perf_counter()
    for s in range(2):
        sample_slide(work / "free.zarr", work / "free", args.size, class_name=None, guidance=None, seed=s,
                     steps=args.sample_steps)
    per_sample = (time.perf_counter() - t0) / 2
    # w = 1 is one evaluation per call, w ≠ 1 two in one batched pass (counted as twice the time)
    samples = len(CLASSES) * args.seeds * sum(1 if w == 1 else 2 for w in GUIDANCE)
    est = {"estimate_steps": args.estimate_steps, "seconds_per_step": round(per_step, 3),
           "train_seconds": round(per_step * args.steps, 1), "seconds_per_sample_w1": round(per_sample, 2),
           "sample_seconds": round(per_sample * samples, 1)}
    est["total_seconds"] = round(est["train_seconds"] + est["sample_seconds"] + result["data_seconds"], 1)
    result["estimate"] = est
    print(f"estimate: {per_step:.3f} s/step (with start-up, {args.estimate_steps} steps) → {args.steps} steps "
          f"≈ {est['train_seconds']:.0f} s; one {args.size}² sample at N = {args.sample_steps}: {per_sample:.1f} s "
          f"→ {samples} w = 1 equivalents ≈ {est['sample_seconds']:.0f} s; total ≈ {est['total_seconds'] / 60:.1f} min "
          "(a shared machine: times vary by 2× with its load)")


def sample_table(args, work: Path, model_of, guidance) -> tuple[dict, dict]:
    """{w: {class: summary of the statistic over seeds}} and the first store of each (class, w)."""
    table: dict[str, dict[str, dict]] = {}
    first: dict[tuple[str, float], Path] = {}
    for w in guidance:
        table[f"{w:g}"] = {}
        for name in sorted(CLASSES):
            vals = []
            for s in range(args.seeds):
                model, cls = model_of(name)
                out = sample_slide(work / f"{name}-w{w:g}-s{s}.zarr", model, args.size, class_name=cls,
                                   guidance=w if cls else None, seed=s, steps=args.sample_steps)
                vals.append(h_amount(store_rgb(out)))
                first.setdefault((name, w), out)
            table[f"{w:g}"][name] = _summary(vals)
    return table, first


def proxy(args, work: Path, result: dict) -> bool:
    """Two class-free models, one per class folder, at the same budget: what the network and steps
    reach for each class alone (an upper bound on the conditional model's separation at w = 1)."""
    t0 = time.perf_counter()
    for name in sorted(CLASSES):
        train_model(work / "slides" / name, work / f"model-{name}", labels=False, steps=args.steps,
                    patch=args.patch, width=args.width, batch=args.batch, mpp_max=MPP * args.size / args.patch)
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    table, _ = sample_table(args, work, lambda name: (work / f"model-{name}", None), (1.0,))
    result["sample_seconds"] = round(time.perf_counter() - t0, 1)
    result["proxy"] = table["1"]
    print_table(f"one class-free model per class ({args.steps} steps each, {result['train_seconds']} s; "
                f"sampling {result['sample_seconds']} s), H amount per seed:", table["1"])
    sep = result["proxy_separation"] = separation(table["1"]["A"], table["1"]["B"])
    print(f"  gap {sep['gap']}, difference of means {sep['mean_difference']}")
    return not sep["overlap"]


def demonstrate(args, work: Path, result: dict) -> bool:
    """The labelled model, then per class and w the statistic over seeds; True on PASS."""
    t0 = time.perf_counter()
    train_model(work / "slides", work / "model", labels=True, steps=args.steps, patch=args.patch,
                width=args.width, batch=args.batch, mpp_max=MPP * args.size / args.patch)
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"trained {args.steps} steps in {result['train_seconds']} s")
    t0 = time.perf_counter()
    table, first = sample_table(args, work, lambda name: (work / "model", name), GUIDANCE)
    result["sample_seconds"] = round(time.perf_counter() - t0, 1)
    result["generated"] = table
    seps = result["separation"] = {w: separation(t["A"], t["B"]) for w, t in table.items()}
    for w, t in table.items():
        print_table(f"w = {w} (H amount per seed):", t)
        print(f"  gap {seps[w]['gap']}, difference of means {seps[w]['mean_difference']}"
              + ("  (overlap)" if seps[w]["overlap"] else ""))
    ok = (not seps["1"]["overlap"] and not seps["3"]["overlap"]
          and seps["3"]["mean_difference"] >= seps["1"]["mean_difference"])
    print("PASS" if ok else "FAIL", "— no overlap at w = 1 nor at w = 3, and the class means at least as far "
          f"apart at w = 3 as at w = 1 (sampling {len(first) * args.seeds} slides: {result['sample_seconds']} s)")
    if args.picture:
        picture(args.picture, first)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 100 steps, 2 seeds, 64² slides")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--data-only", action="store_true", help="make the classes, print their statistic, stop")
    mode.add_argument("--estimate", action="store_true",
                      help="time a short class-free training run and two samples; project the full run")
    mode.add_argument("--proxy", action="store_true",
                      help="one class-free model per class instead of one labelled model (runs today)")
    ap.add_argument("--estimate-steps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1000; quick 100)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=None, help="sampled slide side (default 128; quick 64)")
    ap.add_argument("--sample-steps", type=int, default=None, help="N of each stage (default 16; quick 8)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per class and w (default 4; quick 2)")
    ap.add_argument("--slides", type=int, default=4, help="training slides per class")
    ap.add_argument("--slide-side", type=int, default=768, help="side of a training slide in px")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for slides, models and stores (default: a temporary one, removed)")
    ap.add_argument("--picture", type=Path, default=None,
                    help="one slide per class and w, e.g. docs/img/conditional.png")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (training and sampling)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # training in this process, and each sample (below)
    args.steps = args.steps or (100 if args.quick else 1000)
    args.size = args.size or (64 if args.quick else 128)
    args.sample_steps = args.sample_steps or (8 if args.quick else 16)
    args.seeds = args.seeds or (2 if args.quick else 4)

    with tempfile.TemporaryDirectory(prefix="wsigen-conditional-") as tmp:
        work = args.work or Path(tmp)
        result: dict = {"classes": {k: asdict(v) for k, v in CLASSES.items()}, "mpp": MPP,
                        "statistic": "mean H amount of tissue pixels (‖OD‖ > 0.15), published Macenko basis",
                        "options": {k: v for k, v in vars(args).items() if k not in ("work", "picture")}}
        t0 = time.perf_counter()
        name = "conditional" + ("-estimate" if args.estimate else "-proxy" if args.proxy else "")
        ok = measure_data(args, work, result)
        if not ok:
            print("FAIL: the synthetic classes themselves do not separate")
        elif args.estimate:
            estimate(args, work, result)
        elif args.proxy:
            ok = proxy(args, work, result)
        elif not args.data_only:
            ok = demonstrate(args, work, result)
        result["pass"], result["seconds"] = ok, round(time.perf_counter() - t0, 1)
        print(f"{result['seconds']} s in all")
        save(name, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
