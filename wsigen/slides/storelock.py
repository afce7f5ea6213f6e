"""One writer per store: an exclusive ``flock`` on a lock file beside the store (``slide.zarr.lock``).

Beside, not inside, so ``--overwrite``'s delete cannot remove it. The writer (``acquire``) holds the
lock for the whole run; forked worker ranks inherit the open file description and with it the
lock, so the launcher's lock covers them. The kernel drops a lock when its last holder dies, so a
killed writer's store is free at once. The file holds the writer's PID, host and start time, which
is what a second writer's refusal and a reader's note say. Readers (``probe``) never create the
file: they try a shared lock without blocking and let go of it at once.

The lock file is removed when the writer finishes (while still locked); a writer that locked a
file somebody removed meanwhile sees that its inode is no longer the path's and tries again, so
two writers never hold locks on two different files of one path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import WsigenError

# Busy: another process holds it. Unsupported: the filesystem refuses locks (NFS without lockd,
# some FUSE and object-store mounts).
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
RETRY_S = 0.5  # a reader's probe holds a shared lock for microseconds: a writer retries this long


def lock_path(store: str | os.PathLike) -> Path:
    """``slide.zarr`` → ``slide.zarr.lock`` (beside the store; the folder's real path, so every
    spelling of one store's path names one lock)."""
    p = Path(os.path.abspath(store))
    return Path(os.path.realpath(p.parent)) / (p.name + ".lock")


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a store's lock."""

    pid: int | None
    host: str | None
    since: float | None
    command: str | None = None

    def describe(self) -> str:
        who = f"PID {self.pid}@{self.host}" if self.pid is not None else "another process"
        if self.since:
            who += " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return who

    @classmethod
    def read(cls, fd: int) -> Holder:
        try:
            raw = os.pread(fd, 4096, 0)
            d = json.loads(raw.decode() or "{}")
        except (OSError, ValueError):
            d = {}
        if not isinstance(d, dict):
            d = {}
        return cls(d.get("pid"), d.get("host"), d.get("since"), d.get("command"))


class StoreLock:
    """The held lock of one store; ``release`` (or leaving the ``with`` block) lets go."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            # removed while locked: nobody can lock this inode and believe it is the path's
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        os.close(fd)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refused(store, e: OSError) -> WsigenError:
    return WsigenError(f"cannot lock {lock_path(store)}: the filesystem refuses file locks "
                       f"({errno.errorcode.get(e.errno, e.errno)}); pass --no-lock if no other "
                       "process can write this store (docs/reliability.md, \"Locks on shared filesystems\")")


def acquire(store: str | os.PathLike, command: str = "wsigen", enabled: bool = True) -> StoreLock:
    """Take the store's lock or refuse with one line naming the holder (PID@host, since when)."""
    path = lock_path(store)
    if not enabled:
        return StoreLock(path, None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the store's folder would be created anyway
    except (FileExistsError, NotADirectoryError):
        raise WsigenError(f"cannot create {store}: {path.parent} is not a directory") from None
    deadline = time.monotonic() + RETRY_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY and time.monotonic() < deadline:
                os.close(fd)
                time.sleep(0.05)
                continue
            holder = Holder.read(fd) if e.errno in _BUSY else None
            os.close(fd)
            if holder is None:
                if e.errno in _UNSUPPORTED:
                    raise _refused(store, e) from None
                raise
            raise WsigenError(f"{store} is being written by {holder.describe()}"
                              + (f" ({holder.command})" if holder.command else "")
                              + "; wait for it to finish or stop it first") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous writer removed the file after we opened it: lock the new one
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return StoreLock(path, fd)


def probe(store: str | os.PathLike) -> Holder | None:
    """The live writer of a store, or None; never creates the lock file and never waits."""
    path = lock_path(store)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return Holder.read(fd) if e.errno in _BUSY else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
