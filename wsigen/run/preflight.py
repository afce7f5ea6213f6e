"""Pre-flight: refuse a slide that will not fit in memory or on disk, before anything is written.

The byte counts are ``planning``'s (the ones ``wsigen plan`` prints); available memory and free
disk are measured here unless passed in, so tests check the decision without allocating.
``WSIGEN_PREFLIGHT=0`` skips the check (the estimates are upper bounds).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError, WsigenError
from ..method import planning
from ..method.stages import StagePlan

RUNTIME_BYTES = 512 * 2**20  # interpreter, torch, zarr and codec buffers (≈ 0.4 GB measured on CPU)
STATE_DTYPE_OPTION = True  # `--state-dtype float16` exists, so the hint names it


@dataclass(frozen=True)
class Needs:
    """What one slide needs: bytes per process (largest stage) and on disk (uncompressed bounds)."""

    width: int
    height: int
    world: int  # processes in the job
    processes_here: int  # of those, on this machine
    state_per_rank: int  # the state band one process holds in the last stage
    guide_per_rank: int
    buffers: int  # batch buffers (on the accelerator when there is one)
    model: int
    runtime: int
    host_per_process: int  # what each process needs in host memory
    disk: dict  # stages, level0, pyramid, state, total
    disk_needed: int  # total less what the store already holds (resume)
    state_dtype: str = "float32"

    @property
    def host_total(self) -> int:
        return self.host_per_process * self.processes_here

    def state_line(self) -> str:
        """One line for the log: the state each process holds."""
        share = "" if self.world == 1 else f", 1/{self.world} of the canvas"
        return (f"state per process: {gb(self.state_per_rank)} ({self.state_dtype} band of "
                f"{self.width}x{self.height}{share})")


def gb(n: int | float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def estimate(plans: list[StagePlan], patch: int, k: int, batch: int, params: int, *, world: int = 1,
             processes_here: int | None = None, checkpoint: bool = True, device_type: str = "cpu",
             on_disk: int = 0, state_bytes: int = 4, history: bool = False) -> Needs:
    """Memory per process and disk of sampling ``plans`` with ``world`` processes (nothing allocated).

    ``history``: a multistep solver keeps its previous data prediction as a second band (and
    saves it beside the mid-stage state), so state memory and checkpoint disk double."""
    if world < 1:
        raise ValueError(f"world must be at least 1 (got {world})")
    last = plans[-1]
    mem = planning.memory_per_rank(last.height, last.width, patch, k, world, batch, params, state_bytes)
    # A band never exceeds the canvas (planning adds the shift slack even to a single process).
    mem["state"] = min(mem["state"], 3 * last.height * last.width * state_bytes)
    if history:  # counted in the state: the band holds x and the history together
        mem["state"] *= 2
    disk = dict(planning.disk_bytes(plans, last.width, last.height, state_bytes, history=history))
    if not checkpoint:  # no mid-stage state is ever written
        disk["total"] -= disk["state"]
        disk["state"] = 0
    # State and guide stay in host memory; batch buffers and the model go to the accelerator.
    host = mem["state"] + mem["guide"] + RUNTIME_BYTES
    if device_type == "cpu":
        host += mem["buffers"] + mem["model"]
    return Needs(width=last.width, height=last.height, world=world,
                 processes_here=processes_here or world, state_per_rank=mem["state"],
                 guide_per_rank=mem["guide"], buffers=mem["buffers"], model=mem["model"],
                 runtime=RUNTIME_BYTES, host_per_process=host, disk=disk,
                 disk_needed=max(0, disk["total"] - on_disk),
                 state_dtype="float16" if state_bytes == 2 else "float32")


#: Share of the accelerator's free memory the state may take when ``--state-device auto`` puts it
#: there (the rest: the network's activations, allocator slack, other processes).
DEVICE_STATE_SHARE = 0.6


def state_device(choice: str, device_type: str, state: int, other: int, free: int | None) -> str:
    """Where the state band lives: ``"cpu"`` or ``"cuda"``.

    ``auto`` keeps it on the accelerator when the band (``state`` bytes) plus the batch buffers
    and model (``other``) fit in ``DEVICE_STATE_SHARE`` of its ``free`` memory — no host↔device
    copy per segment then — and in host memory otherwise. The bytes of the result are the same
    either way: only where the values wait between steps changes.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--state-device must be auto, cpu or cuda (got {choice})")
    if device_type != "cuda":
        if choice == "cuda":
            raise UsageError("--state-device cuda needs --device cuda")
        return "cpu"
    if choice == "cuda" and free is not None and state + other > free:
        raise WsigenError(f"--state-device cuda: the state band needs {gb(state)} (+ {gb(other)} buffers and "
                          f"model) but the GPU has {gb(free)} free; use --state-device cpu or more --gpus")
    if choice != "auto":
        return choice
    return "cuda" if free is not None and state + other <= DEVICE_STATE_SHARE * free else "cpu"


def device_free_memory(device) -> int | None:
    """Free bytes on a CUDA device (None where it cannot be asked)."""
    import torch

    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError, ValueError):
        return None


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def free_disk(out: str | os.PathLike) -> tuple[Path, int]:
    """Free bytes on the filesystem that will hold ``out`` (its first existing ancestor)."""
    p = Path(out).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p, shutil.disk_usage(p).free


def check(needs: Needs, out: str | os.PathLike, *, memory: int | None = None,
          disk: int | None = None) -> None:
    """Raise one clear line when ``needs`` exceeds available memory or free disk; else return."""
    if os.environ.get("WSIGEN_PREFLIGHT", "1") == "0":
        return
    memory = available_memory() if memory is None else memory
    where, free = free_disk(out)
    free = free if disk is None else disk
    n = needs
    size = f"{n.width}x{n.height} px"
    if n.host_total > memory:
        others = n.host_per_process - n.state_per_rank
        total_state = n.state_per_rank * n.world
        fits = memory - others  # state one process may hold on a machine of its own
        more = -(-total_state // fits) if fits > 0 else None
        ways = ["spread the state over more processes on more GPUs or machines (--gpus N / --workers N: "
                f"about {gb(total_state)}/N each" + (f", N ≥ {more}" if more and more > n.world else "") + ")"]
        if STATE_DTYPE_OPTION and n.state_per_rank and n.state_dtype == "float32":
            ways.append("a float16 state (--state-dtype float16) halves it")
        ways.append("a smaller --size")
        raise WsigenError(
            f"not enough memory for {size}: each process needs about {gb(n.host_per_process)} "
            f"({n.state_dtype} state band {gb(n.state_per_rank)}, guide {gb(n.guide_per_rank)}, other "
            f"{gb(others - n.guide_per_rank)}), {n.processes_here} process(es) here → "
            f"{gb(n.host_total)}, {gb(memory)} available; ways out: " + "; ".join(ways)
            + " (WSIGEN_PREFLIGHT=0 skips this check)")
    if n.disk_needed > free:
        d = n.disk
        state = (f", --checkpoint-every 0 (no mid-stage state: saves {gb(d['state'])})"
                 if d["state"] else "")
        raise WsigenError(
            f"not enough disk space in {where} for {size}: the store needs up to {gb(n.disk_needed)} "
            f"(stages {gb(d['stages'])}, level 0 {gb(d['level0'])}, pyramid {gb(d['pyramid'])}, "
            f"mid-stage state {gb(d['state'])}; uncompressed bounds), {gb(free)} free; ways out: free "
            f"space or write elsewhere (-o){state}, or a smaller --size (WSIGEN_PREFLIGHT=0 skips this check)")
