"""Loss curves from ``wsigen train``'s ``DIR/loss.jsonl``, drawn with Pillow alone.

    python -m wsigen.training.plot RUN/loss.jsonl[:LABEL] ... -o loss.png [--linear] [--smooth N] [--title T]

Each run is a light curve of its logged values (each a mean over the log interval) under a darker
moving average, one colour per run, on a log-scale loss axis by default. Several runs are drawn one
after the other on the step axis (see :func:`plot_loss`), as a fine-tune continues its base run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..judge.preview import _font, _text, _width

SIZE = (1000, 560)  # output pixels
SCALE = 2  # drawn at SCALE × SIZE, then reduced: smooth lines without an antialiasing renderer
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
RAW_ALPHA = 0.35  # the raw curve is the run's colour this strong over white
INK, GREY, GRID = (30, 30, 30), (110, 110, 110), (232, 232, 232)


@dataclass
class Run:
    """One run's log: steps as logged (ints) and losses, sorted by step."""

    label: str
    path: Path
    steps: np.ndarray
    loss: np.ndarray
    batch: int | None = None  # images per step, where the log says


@dataclass
class Layout:
    """Where things went on the output image (1× pixels), for tests and callers placing notes."""

    plot: tuple[int, int, int, int]  # left, top, right, bottom of the axes box
    legend: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_y: bool
    offsets: list[int] = field(default_factory=list)

    def x_px(self, step: float) -> float:
        l, _, r, _ = self.plot
        a, b = self.x_range
        return l + (step - a) / (b - a) * (r - l)

    def y_px(self, loss: float) -> float:
        _, t, _, btm = self.plot
        a, b = self.y_range
        v = math.log10(loss) if self.log_y else loss
        return btm - (v - a) / (b - a) * (btm - t)


def read_log(path: Path, label: str | None = None) -> Run:
    """Read a ``loss.jsonl`` (or a training folder holding one) into a :class:`Run`.

    Lines need ``step`` and ``loss``; non-finite losses are skipped, a repeated step keeps its last
    line, and a broken *last* line is ignored (a running job may be halfway through writing it).
    Raises :class:`UsageError` for a missing or unreadable file, a broken line elsewhere, or no rows.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "loss.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e.__class__.__name__}: {e})") from None
    lines = [(i, s) for i, s in enumerate(text.splitlines(), 1) if s.strip()]
    rows: dict[int, float] = {}
    batch = None
    for k, (no, line) in enumerate(lines):
        try:
            d = json.loads(line)
            step, loss = int(d["step"]), float(d["loss"])
        except (ValueError, KeyError, TypeError) as e:
            if k == len(lines) - 1 and k > 0:
                break  # a line still being written
            raise UsageError(f"{path}:{no}: not a loss log line ({e.__class__.__name__}: {e})") from None
        if math.isfinite(loss):
            rows[step] = loss
        if batch is None and step > 0 and isinstance(d.get("images"), int) and d["images"] % step == 0:
            batch = d["images"] // step
    if not rows:
        raise UsageError(f"{path}: no loss rows (empty log)")
    steps = np.array(sorted(rows), dtype=np.int64)
    return Run(label if label is not None else str(path), path, steps,
               np.array([rows[s] for s in steps.tolist()], dtype=np.float64), batch)


def moving_average(y: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average over ``n`` points; near the ends, over the points there are."""
    n = max(1, min(int(n), len(y)))
    if n == 1:
        return y.astype(np.float64)
    c = np.concatenate([[0.0], np.cumsum(y, dtype=np.float64)])
    i = np.arange(len(y))
    lo = np.clip(i - (n - 1) // 2, 0, len(y))
    hi = np.clip(i + n // 2 + 1, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.6g}"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round 1, 2 or 5 × 10^n steps covering [lo, hi], about ``target`` of them."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, target - 1)
    e = math.floor(math.log10(raw))
    # the round step whose number of intervals is nearest target - 1 (more of them on a tie)
    step = min((m * 10**e for m in (1, 2, 5, 10)), key=lambda st: (abs((hi - lo) / st - (target - 1)), -1 / st))
    first = math.ceil(lo / step - 1e-9)
    out = []
    k = first
    while k * step <= hi + step * 1e-9:
        out.append(round(k * step, 12))
        k += 1
    return out


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """(labelled ticks, minor ticks) for a log axis over [lo, hi] (both > 0)."""
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = d1 - d0
    if decades > 8:  # many decades: every k-th power of ten
        k = math.ceil(decades / 6)
        major = [10.0**d for d in range(d0, d1 + 1) if d % k == 0 and lo <= 10.0**d <= hi]
        return major, []

    def within(mantissas):
        return [v for d in range(d0, d1 + 1) for m in mantissas if lo <= (v := float(f"{m}e{d}")) <= hi]

    minor = within(range(1, 10))
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10))):
        major = within(mantissas)
        if len(major) >= 4:
            break
    if len(major) < 3:  # less than a factor of ~2: round linear values placed on the log axis
        major = [v for v in nice_ticks(lo, hi, 5) if v > 0]
        minor = []
    return major, [v for v in minor if v not in major]


def _concat_offsets(runs: list[Run]) -> list[int]:
    offsets, end = [], 0
    for i, r in enumerate(runs):
        off = 0 if i == 0 else end
        offsets.append(off)
        end = off + int(r.steps[-1])
    return offsets


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _light(c: tuple[int, int, int], a: float = RAW_ALPHA) -> tuple[int, int, int]:
    return tuple(round(255 + a * (v - 255)) for v in c)


def _height(font) -> int:
    l, t, r, b = font.getbbox("0Ag")
    return b - t


def _put(draw, xy, s: str, font, fill, anchor: str = "lt") -> None:
    """Text with its box's ``anchor`` (l/m/r then t/m/b) at xy; works with bitmap fonts too."""
    w, h = _width(s, font), _height(font)
    top = font.getbbox("0Ag")[1]
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]] - top
    _text(draw, (round(x), round(y)), s, font, fill)


def draw_loss(
    runs: list[tuple[str, Path]],
    *,
    smooth: int = 10,
    log_y: bool = True,
    title: str | None = None,
    offsets: Sequence[int] | None = None,
    size: tuple[int, int] = SIZE,
):
    """The figure of :func:`plot_loss` as a Pillow image, with its :class:`Layout`."""
    from PIL import Image, ImageDraw

    if not runs:
        raise UsageError("no runs to plot")
    logs = [read_log(p, label) for label, p in runs]
    if offsets is None:
        offsets = _concat_offsets(logs)
    elif len(offsets) != len(logs):
        raise UsageError(f"{len(offsets)} offsets for {len(logs)} runs")
    offsets = [int(o) for o in offsets]
    if log_y:
        for r in logs:
            if (r.loss <= 0).any():
                raise UsageError(f"{r.path}: a loss ≤ 0 cannot go on a log axis; draw it with --linear")
    xs = [r.steps + o for r, o in zip(logs, offsets, strict=True)]
    smooth = max(1, int(smooth))
    avgs = [moving_average(r.loss, smooth) for r in logs]

    S = SCALE
    W, H = size
    title = "training loss" if title is None else title
    f_title, f_label, f_tick = _font(18 * S), _font(14 * S), _font(13 * S)
    f_legend, f_note = _font(13 * S), _font(11 * S)

    # data ranges
    x_lo = min(0, min(int(x[0]) for x in xs))
    x_hi = max(int(x[-1]) for x in xs)
    if x_hi <= x_lo:
        x_hi = x_lo + 1
    pad = 0.015 * (x_hi - x_lo)
    x_range = (x_lo - pad, x_hi + pad)
    y_min = float(min(r.loss.min() for r in logs))
    y_max = float(max(r.loss.max() for r in logs))
    if log_y:
        a, b = math.log10(y_min), math.log10(y_max)
        span = b - a or 0.1
        y_range = (a - 0.04 * span, b + 0.04 * span)
        major, minor = log_ticks(10 ** y_range[0], 10 ** y_range[1])
    else:
        span = y_max - y_min or max(abs(y_max), 1.0) * 0.1
        y_range = (y_min - 0.04 * span, y_max + 0.04 * span)
        major, minor = nice_ticks(*y_range), []
    x_ticks = [v for v in nice_ticks(x_lo, x_hi, 7) if x_range[0] <= v <= x_range[1]]

    # margins from the text they hold
    th, lh, kh = _height(f_title), _height(f_label), _height(f_tick)
    tick = 5 * S
    top = (12 * S + th + 12 * S) if title else 14 * S
    y_label_w = max([_width(_fmt(v), f_tick) for v in major] or [0])
    left = 10 * S + lh + 10 * S + y_label_w + 6 * S + tick
    bottom = H * S - (tick + 6 * S + kh + 10 * S + lh + 10 * S)
    right = W * S - 22 * S
    lay = Layout((left, top, right, bottom), (0, 0, 0, 0), x_range, y_range, log_y, offsets)

    img = Image.new("RGB", (W * S, H * S), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def X(v):
        return lay.x_px(v)

    def Y(v):
        return lay.y_px(v)

    # grid, run boundaries
    for v in x_ticks:
        d.line([(X(v), top), (X(v), bottom)], fill=GRID, width=S)
    for v in major:
        d.line([(left, Y(v)), (right, Y(v))], fill=GRID, width=S)
    for i, o in enumerate(offsets):
        if i and x_lo < o < x_range[1]:
            x, y = X(o), top
            while y < bottom:
                d.line([(x, y), (x, min(y + 6 * S, bottom))], fill=(150, 150, 150), width=S)
                y += 11 * S

    # curves: all raw ones below all averages
    colours = [_rgb(COLOURS[i % len(COLOURS)]) for i in range(len(logs))]
    w_raw, w_avg = max(1, round(1.1 * S)), round(2.4 * S)
    for x, r, c in zip(xs, logs, colours, strict=True):
        pts = [(X(a), Y(b)) for a, b in zip(x.tolist(), r.loss.tolist(), strict=True)]
        if smooth > 1:
            _polyline(d, pts, _light(c), w_raw)
        else:
            _polyline(d, pts, c, w_avg)
    if smooth > 1:
        for x, m, c in zip(xs, avgs, colours, strict=True):
            _polyline(d, [(X(a), Y(b)) for a, b in zip(x.tolist(), m.tolist(), strict=True)], c, w_avg)

    # axes, ticks and labels
    d.rectangle([left, top, right, bottom], outline=INK, width=S)
    for v in x_ticks:
        d.line([(X(v), bottom), (X(v), bottom + tick)], fill=INK, width=S)
        _put(d, (X(v), bottom + tick + 4 * S), _fmt(v), f_tick, INK, "mt")
    for v in minor:
        d.line([(left - tick * 0.6, Y(v)), (left, Y(v))], fill=INK, width=S)
    last_y = None
    for v in sorted(major, key=Y, reverse=True):  # bottom up; skip a label that would overlap
        y = Y(v)
        d.line([(left - tick, y), (left, y)], fill=INK, width=S)
        if last_y is None or last_y - y >= kh * 1.5:
            _put(d, (left - tick - 5 * S, y), _fmt(v), f_tick, INK, "rm")
            last_y = y
    batches = {r.batch for r in logs}
    x_label = "optimizer step" + (f" (batch {batches.pop()})" if len(batches) == 1 and None not in batches else "")
    if len(logs) > 1 and offsets == _concat_offsets(logs):
        x_label += ", runs one after another"
    _put(d, ((left + right) / 2, H * S - 10 * S), x_label, f_label, INK, "mb")
    y_label = "EDM loss (log scale)" if log_y else "EDM loss"
    lw = _width(y_label, f_label)
    tag = Image.new("RGB", (lw + 4 * S, lh + 4 * S), (255, 255, 255))
    _put(ImageDraw.Draw(tag), (2 * S, 2 * S), y_label, f_label, INK, "lt")
    tag = tag.rotate(90, expand=True)
    img.paste(tag, (10 * S, round((top + bottom) / 2 - tag.height / 2)))
    if title:
        _put(d, ((left + right) / 2, 12 * S), title, f_title, INK, "mt")

    # legend: the corner of the axes box that covers the fewest data points
    entries = [(r.label, c) for r, c in zip(logs, colours, strict=True)]
    note = (f"light: logged values · dark: moving average of {smooth} points" if smooth > 1 else "")
    sw, gap, padl = 30 * S, 8 * S, 10 * S
    row = round(max(_height(f_legend), w_avg) * 1.7)
    box_w = padl * 2 + max([sw + gap + _width(s, f_legend) for s, _ in entries]
                           + ([_width(note, f_note)] if note else []))
    box_h = padl * 2 + row * len(entries) + (round(_height(f_note) * 1.6) if note else 0)
    inset = 10 * S
    corners = [(right - inset - box_w, top + inset), (left + inset, bottom - inset - box_h),
               (right - inset - box_w, bottom - inset - box_h), (left + inset, top + inset)]
    every = np.concatenate([np.stack([[X(a) for a in x.tolist()], [Y(b) for b in r.loss.tolist()]], 1)
                            for x, r in zip(xs, logs, strict=True)])

    def covered(c):
        x0, y0 = c
        inside = ((every[:, 0] >= x0) & (every[:, 0] <= x0 + box_w)
                  & (every[:, 1] >= y0) & (every[:, 1] <= y0 + box_h))
        return int(inside.sum())

    bx, by = min(corners, key=covered)  # min keeps the first of equals: upper right first
    d.rectangle([bx, by, bx + box_w, by + box_h], fill=(255, 255, 255), outline=(200, 200, 200), width=S)
    for i, (s, c) in enumerate(entries):
        cy = by + padl + row * i + row / 2
        d.line([(bx + padl, cy), (bx + padl + sw, cy)], fill=c, width=w_avg)
        _put(d, (bx + padl + sw + gap, cy), s, f_legend, INK, "lm")
    if note:
        _put(d, (bx + padl, by + box_h - padl), note, f_note, GREY, "lb")

    lay.plot = tuple(round(v / S) for v in (left, top, right, bottom))
    lay.legend = tuple(round(v / S) for v in (bx, by, bx + box_w, by + box_h))
    return img.resize((W, H), Image.Resampling.LANCZOS), lay


def _polyline(d, pts, fill, width) -> None:
    if len(pts) == 1:
        x, y = pts[0]
        d.ellipse([x - width, y - width, x + width, y + width], fill=fill)
    else:
        d.line(pts, fill=fill, width=width, joint="curve")


def plot_loss(
    runs: list[tuple[str, Path]],
    out: Path,
    *,
    smooth: int = 10,
    log_y: bool = True,
    title: str | None = None,
    offsets: Sequence[int] | None = None,
) -> Path:
    """Draw the loss curves of ``runs`` — (label, path to loss.jsonl or its training folder) — to ``out``.

    A ~1000 × 560 px line chart: optimizer step on x, loss on y (log scale unless ``log_y`` is
    False), one colour per run with a legend. Each run shows its logged values as a light curve and
    a centred moving average over ``smooth`` logged points (fewer near the ends) as a dark one;
    ``smooth`` ≤ 1 draws the logged values alone, dark.

    Runs are concatenated: the first run is drawn at its logged steps, and each later run's steps
    are shifted by where the previous run's log ends (its last logged step, itself shifted). So a
    fine-tune whose steps count from 0 again is drawn after the run it continues, and a dashed
    line marks where it starts. Give ``offsets`` (one step shift per run; ``[0, 0, …]`` overlays
    the runs on one step axis) to place them otherwise.

    ``title``: None gives "training loss"; "" draws none. The image format follows ``out``'s
    suffix (PNG for the model card). Returns ``out``. Raises :class:`wsigen.errors.UsageError`
    for a missing, unreadable or empty log.
    """
    from PIL import Image

    img, _ = draw_loss(runs, smooth=smooth, log_y=log_y, title=title, offsets=offsets)
    out = Path(out)
    ext = out.suffix.lower()
    if ext not in Image.registered_extensions():
        raise UsageError(f"{out}: unknown image format {ext or '(no suffix)'!r}; use .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, **({"optimize": True} if ext == ".png" else {}))
    return out


def _run_arg(s: str) -> tuple[str, Path]:
    """RUN.jsonl[:LABEL]: the whole argument when it names an existing path, else split at the first ':'."""
    if Path(s).exists() or ":" not in s:
        return s, Path(s)
    p, _, label = s.partition(":")
    return label or p, Path(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m wsigen.training.plot",
        description="Draw training loss curves from wsigen train's loss.jsonl files (runs one after another).",
    )
    ap.add_argument("runs", nargs="+", metavar="RUN.jsonl[:LABEL]",
                    help="a loss.jsonl (or the training folder holding it), optionally :LABEL for the legend")
    ap.add_argument("-o", "--out", required=True, type=Path, help="output image (.png)")
    ap.add_argument("--linear", action="store_true", help="linear loss axis (default: log scale)")
    ap.add_argument("--smooth", type=int, default=10, metavar="N",
                    help="moving average over N logged points (default 10; 1: none)")
    ap.add_argument("--title", default=None, help='figure title (default "training loss"; "" for none)')
    ap.add_argument("--overlay", action="store_true",
                    help="draw every run at its own logged steps instead of one after another")
    a = ap.parse_args(argv)
    if a.smooth < 1:
        ap.error("--smooth must be at least 1")
    runs = [_run_arg(s) for s in a.runs]
    try:
        out = plot_loss(runs, a.out, smooth=a.smooth, log_y=not a.linear, title=a.title,
                        offsets=[0] * len(runs) if a.overlay else None)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
