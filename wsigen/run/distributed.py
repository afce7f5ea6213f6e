"""Bands of patch rows across processes (design.md §4 "Distributed").

Rank r of R owns the r-th even share of the current step's patch rows and holds only the canvas
rows they cover. After a grid shift ``regroup`` moves the rows that changed owner, point to point;
at the end of a stage the ranks re-split into chunk-aligned rows so no chunk has two writers.
Progress of all ranks is summed through the job's key-value store, without collectives.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..errors import PeerLost, WsigenError  # noqa: F401  (PeerLost: raised here, imported from here)
from ..method.canvas import Band
from ..method.gridshift import split_even
from .sampler import Progress
from .topology import Span, Topology, hull

ROW_BYTES = 3 * 4  # float32 RGB (a float16 state moves half)


def intersect(a: Span, b: Span) -> Span:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else (lo, lo)


def chunk_rows(height: int, chunk: int, rank: int, world: int) -> Span:
    """Rank's share of whole chunk rows of a ``height``-row array (the last chunk may be short)."""
    a, b = split_even(-(-height // chunk), world)[rank]
    return min(a * chunk, height), min(b * chunk, height)


def exchange_plan(current: list[Span], target: list[Span]) -> list[tuple[int, int, Span]]:
    """(source, destination, rows) for every row that must move so rank q holds ``target[q]``.

    ``current`` are the rows each rank holds now (disjoint: whoever holds a row holds its only
    up-to-date copy). A target row that no rank holds is an error, never a stale read.
    """
    filled = [s for s in current if s[1] > s[0]]
    filled.sort()
    for (_, b), (c, _) in zip(filled, filled[1:], strict=False):
        if c < b:
            raise RuntimeError(f"bands overlap: {current}")
    moves = []
    for q, t in enumerate(target):
        covered = 0
        for p, c in enumerate(current):
            a, b = intersect(c, t)
            covered += b - a
            if b > a and p != q:
                moves.append((p, q, (a, b)))
        if covered != max(t[1] - t[0], 0):
            raise RuntimeError(f"rank {q} needs rows {t} but only {covered} are held ({current})")
    return moves


class DistTopology(Topology):
    """R processes in one torch.distributed job, each holding the band of its patch rows."""

    def __init__(self, rank: int, world: int, comm_device: torch.device | str = "cpu"):
        self.rank, self.world = rank, world
        self.comm_device = torch.device(comm_device)
        self._buf: torch.Tensor | None = None
        self._base = 0
        self.stats = {"step_bytes": 0, "steps": 0, "max_step_bytes": 0, "other_bytes": 0,
                      "max_band_rows": 0, "max_buffer_rows": 0, "width": 0}

    # -- who owns what (pure) -------------------------------------------------------------
    def pick_rows(self, rows: list[int]) -> list[int]:
        a, b = split_even(len(rows), self.world)[self.rank]
        return rows[a:b]

    def stage_rows(self, height: int, chunk: int) -> Span:
        return chunk_rows(height, chunk, self.rank, self.world)

    # -- the band buffer ------------------------------------------------------------------
    def allocate(self, height: int, width: int, y0: int, y1: int, reserve: Span,
                 device="cpu", dtype: torch.dtype = torch.float32, channels: int = 3) -> Band:
        """A buffer over every row the band may hold this stage, so shifts move no local rows.
        ``channels`` 6: x and a multistep solver's history, which move together."""
        r0, r1 = hull([reserve, (y0, y1)])
        self._buf, self._base = torch.empty(channels, r1 - r0, width, device=device, dtype=dtype), r0
        self.stats["max_buffer_rows"] = max(self.stats["max_buffer_rows"], r1 - r0)
        return self._view(height, y0, y1)

    def release(self) -> None:
        self._buf = None

    def _view(self, height: int, y0: int, y1: int) -> Band:
        buf = self._buf
        if y1 <= y0:
            return Band(height, buf.shape[2], y0, y0, buf[:, :0])
        return Band(height, buf.shape[2], y0, y1, buf[:, y0 - self._base : y1 - self._base])

    def _holds(self, y0: int, y1: int) -> bool:
        return y1 <= y0 or (self._buf is not None
                            and self._base <= y0 and y1 <= self._base + self._buf.shape[1])

    def _adopt(self, band: Band, y0: int, y1: int) -> None:
        """Make the buffer cover [y0, y1) and hold ``band``'s rows in place (rarely copies)."""
        same = (self._buf is not None and band.data.numel() and self._holds(band.y0, band.y1)
                and band.data.data_ptr()
                == self._view(band.height, band.y0, band.y1).data.data_ptr())
        if same and self._holds(y0, y1):
            return
        old = band.data
        r0, r1 = hull([(band.y0, band.y1), (y0, y1)])
        if self._buf is not None and self._holds(r0, r1):  # room enough: copy the rows over
            self._view(band.height, band.y0, band.y1).data.copy_(old)
            return
        if self._buf is not None:  # grow, keeping the reserve
            r0, r1 = hull([(r0, r1), (self._base, self._base + self._buf.shape[1])])
        self._buf, self._base = torch.empty(old.shape[0], r1 - r0, band.width, device=old.device,
                                            dtype=old.dtype), r0
        self.stats["max_buffer_rows"] = max(self.stats["max_buffer_rows"], r1 - r0)
        self._view(band.height, band.y0, band.y1).data.copy_(old)

    # -- moving rows ----------------------------------------------------------------------
    def regroup(self, band: Band, y0: int, y1: int, kind: str = "step") -> Band:
        """Collective: every rank passes its current band and the rows it needs next."""
        y1 = max(y0, y1)
        spans = self._all_gather([band.y0, band.y1, y0, y1], "the row exchange")
        current = [(s[0], s[1]) for s in spans]
        target = [(s[2], s[3]) for s in spans]
        moves = exchange_plan(current, target)
        self._adopt(band, y0, y1)
        sends, recvs, ops, sent = [], [], [], 0
        for p, q, (a, b) in moves:
            if p == self.rank:
                t = band.all_rows(a, b).contiguous().to(self.comm_device)  # x (and history)
                sends.append(t)
                ops.append(dist.P2POp(dist.isend, t, q))
                sent += t.numel() * t.element_size()
            elif q == self.rank:
                t = torch.empty(band.data.shape[0], b - a, band.width, device=self.comm_device,
                                dtype=band.data.dtype)
                recvs.append((a, b, t))
                ops.append(dist.P2POp(dist.irecv, t, p))
        if ops:
            peers = sorted({p for p, q, _ in moves if q == self.rank}
                           | {q for p, q, _ in moves if p == self.rank})
            try:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            except RuntimeError as e:
                raise self._lost(f"the row exchange with rank(s) {peers}", e) from None
        out = self._view(band.height, y0, y1)
        for a, b, t in recvs:
            out.all_rows(a, b).copy_(t)
        self._count(kind, sent, y1 - y0, band.width)
        return out

    def _count(self, kind: str, sent: int, rows: int, width: int) -> None:
        s = self.stats
        s["width"] = max(s["width"], width)
        if kind == "step":
            s["max_band_rows"] = max(s["max_band_rows"], rows)
            s["steps"] += 1
            s["step_bytes"] += sent
            s["max_step_bytes"] = max(s["max_step_bytes"], sent)
        else:
            s["other_bytes"] += sent

    # -- collectives ----------------------------------------------------------------------
    def _lost(self, what: str, e: Exception) -> PeerLost:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return PeerLost(f"worker rank {self.rank}: lost contact during {what}; another worker has "
                        f"failed or stopped ({first[:200]})")

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.comm_device)

    def _all_gather(self, values: list[int], what: str) -> list[list[int]]:
        mine = self._tensor(values)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(out, mine)
        except RuntimeError as e:
            raise self._lost(what, e) from None
        return [t.tolist() for t in out]

    def _reduce(self, values: list[int], op, what: str) -> list[int]:
        t = self._tensor(values)
        try:
            dist.all_reduce(t, op=op)
        except RuntimeError as e:
            raise self._lost(what, e) from None
        return t.tolist()

    def barrier(self) -> None:
        self._reduce([0], dist.ReduceOp.SUM, "a barrier")

    def all_sum(self, value: int) -> int:
        return self._reduce([int(value)], dist.ReduceOp.SUM, "a sum")[0]

    def broadcast(self, values: list[int]) -> list[int]:
        t = self._tensor(values)
        try:
            dist.broadcast(t, src=0)
        except RuntimeError as e:
            raise self._lost("a broadcast", e) from None
        return t.tolist()

    def report(self) -> dict:
        """Exchange volume of the whole job (collective): bytes per step next to the band size."""
        s = self.stats
        total, steps, other = self._reduce([s["step_bytes"], s["steps"], s["other_bytes"]],
                                           dist.ReduceOp.SUM, "the exchange report")
        most, band_rows, buf_rows, width = self._reduce(
            [s["max_step_bytes"], s["max_band_rows"], s["max_buffer_rows"], s["width"]],
            dist.ReduceOp.MAX, "the exchange report")
        steps = max(steps // self.world, 1)  # every rank counts every step
        return {"world": self.world, "steps": steps, "bytes_per_step": total / steps,
                "max_bytes_per_step_per_rank": most, "stage_end_bytes": other,
                "max_band_rows": band_rows, "max_band_bytes": band_rows * width * ROW_BYTES,
                "max_buffer_bytes": buf_rows * width * ROW_BYTES}


def band_plan(height: int, width: int, patch: int, world: int, offsets: list[int],
              chunk: int = 512) -> list[dict]:
    """Rows and state bytes per rank over steps with the given row offsets (pre-flight)."""
    from ..method.gridshift import axis_starts, row_span

    out = []
    for r in range(world):
        spans = []
        for o in offsets:
            rows = axis_starts(height, o, patch)
            a, b = split_even(len(rows), world)[r]
            spans.append(row_span(rows[a:b], patch, height))
        h0, h1 = hull([*spans, chunk_rows(height, min(chunk, max(height, width)), r, world)])
        most = max((b - a for a, b in spans), default=0)
        out.append({"rank": r, "rows": most, "band_bytes": most * width * ROW_BYTES,
                    "buffer_bytes": (h1 - h0) * width * ROW_BYTES})
    return out


def step_exchange(height: int, width: int, patch: int, offsets: list[int],
                  world: int) -> list[dict]:
    """Rows moved by the regroup before each step, predicted from the steps' row offsets alone.

    Per step: total bytes over all boundaries and the most one rank sends plus receives (what
    bounds the time when boundaries transfer in parallel). The first step moves nothing: each
    rank starts with exactly the rows it needs.
    """
    from ..method.gridshift import axis_starts, row_span

    def spans(o: int) -> list[Span]:
        rows = axis_starts(height, o, patch)
        return [row_span(rows[a:b], patch, height) for a, b in split_even(len(rows), world)]

    out, prev = [], None
    for o in offsets:
        cur = spans(o)
        total, per_rank = 0, [0] * world
        if prev is not None:
            for p, q, (a, b) in exchange_plan(prev, cur):
                n = (b - a) * width * ROW_BYTES
                total += n
                per_rank[p] += n
                per_rank[q] += n
        out.append({"bytes": total, "max_rank_bytes": max(per_rank)})
        prev = cur
    return out


class SharedProgress(Progress):
    """All ranks' patch counts summed in the job's key-value store; rank 0 draws the one bar.

    Each rank adds its count at most every ``interval`` seconds (one small request, not a
    collective). ``fixed_total``: the bar's total was set by the caller (many slides), so a
    slide's ``start`` only adds the patches it had already done.
    """

    KEY = "wsigen/progress"

    def __init__(self, inner: Progress | None, rank: int, kv=None, fixed_total: bool = False,
                 interval: float = 0.5):
        self.inner, self.rank, self.kv = inner or Progress(), rank, kv
        self.fixed_total, self.interval = fixed_total, interval
        self.pending = self.shown = 0
        self.last = 0.0

    def start(self, total: int, done: int = 0) -> None:
        if not self.fixed_total and self.rank == 0:
            self.inner.start(total, 0)
        self.advance(done)

    def stage(self, stage: int, num_stages: int, step: int, steps: int) -> None:
        if self.rank == 0:
            self.inner.stage(stage, num_stages, step, steps)

    def advance(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.kv is None:
            total, self.pending = self.shown + self.pending, 0
        else:
            try:
                total = self.kv.add(self.KEY, self.pending)
            except Exception:  # progress is cosmetic; a lost peer is reported elsewhere
                return
            self.pending = 0
        if self.rank == 0 and total > self.shown:
            self.inner.advance(total - self.shown)
            self.shown = total

    def close(self) -> None:
        self.flush()

    def finish(self) -> None:
        """After a barrier: show the final count of every rank and stop the bar."""
        self.flush()
        if self.rank == 0:
            self.inner.close()


def kv_store():
    """The default process group's key-value store (None where there is none)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def plan_line(spec, world: int) -> str:
    """Pre-flight: state bytes per rank in the last (largest) stage, and the exchange bound."""
    from ..method import gridshift, stages
    from ..slides import checkpoint
    from ..slides.store import SlideStore
    from .config import model_config, parse_size

    if spec.resume:
        info = SlideStore.open(spec.output).info
        cfg, mc = info["config"], info["model"]["config"]
        w, h, m, steps = cfg["width"], cfg["height"], cfg["patch"], cfg["steps"]
        seed, shift = cfg["seed"], cfg["grid_shift"]
    else:
        r = spec.request
        mc = model_config(r.model, r.patch)
        w, h = r.size or parse_size(mc["recommended_size"])
        m = mc["patch"] or r.patch or checkpoint.DEFAULTS["patch"]
        steps, seed = r.steps or mc["steps"], int(r.seed or 0)
        shift = r.grid_shift is not False
    k = mc["k"]
    last = stages.plan_stages(w, h, m, k, 1.0)[-1]
    offsets = [gridshift.grid_offset(seed, last.index, i, m, k, shift)[0] for i in range(steps)]
    ranks = band_plan(last.height, last.width, m, world, offsets)
    guide = [r["buffer_bytes"] // (ROW_BYTES * k * k) * 3 for r in ranks]  # uint8 at 1/k per side
    per = ", ".join(f"rank {r['rank']} {_mb(r['band_bytes'])} (buffer {_mb(r['buffer_bytes'])}, "
                    f"guide {_mb(g)})" for r, g in zip(ranks, guide, strict=True))
    return (f"{world} workers, last stage {last.width}x{last.height}: float32 state per rank: "
            f"{per}; "
            f"each boundary moves ≤ {_mb(m * last.width * ROW_BYTES)} per step")
