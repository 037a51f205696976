"""Who owns an ``out_dir``: a per-rank run lock, and where each process group keeps its snapshots.

Two live runs pointed at the same ``out_dir`` (the default ``./gradience_logs`` makes that easy) would
otherwise delete or overwrite each other's snapshots. :class:`RunLock` lets the second one fail with a clear
:class:`~gradience.errors.ConfigError` before it touches anything; :func:`snapshot_root` keeps data-parallel
subgroups of one run in separate snapshot roots, so their markers and shards never share a directory.

Layout::

    out_dir/.lock/rank_00003          # flock held by global rank 3 of the live run; JSON pid/host/since
    out_dir/snapshots/                # snapshot root of the world (default) group
    out_dir/snapshots/group_0-1/      # snapshot root of the subgroup of global ranks 0 and 1
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from gradience.comm import agree_all
from gradience.errors import ConfigError

__all__ = ["LOCK_DIR", "RunLock", "group_tag", "snapshot_root"]

LOCK_DIR = ".lock"
# Longer rank lists are named by a hash so a 1024-rank subgroup still gets a short directory name.
_MAX_TAG_CHARS = 48


def group_tag(group_ranks: Sequence[int]) -> str:
    """Stable directory name of a process group: ``group_0-1`` for global ranks [0, 1], a hash when long.

    The ranks are sorted, so the tag names the group's members whatever order the group lists them in.
    """
    ranks = sorted({int(r) for r in group_ranks})
    if not ranks or ranks[0] < 0:
        raise ConfigError(f"a process group needs global ranks >= 0, got {list(group_ranks)}")
    joined = "-".join(str(r) for r in ranks)
    if len("group_") + len(joined) <= _MAX_TAG_CHARS:
        return f"group_{joined}"
    digest = hashlib.sha256(joined.encode()).hexdigest()[:12]
    return f"group_{ranks[0]}-{ranks[-1]}_n{len(ranks)}_{digest}"


def snapshot_root(out_dir: str | Path, group_ranks: Sequence[int] | None = None, *,
                  world_size: int | None = None) -> Path:
    """Snapshot root of one process group: ``out_dir/snapshots`` for the world (``group_ranks`` None, or
    every rank of ``world_size``), else ``out_dir/snapshots/<group_tag(group_ranks)>``."""
    base = Path(out_dir) / "snapshots"
    if group_ranks is None:
        return base
    if world_size is not None and sorted(group_ranks) == list(range(world_size)):
        return base
    return base / group_tag(group_ranks)


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``out_dir/.lock/rank_<global_rank>`` for the life of a run.

    The kernel drops a flock when its holder dies, so a lock file left by a killed run is taken over
    silently; one held by a live process (this one included: flock belongs to an open file, so two
    RunLock objects of one process conflict too) raises :class:`ConfigError` and deletes nothing.
    The lock file itself is never removed: unlinking a flock file lets two processes hold "the" lock
    on two different inodes. Keep a reference for the life of the run: a collected RunLock closes its
    file, and closing is what releases a flock.
    """

    def __init__(self, out_dir: str | Path, global_rank: int) -> None:
        if global_rank < 0:
            raise ConfigError(f"RunLock: global_rank must be >= 0, got {global_rank}")
        self.out_dir = Path(out_dir)
        self.global_rank = int(global_rank)
        self.path = self.out_dir / LOCK_DIR / f"rank_{self.global_rank:05d}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`ConfigError` naming ``out_dir`` and the live holder; returns self."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {self.path} ({e}); out_dir must be on a filesystem with flock") from e
            raise ConfigError(
                f"out_dir {self.out_dir} is in use by another live run ({holder}; lock {self.path}); "
                "use another out_dir or stop that run"
            ) from e
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": self.global_rank,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "since_unix": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            # The lock itself is held; the description is only for the error message of a second run.
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays, emptied, for the next run to lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> dict[str, object] | None:
        """What the lock file says about its holder (pid, host, since), or None if empty or unreadable."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        # Closing the descriptor is what releases a flock; do it even if release() was never called.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_holder(fd: int) -> dict[str, object] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, object] | None) -> str:
    if not info:
        return "holder unknown: it has not written its pid yet"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"


def lock_everywhere(out_dir: str | Path, comm: Any, global_rank: int) -> RunLock:
    """*Collective.* Every rank takes its :class:`RunLock`, then all agree: if any rank found ``out_dir``
    in use, every rank releases and raises ConfigError — nobody goes on, or deletes anything, alone."""
    lock = RunLock(out_dir, global_rank)
    error = None
    try:
        lock.acquire()
    except ConfigError as e:
        error = e
    if not agree_all(comm, error is None):
        lock.release()
        raise error or ConfigError(f"out_dir {out_dir} is in use by another live run (seen by another rank)")
    return lock
