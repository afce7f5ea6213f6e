"""Text and scale bars for the judges' Pillow figures: a font with µ and × where the system has one
(ASCII stand-ins where not), and round-length scale bars.
"""

from __future__ import annotations

import math


def load_font(size: int):
    """DejaVu Sans where the system has it (it has µ and ×), else Pillow's default font."""
    from PIL import ImageFont

    try:
        f = ImageFont.truetype("DejaVuSans.ttf", size)
        f.ascii_only = False
        return f
    except OSError:
        pass
    try:
        f = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        f = ImageFont.load_default()
    f.ascii_only = True  # Pillow's default font has neither µ nor ×
    if not hasattr(f, "size"):
        f.size = 11
    return f


def _ascii(s: str, font) -> str:
    if getattr(font, "ascii_only", False):
        s = s.replace("µ", "u").replace("×", "x").replace("·", "-")
    return s


def draw_text(draw, xy, s: str, font, fill) -> None:
    draw.text(xy, _ascii(s, font), fill=fill, font=font)


def text_width(s: str, font) -> int:
    return round(font.getlength(_ascii(s, font)))


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 × 10^n not above ``target`` (scale-bar lengths)."""
    if target <= 0:
        return 0.0
    e = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**e <= target:
            return m * 10**e
    return 10**e


def format_um(um: float) -> str:
    if um >= 1000:
        return f"{um / 1000:g} mm"
    return f"{um:g} µm"


def draw_scale_bar(draw, x: int, y: int, width_px: int, um_per_px: float | None, font) -> None:
    """A bar of a round length about a quarter of ``width_px`` wide, bottom-left at (x, y)."""
    if um_per_px:
        length = nice_length(width_px * 0.28 * um_per_px)
        bar, label = round(length / um_per_px), format_um(length)
    else:
        length = nice_length(width_px * 0.28)
        bar, label = round(length), f"{length:g} px"
    if bar < 2:
        return
    tb = draw.textbbox((0, 0), label, font=font)
    tw, th = tb[2] - tb[0], tb[3] - tb[1]
    pad = 5
    bw, bh = max(bar, tw) + 2 * pad, th + 2 * pad + 9
    draw.rectangle([x, y - bh, x + bw, y], fill=(255, 255, 255, 215))
    draw.rectangle([x + pad, y - pad - 5, x + pad + bar, y - pad], fill=(0, 0, 0, 255))
    draw_text(draw, (x + pad, y - bh + pad - tb[1]), label, font, (0, 0, 0, 255))
