"""Rich progress bar on stderr (rank 0 only): stage, step, patches/s and ETA."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .sampler import Progress as ProgressCallbacks


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


def console() -> Console:
    return Console(file=sys.stderr)


class RichProgress(ProgressCallbacks):
    """Sampler callbacks drawn as one bar for the whole job."""

    def __init__(self, enabled: bool = True, unit: str = "patches"):
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console(), disable=not enabled, transient=False,
        )
        self.task = None

    def start(self, total: int, done: int = 0) -> None:
        self.bar.start()
        self.task = self.bar.add_task("starting", total=total, completed=done)

    def stage(self, stage: int, num_stages: int, step: int, steps: int) -> None:
        self.bar.update(self.task, description=f"stage {stage}/{num_stages - 1} step {step + 1}/{steps}")

    def advance(self, n: int) -> None:
        if self.task is not None and n:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        self.bar.stop()
