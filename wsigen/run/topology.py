"""Which patch rows this process owns and how rows move between processes.

The single-process ``Topology`` owns every row; ``distributed.DistTopology`` is the multi-process one.
"""

from __future__ import annotations

import torch

from ..method import gridshift
from ..method.canvas import Band
from ..method.stages import StageContext

Span = tuple[int, int]


class Topology:
    """One process that owns every row (``distributed.DistTopology`` overrides these)."""

    rank, world = 0, 1

    def pick_rows(self, rows: list[int]) -> list[int]:
        return rows

    def regroup(self, band: Band, y0: int, y1: int, kind: str = "step") -> Band:
        """A band holding canvas rows [y0, y1); collective when there are several processes."""
        if not band.y0 <= y0 <= y1 <= band.y1:
            raise RuntimeError(f"band [{band.y0}, {band.y1}) lacks rows [{y0}, {y1})")
        return band

    def allocate(self, height: int, width: int, y0: int, y1: int, reserve: Span,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 channels: int = 3) -> Band:
        """An uninitialised band of rows [y0, y1); ``reserve``: every row it may hold this stage.
        ``channels`` 6: x and a multistep solver's history."""
        return Band(height, width, y0, y1, torch.empty(channels, y1 - y0, width, device=device, dtype=dtype))

    def release(self) -> None:
        """Forget the stage's buffers."""

    def stage_rows(self, height: int, chunk: int) -> Span:
        """Chunk-aligned rows this process writes at the end of a stage."""
        return 0, height

    def guide_rows(self, ctx: StageContext, start_step: int) -> Span:
        """Canvas rows of the stage this process may touch in any remaining step."""
        return hull(band_rows(self, ctx, i) for i in range(start_step, ctx.settings.steps))

    def barrier(self) -> None:
        pass

    def all_sum(self, value: int) -> int:
        return value

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` on every rank (decisions read from the store are rank 0's)."""
        return values


def band_rows(topo: Topology, ctx: StageContext, step: int) -> Span:
    """Canvas rows this process's patch rows cover in ``step`` (empty span if it has none)."""
    rows, _ = ctx.grid(step)
    return gridshift.row_span(topo.pick_rows(rows), ctx.patch, ctx.height)


def hull(spans) -> Span:
    """Smallest span containing every non-empty span (0, 0 if there is none)."""
    spans = [s for s in spans if s[1] > s[0]]
    if not spans:
        return 0, 0
    return min(a for a, _ in spans), max(b for _, b in spans)
