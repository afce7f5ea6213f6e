"""Many slides in one job (``--count K``): seeds seed … seed+K−1 into K stores under one folder.

A manifest (``manifest.json``) records the run and each slide's status, so ``--resume`` continues the
set. Small slides are sampled whole, one per worker; large ones are split into bands over all workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError, WsigenError
from .config import RunSpec, SlideConfig, model_config, parse_size

MANIFEST = "manifest.json"
SET_FORMAT = "wsigen-set/1"
# A slide is "small" (one worker samples it whole) when the states of all local ranks' slides
# fit in this share of the machine's memory; otherwise every slide is split into bands.
SMALL_SLIDE_MEMORY_SHARE = 0.5


def slide_name(seed: int) -> str:
    return f"slide-{seed}.zarr"


def _slide_status(path: Path) -> str:
    """complete | partial (resumable) | pending (absent or not yet a store)."""
    from ..slides.store import SlideStore

    if not path.exists():
        return "pending"
    try:
        return "complete" if SlideStore.open(path).complete else "partial"
    except WsigenError:
        return "pending"


def write_manifest(root: Path, manifest: dict) -> None:
    """Atomically: the manifest is read by --resume and by people."""
    for s in manifest["slides"]:
        s["status"] = _slide_status(root / s["store"])
    manifest["complete"] = all(s["status"] == "complete" for s in manifest["slides"])
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


def _stored_spec(manifest: dict, output: str) -> RunSpec:
    return RunSpec.from_json(output, {**manifest["options"], "seed": manifest["seed"]})


def _prepare_set(spec: RunSpec, count: int | None) -> dict:
    """Rank 0: create (or reopen with --resume) the folder and its manifest."""
    import shutil

    from ..slides.store import prepare_output
    from ..version import __version__

    root = Path(spec.output)
    if spec.resume:
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise WsigenError(f"--resume: {root} has no {MANIFEST}; it is not a wsigen slide set")
        manifest = json.loads(mpath.read_text())
        stored = _stored_spec(manifest, spec.output).to_json()
        clash = [f"{k} {v!r} (set: {stored.get(k)!r})" for k, v in spec.to_json().items()
                 if k != "threads" and stored.get(k) != v]
        if count is not None and count != manifest["count"]:
            clash.append(f"count {count} (set: {manifest['count']})")
        if clash:
            raise UsageError("--resume: options conflict with the set's manifest: "
                             + "; ".join(clash))
        return manifest
    if root.exists():
        if not spec.overwrite:
            raise WsigenError(f"output {root} exists; pass --overwrite to replace it or --resume "
                              f"to continue it")
        old = root / MANIFEST
        if old.is_file():  # a set of ours: remove its stores and manifest, nothing else
            for s in json.loads(old.read_text()).get("slides", []):
                p = root / s["store"]
                if p.exists():
                    prepare_output(p, overwrite=True)
            old.unlink()
        if root.is_dir() and any(root.iterdir()):
            raise WsigenError(f"refusing to overwrite {root}: it is not empty and not a wsigen "
                              f"slide set")
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    seed0 = int(spec.request.seed or 0)
    manifest = {"format": SET_FORMAT, "version": __version__, "count": count, "seed": seed0,
                "options": {k: v for k, v in spec.to_json().items() if k != "seed"},
                "slides": [{"seed": seed0 + i, "store": slide_name(seed0 + i), "status": "pending",
                            **_class_of(spec, i)} for i in range(count)]}
    write_manifest(root, manifest)
    return manifest


def _class_of(spec: RunSpec, i: int) -> dict:
    """Slide i's class in the manifest (``--count K --class a,b`` cycles a, b, a, …)."""
    r = spec.request.for_slide(i)
    return {"class": r.class_name} if r.class_name is not None else {}


def _split(split: str, spec: RunSpec, world: int) -> str:
    """Whole slides per worker when they are small, bands of every slide when large."""
    if split != "auto":
        return split
    import psutil

    r = spec.request
    w, h = r.size or parse_size(model_config(r.model, r.patch)["recommended_size"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    state = 3 * 4 * w * h
    small = local * state <= SMALL_SLIDE_MEMORY_SHARE * psutil.virtual_memory().total
    return "slide" if small else "band"


def _set_totals(spec: RunSpec, seeds: list[int]) -> list[int]:
    """Patch-steps of each slide (for the one bar), from the keyed grid offsets alone."""
    from ..method import stages
    from ..slides import checkpoint
    from . import sampler
    from .devices import resolve_device

    name = spec.request.model or "default"
    lm = checkpoint.load_model(name, patch=spec.request.patch)
    dev = resolve_device(spec.device)
    totals = []
    for i, s in enumerate(seeds):
        cfg = SlideConfig.resolve(replace(spec.request.for_slide(i), seed=s), lm, name, dev)
        plans = stages.plan_stages(cfg.width, cfg.height, lm.patch, lm.config["k"], cfg.mpp)
        ctxs = sampler.contexts(lm, plans, cfg.settings(), s, dev)
        totals.append(sampler.total_patches(ctxs))
    return totals


def run_set(spec: RunSpec, count: int | None, split: str, topo, bar, kv, log=None) -> dict | None:
    """Seeds seed … seed+K−1 into K stores under ``spec.output``; each rank runs its share."""
    from . import sampler, session
    from .distributed import SharedProgress

    root = Path(spec.output)
    manifest = None
    if topo.rank == 0:
        manifest = _prepare_set(spec, count)
        status = [_slide_status(root / s["store"]) for s in manifest["slides"]]
    codes = topo.broadcast([{"complete": 0, "partial": 1, "pending": 2}[s] for s in status]
                           if topo.rank == 0 else [0] * _set_count(count, root))
    if topo.rank != 0:
        manifest = json.loads((root / MANIFEST).read_text())
    slides = manifest["slides"]
    # the set's own options, with this run's device and threads (threads are per machine)
    stored = _stored_spec(manifest, spec.output)
    threads = spec.request.threads if spec.request.threads is not None else stored.request.threads
    base = replace(stored, device=spec.device, request=replace(stored.request, threads=threads))
    todo = [i for i, c in enumerate(codes) if c != 0]
    split = _split(split, base, topo.world) if todo else "slide"
    whole = todo[: len(todo) - len(todo) % topo.world] if split == "slide" else []
    banded = [i for i in todo if i not in whole]
    progress = SharedProgress(bar, topo.rank, kv, fixed_total=True)
    if topo.rank == 0 and log:
        log(f"{len(slides)} slides, seeds {slides[0]['seed']} … {slides[-1]['seed']} → {root}: "
            f"{len(slides) - len(todo)} complete, {len(whole)} to sample whole "
            f"(one per worker), "
            f"{len(banded)} split into bands over {topo.world} worker(s)")
    if topo.rank == 0 and bar is not None:
        totals = _set_totals(base, [s["seed"] for s in slides])
        bar.start(sum(totals), sum(t for t, c in zip(totals, codes, strict=True) if c == 0))
    single = sampler.Topology()
    summaries = []

    def one(i: int, t) -> None:
        s = slides[i]
        out = root / s["store"]
        one_spec = replace(base, output=str(out), resume=codes[i] == 1,
                           overwrite=codes[i] == 2 and out.exists(),
                           request=replace(base.request.for_slide(i), seed=s["seed"]))
        summaries.append(session.sample(one_spec, progress=progress, topology=t, log=None))
        if topo.rank == 0 and t is single:
            write_manifest(root, manifest)

    for i in whole[topo.rank :: topo.world]:
        one(i, single)
    for i in banded:
        one(i, topo)
    topo.barrier()
    progress.finish()
    evaluations = topo.all_sum(sum(s["evaluations"] for s in summaries))
    if topo.rank != 0:
        return None
    write_manifest(root, manifest)
    return {"output": str(root), "manifest": str(root / MANIFEST), "count": len(slides),
            "seeds": [s["seed"] for s in slides], "sampled": len(todo), "split": split,
            "whole": len(whole), "banded": len(banded), "workers": topo.world,
            "evaluations": evaluations, "complete": manifest["complete"],
            "slides": manifest["slides"]}


def _set_count(count: int | None, root: Path) -> int:
    if count is not None:
        return count
    return json.loads((root / MANIFEST).read_text())["count"]
