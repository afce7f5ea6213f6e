"""The store's layout rules outside the class: what counts as a store, replacing an output, the
OME-NGFF attributes, the checks of the 'wsigen' attributes, and what ``wsigen info`` reports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import WsigenError


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr v3 store (a wsigen store or not: the attributes say which)."""
    return (Path(path) / "zarr.json").is_file()


def prepare_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; never delete what is not ours."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume to continue it")
        if p.is_dir() and not p.is_symlink() and (is_store(p) or not any(p.iterdir())):
            shutil.rmtree(p)
        else:
            raise WsigenError(f"refusing to overwrite {p}: it is not a wsigen store")
    parent = p.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise WsigenError(f"cannot create {p}: {parent} is not a directory")
    return p


def ngff_attrs(shapes: list[tuple[int, int]], mpp: float, name: str) -> dict:
    """OME-NGFF 0.5 'ome' attributes: axes c, y, x; scales in µm; RGB rendering hints."""
    datasets = [
        {"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * 2**i, mpp * 2**i]}]}
        for i in range(len(shapes))
    ]
    colours = ["FF0000", "00FF00", "0000FF"]
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
            "type": "mean",
            "metadata": {"method": "wsigen.slides.store.downsample2",
                         "description": "integer 2x2 mean, round half up; odd edges repeat"},
        }],
        "omero": {
            "channels": [
                {"label": lab, "color": col, "active": True,
                 "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for lab, col in zip(("R", "G", "B"), colours, strict=True)
            ],
            "rdefs": {"model": "color"},
        },
    }


def damage(info: dict) -> str | None:
    """What is wrong with the 'wsigen' attributes the code relies on, or None."""
    stages = info.get("stages")
    if not isinstance(stages, list) or not stages:
        return "stages is not a list"
    for i, st in enumerate(stages):
        if not (isinstance(st, dict) and st.get("index") == i
                and all(isinstance(st.get(k), int) and st[k] > 0 for k in ("height", "width"))
                and isinstance(st.get("mpp"), int | float) and st["mpp"] > 0):
            return f"stage {i} is malformed"
    done = info.get("stages_complete")
    if not isinstance(done, list) or not all(isinstance(l, int) for l in done):
        return "stages_complete is not a list of stage numbers"
    if not isinstance(info.get("complete"), bool):
        return "complete is not true or false"
    state = info.get("state")
    if state is not None and not (isinstance(state, dict) and isinstance(state.get("stage"), int)
                                  and isinstance(state.get("step"), int)):
        return "state is malformed"
    return None


def describe(store) -> dict:
    """What ``wsigen info`` prints of a ``SlideStore``: size, µm/px, model, seed, stages, resumability, disk."""
    i = store.info
    cfg = i.get("config", {})
    last = store.stages[-1]
    dropped = bool(i.get("stages_dropped"))
    stages = [{**st, "complete": store.stage_complete(st["index"]),
               "present": st["index"] == len(store.stages) - 1 or (
                   not dropped and store.stage_name(st["index"]) in store.group)}
              for st in store.stages]
    model = i.get("model", {})
    done = i.get("complete", False)
    holder = None if done else store.writer()
    return {
        "path": str(store.path), "complete": done, "synthetic": i.get("synthetic", True),
        "width": last["width"], "height": last["height"], "mpp": last["mpp"],
        "levels": [list(store.group[n].shape[1:]) for n in store.level_names()],
        "model": model.get("name") if isinstance(model, dict) else model,
        "model_sha256": i.get("model_sha256") or (model.get("sha256") if isinstance(model, dict) else None),
        "seed": i.get("seed"), "version": i.get("version"), "torch_version": i.get("torch_version"),
        "steps": cfg.get("steps"), "guided_steps": cfg.get("guided_steps"),
        "class": cfg.get("class"), "guidance": cfg.get("guidance"),
        "stages": stages, "stages_complete": i.get("stages_complete", []),
        "state": i.get("state"), "stages_dropped": dropped,
        "resume": None if done or holder else store.resume_command(),
        "writer": holder.describe() if holder else None,
        "batch_changes": cfg.get("batch_changes", []),
        "disk_bytes": store.disk_bytes(),
    }
