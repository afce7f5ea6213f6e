"""``wsigen.training.plot``: loss curves from loss.jsonl drawn with matplotlib, and its command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from wsigen.errors import UsageError
from wsigen.training import plot


def _write(path, steps, losses, batch=16):
    with open(path, "w") as f:
        for i, (s, v) in enumerate(zip(steps, losses, strict=True)):
            f.write(json.dumps({"step": s, "images": s * batch, "loss": round(v, 6), "lr": 1e-3,
                                "images_per_s": 20.0, "time": 1.0 * i}) + "\n")
    return path


@pytest.fixture
def logs(tmp_path):
    """Two runs with known, decreasing losses; the second counts its steps from 0 again."""
    wobble = [0.02 * math.sin(1.7 * i) for i in range(60)]
    s1 = list(range(10, 610, 10))  # 60 rows, steps 10..600
    l1 = [0.15 + 0.9 * math.exp(-s / 150) + w for s, w in zip(s1, wobble, strict=True)]
    s2 = list(range(10, 310, 10))  # 30 rows, steps 10..300
    l2 = [0.15 + 0.1 * math.exp(-s / 100) for s in s2]
    return (_write(tmp_path / "a.jsonl", s1, l1), s1, l1), (_write(tmp_path / "b.jsonl", s2, l2), s2, l2)


def _mask(img, colour, tol=40):
    """Pixels of ``img`` (a PIL image or a figure) within ``tol`` of the colour."""
    a = (plot.render(img) if hasattr(img, "canvas") else np.asarray(img.convert("RGB"))).astype(int)
    rgb = plot._rgb(colour) if isinstance(colour, str) else colour
    return np.abs(a - np.array(rgb)).sum(axis=2) <= tol


def test_png_size_and_run_colours(logs, tmp_path):
    (a, *_), (b, *_) = logs
    out = plot.plot_loss([("first", a), ("second", b)], tmp_path / "fig" / "loss.png")
    assert out == tmp_path / "fig" / "loss.png"
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (1000, 560)
    for colour in plot.COLOURS[:2]:
        assert _mask(img, colour).sum() > 200  # the moving average, the legend swatch
    assert _mask(img, plot.COLOURS[2]).sum() == 0  # a third colour only with a third run
    assert np.asarray(img.convert("L"))[2, 2] == 255  # white background
    # the logged values are drawn too, in the light version of the run's colour: far more of that
    # colour than the anti-aliased edges of the dark curve alone give (smooth=1 draws no raw curve)
    light = tuple(round(255 * v) for v in plot._light(plot._rgb(plot.COLOURS[0])))
    with_raw, without = (_mask(plot.draw_loss([("a", a)], smooth=n)[0], light, tol=12).sum() for n in (5, 1))
    assert with_raw > 3 * without


def test_drawing_follows_the_data(logs):
    (a, s1, l1), (b, s2, l2) = logs
    img, lay = plot.draw_loss([("first", a), ("second", b)], smooth=5)
    assert plot.render(img).shape == (560, 1000, 3)
    assert lay.offsets == [0, 600]  # runs one after the other: b starts where a's log ends
    l, t, r, btm = lay.plot
    assert 0 < l < r < 1000 and 0 < t < btm < 560
    for i, (steps, losses) in enumerate([(s1, l1), (s2, l2)]):
        m = _mask(img, plot.COLOURS[i])
        lx0, ly0, lx1, ly1 = lay.legend
        m[ly0 - 2:ly1 + 3, lx0 - 2:lx1 + 3] = False  # the legend swatch is not the curve
        ys, xs = np.nonzero(m)
        x0, x1 = lay.x_px(steps[0] + lay.offsets[i]), lay.x_px(steps[-1] + lay.offsets[i])
        assert x0 - 3 <= xs.min() and xs.max() <= x1 + 3  # the run occupies its own steps
        left = ys[xs < x0 + 0.15 * (x1 - x0)].mean()
        right = ys[xs > x1 - 0.15 * (x1 - x0)].mean()
        assert right > left + 10  # a decreasing loss goes down the image
        avg = plot.moving_average(np.array(losses), 5)
        for k in range(0, len(steps), 7):  # and passes where the data put it
            x, y = round(lay.x_px(steps[k] + lay.offsets[i])), round(lay.y_px(avg[k]))
            assert m[y - 2:y + 3, x - 2:x + 3].any(), (i, k)


def test_log_scale_spreads_small_losses(logs):
    """On a log axis the range 0.15–0.25 takes more height than on a linear one."""
    (a, *_), _ = logs
    _, log_lay = plot.draw_loss([("a", a)])
    _, lin_lay = plot.draw_loss([("a", a)], log_y=False)

    def height(lay):
        return lay.y_px(0.15) - lay.y_px(0.25)
    assert height(log_lay) > 1.5 * height(lin_lay)


def test_offsets_overlay(logs):
    (a, *_), (b, s2, _) = logs
    img, lay = plot.draw_loss([("a", a), ("b", b)], offsets=[0, 0], smooth=1, title="")
    xs = np.nonzero(_mask(img, plot.COLOURS[1]))[1]
    lx0 = lay.legend[0]
    assert xs[xs < lx0].max() <= lay.x_px(s2[-1]) + 3  # b drawn at its own steps, over a's start
    with pytest.raises(UsageError, match="offsets"):
        plot.draw_loss([("a", a), ("b", b)], offsets=[0])


def test_read_log_tolerates_a_half_written_last_line(tmp_path):
    p = _write(tmp_path / "l.jsonl", [10, 20, 20], [1.0, 0.9, 0.8])
    with open(p, "a") as f:
        f.write('{"step": 30, "lo')
    run = plot.read_log(p, "x")
    assert run.steps.tolist() == [10, 20] and run.loss.tolist() == [1.0, 0.8]  # repeated step: last wins
    assert run.batch == 16 and run.label == "x"


def test_moving_average_and_ticks():
    y = np.array([4.0, 2.0, 0.0, 2.0, 4.0])
    assert plot.moving_average(y, 1).tolist() == y.tolist()
    assert plot.moving_average(y, 3).tolist() == [3.0, 2.0, 4 / 3, 2.0, 3.0]
    assert plot.moving_average(y, 99).tolist() == [2.0, 2.0, 2.4, 2.0, 2.0]  # window capped at 5
    major, minor = plot.log_ticks(0.18, 1.3)
    assert major == [0.2, 0.3, 0.5, 1.0] and 0.4 in minor
    assert plot.nice_ticks(0, 7860, 7) == [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000]


def test_cli_draws(logs, tmp_path, capsys):
    (a, *_), (b, *_) = logs
    out = tmp_path / "cli.png"
    rc = plot.main([f"{a}:training, 600 steps", f"{b}:fine-tune to 0.5 µm/px", "-o", str(out),
                    "--smooth", "4", "--title", "T"])
    assert rc == 0 and Image.open(out).size == (1000, 560)
    assert capsys.readouterr().out.strip() == str(out)
    assert plot._run_arg(f"{a}:x:y") == ("x:y", a)
    assert plot._run_arg(str(a)) == (str(a), a)
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "lin.png"), "--linear"]) == 2  # no loss.jsonl there
    (tmp_path / "loss.jsonl").write_text(a.read_text())
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "lin.png"), "--linear"]) == 0  # a training folder


@pytest.mark.parametrize(
    "content, expect",
    [
        (None, "no such file"),
        ("", "empty log"),
        ("\n  \n", "empty log"),
        ('{"step": 10, "loss": 1.0}\nnot json\n{"step": 30, "loss": 0.5}\n', ":2: not a loss log line"),
        ('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.0}\n', "--linear"),
        (b"\xff\xfe\x00bad", "cannot read"),
    ],
)
def test_cli_errors(tmp_path, capsys, content, expect):
    p = tmp_path / "run" / "loss.jsonl"
    if content is not None:
        p.parent.mkdir()
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    out = tmp_path / "x.png"
    assert plot.main([f"{p}:label", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(p) in err
    assert not out.exists()


def test_cli_bad_output_and_options(logs, tmp_path, capsys):
    (a, *_), _ = logs
    assert plot.main([str(a), "-o", str(tmp_path / "x.nope")]) == 2
    assert "unknown image format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        plot.main([str(a), "-o", str(tmp_path / "x.png"), "--smooth", "0"])
    assert e.value.code == 2
