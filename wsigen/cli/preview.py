"""``wsigen preview`` (zoom figure or contact sheet) and ``wsigen evaluate`` (quality and privacy report)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError

Slide = Annotated[Path, typer.Argument(help="A wsigen store (.zarr), a slide file (OME-TIFF, TIFF, SVS, …) or a DICOM WSI folder.")]


def _pair(text: str | None, what: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be X,Y in level-0 pixels (got {text!r})") from None
    return x, y


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers (got {text!r})") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{what} must be positive numbers (got {text!r})")
    return vals


# -- terminal rendering of the report ------------------------------------------------------------


def _f(v, fmt: str = ".3f", none: str = "—") -> str:
    return none if v is None else format(v, fmt)


def render(report: dict, console) -> None:
    """The report as rich tables (the same numbers as ``--json``)."""
    from rich.table import Table

    from ..judge.classes import source_text

    s = report["slide"]
    head = f"[bold]{s['name']}[/]  {s['width']:,} × {s['height']:,} px at {s['mpp']:g} µm/px"
    if s.get("synthetic"):
        head += f"  ·  model {s.get('model')}  ·  seed {s.get('seed')}"
        head += "" if s.get("grid_shift", True) else "  ·  [yellow]fixed grid[/]"
        if s.get("class") is not None:
            w = s.get("guidance")
            head += f"  ·  class {s['class']}" + (f" (guidance {w:g})" if w is not None else "")
    console.print(head)
    refs = report.get("references") or {}
    if refs.get("total"):
        line = f"references: {refs['n']} of {refs['total']}"
        if refs.get("compared") == "class":
            line += f", those of class {refs['slide_class']}"
            line += f" ({source_text(refs.get('class_source'))})"
        elif refs.get("labels"):
            line += ", all classes"
        if refs.get("classes"):
            line += f"  ·  labels {refs['labels']}: " + ", ".join(f"{c} {n}" for c, n in refs["classes"].items())
        console.print(line)

    if report.get("stages"):
        t = Table(title="Cascade: seams (≈ 1 none, > 1 visible) and guide consistency", title_justify="left")
        for c in ("stage", "size", "µm/px", "seam: fixed grid", "seam: last step's grid", "offset",
                  "worst step's grid", "guide PSNR"):
            t.add_column(c, justify="right")
        for r in report["stages"]:
            sm = r.get("seams") or {}
            fx, ls, ws = (sm.get(g) or {} for g in ("fixed_grid", "last_step_grid", "worst_step_grid"))
            t.add_row(str(r["stage"]), f"{r['width']}×{r['height']}", f"{r['mpp']:g}",
                      _f(fx.get("score")), _f(ls.get("score")),
                      ",".join(map(str, ls["offset"])) if ls.get("offset") else "—",
                      f"{ws['score']:.3f} (step {ws['step']})" if ws else "—",
                      _f(r.get("guide_psnr_db"), ".1f") + (" dB" if r.get("guide_psnr_db") else ""))
        console.print(t)

    col = report.get("colour")
    if col and col.get("generated"):
        t = Table(title=f"Colour and stain (tissue pixels at {col['mpp']:g} µm/px)", title_justify="left")
        for c in ("", "generated", "reference", "distance"):
            t.add_column(c, justify="right" if c else "left")
        g, r, d = col["generated"], col.get("reference") or {}, col.get("distances") or {}

        def vec(v):
            return "—" if v is None else " ".join(f"{x:.2f}" for x in v)

        gs, rs = g.get("stain") or {}, r.get("stain") or {}
        t.add_row("H vector (OD)", vec(gs.get("H")), vec(rs.get("H")), _f(d.get("H_angle_deg"), ".1f") + "°")
        t.add_row("E vector (OD)", vec(gs.get("E")), vec(rs.get("E")), _f(d.get("E_angle_deg"), ".1f") + "°")
        t.add_row("OD mean R G B", vec(g.get("od_mean")), vec(r.get("od_mean")),
                  "W₁ " + vec(d.get("od_w1")) if d.get("od_w1") else "—")
        t.add_row("RGB mean", " ".join(f"{x:.0f}" for x in g["rgb_mean"]),
                  " ".join(f"{x:.0f}" for x in r["rgb_mean"]) if r.get("rgb_mean") else "—",
                  "W₁ " + vec(d.get("rgb_w1")) if d.get("rgb_w1") else "—")
        if d.get("concentration_w1"):
            t.add_row("H, E amount", "", "", "W₁ " + vec(d["concentration_w1"]))
        console.print(t)
        if col.get("by_class"):
            _by_class(col, console)

    feat = report.get("features")
    if feat and feat.get("scales"):
        n = feat["network"]
        t = Table(title=f"Patch metrics ({n['arch']}, {n['dim']}-d features at {n['input_size']} px)",
                  title_justify="left")
        for c in ("µm/px", "n gen", "n ref", "FID", "KID ×10³", "precision", "recall"):
            t.add_column(c, justify="right")
        for r in feat["scales"]:
            kid = r.get("kid")
            t.add_row(f"{r['mpp']:g}", str(r["n_generated"]), str(r["n_reference"]), _f(r.get("fid"), ".2f"),
                      "—" if kid is None else f"{kid * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}",
                      _f(r.get("precision"), ".3f"), _f(r.get("recall"), ".3f"))
        console.print(t)

    mem = report.get("memorisation")
    if mem:
        t = Table(title=f"Memorisation: distance to the nearest training patch (medians; held out: "
                        f"{mem['held_out']}; relative = nearest / mean of {mem.get('k', 50)} nearest)",
                  title_justify="left")
        for c in ("µm/px", "space", "nearest: gen", "nearest: held-out", "relative: gen",
                  "relative: held-out", "near copies", "verdict"):
            t.add_column(c, justify="right")
        for r in mem["scales"]:
            for space in ("pixel", "feature"):
                x = r.get(space)
                if not x:
                    continue
                t.add_row(f"{r['mpp']:g}", space, f"{x['distance']['generated']['median']:.3g}",
                          f"{x['distance']['held_out']['median']:.3g}",
                          f"{x['relative']['generated']['median']:.2f}",
                          f"{x['relative']['held_out']['median']:.2f}",
                          f"{x['near_copies']} of {r['n_generated']}",
                          "[red]look at the pairs[/]" if x["suspicious"] else "[green]no sign[/]")
        console.print(t)
        for p in mem.get("pairs_images", []):
            console.print(f"closest pairs: {p}")
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def _by_class(col: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"Colour by reference class ({col['mpp']:g} µm/px; H, E: mean amounts in the published "
                    "Macenko basis)", title_justify="left", caption_justify="left",
              caption="* the slide's class" if any(r.get("own") for r in col["by_class"]) else None)
    for c in ("class", "refs", "H", "E", "OD W₁", "RGB W₁", "H, E angle", ""):
        t.add_column(c, justify="left" if c in ("class", "") else "right")
    g = col["generated"].get("amounts") or [None, None]
    t.add_row("[bold]generated[/]", "", _f(g[0]), _f(g[1]), "", "", "", "")
    for r in col["by_class"]:
        a = r.get("amounts") or [None, None]
        angles = "—" if r.get("H_angle_deg") is None else f"{r['H_angle_deg']:.0f}° {r['E_angle_deg']:.0f}°"
        t.add_row(r["class"] + ("*" if r.get("own") else ""), str(r["n_references"]), _f(a[0]), _f(a[1]),
                  _f(r.get("od_w1")), _f(r.get("rgb_w1"), ".1f"), angles,
                  "[green]nearest[/]" if r.get("nearest") else "")
    console.print(t)


def _progress():
    """A rich progress callback on stderr (none when WSIGEN_NO_PROGRESS is set)."""
    if os.environ.get("WSIGEN_NO_PROGRESS"):
        return None, None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from ..run.progress import console

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console(), transient=True)
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    return bar, update


def register(app: typer.Typer) -> None:
    from .app import command

    @app.command(no_args_is_help=True)
    @command()
    def preview(
        slide: Slide,
        output: Annotated[Path, typer.Option("-o", "--output", help="Figure file (.png, .jpg, .tif, .webp).")],
        zoom: Annotated[float, typer.Option(help="Zoom factor between panels.", min=1.0)] = 4.0,
        panel: Annotated[int, typer.Option(help="Panel side in px.", min=64)] = 512,
        centre: Annotated[str | None, typer.Option(help="X,Y in level-0 px to zoom into (default: tissue, chosen automatically).")] = None,
        grid: Annotated[int | None, typer.Option(help="Instead: a contact sheet of N random tissue patches (needs --mpp).", min=1)] = None,
        mpp: Annotated[float | None, typer.Option(help="µm/px of the --grid patches.")] = None,
        size: Annotated[int, typer.Option(help="Side of a --grid patch in px.", min=16)] = 256,
        seed: Annotated[int, typer.Option(help="Seed of the --grid patch positions.", min=0)] = 0,
        slide_mpp: Annotated[float | None, typer.Option(help="µm/px of a file that does not record it.")] = None,
        colours: Annotated[int | None, typer.Option("--colours", help="Reduce a PNG to this many colours (dithered palette: much smaller files).", min=2, max=256)] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing figure.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ):
        """A figure of a slide: the whole slide, then ×zoom insets on tissue down to full resolution."""
        from ..judge.preview import preview as run

        if mpp is not None and mpp <= 0:
            raise UsageError(f"--mpp must be positive (got {mpp:g})")
        s = run(slide, output, zoom=zoom, panel=panel, centre=_pair(centre, "--centre"), grid=grid,
                mpp=mpp, size=size, seed=seed, slide_mpp=slide_mpp, overwrite=overwrite, colours=colours)
        if as_json:
            typer.echo(json.dumps(s, indent=2))
        else:
            typer.echo(f"wrote {s['output']} ({s['width']}x{s['height']} px, "
                       f"{'contact sheet' if s['kind'] == 'grid' else 'zoom figure'})")

    @app.command(no_args_is_help=True)
    @command()
    def evaluate(
        slide: Slide,
        reference: Annotated[list[Path] | None, typer.Option("--reference", "-r", help="Real slides (files, stores or folders) to compare with; repeat the option.")] = None,
        reference_labels: Annotated[str | None, typer.Option("--reference-labels", help="Classes of the --reference slides: 'folders' (each slide's folder name) or a slide,label CSV file. A slide of a class (its store's, or --class) is then compared with its class's references, and every class gets a colour row.")] = None,
        class_name: Annotated[str | None, typer.Option("--class", help="The slide's class, for an exported slide or to override the store's.")] = None,
        training_data: Annotated[list[Path] | None, typer.Option("--training-data", "-t", help="The model's training slides, for the memorisation audit; repeat the option.")] = None,
        features: Annotated[Path | None, typer.Option(help="Feature-network weights (.safetensors, or .pth read with weights_only): Inception-v3 or ResNet-50 in torchvision's names.")] = None,
        features_arch: Annotated[str, typer.Option(help="auto, inception, inception-fid or resnet50.")] = "auto",
        features_size: Annotated[int | None, typer.Option(help="Network input side in px (default: 299 Inception, 224 ResNet).", min=32)] = None,
        mpp: Annotated[str | None, typer.Option(help="µm/px of the patch metrics, comma-separated (default: the slide’s ×1, ×4, ×16).")] = None,
        patch_size: Annotated[int, typer.Option(help="Patch side in px at each µm/px.", min=8)] = 256,
        patches: Annotated[int, typer.Option(help="Patches per set and µm/px.", min=2)] = 256,
        training_patches: Annotated[int, typer.Option(help="At most this many training patches per µm/px.", min=1)] = 10000,
        seed: Annotated[int, typer.Option(help="Seed of the patch positions.", min=0)] = 0,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto (feature network).")] = "auto",
        batch: Annotated[int, typer.Option(help="Patches per forward pass.", min=1)] = 16,
        output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for report.json and the closest-pairs images.")] = None,
        page: Annotated[int | None, typer.Option(help="Read this one plane (page, Z, T or channel) of image inputs with several.", min=0)] = None,
        channels: Annotated[str | None, typer.Option(help="i,j,k: read these three planes of image inputs as R, G, B.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ):
        """Quality and privacy of a generated slide: seams, guide, colour, FID/KID/precision/recall, memorisation."""
        from ..judge.evaluate import Options
        from ..judge.evaluate import evaluate as run
        from ..slides.planes import Planes

        opts = Options(mpps=_floats(mpp, "--mpp"), patch_size=patch_size, patches=patches,
                       training_patches=training_patches, seed=seed, device=device, batch=batch,
                       features=str(features) if features else None, features_arch=features_arch,
                       features_size=features_size, output_dir=str(output) if output else None,
                       planes=Planes.of(page, channels), reference_labels=reference_labels,
                       slide_class=class_name)
        bar, update = _progress()
        try:
            if bar:
                bar.start()
            report = run(slide, reference or [], training_data or [], opts, progress=update)
        finally:
            if bar:
                bar.stop()
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            from rich.console import Console

            render(report, Console(soft_wrap=False))
