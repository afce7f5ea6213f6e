"""``DIR/loss.jsonl``: one JSON line per logged step (step, images, loss, lr, images/s, time)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

LOG_FILE = "loss.jsonl"


def append_row(path: Path, **row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim(path: Path, step: int) -> None:
    """On resume, drop log lines past the saved step (they were lost with the interruption)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            if json.loads(line)["step"] <= step:
                keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def loss_history(out) -> list[dict]:
    """The rows of DIR/loss.jsonl."""
    p = Path(out) / LOG_FILE
    return (
        [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        if p.exists()
        else []
    )
