"""Slide labels: CSV rows (names, relative paths, header), parent folders, and every bad input."""

from pathlib import Path

import pytest

from wsigen.errors import UsageError
from wsigen.slides.labels import read_labels


def _tree(tmp_path: Path) -> tuple[Path, list[Path]]:
    root = tmp_path / "slides"
    files = [root / "tumour" / "t1.tif", root / "tumour" / "t2.tif", root / "normal" / "n1.tif"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    return root, files


def test_folders(tmp_path):
    root, files = _tree(tmp_path)
    lab = read_labels("folders", [root], files)
    assert lab.classes == ("normal", "tumour")  # sorted: numbering depends on the names only
    assert [lab.index(f) for f in files] == [1, 1, 0]
    assert lab.counts() == [1, 2]
    assert lab.record()["slides"] == {"t1.tif": "tumour", "t2.tif": "tumour", "n1.tif": "normal"}


def test_csv_names_relative_paths_and_header(tmp_path):
    root, files = _tree(tmp_path)
    csv = tmp_path / "l.csv"
    csv.write_text("slide,label\nt1.tif,b\ntumour/t2.tif,a\n\n" + f"{files[2]},b\n")
    lab = read_labels(csv, [root], files)
    assert lab.classes == ("a", "b")
    assert [lab.name(f) for f in files] == ["b", "a", "b"]


@pytest.mark.parametrize("text, msg", [
    ("t1.tif,a\nt2.tif,a\n", "has no label"),
    ("t1.tif,a\nt2.tif,a\nn1.tif,a\n", "at least two classes"),
    ("t1.tif,a\nt2.tif,b\nn1.tif,a\ngone.tif,b\n", "line 4: slide 'gone.tif' is not among"),
    ("t1.tif,a\nt2.tif,b\nn1.tif\n", "line 3: expected 'slide,label'"),
    ("t1.tif,a\nt1.tif,b\nt2.tif,b\nn1.tif,a\n", "labelled both"),
    ("slide,label\n", "no slide,label rows"),
])
def test_csv_errors(tmp_path, text, msg):
    root, files = _tree(tmp_path)
    csv = tmp_path / "l.csv"
    csv.write_text(text)
    with pytest.raises(UsageError, match=msg):
        read_labels(csv, [root], files)


def test_ambiguous_name_and_missing_file(tmp_path):
    root, files = _tree(tmp_path)
    twin = root / "normal" / "t1.tif"
    twin.write_bytes(b"x")
    csv = tmp_path / "l.csv"
    csv.write_text("t1.tif,a\n")
    with pytest.raises(UsageError, match="several slides are called"):
        read_labels(csv, [root], [*files, twin])
    with pytest.raises(UsageError, match="label file not found"):
        read_labels(tmp_path / "none.csv", [root], files)
    with pytest.raises(UsageError, match="at least two classes"):
        read_labels("folders", [root], files[:2])
