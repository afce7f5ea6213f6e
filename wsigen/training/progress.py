"""Training progress on stderr: a rich bar on a terminal, otherwise a plain line now and then."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """A rich progress bar on a terminal; otherwise a plain line on stderr every 30 s."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.bar = None
        self.last_print = 0.0
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)
            if self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("train"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]} img/s"),
                    TextColumn("data wait {task.fields[wait]}"),
                    TimeRemainingColumn(),
                    console=self.console,
                )
                self.task = self.bar.add_task(
                    "train", total=total, completed=start, loss="…", rate="…", wait="…"
                )

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float, rate: float, waiting: float = 0.0):
        """``rate``: images/s over all processes; ``waiting``: share of the time spent waiting
        for the loader (near 0: the loader keeps up; near 1: the run is starved of data)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}",
                            wait=f"{100 * waiting:.0f}%")
        elif time.time() - self.last_print > 30 or step == self.total:
            self.last_print = time.time()
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} img/s  "
                f"data wait {100 * waiting:.0f}%",
                file=sys.stderr,
                flush=True,
            )
