"""Getting a run's last good state back from its ``out_dir``: a controller resuming after a crash or a requeue
(:func:`resume_latest`), and :func:`load_snapshot` for restoring good weights by hand after an ABORTED run.

Both read only committed snapshots and verify each shard's SHA-256 before anything is loaded, so a
snapshot half-written when the process died is never used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradience.comm import Comm, LocalComm, default_rank
from gradience.errors import ConfigError, SnapshotError
from gradience.rundir import snapshot_root
from gradience.snapshot import SnapshotInfo, SnapshotStore
from gradience.state import restore_state
from gradience.unwrap import strip_name

logger = logging.getLogger("gradience")



@dataclass
class Resumed:
    """What :func:`resume_latest` restored."""

    info: SnapshotInfo
    meta: dict[str, Any]


def resume_latest(store: SnapshotStore, comm: Comm, prepare_everywhere: Any,
                  apply: Any) -> Resumed | None:
    """*Collective.* Restore the newest committed snapshot whose shards verify on every rank.

    ``prepare_everywhere(sid) -> (prepared | None, local_ok)`` and ``apply(prepared)`` come from the caller
    (the executor's :class:`~gradience.recovery.Recovery`). Snapshots are tried newest first; one written by another world size is an
    error (its shards cannot be mapped onto these ranks). Returns None when nothing committed is left.
    """
    for info in reversed(store.committed()):
        if info.world_size != comm.world_size:
            raise ConfigError(f"resume: snapshot {info.sid} (step {info.step}) in {info.path} was taken by "
                              f"{info.world_size} ranks, this run has {comm.world_size}; resume with the same "
                              "world size, or load weights by hand with gradience.load_snapshot")
        prepared, _ = prepare_everywhere(info.sid)
        if prepared is None:
            logger.warning("Gradience: snapshot %d (step %s) did not verify on every rank; trying an older one",
                           info.sid, info.step)
            continue
        apply(prepared)
        return Resumed(info, dict(prepared.meta))
    return None


def load_snapshot(out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  step: int | str = "latest", *, rank: int | None = None) -> int:
    """Load a committed, verified snapshot from ``out_dir`` into ``model`` (and ``optimizer``); returns the
    step it restored.

    ``step`` is ``"latest"`` or a step label (the newest snapshot with that label). ``rank`` picks whose
    shard to read (default: this process's global rank, else 0); under data parallelism every rank's shard
    holds the same replica. Tied weights are re-tied, and state-dict keys are matched across the usual
    wrappers (a snapshot of ``model`` loads into ``DDP(model)`` or ``torch.compile(model)`` and back).
    """
    root = snapshot_root(Path(out_dir))
    if not root.is_dir():
        raise SnapshotError(f"load_snapshot: no snapshots under {root}")
    if rank is None:
        rank = default_rank()
    store = SnapshotStore(root, LocalComm(), global_rank=rank)
    infos = store.committed_on_disk()
    if step != "latest":
        infos = [i for i in infos if i.step == step]
    for info in reversed(infos):
        prepared = store.prepare(info.sid)
        if prepared is None:
            logger.warning("Gradience: load_snapshot: snapshot %d (step %s) is missing rank %d's shard or fails "
                           "its checksum; trying an older one", info.sid, info.step, rank)
            continue
        if prepared.tensors is None:
            raise SnapshotError(f"load_snapshot: snapshot {info.sid} was written by a save_fn ({prepared.path}); "
                                "load it with your own load_fn")
        keys = _key_map(model)
        tensors = {_rekey(n, keys): t for n, t in prepared.tensors.items()}
        meta = dict(prepared.meta)
        meta["aliases"] = {_rekey(a, keys): _rekey(c, keys) for a, c in meta.get("aliases", {}).items()}
        restore_state(tensors, meta, model, optimizer)
        logger.info("Gradience: loaded snapshot %d (step %s) from %s", info.sid, info.step, info.path)
        return int(info.step) if info.step is not None else -1
    what = "a committed snapshot" if step == "latest" else f"a committed snapshot of step {step}"
    raise SnapshotError(f"load_snapshot: no {what} with a valid shard for rank {rank} under {root}")


def _key_map(model: torch.nn.Module) -> dict[str, str]:
    """The target model's state-dict keys by their wrapper-free form."""
    return {strip_name(k): k for k in model.state_dict()}


def _rekey(name: str, keys: dict[str, str]) -> str:
    """A shard's ``model.<key>`` name, renamed to the target model's key for the same tensor."""
    if not name.startswith("model."):
        return name
    key = name[len("model."):]
    return "model." + keys.get(strip_name(key), key)
