"""Training processes: ``wsigen train --workers N --device cpu`` / ``--gpus N``, or one joined rank.

The same launcher machinery as ``wsigen sample`` (``wsigen.run.launch``: device counting in a
child, the watcher that stops the others at the first failure, rank report files): this module
forks N ranks, each sets the torch.distributed environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK) and runs :func:`wsigen.training.loop.train`, whose Accelerator joins the job (gloo on
CPU, NCCL on CUDA; rank 0 writes). Started by ``accelerate launch``/``torchrun`` (WORLD_SIZE
set), this process is one rank and trains directly. A failed rank is named in one line; the
state of the last checkpoint resumes exactly with the same number of processes.

``run/`` may not import ``training/``, so the rank function lives here and ``run.launch`` is
reused, not changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError, WsigenError
from ..run import launch as run_launch
from ..run import processes
from .config import TrainOptions


def processes_for(workers: int | None, gpus: int | None, device: str) -> tuple[int, str]:
    """(ranks to start here, device) — 0 ranks: this process is one of an external job's."""
    ext = processes.external_world()
    if ext > 1:
        n = gpus or workers
        if n is not None and n != ext:
            raise UsageError(f"this process was started as one of {ext} processes (WORLD_SIZE={ext}), "
                             f"but {'--gpus' if gpus else '--workers'} {n} was asked")
        return 0, "cuda" if gpus else device
    return run_launch.resolve_workers(workers, gpus, device)


def train_job(slides, out, options: TrainOptions, *, workers: int | None = None, gpus: int | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train in this process, in N forked ranks, or as one rank of an external launcher's job."""
    from . import setup
    from .loop import train

    n, device = processes_for(workers, gpus, options.config.device)
    if device != options.config.device:
        options = replace(options, config=replace(options.config, device=device),
                          given=options.given | {"device"})
    if n <= 1:
        return train(slides, out, options, resume=resume, overwrite=overwrite, progress=progress)
    if options.config.batch % n:
        raise UsageError(f"--batch {options.config.batch} is not divisible by the {n} processes")
    # the folder rules and the labels once, here (and --overwrite's clearing, before any rank
    # looks at the folder)
    cfg, _ = setup.resolve(options, Path(out), resume, overwrite)
    setup.slide_files(cfg, slides)
    if overwrite and not resume:
        setup.clear_run(Path(out))
    return _spawn(n, device, (list(slides), str(out), options, resume, False, progress))


def _spawn(n: int, device: str, args: tuple) -> dict:
    import multiprocessing.connection

    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(processes.free_port()),
           "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    ctx = mp.get_context("fork")  # nothing device-related has run in this process yet
    with tempfile.TemporaryDirectory(prefix="wsigen-train-") as jobdir:
        procs = [ctx.Process(target=_rank, args=(r, env, jobdir, args), name=f"wsigen-train-{r}")
                 for r in range(n)]
        for p in procs:
            p.start()
        stopped: set[int] = set()
        interrupt = processes.watch(procs, stopped, multiprocessing.connection.wait)
        reports = processes.read_reports(jobdir, n)
    if interrupt is not None:
        raise interrupt
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    if any(codes.values()) or any(not (reports.get(r) or {}).get("ok") for r in codes):
        raise _failure(n, device, args[1], reports, codes, stopped)
    return reports[0]["summary"]


def _rank(rank: int, env: dict, jobdir: str, args: tuple) -> None:
    """One forked rank: the launcher's environment, the training loop, a report, exit."""
    from ..run import stopping
    from .loop import train

    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    processes.mark_forked_worker()
    os.setpgrp()  # terminal signals go to the launcher, which passes them on once
    processes.die_with_parent()
    processes.forget_accelerate_state()
    slides, out, options, resume, overwrite, progress = args
    report = Path(jobdir) / f"rank-{rank}.json"
    try:
        with stopping.installed():
            summary = train(slides, out, options, resume=resume, overwrite=overwrite,
                            progress=progress and rank == 0)
        data, code = {"ok": True, "summary": summary if rank == 0 else None}, 0
    except BaseException as e:  # noqa: BLE001 - every way out is reported to the launcher
        kind, code = processes.classify(e)
        if isinstance(e, SystemExit):  # the loop's own exit after a signal (state saved)
            kind, code = "interrupted", int(e.code or 0)
        msg = str(e) if isinstance(e, WsigenError) else (
            "interrupted" if kind == "interrupted" else f"{type(e).__name__}: {e}")
        data = {"ok": False, "kind": kind, "code": code, "message": msg}  # the launcher says it
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, report)
    with contextlib.suppress(Exception):
        import torch

        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)  # no atexit handlers of the parent's libraries in a forked child


def _failure(n: int, device: str, out: str, reports: dict, codes: dict, stopped: set[int]) -> Exception:
    """One line naming the rank that failed first: killed > error > interrupted > lost contact."""
    first, order, msg, code, terminated = processes.first_failure(n, reports, codes, stopped)
    if order in processes.INTERRUPTED:
        from ..run.stopping import Terminated

        return Terminated() if terminated else KeyboardInterrupt()
    from .state import has_state

    flag = f"--workers {n} --device cpu" if device == "cpu" else f"--gpus {n}"
    hint = (f"the last checkpoint resumes exactly: run the same command with --resume -o {out} {flag} "
            "(the same number of processes)" if has_state(Path(out)) else "nothing was saved yet")
    if order in processes.KILLED:
        return WsigenError(f"training rank {first} of {n} {msg}; the other ranks were stopped. {hint}")
    text = f"training rank {first} of {n}: {msg}"
    return UsageError(text) if code == 2 else WsigenError(text if "resume" in msg else f"{text}; {hint}")
