"""Loss curves from ``wsigen train``'s ``DIR/loss.jsonl``, drawn with matplotlib (Agg, no display).

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

SIZE = (1000, 560)  # output pixels
DPI = 100
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
RAW_ALPHA = 0.35  # the raw curve is the run's colour this strong over white
INK, GREY, GRID = "#1e1e1e", "#6e6e6e", "#e8e8e8"
RAW_WIDTH, AVG_WIDTH = 1.1, 2.4  # line widths in output pixels


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
    """Where things went on the output image (pixels, origin top left), for tests and callers."""

    plot: tuple[int, int, int, int]  # left, top, right, bottom of the axes box
    legend: tuple[int, int, int, int]
    log_y: bool
    offsets: list[int] = field(default_factory=list)
    _ax: object = field(default=None, repr=False)
    _height: int = 0

    def x_px(self, step: float) -> float:
        return float(self._ax.transData.transform((step, 1.0))[0])

    def y_px(self, loss: float) -> float:
        return self._height - float(self._ax.transData.transform((0.0, loss))[1])


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


def _light(c: tuple[int, int, int], a: float = RAW_ALPHA) -> tuple[float, float, float]:
    """``c`` at strength ``a`` over white, opaque (overlapping raw curves do not darken)."""
    return tuple((255 + a * (v - 255)) / 255 for v in c)


def _pt(px: float) -> float:
    return px * 72 / DPI  # matplotlib sizes lines in points


def draw_loss(
    runs: list[tuple[str, Path]],
    *,
    smooth: int = 10,
    log_y: bool = True,
    title: str | None = None,
    offsets: Sequence[int] | None = None,
    size: tuple[int, int] = SIZE,
):
    """The figure of :func:`plot_loss` (a matplotlib Figure on an Agg canvas, drawn) and its :class:`Layout`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

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
    title = "training loss" if title is None else title

    W, H = size
    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor("white")

    # data ranges: the step axis starts at 0 (or earlier), the loss axis has a 4 % margin
    x_lo = min(0, min(int(x[0]) for x in xs))
    x_hi = max(int(x[-1]) for x in xs)
    if x_hi <= x_lo:
        x_hi = x_lo + 1
    pad = 0.015 * (x_hi - x_lo)
    ax.set_xlim(x_lo - pad, x_hi + pad)
    y_min = float(min(r.loss.min() for r in logs))
    y_max = float(max(r.loss.max() for r in logs))
    if log_y:
        ax.set_yscale("log")
        a, b = math.log10(y_min), math.log10(y_max)
        span = b - a or 0.1
        lo, hi = 10 ** (a - 0.04 * span), 10 ** (b + 0.04 * span)
        major, minor = log_ticks(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(major))
        ax.yaxis.set_minor_locator(FixedLocator(minor))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        span = y_max - y_min or max(abs(y_max), 1.0) * 0.1
        lo, hi = y_min - 0.04 * span, y_max + 0.04 * span
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
    ax.grid(True, which="major", color=GRID, linewidth=_pt(1))
    ax.set_axisbelow(True)
    for side in ax.spines.values():
        side.set_color(INK)
    ax.tick_params(colors=INK, labelsize=10)

    # run boundaries, then curves: all raw ones below all averages
    for i, o in enumerate(offsets):
        if i and x_lo < o < x_hi + pad:
            ax.axvline(o, color="#969696", linewidth=_pt(1), linestyle=(0, (6, 5)), zorder=1)
    colours = [_rgb(COLOURS[i % len(COLOURS)]) for i in range(len(logs))]
    for i, (x, r, c) in enumerate(zip(xs, logs, colours, strict=True)):
        dark = tuple(v / 255 for v in c)
        marker = "o" if len(x) == 1 else None  # a single logged point is still seen
        if smooth > 1:
            ax.plot(x, r.loss, color=_light(c), linewidth=_pt(RAW_WIDTH), marker=marker, zorder=2)
            y = moving_average(r.loss, smooth)
        else:
            y = r.loss
        ax.plot(x, y, color=dark, linewidth=_pt(AVG_WIDTH), marker=marker, label=logs[i].label, zorder=3)

    batches = {r.batch for r in logs}
    x_label = "optimizer step" + (f" (batch {batches.pop()})" if len(batches) == 1 and None not in batches else "")
    if len(logs) > 1 and offsets == _concat_offsets(logs):
        x_label += ", runs one after another"
    ax.set_xlabel(x_label, color=INK, fontsize=11)
    ax.set_ylabel("EDM loss (log scale)" if log_y else "EDM loss", color=INK, fontsize=11)
    if title:
        ax.set_title(title, color=INK, fontsize=14)
    note = f"light: logged values · dark: moving average of {smooth} points" if smooth > 1 else None
    legend = ax.legend(loc="best", fontsize=10, title=note, title_fontsize=8.5, alignment="left",
                       framealpha=1, edgecolor="#c8c8c8", fancybox=False)
    if note:
        legend.get_title().set_color(GREY)

    fig.canvas.draw()  # lays the figure out, so the Layout's pixels are final
    lay = Layout(_box(ax.get_window_extent(), H), _box(legend.get_window_extent(), H), log_y, offsets, ax, H)
    return fig, lay


def _box(bbox, height: int) -> tuple[int, int, int, int]:
    """A display bbox (origin bottom left) as left, top, right, bottom image pixels."""
    return round(bbox.x0), round(height - bbox.y1), round(bbox.x1), round(height - bbox.y0)


def render(fig) -> np.ndarray:
    """The drawn figure as an (H, W, 3) uint8 array."""
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


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

    A 1000 × 560 px line chart: optimizer step on x, loss on y (log scale unless ``log_y`` is
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
    out = Path(out)
    ext = out.suffix.lower().lstrip(".")
    fig, _ = draw_loss(runs, smooth=smooth, log_y=log_y, title=title, offsets=offsets)
    if ext not in fig.canvas.get_supported_filetypes():
        raise UsageError(f"{out}: unknown image format {out.suffix.lower() or '(no suffix)'!r}; use .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    # no creation date or version in the PNG, so one log always gives the same bytes
    fig.savefig(out, format=ext, dpi=DPI, metadata={"Software": None} if ext == "png" else None)
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
