"""``DIR/train-state/``: what an exact resume needs, as safetensors + JSON (never pickle).

``model.safetensors`` (raw weights), ``ema.safetensors``, ``optimizer.safetensors`` (AdamW's
moments, one tensor per parameter and name) and ``state.json`` (step, images, elapsed time, the
run's :class:`TrainConfig`, the slides and their classes, the optimizer's param groups, the AMP
scaler). Randomness
is keyed by (seed, step, rank), so there is no generator state to keep.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import WsigenError
from .config import TrainConfig

STATE_DIR = "train-state"
PARTIAL, OLD = STATE_DIR + ".partial", STATE_DIR + ".old"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"{pid}.{name}"] = (
                (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
            )
    return tensors, {"param_groups": sd["param_groups"]}


def _cpu(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Reached:
    """How far a run got: optimizer steps, images seen, training seconds over all its sessions."""

    step: int = 0
    images: int = 0
    elapsed: float = 0.0


@dataclass(frozen=True)
class RunRecord:
    """What identifies a run in ``state.json`` besides its progress."""

    config: TrainConfig
    slides: list[dict]  # data.PatchSampler.describe(): name, path, sha256, µm/px
    world_size: int
    #: a labelled run's classes and each slide's class (``setup.RunLabels.record``); a resume
    #: with other labels is refused
    labels: dict | None = None

    def to_json(self) -> dict:
        d = {
            "config": self.config.to_json(),
            "slides": self.slides,
            "world_size": self.world_size,
            "torch": torch.__version__,
        }
        return d if self.labels is None else {**d, "labels": self.labels}


def save_state(
    out: Path,
    net: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    reached: Reached,
    run: RunRecord,
    scaler=None,
) -> None:
    """Write DIR/train-state atomically: a new folder, then a rename (state.json written last)."""
    tmp, final, old = out / PARTIAL, out / STATE_DIR, out / OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu(net), str(tmp / "model.safetensors"))
    save_file(_cpu(ema), str(tmp / "ema.safetensors"))
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "step": reached.step,
        "images": reached.images,
        "elapsed": reached.elapsed,
        **run.to_json(),
        "optimizer": meta,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "scheme": "keyed by (seed, TRAIN, what, step, rank, index) via wsigen.method.keys; "
                      "nothing else to restore",
            "version": KEYS_VERSION,
        },
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


#: The keyed-randomness scheme of a train-state. 2 (issue 13): one key per patch, per loss
#: noise and per dropout draw; states without it drew a step from one stream and cannot be
#: resumed exactly.
KEYS_VERSION = 2


@dataclass(frozen=True)
class SavedState:
    """A training state read back: ``state.json`` and the three tensor files."""

    info: dict  # state.json as written by save_state
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_json(self.info["config"])

    @property
    def reached(self) -> Reached:
        return Reached(self.info["step"], self.info["images"], self.info.get("elapsed", 0.0))

    @property
    def slide_hashes(self) -> list[str | None]:
        return [d.get("sha256") for d in self.info.get("slides", [])]

    @property
    def slide_names(self) -> list[str]:
        return [d["name"] for d in self.info.get("slides", [])]

    @property
    def keys_version(self) -> int:
        return int(self.info.get("rng", {}).get("version", 1))

    @property
    def scaler(self) -> dict | None:
        return self.info.get("scaler")

    def optimizer_state(self) -> dict:
        """The optimizer's ``state_dict`` again, for ``load_state_dict``."""
        state: dict = {}
        for key, v in self.optimizer.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        return {"state": state, "param_groups": self.info["optimizer"]["param_groups"]}


def has_state(out: Path) -> bool:
    return (out / STATE_DIR / "state.json").is_file() or (out / OLD / "state.json").is_file()


def load_state(out: Path) -> SavedState:
    d = out / STATE_DIR
    if not (d / "state.json").is_file():
        old = out / OLD  # interrupted between the two renames
        if (old / "state.json").is_file():
            d = old
        else:
            raise WsigenError(f"nothing to resume in {out}: {d}/state.json is missing")
    try:
        return SavedState(
            json.loads((d / "state.json").read_text()),
            load_file(str(d / "model.safetensors")),
            load_file(str(d / "ema.safetensors")),
            load_file(str(d / "optimizer.safetensors")),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise WsigenError(
            f"cannot read the training state in {d} ({e}); start again with --overwrite"
        ) from None
