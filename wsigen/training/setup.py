"""What a training run starts from: its config (the saved one on ``--resume``), its slides and
their class labels, the patch sampler, the checkpoint config and the initial weights
(``--init-from``). Everything here is checked before anything is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError, WsigenError
from ..slides import checkpoint, readers
from ..slides.labels import Labels, read_labels
from . import data, log
from .config import TrainConfig, TrainOptions
from .state import KEYS_VERSION, OLD, PARTIAL, STATE_DIR, SavedState, has_state, load_state

PREVIEW_DIR = "preview"
#: The class embedding's key in a denoiser's state dict (EDMPrecond → UNet.class_emb)
CLASS_EMB = "net.class_emb.weight"


def resolve(
    options: TrainOptions, out: Path, resume: bool, overwrite: bool
) -> tuple[TrainConfig, SavedState | None]:
    """The run's config (the saved one on resume) and its saved state. Writes nothing: on
    ``overwrite`` the caller clears DIR (:func:`clear_run`) once every input is checked."""
    if resume:
        if not has_state(out):
            raise WsigenError(f"--resume: no training state in {out} (expected {out / STATE_DIR})")
        saved = load_state(out)
        if saved.keys_version != KEYS_VERSION:
            raise WsigenError(
                f"--resume: {out / STATE_DIR} was written by an older wsigen whose patches and "
                "noise are drawn differently, so it cannot be resumed exactly; start again with "
                "--overwrite (or fine-tune its model with --init-from)"
            )
        return options.resumed(saved.config), saved
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise WsigenError(
            f"{out} exists and is not empty; use --resume to continue or --overwrite to start again"
        )
    return options.config, None


def clear_run(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote into DIR (nothing else)."""
    for name in ("model.safetensors", STATE_DIR, OLD, PARTIAL, log.LOG_FILE, PREVIEW_DIR):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunLabels:
    """A labelled run's classes and each slide's class index, in the order of the slides."""

    labels: Labels
    per_slide: list[int]

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    def record(self, files: list[Path]) -> dict:
        """What train-state records, so that a resume with other labels is refused."""
        return {"source": self.labels.source, "classes": self.classes,
                "slides": [self.labels.name(f) for f in files]}


def slide_files(cfg: TrainConfig, slides) -> tuple[list[Path], RunLabels | None]:
    """The slide files under ``slides`` (files and folders) and, with ``--labels``, their classes
    (the folders given are where a CSV row's relative path starts)."""
    files = readers.find_images(slides)
    if cfg.labels is None:
        return files, None
    labels = read_labels(cfg.labels, [Path(r) for r in slides], files)
    return files, RunLabels(labels, [labels.index(f) for f in files])


def check_resumed_labels(saved: SavedState, record: dict | None, names: list[str]) -> None:
    """Refuse a resume whose classes, or any slide's class, differ from the saved run's."""
    before = saved.info.get("labels")
    if before is None and record is None:
        return
    if before is None or record is None:  # the config's labels already differ: refused earlier
        raise UsageError("--resume with labels that differ from the saved run")
    if before["classes"] != record["classes"]:
        raise UsageError(f"--resume with other classes than the saved run ({', '.join(record['classes'])}; "
                         f"saved: {', '.join(before['classes'])}); start a new run or --init-from its model")
    for name, a, b in zip(names, before["slides"], record["slides"], strict=True):
        if a != b:
            raise UsageError(f"--resume with changed labels: slide {name} was {a!r} in the saved run, "
                             f"now {b!r}; start a new run or --init-from its model")


def make_sampler(cfg: TrainConfig, files: list[Path], labels: RunLabels | None) -> data.PatchSampler:
    slides_data = data.load_slides(files, mpp=cfg.slide_mpp, od_threshold=cfg.tissue_od,
                                   stain_ref=cfg.stain_normalise, fit_stains=cfg.morphology_weight > 0)
    target = data.reference_stain(cfg.stain_normalise) if cfg.stain_normalise else None
    return data.PatchSampler(
        slides_data,
        cfg.patch,
        cfg.mpp_min,
        cfg.mpp_max,
        cfg.tissue_threshold,
        cfg.mpp_sampling,
        stain_target=target,
        classes=None if labels is None else labels.per_slide,
        nuclei=cfg.morphology_weight > 0,
    )


def class_config(labels: RunLabels | None, cfg: TrainConfig) -> dict:
    """The checkpoint config's class fields (none for a class-free run: its config is unchanged)."""
    if labels is None:
        return {}
    return {"classes": labels.classes, "class_slides": labels.labels.counts(),
            "label_dropout": cfg.label_dropout}


def describe_data(described: list[dict]) -> str:
    """The checkpoint's ``training_data`` line: each slide with its hash and µm/px."""
    return "; ".join(
        f"{d['name']} (sha256 {d['sha256'][:16]}…, {d['mpp']:.4g} µm/px)" if d["sha256"] else d["name"]
        for d in described
    )


def _without_classes(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "classes"}


def init_weights(net: torch.nn.Module, spec: str, arch: dict, training_data: str,
                 classes: list[str] | None = None) -> str:
    """Start ``net`` from the weights of model ``spec`` (fine-tuning); same network only.

    A class-free model starts a labelled run with every weight and the class embedding at zero
    (so each class's call is at first the class-free call); a labelled model starts a run with
    the same classes with everything, and a class-free run without its class embedding.
    Returns the training-data line of the new checkpoint, which names the starting model.
    """
    base = checkpoint.load_model(spec)
    theirs_arch = base.config["arch"]
    if _without_classes(theirs_arch) != _without_classes(arch):
        theirs = {k: v for k, v in _without_classes(theirs_arch).items() if arch.get(k) != v}
        raise UsageError(
            f"--init-from {spec}: its network differs from this run's "
            f"({', '.join(f'{k}={v}' for k, v in sorted(theirs.items()))}); give the same "
            "--width/--mults as the model"
        )
    theirs_classes, ours = base.classes, list(classes or [])
    state = dict(base.denoiser.state_dict())
    note = ""
    if theirs_classes and ours and theirs_classes != ours:
        raise UsageError(
            f"--init-from {spec}: its classes ({', '.join(theirs_classes)}) differ from this run's "
            f"labels ({', '.join(ours)}); a class embedding cannot be carried over to other classes"
        )
    if ours and not theirs_classes:
        state[CLASS_EMB] = torch.zeros_like(net.state_dict()[CLASS_EMB])
        note = ", class embedding started at zero"
    elif theirs_classes and not ours:
        del state[CLASS_EMB]
        note = ", its class embedding dropped"
    net.load_state_dict(state)
    return (
        f"fine-tuned from {base.name} (sha256 {base.sha256[:16]}…, trained on "
        f"{base.config.get('training_data') or 'unknown data'}{note}) on {training_data}"
    )


def training_config(ckpt_cfg: dict, step: int, images: int, cfg: TrainConfig) -> dict:
    """The checkpoint config plus how far training got (ignored by ``validate_config``)."""
    extra = {}
    if cfg.labels is not None:
        extra["labels"] = cfg.labels
    if cfg.morphology_weight:
        extra["morphology_weight"] = cfg.morphology_weight
    return {
        **ckpt_cfg,
        "training": {
            "step": step,
            "images": images,
            "batch": cfg.batch,
            "lr": cfg.lr,
            "mpp_sampling": cfg.mpp_sampling,
            "seed": cfg.seed,
            "tissue_threshold": cfg.tissue_threshold,
            "stain_normalise": cfg.stain_normalise,
            **extra,
        },
    }
