"""Durable writes: what a mark says is on disk is on disk, even after a power loss.

zarr's LocalStore writes every key to a temporary file and renames it over the key, without
fsync: after a crash of the machine (not of the process) a rename can be on disk before the
data it names, leaving an empty ``zarr.json`` or a chunk of zeros behind a mark. So a mark is
written here as POSIX asks: the data is fsynced, then the directory entries that name it, then
the metadata goes to a temporary file that is fsynced, renamed over ``zarr.json``, and the
directory fsynced (``write_json``). ``--no-fsync`` turns every fsync off (scratch runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """The directory's entries (the names of what was created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories (EINVAL)
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(paths: Iterable[Path], workers: int = 1) -> int:
    """fsync every file in ``paths`` on ``workers`` threads (fsync releases the GIL); how many."""
    from .parallel import bounded_map

    n = 0
    for _ in bounded_map(fsync_file, paths, workers):
        n += 1
    return n


def write_json(path: str | os.PathLike, obj, fsync: bool = True, indent: int | None = 2) -> None:
    """Replace ``path`` by ``obj`` as JSON: temporary file, fsync, rename, fsync of the directory.

    The temporary file's name ends in ``.partial``, which the store removes when one is left
    behind by a killed writer.
    """
    p = Path(path)
    tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps(obj, indent=indent, allow_nan=True).encode())
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(p.parent)
