"""``wsigen export`` (store → OME-TIFF, TIFF, SVS, DZI, PNG, DICOM) and ``wsigen info`` (what a store holds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _size(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:,.1f} {unit}"
    return f"{int(n)} B"


def info_lines(d: dict) -> list[str]:
    """``wsigen info`` as text: one fact per line."""
    if d.get("format") == "dicom":  # a DICOM export folder
        from ..slides.dicom_read import info_lines as dicom_lines

        return dicom_lines(d)
    levels = ", ".join(f"{w}x{h}" for h, w in d["levels"])
    done = set(d["stages_complete"])
    stages = " ".join(f"{s['index']}:{s['width']}x{s['height']}@{s['mpp']:g}{'✓' if s['index'] in done else '…'}"
                      for s in d["stages"])
    lines = [
        f"store      {d['path']}",
        f"status     {'complete' if d['complete'] else 'INCOMPLETE'}"
        + ("" if d["complete"] else f" ({len(done)} of {len(d['stages'])} stages done"
           + (f"; being written by {d['writer']})" if d.get("writer") else "; interrupted)")),
        f"size       {d['width']}x{d['height']} px at {d['mpp']:g} µm/px "
        f"({d['width'] * d['mpp'] / 1000:.2f} x {d['height'] * d['mpp'] / 1000:.2f} mm), synthetic",
        f"model      {d['model']} (sha256 {d['model_sha256']})",
        f"seed       {d['seed']}; {d['steps']} steps, {d['guided_steps']} guided",
        *([f"class      {d['class']} (classifier-free guidance w = {d['guidance']:g})"] if d.get("class") else []),
        f"levels     {levels or '—'}",
        f"stages     {stages}" + (" (intermediate stages dropped)" if d["stages_dropped"] else ""),
    ]
    if d["state"]:
        lines.append(f"state      stage {d['state']['stage']} saved after step {d['state']['step']}")
    for c in d.get("batch_changes") or []:
        lines.append(f"batch      {c['old']} → {c['new']} from stage {c['stage']} step {c['step']} "
                     f"(--resume --batch {c['new']})")
    lines.append(f"disk       {_size(d['disk_bytes'])}")
    lines.append(f"written by wsigen {d['version']}, torch {d['torch_version']}")
    if d["resume"]:
        lines.append(f"resume     {d['resume']}")
    return lines


def register(app: typer.Typer) -> None:
    from .app import command

    @app.command()
    @command()
    def info(
        store: Annotated[Path, typer.Argument(help="A slide store (zarr) written by wsigen sample, or a DICOM folder written by wsigen export.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    ):
        """Size, µm/px, model, seed, completed stages, disk use and how to resume a store."""
        from ..slides.store import info as describe

        d = describe(store)
        typer.echo(json.dumps(d, indent=2) if as_json else "\n".join(info_lines(d)))

    @app.command()
    @command()
    def export(
        store: Annotated[Path, typer.Argument(help="A slide store (zarr) written by wsigen sample.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Output file (dzi: OUT.dzi and OUT_files/; dicom: a folder).")],
        format: Annotated[str, typer.Option("--format", "-f", help="ome-tiff, tiff (OpenSlide), svs (Aperio), dzi, png or dicom (a folder: one DICOM WSI series).")] = "ome-tiff",
        compression: Annotated[str | None, typer.Option(help="jpeg, deflate, zstd or none (default jpeg; png is always deflate; dicom: jpeg, jpeg2000 or jpegls, the last two lossless).")] = None,
        quality: Annotated[int, typer.Option(help="JPEG quality.", min=1, max=100)] = 90,
        tile: Annotated[int, typer.Option(help="Tile size in px (multiple of 16).", min=16)] = 512,
        level: Annotated[int | None, typer.Option(help="Pyramid level to export as the full resolution (0 = largest).", min=0)] = None,
        max_size: Annotated[int | None, typer.Option(help="Start at the largest level whose longer side fits (png default 4096).", min=1)] = None,
        workers: Annotated[int | None, typer.Option(help="Encoder threads (default: CPU count, at most 8).", min=1)] = None,
        partial: Annotated[bool, typer.Option(help="Export an incomplete store as it is (unwritten pixels are black).")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
        uid_root: Annotated[str, typer.Option(help="dicom: root of the study/series/instance UIDs (default 2.25.: UUID-derived).")] = "2.25.",
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ):
        """Export a store as pyramidal OME-TIFF, OpenSlide TIFF, Aperio SVS, Deep Zoom, PNG or DICOM WSI."""
        from ..slides.exporting import export as run_export

        s = run_export(store, output, format=format, compression=compression, quality=quality,
                       tile=tile, level=level, max_size=max_size, partial=partial,
                       overwrite=overwrite, workers=workers, uid_root=uid_root)
        if as_json:
            typer.echo(json.dumps(s, indent=2))
            return
        what = s["compression"] + (f" q{s['quality']}" if s["quality"] else "")
        typer.echo(f"wrote {s['output']}: {s['format']}, {s['width']}x{s['height']} px at {s['mpp']:g} µm/px, "
                   f"{s['levels']} level(s), {what}, {_size(s['bytes'])}"
                   + ("" if s["complete"] else " (partial store)"))
