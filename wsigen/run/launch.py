"""Worker processes for ``wsigen sample`` (design.md §4 "Distributed"): start, join, or none.

``--gpus N`` / ``--workers N`` fork N ranks that join one torch.distributed job through
``accelerate.PartialState`` (NCCL on CUDA, gloo on CPU); this process watches them and names the
first that fails (why not ``accelerate.notebook_launcher``: see ``_spawn``). Started by an external
launcher (``accelerate launch``, ``torchrun``: WORLD_SIZE is set) this process is one rank and
joins that job. ``--count K`` samples seeds
seed … seed+K−1 into K stores under one folder with a manifest. Every rank leaves a small report
file, so the parent can name the rank that failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ..errors import UsageError, WsigenError

MANIFEST = "manifest.json"
SET_FORMAT = "wsigen-set/1"
# A slide is "small" (one worker samples it whole) when the states of all local ranks' slides
# fit in this share of the machine's memory; otherwise every slide is split into bands.
SMALL_SLIDE_MEMORY_SHARE = 0.5
COLLECTIVE_TIMEOUT_S = 3 * 3600


@dataclass
class Job:
    """What every rank runs: the output, api.sample options, and how the job is spread."""

    output: str
    options: dict
    count: int | None = None
    device: str = "cpu"
    nprocs: int = 1
    resume: bool = False
    overwrite: bool = False
    split: str = "auto"  # many slides: auto | slide | band
    jobdir: str | None = None
    progress: object | None = None
    log: object | None = None
    extra: dict = field(default_factory=dict)


# -- options -------------------------------------------------------------------------------
def external_world() -> int:
    """WORLD_SIZE of an external launcher (accelerate launch, torchrun), else 0."""
    try:
        return int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        return 0


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
        return 1, device  # one process in this one: api.sample resolves "auto" itself
    have = cuda_devices() if device != "cpu" else 0
    if device == "auto":
        device = "cuda" if have else "cpu"
    if device == "cuda":
        if have < n:
            what = f"--gpus {gpus}" if gpus else f"--workers {n} --device cuda"
            raise WsigenError(f"{what}: only {have} CUDA device(s) visible; ask for at most {have} "
                              f"or use --workers {n} --device cpu")
    return n, device


def _precheck(output: str, count: int | None, resume: bool, overwrite: bool, options: dict) -> None:
    """Errors the parent can find before starting workers (so they come once, before any work)."""
    from .. import api
    from ..slides import checkpoint

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if options.get("size") is not None:
        api.parse_size(options["size"])
    spec = options.get("model")
    if spec is not None and str(spec) not in checkpoint.BUILTIN and not resume:
        checkpoint.read_config(checkpoint.resolve_model_path(spec))
    p = Path(output)
    if resume and not p.exists():
        raise WsigenError(f"--resume: {p} does not exist; start it without --resume")
    if p.exists() and not resume and not overwrite:
        raise WsigenError(f"output {p} exists; pass --overwrite to replace it or --resume "
                          f"to continue it")
    if count is not None and count < 1:
        raise UsageError(f"--count must be at least 1 (got {count})")


# -- entry point ---------------------------------------------------------------------------
def sample(output, size=None, *, workers: int | None = None, gpus: int | None = None,
           count: int | None = None, device: str = "auto", resume: bool = False,
           overwrite: bool = False, progress=None, log=None, split: str = "auto",
           **options) -> dict:
    """``api.sample`` on one or many processes, for one slide or ``count`` slides."""
    job = make_job(output, size, workers=workers, gpus=gpus, count=count, device=device,
                   resume=resume, overwrite=overwrite, progress=progress, log=log, split=split,
                   **options)
    return run_job(job)


def make_job(output, size=None, *, workers: int | None = None, gpus: int | None = None,
             count: int | None = None, device: str = "auto", resume: bool = False,
             overwrite: bool = False, progress=None, log=None, split: str = "auto",
             command: str = "wsigen sample", **options) -> Job:
    """Resolve the processes and check the options (errors come here, before any work).

    ``command`` starts the resume hint of a failed job (``wsigen upscale IN`` for upscaling).
    ``wsigen.upscale`` calls this before it reads its input, then adds the input to
    ``job.options`` and runs the job with ``run_job``.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if size is not None:
        options["size"] = size
    if resume and count is None and (Path(output) / MANIFEST).is_file():
        count = json.loads((Path(output) / MANIFEST).read_text())["count"]  # a slide set
    ext = external_world()
    if ext > 1:
        n = gpus or workers
        if n is not None and n != ext:
            raise UsageError(f"this process was started as one of {ext} workers "
                             f"(WORLD_SIZE={ext}), "
                             f"but {'--gpus' if gpus else '--workers'} {n} was asked")
        dev = "cuda" if gpus else device
        return Job(str(output), options, count, dev, ext, resume, overwrite, split, None,
                   progress, log, extra={"joined": True, "command": command})
    n, dev = resolve_workers(workers, gpus, device)
    _precheck(str(output), count, resume, overwrite, options)
    return Job(str(output), options, count, dev, n, resume, overwrite, split, None, progress, log,
               extra={"command": command})


def run_job(job: Job) -> dict | None:
    """Run a job from ``make_job``: in this process, in forked workers, or as one joined rank."""
    if job.extra.get("joined"):
        return _rank_main(job, joined=True)
    if job.nprocs == 1:
        return _single(job)
    return _spawn(job)


def _single(job: Job) -> dict:
    from .. import api
    from . import sampler

    if job.count is not None:
        return run_set(job, sampler.Topology(), job.progress, kv=None)
    return api.sample(job.output, device=job.device, resume=job.resume, overwrite=job.overwrite,
                      progress=job.progress, log=job.log, **job.options)


# -- spawning ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: Job) -> dict:
    """N forked workers; each initialises torch.distributed through ``accelerate.PartialState``.

    Not ``accelerate.notebook_launcher``: its torch-elastic agent reports whichever failure it
    polls first (a killed rank was named correctly in only some runs here) and returns nothing.
    Watching the processes ourselves gives every exit code, so the first failure is named.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(job.nprocs), "LOCAL_WORLD_SIZE": str(job.nprocs)}
    if job.device == "cpu":
        per = job.options.get("threads") or max(1, (os.cpu_count() or 1) // job.nprocs)
        job.extra["threads"] = per
        env["OMP_NUM_THREADS"] = str(job.extra["threads"])
    ctx = mp.get_context("fork")  # fast, and nothing device-related has run in this process yet
    with tempfile.TemporaryDirectory(prefix="wsigen-job-") as jobdir:
        job.jobdir = jobdir
        procs = [ctx.Process(target=_spawned, args=(job, r, env), name=f"wsigen-rank-{r}")
                 for r in range(job.nprocs)]
        for p in procs:
            p.start()
        stopped: set[int] = set()
        interrupt = _watch(procs, stopped, multiprocessing.connection.wait)
        reports = _reports(jobdir, job.nprocs)
    if job.count is not None and (Path(job.output) / MANIFEST).is_file():
        # the statuses say what the stores say, also after a failed worker
        write_manifest(Path(job.output), json.loads((Path(job.output) / MANIFEST).read_text()))
    if interrupt is not None:
        raise interrupt
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    if any(codes.values()) or any(not (reports.get(r) or {}).get("ok") for r in codes):
        raise _job_error(job, reports, codes, stopped)
    return reports[0]["summary"]


GRACE_S = 15.0  # after a failure: how long the other workers get to stop before SIGKILL


def _watch(procs, stopped: set[int], wait) -> KeyboardInterrupt | None:
    """Wait for every worker; at the first non-zero exit stop the others (SIGTERM, then SIGKILL).

    Workers sit in their own process group, so Ctrl-C and SIGTERM reach only this process, which
    passes each on: the first lets every worker finish its step and save the state (the ranks
    agree on the step), a second stops them at once. Returns the interrupt to re-raise, if any.
    """
    import time

    running = {p.sentinel: r for r, p in enumerate(procs) if p.exitcode is None}
    deadline, interrupt = None, None
    while running:
        try:
            for sentinel in wait(list(running), timeout=0.5):
                r = running.pop(sentinel)
                procs[r].join()
                code = procs[r].exitcode
                # 130/143: an interrupted worker; the ranks agree on stopping by themselves
                if code not in (0, 130, 143) and deadline is None and interrupt is None:
                    _stop(procs, stopped, signal.SIGTERM)
                    deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                _stop(procs, stopped, signal.SIGKILL)
                deadline = float("inf")
        except KeyboardInterrupt as e:
            from .stopping import Terminated

            sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            _stop(procs, set(), sig)
            if interrupt is not None and deadline is None:  # the second: stop now
                deadline = time.monotonic() + GRACE_S
            interrupt = interrupt or e
    return interrupt


def _stop(procs, stopped: set[int], sig) -> None:
    for r, p in enumerate(procs):
        if p.exitcode is None and p.pid:
            stopped.add(r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)


def _reports(jobdir: str, n: int) -> dict[int, dict]:
    out = {}
    for r in range(n):
        p = Path(jobdir) / f"rank-{r}.json"
        if p.exists():
            with contextlib.suppress(ValueError, OSError):
                out[r] = json.loads(p.read_text())
    return out


def _job_error(job: Job, reports: dict[int, dict], codes: dict[int, int | None],
               stopped: set[int]) -> WsigenError:
    """One line naming the rank that failed first: killed > error > interrupted > lost contact."""
    n = job.nprocs

    def why(rank: int) -> tuple[int, str, int]:
        rep, code = reports.get(rank), codes.get(rank)
        if rep is None:
            if code is not None and code < 0:
                try:
                    how = f"was killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"was killed by signal {-code}"
            else:
                how = f"died without a report (exit code {code})"
            return (5 if rank in stopped else 0), how, 1
        order = {"error": 1, "interrupted": 2, "lost": 3}.get(rep.get("kind"), 1)
        order += 4 if rank in stopped else 0
        return order, rep.get("message", "failed"), int(rep.get("code", 1))

    failed = [r for r in range(n) if codes.get(r) or not (reports.get(r) or {}).get("ok")]
    first = min(failed, key=lambda r: (why(r)[0], r))
    order, msg, code = why(first)
    if order in (2, 6):  # interrupted: the CLI says so and how to resume
        from .stopping import Terminated

        # the ranks stop together; if any was sent SIGTERM, the job was terminated
        terminated = any(why(r)[2] == 143 for r in failed if why(r)[0] in (2, 6))
        raise Terminated() if terminated else KeyboardInterrupt()
    hint = _resume_hint(job)
    if order in (0, 5):
        text = f"worker rank {first} of {n} {msg}; the other workers were stopped. {hint}"
    else:
        text = f"worker rank {first} of {n}: {msg}" + ("" if "resum" in msg else f"; {hint}")
    err = UsageError(text) if code == 2 else WsigenError(text)
    return err


def _resume_hint(job: Job) -> str:
    flag = f"--workers {job.nprocs}" if job.device == "cpu" else f"--gpus {job.nprocs}"
    what = "the set is" if job.count is not None else "the store is"
    command = job.extra.get("command", "wsigen sample")
    return (f"{what} resumable: {command} --resume -o {job.output} {flag} "
            f"(any number of workers gives the same bytes)")


def _spawned(job: Job, rank: int, env: dict) -> None:
    """Body of a worker started by ``_spawn``: the launcher's environment, run, report, exit."""
    from . import stopping, upscaling

    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    # Forked: libraries with thread pools that the launcher may have used (libvips decoding the
    # input of ``wsigen upscale``) are broken here, so the input is read in a fresh process.
    upscaling.read_in_fresh_process()
    os.setpgrp()  # terminal signals go to the launcher, which passes them on once
    _die_with_parent()
    with stopping.installed():  # like the CLI: a first signal finishes the step and saves
        _rank_main(job, joined=False)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the launching process dies (it left the terminal's group)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


def _forget_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def _rank_main(job: Job, joined: bool) -> dict | None:
    """One rank: initialise torch.distributed through Accelerate, run the job, report."""
    import warnings

    import torch
    from accelerate import PartialState

    from .distributed import DistTopology, PeerLost

    threads = job.options.get("threads") or job.extra.get("threads")
    if job.device == "cpu" and threads:
        torch.set_num_threads(threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "OMP_NUM_THREADS unset" and backend notes
            # Rank 0 alone creates the store and builds the pyramid while the others wait in a
            # barrier; a dead peer shows as a closed connection or to the launcher, not as this.
            if not joined:
                # A forked worker inherits the launcher's Accelerate singletons: if the launching
                # process had used Accelerate (e.g. training earlier in the same Python), they
                # would say "one process" and skip initialising the process group.
                _forget_accelerate_state()
            state = PartialState(cpu=job.device == "cpu",
                                 timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        rank, world = state.process_index, state.num_processes
        comm = state.device if state.backend == "nccl" else torch.device("cpu")
        summary = _run_rank(job, DistTopology(rank, world, comm))
        _report(job, rank, {"ok": True, "summary": summary if rank == 0 else None})
        return summary if rank == 0 else None
    except BaseException as e:
        kind, code = _classify(e)
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


def _classify(e: BaseException) -> tuple[str, int]:
    from .distributed import PeerLost

    if isinstance(e, PeerLost):
        return "lost", 1
    if isinstance(e, KeyboardInterrupt):
        from .stopping import Terminated

        return "interrupted", 143 if isinstance(e, Terminated) else 130
    if isinstance(e, WsigenError):
        return "error", e.exit_code
    if isinstance(e, RuntimeError) and ("gloo" in str(e).lower() or "Connection closed" in str(e)):
        return "lost", 1
    return "error", 1


def _report(job: Job, rank: int, data: dict) -> None:
    if not job.jobdir:
        return
    p = Path(job.jobdir) / f"rank-{rank}.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, p)


def _run_rank(job: Job, topo) -> dict | None:
    from .. import api
    from .distributed import SharedProgress, kv_store

    rank0 = topo.rank == 0
    if job.count is not None:
        return run_set(job, topo, job.progress if rank0 else None, kv=kv_store())
    if rank0 and job.log:
        job.log(plan_line(job.output, job.options, topo.world, job.resume))
    bar = SharedProgress(job.progress if rank0 else None, topo.rank, kv_store())
    summary = api.sample(job.output, device=job.device, resume=job.resume, overwrite=job.overwrite,
                         progress=bar, topology=topo, log=job.log if rank0 else None, **job.options)
    report = topo.report()
    topo.barrier()
    bar.finish()
    if rank0:
        summary = {**summary, "workers": topo.world, "exchange": report}
    return summary


def _model_config(options: dict) -> dict:
    """The model's config without building it (no torch work in the launching process)."""
    from ..slides import checkpoint

    spec = options.get("model") or "default"
    if str(spec) == "gaussian":
        return checkpoint.gaussian_config(options.get("patch"))
    return checkpoint.read_config(checkpoint.resolve_model_path(spec))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def plan_line(output: str, options: dict, world: int, resume: bool) -> str:
    """Pre-flight: state bytes per rank in the last (largest) stage, and the exchange bound."""
    from .. import api
    from ..method import cascade, gridshift
    from ..slides import checkpoint
    from ..slides.store import SlideStore
    from .distributed import ROW_BYTES, band_plan

    if resume:
        info = SlideStore.open(output).info
        cfg, mc = info["config"], info["model"]["config"]
        w, h, m, steps = cfg["width"], cfg["height"], cfg["patch"], cfg["steps"]
        seed, shift = cfg["seed"], cfg["grid_shift"]
    else:
        mc = _model_config(options)
        w, h = api.parse_size(options.get("size") or mc["recommended_size"])
        m = mc["patch"] or options.get("patch") or checkpoint.DEFAULTS["patch"]
        steps, seed = options.get("steps") or mc["steps"], int(options.get("seed") or 0)
        shift = options.get("grid_shift") is not False
    k = mc["k"]
    last = cascade.plan_stages(w, h, m, k, 1.0)[-1]
    offsets = [gridshift.grid_offset(seed, last.index, i, m, k, shift)[0] for i in range(steps)]
    ranks = band_plan(last.height, last.width, m, world, offsets)
    guide = [r["buffer_bytes"] // (ROW_BYTES * k * k) * 3 for r in ranks]  # uint8 at 1/k per side
    per = ", ".join(f"rank {r['rank']} {_mb(r['band_bytes'])} (buffer {_mb(r['buffer_bytes'])}, "
                    f"guide {_mb(g)})" for r, g in zip(ranks, guide, strict=True))
    return (f"{world} workers, last stage {last.width}x{last.height}: float32 state per rank: "
            f"{per}; "
            f"each boundary moves ≤ {_mb(m * last.width * ROW_BYTES)} per step")


# -- many slides ---------------------------------------------------------------------------
def slide_name(seed: int) -> str:
    return f"slide-{seed}.zarr"


def _slide_status(path: Path) -> str:
    """complete | partial (resumable) | pending (absent or not yet a store)."""
    from ..slides.store import SlideStore

    if not path.exists():
        return "pending"
    try:
        return "complete" if SlideStore.open(path).complete else "partial"
    except WsigenError:
        return "pending"


def write_manifest(root: Path, manifest: dict) -> None:
    """Atomically: the manifest is read by --resume and by people."""
    for s in manifest["slides"]:
        s["status"] = _slide_status(root / s["store"])
    manifest["complete"] = all(s["status"] == "complete" for s in manifest["slides"])
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


def _prepare_set(job: Job) -> dict:
    """Rank 0: create (or reopen with --resume) the folder and its manifest."""
    import shutil

    from ..slides.store import prepare_output
    from ..version import __version__

    root = Path(job.output)
    if job.resume:
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise WsigenError(f"--resume: {root} has no {MANIFEST}; it is not a wsigen slide set")
        manifest = json.loads(mpath.read_text())
        stored = manifest["options"]
        stored = {**stored, "seed": manifest["seed"]}
        clash = [f"{k} {v!r} (set: {stored.get(k)!r})" for k, v in job.options.items()
                 if k != "threads" and stored.get(k) != v]
        if job.count is not None and job.count != manifest["count"]:
            clash.append(f"count {job.count} (set: {manifest['count']})")
        if clash:
            raise UsageError("--resume: options conflict with the set's manifest: "
                             + "; ".join(clash))
        return manifest
    if root.exists():
        if not job.overwrite:
            raise WsigenError(f"output {root} exists; pass --overwrite to replace it or --resume "
                              f"to continue it")
        old = root / MANIFEST
        if old.is_file():  # a set of ours: remove its stores and manifest, nothing else
            for s in json.loads(old.read_text()).get("slides", []):
                p = root / s["store"]
                if p.exists():
                    prepare_output(p, overwrite=True)
            old.unlink()
        if root.is_dir() and any(root.iterdir()):
            raise WsigenError(f"refusing to overwrite {root}: it is not empty and not a wsigen "
                              f"slide set")
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    seed0 = int(job.options.get("seed") or 0)
    manifest = {"format": SET_FORMAT, "version": __version__, "count": job.count, "seed": seed0,
                "options": {k: v for k, v in job.options.items() if k != "seed"},
                "slides": [{"seed": seed0 + i, "store": slide_name(seed0 + i), "status": "pending"}
                           for i in range(job.count)]}
    write_manifest(root, manifest)
    return manifest


def _split(job: Job, options: dict, world: int) -> str:
    """Whole slides per worker when they are small, bands of every slide when large."""
    if job.split != "auto":
        return job.split
    import psutil

    from .. import api

    w, h = api.parse_size(options.get("size") or _model_config(options)["recommended_size"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    state = 3 * 4 * w * h
    small = local * state <= SMALL_SLIDE_MEMORY_SHARE * psutil.virtual_memory().total
    return "slide" if small else "band"


def _set_totals(options: dict, seeds: list[int], device: str) -> list[int]:
    """Patch-steps of each slide (for the one bar), from the keyed grid offsets alone."""

    from .. import api
    from ..method import cascade
    from ..slides import checkpoint
    from . import sampler

    spec = options.get("model") or "default"
    lm = checkpoint.load_model(spec, patch=options.get("patch"))
    dev = api.resolve_device(device)
    req = {k: v for k, v in options.items() if k not in ("model", "patch")}
    totals = []
    for s in seeds:
        cfg = api.build_config(lm, spec, {**req, "seed": s}, dev)
        k = lm.config["k"]
        plans = cascade.plan_stages(cfg["width"], cfg["height"], lm.patch, k, cfg["mpp"])
        ctxs = sampler.contexts(lm, plans, api.settings_of(cfg), s, dev)
        totals.append(sampler.total_patches(ctxs))
    return totals


def run_set(job: Job, topo, bar, kv) -> dict:
    """Seeds seed … seed+K−1 into K stores under ``job.output``; each rank runs its share."""
    from .. import api
    from . import sampler
    from .distributed import SharedProgress

    root = Path(job.output)
    manifest = None
    if topo.rank == 0:
        manifest = _prepare_set(job)
        status = [_slide_status(root / s["store"]) for s in manifest["slides"]]
    codes = topo.broadcast([{"complete": 0, "partial": 1, "pending": 2}[s] for s in status]
                           if topo.rank == 0 else [0] * _set_count(job, root))
    if topo.rank != 0:
        manifest = json.loads((root / MANIFEST).read_text())
    slides = manifest["slides"]
    options = {**manifest["options"], **{k: v for k, v in job.options.items() if k == "threads"}}
    todo = [i for i, c in enumerate(codes) if c != 0]
    split = _split(job, options, topo.world) if todo else "slide"
    whole = todo[: len(todo) - len(todo) % topo.world] if split == "slide" else []
    banded = [i for i in todo if i not in whole]
    progress = SharedProgress(bar, topo.rank, kv, fixed_total=True)
    if topo.rank == 0 and job.log:
        job.log(f"{len(slides)} slides, seeds {slides[0]['seed']} … {slides[-1]['seed']} → {root}: "
                f"{len(slides) - len(todo)} complete, {len(whole)} to sample whole "
                f"(one per worker), "
                f"{len(banded)} split into bands over {topo.world} worker(s)")
    if topo.rank == 0 and bar is not None:
        totals = _set_totals(options, [s["seed"] for s in slides], job.device)
        bar.start(sum(totals), sum(t for t, c in zip(totals, codes, strict=True) if c == 0))
    single = sampler.Topology()
    summaries = []

    def one(i: int, t) -> None:
        s = slides[i]
        out = root / s["store"]
        summaries.append(api.sample(
            out, device=job.device, resume=codes[i] == 1, overwrite=codes[i] == 2 and out.exists(),
            progress=progress, topology=t, log=None,
            **{**options, "seed": s["seed"]}))
        if topo.rank == 0 and t is single:
            write_manifest(root, manifest)

    for i in whole[topo.rank :: topo.world]:
        one(i, single)
    for i in banded:
        one(i, topo)
    topo.barrier()
    progress.finish()
    evaluations = topo.all_sum(sum(s["evaluations"] for s in summaries))
    if topo.rank != 0:
        return None
    write_manifest(root, manifest)
    return {"output": str(root), "manifest": str(root / MANIFEST), "count": len(slides),
            "seeds": [s["seed"] for s in slides], "sampled": len(todo), "split": split,
            "whole": len(whole), "banded": len(banded), "workers": topo.world,
            "evaluations": evaluations, "complete": manifest["complete"],
            "slides": manifest["slides"]}


def _set_count(job: Job, root: Path) -> int:
    if job.count is not None:
        return job.count
    return json.loads((root / MANIFEST).read_text())["count"]
