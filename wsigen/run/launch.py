"""Worker processes for ``wsigen sample`` (design.md §4 "Distributed"): start, join, or none.

``--gpus N`` / ``--workers N`` fork N ranks that join one torch.distributed job through
``accelerate.PartialState`` (NCCL on CUDA, gloo on CPU); this process watches them and names the
first that fails (why not ``accelerate.notebook_launcher``: see ``_spawn``). Started by an external
launcher (``accelerate launch``, ``torchrun``: WORLD_SIZE is set) this process is one rank and
joins that job. ``--count K`` runs a slide set (``slidesets``). Every rank leaves a small report
file, so the parent can name the rank that failed. What each rank runs is the launcher's ``RunSpec``,
as it was built (``wsigen.run.config``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from ..errors import UsageError, WsigenError
from . import processes, slidesets
from .config import RunSpec
from .slidesets import MANIFEST, write_manifest

COLLECTIVE_TIMEOUT_S = 3 * 3600


@dataclass
class Job:
    """A run spread over processes: the ``RunSpec`` every rank runs (its device resolved) and how."""

    spec: RunSpec
    count: int | None = None  # a slide set of this many seeds
    nprocs: int = 1
    split: str = "auto"  # many slides: auto | slide | band
    command: str = "wsigen sample"  # starts the resume hint of a failed job
    joined: bool = False  # one rank of an external launcher's job
    threads: int | None = None  # per forked CPU worker (set by ``_spawn``)
    jobdir: str | None = None
    progress: object | None = None
    log: object | None = None

    @property
    def output(self) -> str:
        return self.spec.output

    @property
    def device(self) -> str:
        return self.spec.device


# -- options -------------------------------------------------------------------------------
def cuda_devices() -> int:
    """Visible CUDA devices, counted in a child process: this one forks workers later, and
    CUDA initialised before a fork breaks them (torch's count is fork-safe only through NVML)."""
    import subprocess

    import torch

    if not torch.backends.cuda.is_built():
        return 0
    code = "import torch; print(torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def resolve_workers(workers: int | None, gpus: int | None, device: str) -> tuple[int, str]:
    """(number of processes, device type) from --workers/--gpus/--device; errors before any work."""
    for name, v in (("--workers", workers), ("--gpus", gpus)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1 (got {v})")
    if device not in ("cpu", "cuda", "auto"):
        raise UsageError(f"--device must be cpu, cuda or auto (got {device})")
    if gpus is not None:
        if device == "cpu":
            raise UsageError("--gpus starts CUDA workers; use --workers N --device cpu "
                             "for CPU processes")
        if workers is not None and workers != gpus:
            raise UsageError(f"--gpus {gpus} and --workers {workers} disagree; give one of them")
        device = "cuda"
    n = gpus or workers or 1
    if n == 1 and gpus is None:
        return 1, device  # one process in this one: session.sample resolves "auto" itself
    have = cuda_devices() if device != "cpu" else 0
    if device == "auto":
        device = "cuda" if have else "cpu"
    if device == "cuda":
        if have < n:
            what = f"--gpus {gpus}" if gpus else f"--workers {n} --device cuda"
            raise WsigenError(f"{what}: only {have} CUDA device(s) visible; ask for at most {have} "
                              f"or use --workers {n} --device cpu")
    return n, device


def _precheck(spec: RunSpec, count: int | None) -> None:
    """Errors the parent can find before starting workers (so they come once, before any work)."""
    from ..slides import checkpoint

    spec.validate()
    writer_busy(spec)  # "being written by PID@host" rather than "exists" or anything else
    name = spec.request.model
    if name is not None and name not in checkpoint.BUILTIN and not spec.resume:
        checkpoint.read_config(checkpoint.resolve_model_path(name))
    p = Path(spec.output)
    if spec.resume and not p.exists():
        raise WsigenError(f"--resume: {p} does not exist; start it without --resume")
    if p.exists() and not spec.resume and not spec.overwrite:
        raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume "
                          f"to continue it")
    if count is not None and count < 1:
        raise UsageError(f"--count must be at least 1 (got {count})")


def writer_busy(spec: RunSpec) -> None:
    """A live writer of the output, named, before anything else is said about the store."""
    from ..slides import storelock

    holder = storelock.probe(spec.output) if spec.lock else None
    if holder is not None:
        raise WsigenError(f"{spec.output} is being written by {holder.describe()}"
                          + (f" ({holder.command})" if holder.command else "")
                          + "; wait for it to finish or stop it first")


# -- entry point ---------------------------------------------------------------------------
def make_job(spec: RunSpec, *, workers: int | None = None, gpus: int | None = None,
             count: int | None = None, split: str = "auto", command: str = "wsigen sample",
             progress=None, log=None) -> Job:
    """Resolve the processes and check the run (errors come here, before any work).

    ``command`` starts the resume hint of a failed job (``wsigen upscale IN`` for upscaling).
    ``wsigen.upscale`` calls this before it reads its input, then adds the input to the job's
    spec and runs the job with ``run_job``.
    """
    out = Path(spec.output)
    if spec.resume and count is None and (out / MANIFEST).is_file():
        count = json.loads((out / MANIFEST).read_text())["count"]  # a slide set
    ext = processes.external_world()
    if ext > 1:
        n = gpus or workers
        if n is not None and n != ext:
            raise UsageError(f"this process was started as one of {ext} workers "
                             f"(WORLD_SIZE={ext}), "
                             f"but {'--gpus' if gpus else '--workers'} {n} was asked")
        spec = replace(spec, device="cuda" if gpus else spec.device)
        return Job(spec, count, ext, split, command, joined=True, progress=progress, log=log)
    n, dev = resolve_workers(workers, gpus, spec.device)
    spec = replace(spec, device=dev)
    _precheck(spec, count)
    return Job(spec, count, n, split, command, progress=progress, log=log)


def run_job(job: Job) -> dict | None:
    """Run a job from ``make_job``: in this process, in forked workers, or as one joined rank.

    The store's lock (``slides.storelock``) is taken here, before anything is prepared or deleted,
    by this process (forked ranks inherit it) or, under an external launcher, by rank 0.
    """
    if job.joined and os.environ.get("RANK", "0") != "0":
        return _rank_main(job, joined=True)
    with writer_lock(job.spec, job.command):
        if job.joined:
            return _rank_main(job, joined=True)
        if job.nprocs == 1:
            return _single(job)
        return _spawn(job)


def writer_lock(spec: RunSpec, command: str = "wsigen sample"):
    """The exclusive lock beside ``spec.output`` (none with ``--no-lock``); refuses a second writer."""
    from ..slides import storelock

    return storelock.acquire(spec.output, command=command, enabled=spec.lock)


def _single(job: Job) -> dict:
    from . import sampler, session

    if job.count is not None:
        return slidesets.run_set(job.spec, job.count, job.split, sampler.Topology(), job.progress, kv=None,
                                 log=job.log)
    return session.sample(job.spec, progress=job.progress, log=job.log)


# -- spawning ------------------------------------------------------------------------------
def _spawn(job: Job) -> dict:
    """N forked workers; each initialises torch.distributed through ``accelerate.PartialState``.

    Not ``accelerate.notebook_launcher``: its torch-elastic agent reports whichever failure it
    polls first (a killed rank was named correctly in only some runs here) and returns nothing.
    Watching the processes ourselves gives every exit code, so the first failure is named.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(processes.free_port()),
           "WORLD_SIZE": str(job.nprocs), "LOCAL_WORLD_SIZE": str(job.nprocs)}
    if job.device == "cpu":
        job.threads = job.spec.request.threads or max(1, (os.cpu_count() or 1) // job.nprocs)
        env["OMP_NUM_THREADS"] = str(job.threads)
    ctx = mp.get_context("fork")  # fast, and nothing device-related has run in this process yet
    with tempfile.TemporaryDirectory(prefix="wsigen-job-") as jobdir:
        job.jobdir = jobdir
        procs = [ctx.Process(target=_spawned, args=(job, r, env), name=f"wsigen-rank-{r}")
                 for r in range(job.nprocs)]
        for p in procs:
            p.start()
        stopped: set[int] = set()
        interrupt = processes.watch(procs, stopped, multiprocessing.connection.wait)
        reports = processes.read_reports(jobdir, job.nprocs)
    if job.count is not None and (Path(job.output) / MANIFEST).is_file():
        # the statuses say what the stores say, also after a failed worker
        write_manifest(Path(job.output), json.loads((Path(job.output) / MANIFEST).read_text()))
    if interrupt is not None:
        raise interrupt
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    if any(codes.values()) or any(not (reports.get(r) or {}).get("ok") for r in codes):
        raise _job_error(job, reports, codes, stopped)
    return reports[0]["summary"]


def _job_error(job: Job, reports: dict[int, dict], codes: dict[int, int | None],
               stopped: set[int]) -> WsigenError:
    """One line naming the rank that failed first: killed > error > interrupted > lost contact."""
    n = job.nprocs
    first, order, msg, code, terminated = processes.first_failure(n, reports, codes, stopped)
    if order in processes.INTERRUPTED:  # interrupted: the CLI says so and how to resume
        from .stopping import Terminated

        raise Terminated() if terminated else KeyboardInterrupt()
    hint = _resume_hint(job)
    if order in processes.KILLED:
        text = f"worker rank {first} of {n} {msg}; the other workers were stopped. {hint}"
    else:
        text = f"worker rank {first} of {n}: {msg}" + ("" if "resum" in msg else f"; {hint}")
    err = UsageError(text) if code == 2 else WsigenError(text)
    return err


def _resume_hint(job: Job) -> str:
    flag = f"--workers {job.nprocs}" if job.device == "cpu" else f"--gpus {job.nprocs}"
    what = "the set is" if job.count is not None else "the store is"
    return (f"{what} resumable: {job.command} --resume -o {job.output} {flag} "
            f"(any number of workers gives the same bytes)")


def _spawned(job: Job, rank: int, env: dict) -> None:
    """Body of a worker started by ``_spawn``: the launcher's environment, run, report, exit."""
    from . import stopping

    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    # Forked: libraries with thread pools that the launcher may have used (libvips decoding the
    # input of ``wsigen upscale``) are broken here, so the input is read in a fresh process.
    processes.mark_forked_worker()
    os.setpgrp()  # terminal signals go to the launcher, which passes them on once
    processes.die_with_parent()
    with stopping.installed():  # like the CLI: a first signal finishes the step and saves
        _rank_main(job, joined=False)


def _rank_main(job: Job, joined: bool) -> dict | None:
    """One rank: initialise torch.distributed through Accelerate, run the job, report."""
    import warnings

    import torch
    from accelerate import PartialState

    from .distributed import DistTopology, PeerLost

    threads = job.spec.request.threads or job.threads
    if job.device == "cpu" and threads:
        torch.set_num_threads(threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "OMP_NUM_THREADS unset" and backend notes
            # Rank 0 alone creates the store and builds the pyramid while the others wait in a
            # barrier; a dead peer shows as a closed connection or to the launcher, not as this.
            if not joined:
                processes.forget_accelerate_state()
            state = PartialState(cpu=job.device == "cpu",
                                 timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        rank, world = state.process_index, state.num_processes
        comm = state.device if state.backend == "nccl" else torch.device("cpu")
        summary = _run_rank(job, DistTopology(rank, world, comm))
        _report(job, rank, {"ok": True, "summary": summary if rank == 0 else None})
        return summary if rank == 0 else None
    except BaseException as e:
        kind, code = processes.classify(e)
        msg = str(e) if isinstance(e, WsigenError) else (
            "interrupted" if kind == "interrupted" else f"{type(e).__name__}: {e}")
        _report(job, rank, {"ok": False, "kind": kind, "code": code, "message": msg})
        if joined:  # no parent of ours: this process says what happened to it
            if isinstance(e, WsigenError | KeyboardInterrupt):
                if isinstance(e, WsigenError) and not isinstance(e, PeerLost):
                    e.args = (f"worker rank {rank} of {world}: {e}",)
                raise
            raise WsigenError(f"worker rank {rank} of {world}: {msg}") from e
        if kind == "error":  # a lost peer or an interrupt is a consequence: the parent names it
            print(f"wsigen: worker rank {rank} of {world}: {msg}", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def _report(job: Job, rank: int, data: dict) -> None:
    if not job.jobdir:
        return
    p = Path(job.jobdir) / f"rank-{rank}.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, p)


def _run_rank(job: Job, topo) -> dict | None:
    from . import session
    from .distributed import SharedProgress, kv_store, plan_line

    rank0 = topo.rank == 0
    if job.count is not None:
        return slidesets.run_set(job.spec, job.count, job.split, topo, job.progress if rank0 else None,
                                 kv=kv_store(), log=job.log if rank0 else None)
    if rank0 and job.log:
        job.log(plan_line(job.spec, topo.world))
    bar = SharedProgress(job.progress if rank0 else None, topo.rank, kv_store())
    summary = session.sample(job.spec, progress=bar, topology=topo, log=job.log if rank0 else None)
    report = topo.report()
    topo.barrier()
    bar.finish()
    if rank0:
        summary = {**summary, "workers": topo.world, "exchange": report}
    return summary
