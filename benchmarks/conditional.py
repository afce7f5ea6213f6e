"""Class conditioning, demonstrated (issue 15): two synthetic slide classes, a small labelled model,
and the class statistic of its slides per class and guidance w over several seeds.

The classes are made by ``synthetic_classes.py`` beside this script, as H&E-like TIFFs at 1 µm/px
(Beer–Lambert with the published Macenko H and E vectors), in folders ``A/`` and ``B/`` so that
``--labels folders`` reads them:

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
draw the same slide for a seed). ``wsigen evaluate --reference-labels folders`` of each (class, w)'s
first slide against the training slides adds the reference class nearest in colour. Writes
``benchmarks/results/conditional.json`` and, with ``--picture``, one slide per class and w.

    .venv/bin/python benchmarks/conditional.py                # the demonstration (≈ 4 min on 2 cores)
    .venv/bin/python benchmarks/conditional.py --quick        # fewer steps and seeds: a smoke run
    .venv/bin/python benchmarks/conditional.py --data-only    # the classes and their statistic only
    .venv/bin/python benchmarks/conditional.py --estimate     # time a short class-free run, project
    .venv/bin/python benchmarks/conditional.py --proxy        # one class-free model per class instead

``train_model`` and ``sample_slide`` are the only places that call the library's training and
sampling; everything else is data, statistic and report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402
from synthetic_classes import (  # noqa: E402
    CLASSES,
    MPP,
    h_amount,
    make_slides,
    real_statistics,
    separation,
    store_rgb,
    summary,
)

import wsigen  # noqa: E402

GUIDANCE = (0.0, 1.0, 3.0)
# One thread for training and sampling, and the patches read in the training process: these tiny
# networks gain little from a second thread, and on a shared 2-core machine under load two threads
# were 3–10× slower than one (measured: 0.11 vs 0.5–1.2 s per training step at load 4).
THREADS = 1


# -- the two library calls: labelled training, class-conditional sampling ------------------------


def train_model(slides_dir: Path, out: Path, *, labels: bool, steps: int, patch: int, width: int,
                batch: int, mpp_max: float, seed: int = 0) -> dict:
    """A small UNet on the synthetic slides; ``labels``: class-conditional (folder names, label
    dropout 0.1), else class-free (``--estimate``, ``--proxy``)."""
    options = dict(max_steps=steps, patch=patch, width=width, mults=(1, 2), batch=batch, seed=seed,
                   device="cpu", mpp_min=MPP, mpp_max=mpp_max, final_mpp=MPP, recommended_size=4 * patch,
                   preview_every=0, checkpoint_every=steps, log_every=max(1, steps // 20),
                   loader_workers=0, lr_warmup=min(200, max(1, steps // 5)))
    if labels:
        options.update(labels="folders", label_dropout=0.1)
    return wsigen.train([slides_dir], out, overwrite=True, progress=False, **options)


def sample_slide(out: Path, model: Path, size: int, *, class_name: str | None, guidance: float | None,
                 seed: int, steps: int) -> Path:
    """One size² slide at ``MPP`` of class ``class_name`` with guidance w (None, None: class-free)."""
    import torch

    kw = {} if class_name is None else {"class_name": class_name, "guidance": guidance}
    wsigen.sample(out, size, model=str(model), seed=seed, steps=steps, mpp=MPP, device="cpu",
                  threads=torch.get_num_threads(), overwrite=True, **kw)
    return out


def nearest_classes(first: dict[tuple[str, float], Path], slides_dir: Path) -> dict:
    """``wsigen evaluate`` of each store in ``first`` against the labelled training slides: the
    reference class nearest in colour (OD W₁) and the distance to each class's slides."""
    from wsigen.judge.evaluate import Options

    out = {}
    for (name, w), store in sorted(first.items()):
        o = Options(mpps=[MPP], patch_size=32, patches=16, reference_labels="folders", slide_class=name)
        rows = wsigen.evaluate(store, [slides_dir], options=o)["colour"]["by_class"]
        out[f"{name} w={w:g}"] = {"nearest": next((r["class"] for r in rows if r.get("nearest")), None),
                                  "od_w1": {r["class"]: r.get("od_w1") for r in rows}}
    print("wsigen evaluate --reference-labels folders (seed 0): nearest reference class in colour (OD W₁)")
    for k, v in out.items():
        dist = "  ".join(f"{c} {d:.3f}" for c, d in v["od_w1"].items() if d is not None)
        print(f"  {k:<10} nearest {v['nearest']}   ({dist})")
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
            table[f"{w:g}"][name] = summary(vals)
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
    table, first = sample_table(args, work, lambda name: (work / f"model-{name}", None), (1.0,))
    result["sample_seconds"] = round(time.perf_counter() - t0, 1)
    result["proxy"] = table["1"]
    print_table(f"one class-free model per class ({args.steps} steps each, {result['train_seconds']} s; "
                f"sampling {result['sample_seconds']} s), H amount per seed:", table["1"])
    sep = result["proxy_separation"] = separation(table["1"]["A"], table["1"]["B"])
    print(f"  gap {sep['gap']}, difference of means {sep['mean_difference']}")
    result["evaluate"] = nearest_classes(first, work / "slides")
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
    result["evaluate"] = nearest_classes(first, work / "slides")
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
