"""Reading a DICOM whole-slide series folder back through wsidicom (``wsigen info``, ``preview``).

``open_image`` hands a folder of DICOM files to ``open_dicom`` (a ``Slide``: levels, µm/px,
regions as RGB uint8); ``describe`` is what ``wsigen info`` prints for it: size, µm/px, levels, transfer
syntax, and what the series says about being synthetic (patient, model sha256, seed).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from ..errors import WsigenError

_PROVENANCE = re.compile(r"model sha256 (?P<sha>[0-9a-f]+|None); seed (?P<seed>[^;]+)"
                         r"(?:; class (?P<cls>.+?) \(guidance (?P<w>[^)]+)\))?")


def dicom_files(path: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Files of the folder that carry the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    out = []
    p = Path(path)
    if not p.is_dir():
        return out
    for f in sorted(p.iterdir()):
        if f.is_file() and f.stat().st_size > 132:
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    out.append(f)
                    if limit and len(out) >= limit:
                        break
    return out


def is_dicom_folder(path: str | os.PathLike) -> bool:
    return bool(dicom_files(path, limit=1))


def _open(path: Path):
    from wsidicom import WsiDicom

    try:
        wsi = WsiDicom.open(path)
    except Exception as e:  # wsidicom raises its own errors, pydicom's and ValueError
        raise WsigenError(f"cannot read {path} as a DICOM whole-slide image: {e}") from None
    if not wsi.levels:
        wsi.close()
        raise WsigenError(f"{path} holds DICOM files but no whole-slide image levels")
    return wsi


@functools.cache
def slide_class(base: type) -> type:
    """``DicomSlide``, a subclass of the readers' ``Slide`` (handed in: readers imports this module)."""

    class DicomSlide(base):
        """A DICOM VL Whole Slide Microscopy series (one pyramid) opened with wsidicom."""

        def __init__(self, path: Path, mpp: float | None):
            self._wsi = _open(path)
            lv = list(self._wsi.levels)
            w0 = lv[0].size.width
            levels = [(lvl.size.width, lvl.size.height, w0 / lvl.size.width) for lvl in lv]
            if mpp is None and self._wsi.mpp is not None:
                mpp = float(self._wsi.mpp.width)  # wsidicom's "mpp" is µm per pixel
            self._levels = lv
            super().__init__(path, levels, mpp)

        def close(self):
            self._wsi.close()

        def _read(self, level, x, y, w, h):
            # read_region takes the level's own number (log2 of its downsample) and its pixel coordinates
            a = self._wsi.read_region((x, y), self._levels[level].level, (w, h), as_array=True)
            return np.ascontiguousarray(np.asarray(a, np.uint8)[..., :3])

    return DicomSlide


def open_dicom(path: str | os.PathLike, mpp: float | None, base: type):
    """The folder as a ``base`` (readers.Slide): levels, µm/px, regions as RGB uint8."""
    return slide_class(base)(Path(path), mpp)


def describe(path: str | os.PathLike) -> dict:
    """What ``wsigen info`` prints for a DICOM folder (read from the files, not from the marker)."""
    import pydicom

    path = Path(path)
    files = dicom_files(path)
    with _open(path) as wsi:
        lv = list(wsi.levels)
        levels = [[lvl.size.height, lvl.size.width] for lvl in lv]
        mpp = float(wsi.mpp.width) if wsi.mpp is not None else None
    first = None
    for f in files:  # the base level's dataset: the one with the largest matrix
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if getattr(ds, "TotalPixelMatrixColumns", 0) == levels[0][1] and "VOLUME" in list(ds.ImageType):
            first = ds
            break
    first = first or pydicom.dcmread(files[0], stop_before_pixels=True)
    desc = " ".join(str(it.get("ContributionDescription", "")) for it in first.get("ContributingEquipmentSequence", []))
    m = _PROVENANCE.search(desc)
    patient = str(first.get("PatientName", ""))
    return {
        "path": str(path), "format": "dicom", "complete": True,
        "width": levels[0][1], "height": levels[0][0], "mpp": mpp, "levels": levels,
        "synthetic": patient.startswith("SYNTHETIC") or "synthetic: true" in desc,
        "patient_name": patient, "patient_id": str(first.get("PatientID", "")),
        "study_uid": str(first.get("StudyInstanceUID", "")), "series_uid": str(first.get("SeriesInstanceUID", "")),
        "transfer_syntax": first.file_meta.TransferSyntaxUID.name,
        "model_sha256": m["sha"] if m else None, "seed": m["seed"] if m else None,
        "class": m["cls"] if m else None, "guidance": float(m["w"]) if m and m["w"] else None,
        "files": len(files), "disk_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }


def info_lines(d: dict) -> list[str]:
    """``wsigen info`` of a DICOM folder as text: one fact per line."""
    w, h, mpp = d["width"], d["height"], d["mpp"]
    size = f"{w}x{h} px" + (f" at {mpp:g} µm/px ({w * mpp / 1000:.2f} x {h * mpp / 1000:.2f} mm)" if mpp else "")
    return [
        f"dicom      {d['path']} ({d['files']} instance file(s), {d['transfer_syntax']})",
        f"size       {size}" + (", synthetic" if d["synthetic"] else ""),
        f"patient    {d['patient_name']} (ID {d['patient_id']})",
        f"model      sha256 {d['model_sha256'] or '—'}; seed {d['seed'] or '—'}",
        *([f"class      {d['class']} (classifier-free guidance w = {d['guidance']:g})"] if d.get("class") else []),
        f"levels     {', '.join(f'{lw}x{lh}' for lh, lw in d['levels'])}",
        f"series     {d['series_uid']} (study {d['study_uid']})",
        f"disk       {d['disk_bytes'] / 1e6:,.1f} MB",
    ]
