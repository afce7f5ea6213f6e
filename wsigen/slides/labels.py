"""Tissue-class labels of slides: a ``slide,label`` CSV file, or each slide's parent folder name.

``--labels labels.csv``: one row per slide, ``slide`` a file name, or a path relative to one of
the folders given (or absolute); a header row ``slide,label`` is optional. ``--labels folders``:
a slide's class is the name of the folder holding it. Every slide must get exactly one class,
every row must name a slide that is there, and there must be at least two classes. Classes are
numbered in sorted name order, so the numbering depends on the names alone.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

FOLDERS = "folders"


@dataclass(frozen=True)
class Labels:
    """Class names (sorted) and each slide's class."""

    classes: tuple[str, ...]
    by_slide: dict[Path, str]  # resolved slide path → class name
    source: str  # "folders" or the CSV file's path

    def name(self, slide: str | os.PathLike) -> str:
        return self.by_slide[Path(slide).resolve()]

    def index(self, slide: str | os.PathLike) -> int:
        return self.classes.index(self.name(slide))

    def counts(self) -> list[int]:
        """Slides per class, in class order."""
        names = list(self.by_slide.values())
        return [names.count(c) for c in self.classes]

    def record(self) -> dict:
        """What a checkpoint or report records: source, classes, counts, each slide's class by name."""
        return {"source": self.source, "classes": list(self.classes), "counts": self.counts(),
                "slides": {p.name: c for p, c in sorted(self.by_slide.items())}}


def read_labels(spec: str | os.PathLike, roots, slides, what: str = "--labels",
                at_least: int = 2) -> Labels:
    """The class of each of ``slides`` (files found under ``roots``, the paths the user gave).

    ``spec`` is ``folders`` or a CSV file. UsageError, one line, on anything missing or unclear.
    """
    slides = [Path(s).resolve() for s in slides]
    if str(spec) == FOLDERS:
        by_slide = {p: p.parent.name for p in slides}
        source = FOLDERS
    else:
        by_slide = _from_csv(Path(spec), [Path(r) for r in roots], slides, what)
        source = str(spec)
    missing = [p for p in slides if p not in by_slide]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UsageError(f"{what}: slide {missing[0]} has no label{more} (add a row for it to {spec})")
    classes = tuple(sorted(set(by_slide.values())))
    if len(classes) < at_least:
        raise UsageError(f"{what}: every slide has the class {classes[0]!r}; class-conditional training "
                         "needs at least two classes (train without --labels for one)")
    return Labels(classes, by_slide, source)


def _from_csv(path: Path, roots: list[Path], slides: list[Path], what: str) -> dict[Path, str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UsageError(f"{what}: label file not found: {path} (give a slide,label CSV file or 'folders')") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{what}: cannot read {path} ({e})") from None
    numbered = [(n, [c.strip() for c in r]) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]
    if numbered and [c.lower() for c in numbered[0][1]] == ["slide", "label"]:
        numbered = numbered[1:]
    if not numbered:
        raise UsageError(f"{what}: {path} has no slide,label rows")
    by_name: dict[str, list[Path]] = {}
    for p in slides:
        by_name.setdefault(p.name, []).append(p)
    out: dict[Path, str] = {}
    for n, row in numbered:
        if len(row) != 2 or not row[0] or not row[1]:
            raise UsageError(f"{what}: {path} line {n}: expected 'slide,label' (got {','.join(row)!r})")
        name, label = row
        p = _match(name, roots, slides, by_name)
        if p is None:
            raise UsageError(f"{what}: {path} line {n}: slide {name!r} is not among the slides given")
        if p == "ambiguous":
            raise UsageError(f"{what}: {path} line {n}: several slides are called {name!r}; give its path "
                             "relative to the slides folder")
        if p in out and out[p] != label:
            raise UsageError(f"{what}: {path} line {n}: slide {name!r} is labelled both {out[p]!r} and {label!r}")
        out[p] = label
    return out


def _match(name: str, roots: list[Path], slides: list[Path], by_name: dict[str, list[Path]]):
    """The slide a CSV row names: an absolute path, a path relative to a root, or a file name."""
    known = set(slides)
    cands = [Path(name)] if Path(name).is_absolute() else [r / name for r in roots if r.is_dir()]
    for c in cands:
        c = c.resolve()
        if c in known:
            return c
    if "/" not in name and os.sep not in name:
        found = by_name.get(name, [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            return "ambiguous"
    return None
