"""The mechanics of snapshots and restores under the executor: what a rank captures, how a snapshot is begun,
committed or abandoned, how a verified shard is put back (model, optimizer, LR in force) and how diverged
replicas are made bitwise equal again. It owns no policy: the policy decides, the executor
(:mod:`gradience.executor`) calls this module, which acts and reports each result to telemetry.

Snapshots are keyed by an id (``sid``) the executor hands out in order, never by the loop's step number,
which is only a label: loops that restart ``enumerate`` each epoch repeat step numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradience.backends import StateBackend
from gradience.comm import Comm, agree_all
from gradience.config import GradienceConfig
from gradience.errors import ConfigError, SnapshotError
from gradience.lr import CallbackLR, LRScale
from gradience.probe import fingerprint_tensor, parameters
from gradience.snapshot import SnapshotStore
from gradience.telemetry import Telemetry


@dataclass
class Target:
    """What a rank restores into: its state backend, and optionally optimizer and user checkpoint hooks."""

    backend: StateBackend
    optimizer: torch.optim.Optimizer | None = None
    save_fn: Callable[[str], None] | None = None
    load_fn: Callable[[str], None] | None = None
    lr: LRScale | CallbackLR | None = None
    scheduler: Any | None = None


class Recovery:
    """Snapshot and restore mechanics over one :class:`SnapshotStore` (collective where the store is)."""

    def __init__(self, store: SnapshotStore, comm: Comm, telemetry: Telemetry, config: GradienceConfig,
                 target: Target) -> None:
        self.store, self.comm, self.telemetry, self.config, self.target = store, comm, telemetry, config, target
        #: Snapshot id -> the loop's step label it was taken at (for reports).
        self.labels: dict[int, int] = {}

    # ---- snapshots
    def begin(self, sid: int, label: int, meta: dict[str, Any], *, background: bool) -> None:
        """*Local.* Capture this rank's state as snapshot ``sid`` (labelled ``label``) and start its write."""
        t = self.target
        meta = {**meta, "id": sid, "step": label, "rank": self.comm.rank, "world_size": self.comm.world_size,
                "scheduler": _jsonable_state(t.scheduler)}
        self.labels[sid] = label
        if t.save_fn is not None:
            self.store.begin(sid, step=label, meta=meta, save_fn=t.save_fn)
        else:
            # A background write or a kept copy is read while training goes on: it must not alias live tensors.
            # (The memory tier refuses guard_snapshot_hot='off': its snapshots are kept copies.)
            copy = background or self.config.guard_snapshot_hot != "off"
            self.store.begin(sid, step=label, meta=meta, background=background,
                             capture=lambda where: t.backend.capture(copy=copy, where=where))

    def commit(self, at_label: int | None, extra: dict[str, Any]) -> tuple[int, bool]:
        """*Collective.* Commit the in-flight snapshot with ``extra`` in its marker (JSON, the same on every rank);
        returns (its id, committed?) and reports it."""
        sid = self.store.pending_id
        ok = self.store.finish(extra=extra)
        error = self.store.last_error
        on_disk = ok and self.store.tier == "disk" and self.store.persisting_id != sid  # else: snapshot_persisted
        self.telemetry.emit("snapshot", step=self.labels.get(sid), snapshot_id=sid, committed=ok,
                            committed_at=at_label, tier=self.config.guard_snapshot_tier,
                            in_memory=ok and self.store.persisting_id == sid,
                            path=str(self.store.snapshot_dir(sid)) if on_disk else None,
                            local_error=f"{type(error).__name__}: {error}" if error else
                            (None if ok else "another rank failed"))
        return sid, ok

    def abandon(self, at_label: int | None, *, fault: bool = True) -> None:
        """*Local.* Drop the in-flight snapshot: a fault came before its commit, or (``fault`` False) the copy was
        taken ahead of a verdict that did not make its step a snapshot."""
        sid = self.store.abandon()
        if sid is not None:
            self.telemetry.emit("snapshot", step=self.labels.get(sid), snapshot_id=sid, committed=False,
                                committed_at=None, tier=self.config.guard_snapshot_tier, path=None,
                                abandoned_at=at_label, fault=fault)

    def persist(self, at_label: int | None) -> bool | None:
        """*Collective.* Write the marker of the snapshot committed from memory once its shards are written;
        a failure is reported (the snapshot stays a target while its in-memory copy is held)."""
        sid = self.store.persisting_id
        ok = self.store.persist()
        if ok is False:
            error = self.store.last_error
            self.telemetry.emit("snapshot_persist_failed", step=self.labels.get(sid), snapshot_id=sid,
                                at=at_label, local_error=f"{type(error).__name__}: {error}" if error else
                                "another rank failed")
        elif ok:
            self.telemetry.emit("snapshot_persisted", step=self.labels.get(sid), snapshot_id=sid, at=at_label,
                                path=str(self.store.snapshot_dir(sid)))
        return ok

    def prune(self, keep: tuple[int, ...]) -> None:
        """*Collective* (disk tier). Delete snapshots not in ``keep``."""
        self.store.prune(keep)
        for sid in [s for s in self.labels if s not in keep and s != self.store.pending_id]:
            del self.labels[sid]

    # ---- restores
    def prepare_everywhere(self, sid: int) -> tuple[Any | None, bool]:
        """*Collective.* (this rank's verified shard of ``sid`` if every rank has one, else None; whether
        this rank's own shard verified)."""
        prepared = self.store.prepare(sid)
        return (prepared if agree_all(self.comm, prepared is not None) else None), prepared is not None

    def restore(self, prepared: Any, lr_scale: float) -> None:
        """*Local.* Put a verified shard back, keep the LR schedule's position, apply ``lr_scale``.

        The LR in force is read before a user ``load_fn`` runs and put back after it, so a restored
        checkpoint cannot rewind the schedule or bring back another scale; the guard's scale is then applied
        where the LR is consumed (:class:`~gradience.lr.LRScale`), whatever the checkpoint carried.
        """
        t = self.target
        optimizer = t.optimizer
        lrs = [g.get("lr") for g in optimizer.param_groups] if optimizer is not None else None
        held = t.lr.hold() if t.lr is not None else None
        if t.load_fn is not None:
            t.load_fn(str(prepared.path))
        else:
            t.backend.restore(prepared.tensors, prepared.meta)
        if optimizer is not None:
            for group, value in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = value
        if t.lr is not None:
            t.lr.set(lr_scale, held)

    def resume(self, prepared: Any) -> None:
        """*Local.* Put a verified shard back for a resumed run: model, optimizer and the scheduler's state
        (schedule position included, unlike a rollback: the loop continues from the snapshot's step)."""
        t = self.target
        if t.load_fn is not None:
            t.load_fn(str(prepared.path))
        else:
            t.backend.restore(prepared.tensors, prepared.meta)
        saved = prepared.meta.get("scheduler")
        if t.scheduler is not None and saved is not None:
            t.scheduler.load_state_dict(saved)
            # load_state_dict sets the scheduler's position only; the groups get its LR as a step would.
            last = getattr(t.scheduler, "_last_lr", None)
            if t.optimizer is not None and isinstance(last, list) and len(last) == len(t.optimizer.param_groups):
                for group, lr in zip(t.optimizer.param_groups, last, strict=True):
                    group["lr"] = lr

    def repair_replicas(self) -> None:
        """*Collective.* Make every replica bitwise equal to group rank 0's restored state (after a
        divergence: each rank restored its own shard, and rank 0's is the agreed one)."""
        self.comm.broadcast_(self.target.backend.replica_tensors(), src=0)


def check_replicas(comm: Comm, model: torch.nn.Module) -> None:
    """*Collective.* With fingerprints on, the initial snapshot must be of equal replicas too."""
    if comm.world_size == 1:
        return
    fp = float(fingerprint_tensor(parameters(model)))
    vec = comm.all_reduce_max(torch.tensor([fp, -fp], dtype=torch.float64), kind="verify")
    if vec[0] != -vec[1]:
        raise ConfigError("fingerprint_interval is on but the replicas' parameters differ at initialize: start "
                          "every rank from the same weights (DDP broadcasts them when it wraps the model)")


def _jsonable_state(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's state_dict if it survives JSON (it rides in the shard's metadata), else None."""
    if scheduler is None or not hasattr(scheduler, "state_dict"):
        return None
    try:
        state = scheduler.state_dict()
        json.dumps(state)
        return state
    except (TypeError, ValueError):  # lambdas, tensors: the loop's own checkpoint must carry it
        return None


def check_backoff_target(target: Target) -> str | None:
    """Why an LR backoff cannot take effect for this target, or None when it can."""
    if target.lr is not None and not target.lr.supported:
        name = type(target.optimizer).__name__ if target.optimizer is not None else "optimizer"
        return (f"{name} has no numeric learning rate in any param group (e.g. Adafactor with relative_step): "
                "a rollback restores the state but cannot lower the LR")
    return None


__all__ = ["Recovery", "SnapshotError", "Target", "check_backoff_target", "check_replicas"]
