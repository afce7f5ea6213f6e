"""Pictures of a slide: the zoom figure (whole slide, then ×zoom insets down to full resolution,
as in Harb et al. Fig. 2) and a contact sheet of random tissue patches at a chosen µm/px.

Slides are wsigen stores or any image ``wsigen.slides.readers`` opens (TIFF, OME-TIFF, SVS, …). Only the
regions a panel shows are read, each from the coarsest pyramid level that is fine enough.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError, WsigenError
from ..slides import readers
from .drawing import draw_scale_bar, draw_text, format_um, load_font, text_width
from .sources import describe, open_slide
from .tissue import tissue_boxes, tissue_centre

ZOOM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b"]


@dataclass
class Panel:
    """One panel: a level-0 box shown at ``scale`` level-0 pixels per panel pixel."""

    x: float
    y: float
    w: float
    h: float
    scale: float
    image: np.ndarray | None = None


def zoom_panels(slide: readers.Slide, zoom: float = 4, panel: int = 512,
                centre: tuple[float, float] | None = None) -> list[Panel]:
    """The whole slide, then boxes zoom× smaller per side, each centred on tissue inside the last,
    down to full resolution (the last step may zoom less)."""
    if zoom <= 1:
        raise UsageError(f"--zoom must be greater than 1 (got {zoom:g})")
    W, H = slide.width, slide.height
    d0 = max(W, H) / panel
    scales = [max(d0, 1.0)]
    while scales[-1] > 1 + 1e-9:
        scales.append(max(scales[-1] / zoom, 1.0))
    tw, th = max(1, round(W / scales[0])), max(1, round(H / scales[0]))
    first = Panel(0, 0, W, H, scales[0], slide.read_scaled(0, 0, W, H, tw, th))
    panels = [first]
    for s in scales[1:]:
        prev = panels[-1]
        side_w, side_h = min(panel * s, W), min(panel * s, H)
        if centre is not None:
            cx, cy = centre
        else:
            px, py = tissue_centre(prev.image, round(side_w / prev.scale))
            cx, cy = prev.x + px * prev.scale, prev.y + py * prev.scale
        # keep the box inside the previous panel's box and inside the slide
        x = min(max(cx - side_w / 2, prev.x), prev.x + prev.w - side_w)
        y = min(max(cy - side_h / 2, prev.y), prev.y + prev.h - side_h)
        x, y = max(0.0, min(x, W - side_w)), max(0.0, min(y, H - side_h))
        ow, oh = max(1, round(side_w / s)), max(1, round(side_h / s))
        image = slide.read_scaled(x, y, side_w, side_h, ow, oh)
        panels.append(Panel(x, y, side_w, side_h, s, image))
    return panels


def zoom_figure(slide: readers.Slide, zoom: float = 4, panel: int = 512,
                centre: tuple[float, float] | None = None):
    """The figure as a Pillow image: panels left to right, each with the next one's box drawn in it."""
    from PIL import Image, ImageDraw

    panels = zoom_panels(slide, zoom, panel, centre)
    gap, margin = max(24, panel // 10), 16
    font, small = load_font(max(12, panel // 28)), load_font(max(11, panel // 34))
    title_h = margin + round(font.size * 1.4 + small.size * 1.3) + margin
    cap_h = round(small.size * 2.8)
    n = len(panels)
    mpp = slide.mpp
    info = describe(slide)
    title = f"{info['name']}: {slide.width:,} × {slide.height:,} px"
    if mpp:
        title += (f" at {mpp:g} µm/px ({slide.width * mpp / 1000:.2f} × "
                  f"{slide.height * mpp / 1000:.2f} mm)")
    sub = []
    if info.get("synthetic"):
        sub.append(f"synthetic · model {info.get('model')} · seed {info.get('seed')}"
                   + ("" if info.get("grid_shift", True) else " · fixed grid"))
    sub.append("each box shows where the next panel comes from"
               + ("" if mpp else " · µm/px unknown: scale bars in pixels"))
    sub = "  ·  ".join(sub)
    width = max(2 * margin + n * panel + (n - 1) * gap, 2 * margin + text_width(title, font),
                2 * margin + text_width(sub, small))
    height = title_h + panel + cap_h + margin
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    over = Image.new("RGBA", fig.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    draw_text(d, (margin, margin // 2), title, font, (0, 0, 0, 255))
    draw_text(d, (margin, margin // 2 + round(font.size * 1.4)), sub, small, (90, 90, 90, 255))
    boxes = []
    for i, p in enumerate(panels):
        ox = margin + i * (panel + gap)
        ih, iw = p.image.shape[:2]
        # centre a panel's image in its square cell (the overview of a non-square slide)
        px0, py0 = ox + (panel - iw) // 2, title_h + (panel - ih) // 2
        fig.paste(Image.fromarray(p.image), (px0, py0))
        boxes.append((px0, py0, iw, ih))
        colour = ZOOM_COLOURS[(i - 1) % len(ZOOM_COLOURS)] if i else "#555555"
        d.rectangle([px0 - 1, py0 - 1, px0 + iw, py0 + ih], outline=colour, width=3 if i else 1)
        draw_scale_bar(d, px0 + 8, py0 + ih - 8, iw, mpp * p.scale if mpp else None, small)
        mag = panels[0].scale / p.scale
        if i == 0:
            cap = "whole slide"
        elif i == n - 1 and p.scale <= 1 + 1e-9:
            cap = f"×{mag:.3g} · full resolution"
        else:
            cap = f"×{mag:.3g}"
        field = f"{p.w * mpp / 1000:.3g} mm" if mpp and p.w * mpp >= 1000 else (
            f"{p.w * mpp:.3g} µm" if mpp else f"{p.w:.0f} px")
        cap2 = f"{mpp * p.scale:.3g} µm/px · field {field}" if mpp else f"{p.scale:.3g} px/px · field {field}"
        draw_text(d, (px0, title_h + panel + 6), cap, small, (0, 0, 0, 255))
        draw_text(d, (px0, title_h + panel + 6 + round(small.size * 1.2)), cap2, small, (90, 90, 90, 255))
    for i in range(1, n):
        prev, p = panels[i - 1], panels[i]
        bx, by, _, _ = boxes[i - 1]
        colour = ZOOM_COLOURS[(i - 1) % len(ZOOM_COLOURS)]
        rx0 = bx + (p.x - prev.x) / prev.scale
        ry0 = by + (p.y - prev.y) / prev.scale
        rw, rh = max(p.w / prev.scale, 3), max(p.h / prev.scale, 3)
        d.rectangle([rx0, ry0, rx0 + rw, ry0 + rh], outline=colour, width=3)
        nx, ny, _, nh = boxes[i]
        for ya, yb in ((ry0, ny), (ry0 + rh, ny + nh)):
            d.line([(rx0 + rw, ya), (nx, yb)], fill=colour, width=2)
    fig.paste(over, (0, 0), over)
    return fig


def patch_grid(slide: readers.Slide, count: int, mpp: float, size: int = 256, seed: int = 0,
               columns: int | None = None):
    """A contact sheet of ``count`` random tissue patches of ``size`` px at ``mpp`` µm/px."""
    from PIL import Image, ImageDraw

    if count < 1:
        raise UsageError(f"--grid must be at least 1 (got {count})")
    if slide.mpp is None:
        raise WsigenError(f"{slide.path} does not say how many µm a pixel is; pass --slide-mpp")
    if mpp < slide.mpp * (1 - 1e-6):
        raise UsageError(f"--mpp {mpp:g} is finer than the slide's {slide.mpp:g} µm/px "
                         "(patches would be upsampled)")
    footprint = size * mpp / slide.mpp
    if footprint > min(slide.width, slide.height):
        raise UsageError(f"a {size} px patch at {mpp:g} µm/px ({footprint:.0f} level-0 px) does not "
                         f"fit in the {slide.width}x{slide.height} slide; use a smaller --mpp or --size")
    corners = tissue_boxes(slide, footprint, count, seed)
    if not corners:
        raise WsigenError(f"{slide.path}: no tissue found for {size} px patches at {mpp:g} µm/px")
    cols = columns or math.ceil(math.sqrt(len(corners)))
    rows = math.ceil(len(corners) / cols)
    gap, margin = 8, 12
    font, small = load_font(max(12, size // 14)), load_font(max(10, size // 20))
    title_h = 6 + round(font.size * 1.4 + small.size * 1.3) + 8
    name = describe(slide)["name"]
    title = (f"{name}: {len(corners)} random tissue patches at {mpp:g} µm/px "
             f"({size} px = {format_um(size * mpp)})")
    sub = f"labels: top-left corner in level-0 pixels · seed {seed}"
    width = max(2 * margin + cols * size + (cols - 1) * gap, 2 * margin + text_width(title, font),
                2 * margin + text_width(sub, small))
    fig = Image.new("RGB", (width, title_h + rows * (size + gap) + margin), (255, 255, 255))
    over = Image.new("RGBA", fig.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    draw_text(d, (margin, 6), title, font, (0, 0, 0, 255))
    draw_text(d, (margin, 6 + round(font.size * 1.4)), sub, small, (90, 90, 90, 255))
    for j, (x, y) in enumerate(corners):
        r, c = divmod(j, cols)
        ox, oy = margin + c * (size + gap), title_h + r * (size + gap)
        tile = slide.read_scaled(x, y, footprint, footprint, size, size)
        fig.paste(Image.fromarray(tile), (ox, oy))
        label = f"{x:,.0f}, {y:,.0f}"
        tb = d.textbbox((0, 0), label, font=small)
        d.rectangle([ox, oy, ox + tb[2] + 6, oy + tb[3] + 4], fill=(255, 255, 255, 200))
        draw_text(d, (ox + 3, oy + 2), label, small, (0, 0, 0, 255))
        if j == 0:
            draw_scale_bar(d, ox + 6, oy + size - 6, size, mpp, small)
    fig.paste(over, (0, 0), over)
    return fig


def figure_format(path: Path, colours: int | None = None) -> str:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
           ".webp": "WEBP"}.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"unsupported figure format {Path(path).suffix or '(none)'}: "
                         "use .png, .jpg, .tif or .webp")
    if colours is not None and (fmt != "PNG" or not 2 <= colours <= 256):
        raise UsageError("--colours takes 2 … 256 and applies to PNG figures only")
    return fmt


def save_image(img, path: str | os.PathLike, overwrite: bool = False,
               colours: int | None = None) -> Path:
    """Write a figure; the format follows the suffix (PNG, JPEG, TIFF, WebP). ``colours``
    reduces a PNG to a dithered palette of that many colours (a third of the size or less)."""
    from PIL import Image

    p = Path(path)
    if p.exists() and not overwrite:
        raise WsigenError(f"output {p} exists; pass --overwrite to replace it")
    fmt = figure_format(p, colours)
    kw = {"optimize": True} if fmt == "PNG" else {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    if colours is not None:
        img = img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.FLOYDSTEINBERG)
    tmp = p.with_name(p.name + ".partial")
    img.save(tmp, format=fmt, **kw)
    os.replace(tmp, p)
    return p


def preview(path, output, *, zoom: float = 4, panel: int = 512, centre=None,
            grid: int | None = None, mpp: float | None = None, size: int = 256, seed: int = 0,
            slide_mpp: float | None = None, overwrite: bool = False,
            colours: int | None = None) -> dict:
    """Write the zoom figure (or, with ``grid``, a contact sheet at ``mpp``); returns a summary."""
    if Path(output).exists() and not overwrite:
        raise WsigenError(f"output {output} exists; pass --overwrite to replace it")
    figure_format(output, colours)
    with open_slide(path, slide_mpp) as slide:
        if grid is not None:
            if mpp is None:
                raise UsageError("--grid needs --mpp: the µm/px of the patches")
            img = patch_grid(slide, grid, mpp, size, seed)
            kind = "grid"
        else:
            if mpp is not None:
                raise UsageError("--mpp applies to --grid only "
                                 "(the zoom figure goes down to full resolution)")
            img = zoom_figure(slide, zoom, panel, centre)
            kind = "zoom"
        info = describe(slide)
    save_image(img, output, overwrite=overwrite, colours=colours)
    return {"output": str(output), "kind": kind, "width": img.width, "height": img.height,
            "slide": info}
