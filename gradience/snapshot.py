"""SnapshotStore: one process group's snapshots: per-rank shards, a commit marker, checksums, retention.

Layout (disk tier; ``root`` is the group's snapshot root, see :func:`gradience.rundir.snapshot_root`)::

    root/snap_00000012/rank_00003.safetensors   # global rank 3's model + optimizer state (.ckpt: a save_fn's)
    root/snap_00000012/COMMITTED                # JSON marker, written last by the group's rank 0

Snapshots are keyed by an id (``sid``) the caller assigns in increasing order (after a restart: past what
:meth:`SnapshotStore.scan` returns); a committed id is never written again. The training step is only a
label (marker and shard metadata): step numbers repeat, e.g. a per-epoch ``enumerate``.

A snapshot is committed only after every rank reported its shard written, fsynced and hashed (one MAX
all-reduce carries failure flags, SHA-256s, sizes and global ranks), rank 0 then wrote the marker (format:
:func:`gradience.shardio.load_marker`; temp -> fsync -> rename) and reported success (a second all-reduce).
A marker always lists complete shards: prune and reset remove it and every rank waits for that before
deleting its shard. Restores verify the SHA-256 before anything is loaded. The memory tier runs the same
protocol with in-memory copies and touches no disk.

With a hot tier (:mod:`gradience.hot`) the disk tier commits in two phases: at the commit point every rank
agrees that its in-memory copy was taken, and the snapshot becomes a rollback target served from that copy;
the shard is written from the copy in a background thread meanwhile, and :meth:`SnapshotStore.persist` (called
once every rank's write has finished, so the step never waits) exchanges the hashes and writes the marker.
Until then the snapshot survives only in memory; only the newest committed snapshot keeps its copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from gradience import shardio as sio
from gradience.comm import Comm, agree_all
from gradience.errors import ConfigError, SnapshotError
from gradience.hot import HotCopy, HotTier
from gradience.persist import Persisting
from gradience.shardio import FORMAT_VERSION, MARKER, snapshot_dir_name
from gradience.state import capture_state, restore_state

__all__ = ["FORMAT_VERSION", "MARKER", "Prepared", "SnapshotInfo", "SnapshotStore", "capture_state",
           "restore_state", "snapshot_dir_name"]


@dataclass
class Prepared:
    """A verified shard, ready to apply; produced by :meth:`SnapshotStore.prepare`."""

    sid: int
    step: int | None
    tensors: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    path: Path | None


@dataclass
class SnapshotInfo:
    """A committed snapshot: its id, step label, writer world size, directory (None in memory), marker extra."""

    sid: int
    step: int | None
    world_size: int
    path: Path | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    sid: int
    step: int | None
    meta: dict[str, Any]
    extra: dict[str, Any]
    thread: threading.Thread | None = None
    result: tuple[str, int, int] = ("", 0, 0)  # sha256, size, kind
    hot: HotCopy | None = None  # the in-memory copy (memory tier, or a disk tier with a hot tier)
    error: Exception | None = None
    captured: bool = False  # the capture succeeded (read without racing the writer thread)
    two_phase: bool = False  # committed from memory first (the same on every rank: decided by configuration)


class SnapshotStore(Persisting):
    """One group's shards with a collective commit. Methods marked *collective* must run on every rank of ``comm``.

    ``global_rank`` names this rank's shard files (default ``comm.rank``, right only when ``comm`` is the world):
    ranks of different groups then never write the same path, while ``comm.rank`` decides who writes the marker.
    """

    def __init__(self, root: str | Path, comm: Comm, *, global_rank: int | None = None, tier: str = "disk",
                 hot: HotTier | None = None) -> None:
        if tier not in ("disk", "memory"):
            raise ConfigError(f"snapshot tier must be 'disk' or 'memory', got {tier!r}")
        if tier == "memory" and hot is not None and not hot.enabled:
            raise ConfigError("the memory tier keeps snapshots in the hot tier only: it cannot be 'off'")
        self.root = Path(root)
        self.comm = comm
        self.global_rank = comm.rank if global_rank is None else int(global_rank)
        self.tier = tier
        # sid -> commit record (the marker's content), identical on every rank after the commit all-reduce.
        self._records: dict[int, dict[str, Any]] = {}
        #: Placement of in-memory copies; None: the memory tier copies to host memory, the disk tier keeps none.
        self.hot = hot
        self._hot: dict[int, HotCopy] = {}  # sid -> in-memory copy of a committed snapshot
        self._persisting: _Pending | None = None  # committed from memory, its shard still being written
        #: This rank's exception from the last failed :meth:`save` / :meth:`finish`, None after a success.
        self.last_error: Exception | None = None
        self._pending: _Pending | None = None
        #: Seconds each shard write (serialise, hash, write, fsync) took, in order: the overhead bench reads it.
        self.write_seconds: list[float] = []

    # ---- paths
    def snapshot_dir(self, sid: int) -> Path:
        """Directory of snapshot ``sid`` (never created by the memory tier)."""
        return self.root / snapshot_dir_name(sid)

    def shard_path(self, sid: int, suffix: str = ".safetensors") -> Path:
        """This rank's shard of snapshot ``sid``, named by the global rank."""
        return self.snapshot_dir(sid) / f"rank_{self.global_rank:05d}{suffix}"

    # ---- opening
    def reset(self) -> None:
        """*Collective.* Forget every snapshot and delete this root's ``snap_*`` directories (a fresh run).

        Anything else under ``root`` (another group's root nested in the world's) is left alone. Hold the
        run lock first: this deletes whatever an earlier run left here.
        """
        self.abandon()
        self.abandon_persist()
        self._records.clear()
        self._hot.clear()
        if self.tier == "disk" and self.comm.rank == 0:
            dirs = [d for _, d in sio.snapshot_dirs(self.root)]
            for d in dirs:  # markers first: a kill half-way leaves unmarked leftovers, never a broken snapshot
                with contextlib.suppress(OSError):
                    (d / MARKER).unlink(missing_ok=True)
                    sio.fsync_dir(d)
            for d in dirs:
                sio.remove_path(d)
        agree_all(self.comm, True)  # nobody writes before rank 0 has cleared the directory

    def scan(self) -> int:
        """*Collective.* Open the root for resume, deleting nothing committed.

        Removes this rank's stale ``*.tmp`` files (rank 0: ``COMMITTED.tmp``) and its shards in directories
        without a marker (never committed), then loads every complete committed snapshot's record, so that
        :meth:`prepare`, :meth:`prune` and :meth:`committed` cover it. Returns the highest id on any rank,
        committed or not (-1 if none): new ids must be greater. Its all-reduce also keeps every rank from
        writing before all have cleaned up.
        """
        if self._pending is not None:
            raise SnapshotError(f"scan: snapshot {self._pending.sid} is in flight; finish or abandon it first")
        # Before any cleanup: the first rank to get here sees every leftover, so none of their ids is reused.
        local = max(self.max_id_on_disk(), max(self._records, default=-1))
        if self.tier == "disk":
            sio.remove_stale(self.root, self.global_rank, marker_writer=self.comm.rank == 0)
            for sid, _, record in sio.committed_dirs(self.root):
                self._records[sid] = record
        if self.comm.world_size == 1:
            return local
        return int(self.comm.all_reduce_max(torch.tensor([float(local)], dtype=torch.float64))[0])

    def max_id_on_disk(self) -> int:
        """*Local.* Highest id of any ``snap_*`` directory under ``root``, committed or not; -1 if none."""
        if self.tier == "memory":
            return -1
        return max((sid for sid, _ in sio.snapshot_dirs(self.root)), default=-1)

    # ---- writing
    def save(self, sid: int, **shard: Any) -> bool:
        """*Collective.* :meth:`begin` (in the foreground, same keywords) then :meth:`finish`.

        Returns True when committed. On failure nothing is committed, this rank's shard is removed,
        earlier snapshots stay the rollback targets and ``last_error`` holds this rank's exception, if any.
        """
        self.begin(sid, **shard)
        return self.finish()

    def begin(
        self,
        sid: int,
        *,
        step: int | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        save_fn: Callable[[str], None] | None = None,
        capture: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
        background: bool = False,
    ) -> None:
        """*Local.* Capture now and write this rank's shard of snapshot ``sid``, in a thread if ``background``.

        ``step``: a label. ``meta`` (JSON) goes into the shard, back in :class:`Prepared`; ``extra`` (JSON, the
        same on every rank) into the marker, back in :class:`SnapshotInfo`. The shard is ``tensors``, what
        ``capture()`` returns (tensors, more meta; called inside the failure handling, so a rank whose capture
        raises still joins the agreement; with ``background`` it must return copies) or what
        ``save_fn(path)`` writes. ``capture(where)`` places its tensors as told (:data:`gradience.state.PLACES`):
        with a hot tier the capture is the in-memory copy, and a disk shard is written from it in the
        background (``background`` implied). :meth:`finish` commits, :meth:`abandon` drops; one snapshot in
        flight at a time, and a snapshot still being persisted is persisted first (:meth:`persist`, collective:
        every rank begins together). Raises SnapshotError for a negative id or one already committed.
        """
        if self._pending is not None:
            raise SnapshotError(f"snapshot {self._pending.sid} is still in flight; finish or abandon it first")
        if self._persisting is not None:
            self.persist()
        if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
            raise SnapshotError(f"snapshot id must be an int >= 0, got {sid!r}")
        if sid in self._records or (self.tier == "disk" and (self.snapshot_dir(sid) / MARKER).exists()):
            raise SnapshotError(f"snapshot id {sid} is already committed under {self.root}; ids are never reused")
        pending = _Pending(sid, step, dict(meta or {}), dict(extra or {}))
        job: Callable[[], tuple[str, int, int]] = lambda: ("", 0, 0)  # noqa: E731
        hot = self.hot if self.hot is not None and self.hot.enabled and capture is not None else None
        pending.two_phase = hot is not None and self.tier == "disk"
        background = background or pending.two_phase
        try:
            if capture is not None:
                tensors, more = self._capture(capture, hot)
                pending.meta.update(more)
                if hot is not None:
                    pending.hot = hot.made(tensors, pending.meta)
            job = self._shard_job(sid, tensors, pending, save_fn)
        except Exception as e:  # reported through finish(), never by skipping the agreement
            pending.error = e
        pending.captured = pending.error is None

        def write() -> None:
            t0 = time.perf_counter()
            try:
                pending.result = job()
                self.write_seconds.append(time.perf_counter() - t0)
            except Exception as e:
                pending.error = e

        if pending.error is None:
            if background:
                thread = threading.Thread(target=write, name=f"gradience-snapshot-{sid}", daemon=True)
                try:
                    thread.start()
                    pending.thread = thread
                except RuntimeError as e:  # "can't start new thread": a flag for finish(), not a lone raise
                    pending.error = e
            else:
                write()
        self._pending = pending

    @property
    def pending_id(self) -> int | None:
        """Id of the snapshot begun and not yet finished or abandoned."""
        return self._pending.sid if self._pending is not None else None

    @property
    def pending_label(self) -> int | None:
        """Step label of the snapshot in flight (None when none is, or it has no label)."""
        return self._pending.step if self._pending is not None else None

    def finish(self, *, extra: dict[str, Any] | None = None) -> bool:
        """*Collective.* Wait for this rank's shard, then commit the in-flight snapshot if every rank succeeded.
        ``extra`` (JSON, the same on every rank) joins the marker's extra: what is known only at the commit."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise SnapshotError("no snapshot in flight")
        if extra:
            pending.extra.update(extra)
        if pending.two_phase:
            return self._commit_hot(pending)
        sid = pending.sid
        shards = self._shards_of(pending)
        record = None if shards is None else self._record(pending, shards)
        if not self._mark(sid, record):
            return False
        self._records[sid] = record
        if self.tier == "memory":
            self._hot[sid] = pending.hot
        return True

    def abandon(self) -> int | None:
        """*Local.* Drop the in-flight snapshot (it is never committed); returns its id."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.thread is not None:
            pending.thread.join()
        self._discard(pending.sid)
        return pending.sid

    # ---- reading and retention
    def prepare(self, sid: int) -> Prepared | None:
        """*Local.* Read and verify this rank's shard of committed snapshot ``sid``; None if missing or corrupt.

        Snapshots not known to this store (not committed by it, not loaded by :meth:`scan`) are looked up
        through their marker on disk.
        """
        try:
            record = self._records.get(sid)
            hot = self._hot.get(sid)
            if hot is not None and record is not None:
                hot.ready()
                return Prepared(sid, record["step"], hot.tensors, hot.meta, None)
            if self.tier == "memory" or (record is not None and not record.get("persisted", True)):
                return None
            d = self.snapshot_dir(sid)
            record = record or sio.load_marker(d, sid)
            entry = next(s for s in record["shards"] if s["global_rank"] == self.global_rank)
            path = d / entry["file"]
            if path.suffix == ".safetensors":
                blob = path.read_bytes()
                if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                    return None
                meta = json.loads(sio.safetensors_metadata(blob).get("gradience", "{}"))
                return Prepared(sid, record["step"], st_load(blob), meta, path)
            if sio.hash_path(path) != entry["sha256"]:
                return None
            return Prepared(sid, record["step"], None, {}, path)
        except Exception:
            return None

    def prune(self, keep: Iterable[int]) -> None:
        """Forget and delete committed snapshots whose id is not in ``keep``.

        *Collective* on the disk tier (every rank, same ``keep``): rank 0 removes the markers, all ranks wait
        for that, then each deletes its own shards, so a kill at any point leaves no marker beside a missing
        shard. *Local* on the memory tier.
        """
        keep = set(keep)
        marked = [sid for sid, r in self._records.items() if r.get("persisted", True)]
        if self.tier == "disk" and marked and any(sid > max(marked) for sid in keep):
            # The newer targets live in memory only (their shards still being written, or never): a crash
            # meanwhile must still find a snapshot on disk.
            keep.add(max(marked))
        doomed = sorted(set(self._records) - keep)
        if self._persisting is not None and self._persisting.sid in doomed:
            self.abandon_persist()  # same ids on every rank: nobody waits for its marker
        for sid in doomed:
            self._records.pop(sid, None)
            self._hot.pop(sid, None)
        if self.tier == "memory":
            return
        ok = True
        if self.comm.rank == 0:
            try:
                for sid in doomed:
                    (self.snapshot_dir(sid) / MARKER).unlink(missing_ok=True)
                    sio.fsync_dir(self.snapshot_dir(sid))
            except OSError as e:  # the marker stays: then every shard must stay too
                self.last_error, ok = e, False
        if agree_all(self.comm, ok):
            for sid in doomed:
                sio.remove_rank_files(self.snapshot_dir(sid), self.global_rank)

    def committed(self) -> list[SnapshotInfo]:
        """*Local.* Snapshots this store committed or loaded with :meth:`scan`, sorted by id."""
        return [_info(r, self.snapshot_dir(sid) if self.tier == "disk" else None)
                for sid, r in sorted(self._records.items())]

    def committed_on_disk(self) -> list[SnapshotInfo]:
        """*Local.* Committed snapshots under ``root`` whose every listed shard exists with its recorded size,
        sorted by id (no hashing: :meth:`prepare` verifies). Empty for the memory tier."""
        return [_info(r, d) for _, d, r in sio.committed_dirs(self.root)] if self.tier == "disk" else []

    # ---- internals
    def _shard_job(self, sid: int, tensors: dict[str, torch.Tensor] | None, pending: _Pending,
                   save_fn: Callable[[str], None] | None) -> Callable[[], tuple[str, int, int]]:
        """Do on this thread what must see the state as it is now; return the rest (IO, hashing) as a job
        yielding (sha256, size, kind) that may run on a background thread."""
        if self.tier == "memory":
            if tensors is None:
                raise SnapshotError("the memory tier needs tensors (initialize with optimizer=, not save_fn)")
            if pending.hot is None:
                pending.hot = HotCopy(tensors, pending.meta)
            return lambda: ("", 0, 0)
        d = self.snapshot_dir(sid)
        d.mkdir(parents=True, exist_ok=True)
        # What a killed run left under this id (never committed: begin() checked) must not mix with the new shard.
        sio.remove_rank_files(d, self.global_rank, rmdir=False)
        if tensors is not None:
            path = self.shard_path(sid)
            metadata = {"gradience": json.dumps(pending.meta),
                        "gradience_snapshot": json.dumps({"id": sid, "step": pending.step})}

            def write(head: bytes, raws: list[torch.Tensor]) -> tuple[str, int, int]:
                return sio.write_planned(path, head, raws), path.stat().st_size, 1

            if pending.hot is not None:  # written from the in-memory copy, fetched to the host by the writer
                copy = pending.hot
                return lambda: write(*sio.plan_safetensors(copy.host_tensors(), metadata))
            # Planning (header, byte views) here leaves the writer thread a few large GIL-free calls.
            head, raws = sio.plan_safetensors(tensors, metadata)
            return lambda: write(head, raws)
        if save_fn is None:
            raise SnapshotError("begin: pass tensors=, capture= or save_fn=")
        path = self.shard_path(sid, ".ckpt")
        save_fn(str(path))
        if not path.exists():
            raise SnapshotError(f"save_fn did not create {path}")

        def finish_file() -> tuple[str, int, int]:
            sio.fsync_path(path)
            return sio.hash_path(path), sio.path_size(path), 2

        return finish_file

    def _write_marker(self, sid: int, record: dict[str, Any]) -> None:
        d = self.snapshot_dir(sid)
        d.mkdir(parents=True, exist_ok=True)
        sio.atomic_write(d / MARKER, json.dumps(record, indent=1).encode())

    def _discard(self, sid: int) -> None:
        """Remove this rank's files of an uncommitted snapshot (rank 0: the marker, should one exist)."""
        if self.tier == "memory":
            return
        if self.comm.rank == 0:
            for name in (MARKER, MARKER + sio.TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    (self.snapshot_dir(sid) / name).unlink(missing_ok=True)
        sio.remove_rank_files(self.snapshot_dir(sid), self.global_rank)



def _info(record: dict[str, Any], path: Path | None) -> SnapshotInfo:
    return SnapshotInfo(int(record["id"]), record.get("step"), int(record["world_size"]), path,
                        dict(record.get("extra") or {}))
