"""Evaluation per tissue class: which reference slides a slide of a class is compared with, and the
colour of a slide against the references of each class (``--reference-labels``).

A slide's class is the one its store records (``config["class"]``, written by ``wsigen sample
--class``), the one an export of such a store carries in its provenance, or ``--class``. With
labelled references a slide of class c is compared with the references of class c only; a slide
without a class, or references without labels, are compared with all references, and the report
says so. Every labelled reference class also gets a row of
colour and stain distances, which shows whether a class-conditional model's slide looks like its
own class more than like the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..slides.labels import Labels, read_labels
from .colour import colour_distances, colour_summary, tissue_pixels


def slide_class(info: dict | None, given: str | None, where: str = "store") -> tuple[str | None, str | None]:
    """(class, where it came from): ``--class`` if given, else the one ``info`` records (a store's
    attributes, or an export's provenance as ``{"config": …}``), else (None, None)."""
    if given is not None:
        if not str(given).strip():
            raise UsageError("--class must name a class (got an empty name)")
        return str(given), "--class"
    cls = ((info or {}).get("config") or {}).get("class")
    return (str(cls), where) if cls is not None else (None, None)


@dataclass(frozen=True)
class Selection:
    """The reference slides compared with (indices into all references), and why."""

    chosen: tuple[int, ...]
    total: int
    slide_class: str | None
    class_source: str | None  # "store", "export provenance", "--class" or None
    labels: Labels | None
    names: tuple[str | None, ...]  # each reference's class (None without labels)

    def of_class(self, c: str) -> list[int]:
        return [i for i, n in enumerate(self.names) if n == c]

    def record(self) -> dict:
        rec = {"slide_class": self.slide_class, "class_source": self.class_source,
               "compared": "class" if self.labels and self.slide_class else "all",
               "n": len(self.chosen), "total": self.total, "labels": None, "classes": None}
        if self.labels:
            rec["labels"] = self.labels.source
            rec["classes"] = dict(zip(self.labels.classes, self.labels.counts(), strict=True))
        return rec

    def note(self) -> str | None:
        """What the report should say about the choice (None when nothing needs saying)."""
        if not self.total:
            return None
        if self.labels and self.slide_class:
            return None  # the references line says which class and how many
        if self.labels:
            return (f"the slide has no class: compared with all {self.total} reference slides "
                    f"({_counts(self.labels)}); the colour table by class shows which it resembles")
        if self.slide_class:
            return (f"the slide is of class {self.slide_class!r} but the references are not labelled "
                    f"(--reference-labels): compared with all {self.total} reference slides")
        return None


def source_text(source: str | None) -> str:
    """Where a slide's class came from, as the report says it: ``slide_class``'s second value."""
    return {"store": "the store's class", "--class": "--class"}.get(source, f"the class of its {source}")


def _counts(labels: Labels) -> str:
    return ", ".join(f"{c} {n}" for c, n in zip(labels.classes, labels.counts(), strict=True))


def select(paths: list[Path], roots, spec: str | None, cls: str | None, source: str | None) -> Selection:
    """Label the references (``spec``: ``folders`` or a CSV file; None: unlabelled) and choose
    those of class ``cls``. UsageError, one line, when the class has no labelled reference."""
    if spec is not None and not paths:
        raise UsageError("--reference-labels labels the --reference slides; give some with -r")
    if spec is None or not paths:
        return Selection(tuple(range(len(paths))), len(paths), cls, source, None, (None,) * len(paths))
    labels = read_labels(spec, roots, paths, what="--reference-labels", at_least=1)
    names = tuple(labels.name(p) for p in paths)
    if cls is None:
        chosen = tuple(range(len(paths)))
    else:
        chosen = tuple(i for i, n in enumerate(names) if n == cls)
        if not chosen:
            raise UsageError(f"--reference-labels: no reference slide is labelled {cls!r} ({source_text(source)}); the "
                             f"references' classes are {_counts(labels)} (add references of {cls!r}, "
                             "or give --class to compare with another class)")
    return Selection(chosen, len(paths), cls, source, labels, names)


def by_class(pg: np.ndarray, generated: dict, sel: Selection, patches_of, seed: int,
             chosen: tuple[dict, dict] | None = None) -> list[dict]:
    """One row per labelled reference class: colour/stain distances of the generated tissue pixels
    ``pg`` (summary ``generated``) to the references of that class. ``patches_of(indices)`` gives
    the PatchSet of those references; ``chosen`` the (summary, distances) already computed for
    the selected references, reused for the class that is exactly them. The row with the smallest
    mean OD W₁ is ``nearest``."""
    rows = []
    for c in sel.labels.classes:
        idx = sel.of_class(c)
        ps = patches_of(idx)
        row = {"class": c, "n_references": len(idx), "n_patches": len(ps), "own": c == sel.slide_class}
        if chosen is not None and tuple(idx) == sel.chosen:
            s, d = chosen  # the selected references: computed by the caller already
        else:
            pr = tissue_pixels(ps.array(), seed=seed) if len(ps) else np.zeros((0, 3), np.uint8)
            s = colour_summary(pr) if len(pr) else None
            d = colour_distances(pg, pr, generated, s) if len(pr) else None
        if d is not None:
            row.update(amounts=s["amounts"], od_mean=s["od_mean"],
                       od_w1=round(float(np.mean(d["od_w1"])), 4),
                       rgb_w1=round(float(np.mean(d["rgb_w1"])), 3),
                       H_angle_deg=d.get("H_angle_deg"), E_angle_deg=d.get("E_angle_deg"))
        rows.append(row)
    scored = [r for r in rows if "od_w1" in r]
    if scored:
        best = min(scored, key=lambda r: r["od_w1"])
        for r in rows:
            r["nearest"] = r is best
    return rows
