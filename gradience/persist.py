"""The second phase of a disk snapshot committed from its in-memory copy (a mixin of
:class:`~gradience.snapshot.SnapshotStore`), and the shard exchange of the commit protocol.

With a hot tier, :meth:`Persisting._commit_hot` makes a snapshot a rollback target once every rank took its copy;
its shards are written by background threads, and :meth:`Persisting.persist` (collective, called once no rank
is still writing) exchanges their hashes and writes the marker. Until then the snapshot survives in memory only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradience import shardio as sio
from gradience.comm import Comm, agree_all
from gradience.errors import SnapshotError
from gradience.hot import HotTier
from gradience.shardio import FORMAT_VERSION

_SLOTS = 35  # per rank in the commit all-reduce: 32 SHA-256 bytes, global rank, size, kind


class Persisting:
    """The two-phase commit of :class:`~gradience.snapshot.SnapshotStore` (see the module docstring)."""

    def _commit_hot(self, pending: Any) -> bool:
        """The first phase of a disk snapshot with a hot copy: every rank took its copy, so the snapshot is a
        target (served from memory) while its shard is still being written."""
        sid = pending.sid
        if not agree_all(self.comm, pending.captured):
            self.last_error = None if pending.captured else pending.error
            if pending.thread is not None:
                pending.thread.join()
            self._discard(sid)
            return False
        self.last_error = None
        self._records[sid] = self._record(pending, []) | {"persisted": False}
        self._hot = {sid: pending.hot}  # the newest target only: older ones are on disk
        self._persisting = pending
        return True

    @property
    def persisting_id(self) -> int | None:
        """Id of the committed snapshot whose shard is still being written (see :meth:`persist`)."""
        return self._persisting.sid if self._persisting is not None else None

    def persist_busy(self) -> bool:
        """*Local.* Whether this rank's shard of the persisting snapshot is still being written."""
        p = self._persisting
        return p is not None and p.thread is not None and p.thread.is_alive()

    def persist(self) -> bool | None:
        """*Collective.* Second phase: wait for this rank's shard (call it once no rank is busy and nobody
        waits), exchange the hashes and write the marker. True when the snapshot is on disk; False when a
        rank's write failed (``last_error``): it stays a target only while its in-memory copy is held.
        None when nothing was persisting."""
        pending, self._persisting = self._persisting, None
        if pending is None:
            return None
        sid = pending.sid
        shards = self._shards_of(pending)
        record = self._records.get(sid)
        if not self._mark(sid, None if shards is None or record is None else self._record(pending, shards)):
            return False
        record.update(shards=shards, persisted=True)
        return True

    def _record(self, pending: Any, shards: list[dict[str, Any]]) -> dict[str, Any]:
        """The commit record of ``pending`` (the marker's content) with these shards."""
        return {"format": FORMAT_VERSION, "id": pending.sid, "step": pending.step, "world_size": self.comm.world_size,
                "tier": self.tier, "extra": pending.extra, "shards": shards}

    def _mark(self, sid: int, record: dict[str, Any] | None) -> bool:
        """*Collective.* Rank 0 writes the marker of ``record`` (disk tier) and every rank learns whether it
        did; on any failure this rank's files of ``sid`` go. None: the exchange already failed on every rank."""
        ok = record is not None
        if ok and self.tier == "disk" and self.comm.rank == 0:
            try:
                self._write_marker(sid, record)
            except Exception as e:
                self.last_error, ok = e, False
        if record is None or not agree_all(self.comm, ok):
            self._discard(sid)
            return False
        return True

    def unrestorable(self) -> set[int]:
        """*Local*, the same on every rank. Committed snapshots that can no longer be restored: never written
        to disk (the write failed) and no longer held in memory."""
        return {sid for sid, r in self._records.items() if r.get("persisted", True) is False
                and sid not in self._hot and sid != self.persisting_id}

    def _shards_of(self, pending: Any) -> list[dict[str, Any]] | None:
        """*Collective.* Wait for this rank's write, then exchange every rank's outcome: the marker's shard
        list, or None (``last_error`` says why on the rank that failed)."""
        if pending.thread is not None:
            pending.thread.join()
        self.last_error = pending.error
        shards = exchange_shards(self.comm, self.global_rank, pending.result, ok=pending.error is None)
        if shards is not None and len({s["global_rank"] for s in shards}) < len(shards):
            # Same verdict on every rank (same exchange): two ranks wrote one file, neither shard can be trusted.
            self.last_error = SnapshotError(f"global ranks {[s['global_rank'] for s in shards]} are not distinct")
            return None
        return shards

    def abandon_persist(self) -> None:
        """*Local.* Wait for this rank's write of the persisting snapshot and remove it (never marked)."""
        pending, self._persisting = self._persisting, None
        if pending is not None:
            if pending.thread is not None:
                pending.thread.join()
            self._discard(pending.sid)

    def _capture(self, capture: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                 hot: HotTier | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        where = hot.where(sum(c.device_bytes for c in self._hot.values())) if hot is not None else "cpu"
        try:
            return capture(where)
        except torch.cuda.OutOfMemoryError as e:
            if where != "device":
                raise
            hot.fall_back(f"copying the snapshot into device memory ran out of memory ({e})")
            return capture("pinned")


def exchange_shards(comm: Comm, global_rank: int, result: tuple[str, int, int], *,
                    ok: bool) -> list[dict[str, Any]] | None:
    """One MAX all-reduce carrying every rank's failure flag, SHA-256, size and global rank; the marker's
    shard list, identical on every rank, or None if any rank failed."""
    n = comm.world_size
    vec = torch.zeros(1 + _SLOTS * n, dtype=torch.float64)
    vec[0] = 0.0 if ok else 1.0
    if ok:
        digest, size, kind = result
        base = 1 + _SLOTS * comm.rank
        if digest:
            vec[base : base + 32] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.float64)
        vec[base + 32 : base + 35] = torch.tensor([global_rank, size, kind], dtype=torch.float64)
    out = comm.all_reduce_max(vec) if n > 1 else vec
    if out[0] > 0:
        return None
    vals = [int(x) for x in out[1:].tolist()]
    shards = []
    for r in range(n):
        slot = vals[_SLOTS * r : _SLOTS * (r + 1)]
        raw, (g, size, kind) = bytes(slot[:32]), slot[32:]
        shards.append({"rank": r, "global_rank": g, "file": sio.shard_file_name(g, kind),
                       "size": size, "sha256": raw.hex() if any(raw) else ""})
    return shards
