"""What ``GradienceController.initialize`` checks and builds: its arguments, and the parts of a guarded run that do
not change afterwards (telemetry, where the LR scale is applied, the spectral monitor, the snapshot store and the
restore mechanics). Construction only: nothing here decides or runs a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradience.comm import Comm, default_world_size
from gradience.config import GradienceConfig
from gradience.errors import ConfigError
from gradience.hot import HotTier
from gradience.lr import CallbackLR, LRScale
from gradience.recovery import Recovery, Target
from gradience.rundir import snapshot_root
from gradience.sinks import make_sinks
from gradience.snapshot import SnapshotStore
from gradience.spectral.monitor import SpectralMonitor, shard_reduce
from gradience.telemetry import Telemetry

logger = logging.getLogger("gradience")


def check_arguments(config: GradienceConfig, *, save_fn: Any, load_fn: Any, get_lr: Any, set_lr: Any,
                    optimizer: Any, scheduler: Any, resume: Any, backend: Any) -> None:
    """Raise ConfigError, naming the argument, for an ``initialize`` call that cannot work."""
    if resume not in (False, True, "latest"):
        raise ConfigError(f"initialize: resume must be False, True or 'latest', got {resume!r}")
    if (save_fn is None) != (load_fn is None):
        raise ConfigError("initialize: save_fn and load_fn must be given together")
    if (get_lr is None) != (set_lr is None):
        raise ConfigError("initialize: get_lr and set_lr must be given together")
    guard = config.guard_enabled
    if guard and save_fn is None and optimizer is None:
        raise ConfigError("initialize: pass optimizer= (Gradience snapshots it) or save_fn and load_fn")
    if guard and get_lr is None and optimizer is None and config.guard_lr_backoff != 1.0:
        raise ConfigError("initialize: LR backoff needs optimizer= or get_lr and set_lr")
    if scheduler is not None and optimizer is None:
        raise ConfigError("initialize: scheduler= needs optimizer= (the LR backoff goes through it)")
    if guard and save_fn is not None and config.guard_snapshot_tier == "memory":
        raise ConfigError("guard_snapshot_tier='memory' stores tensors; use optimizer= instead of save_fn")
    if config.fingerprint_interval and not backend.replicated:
        raise ConfigError("fingerprint_interval needs every rank to hold the same state; this run's ranks "
                          "hold different partitions (set it to 0)")


def open_telemetry(config: GradienceConfig, out: Path, comm: Comm, global_ranks: tuple[int, ...], *,
                   append: bool, backend: Any) -> Telemetry:
    """This rank's telemetry, with the run's ``start`` event written."""
    rank = global_ranks[comm.rank]
    telemetry = Telemetry(out, rank=rank, redact_max_chars=config.redact_max_chars, append=append,
                          world_size=comm.world_size, group_rank=comm.rank, log_all_ranks=config.log_all_ranks,
                          summary_writer=comm.rank == 0, sinks=make_sinks(config.tensorboard, out,
                                                                          leader=comm.rank == 0))
    telemetry.emit("start", world_size=comm.world_size, global_ranks=list(global_ranks),
                   backend=type(backend).__name__, config=config.to_dict())
    return telemetry


def lr_target(optimizer: Any, get_lr: Callable[[], float] | None,
              set_lr: Callable[[float], None] | None) -> LRScale | CallbackLR | None:
    """Where the guard's LR scale is applied: the loop's ``set_lr``, else inside ``optimizer.step()``."""
    if get_lr is not None:
        return CallbackLR(get_lr, set_lr)
    return LRScale(optimizer) if optimizer is not None else None


def spectral_monitor(config: GradienceConfig, backend: Any, telemetry: Telemetry,
                     comm: Comm) -> SpectralMonitor | None:
    """The spectral probe of this run's weights, or None (off, or weights it cannot read)."""
    if not config.spectral_enabled:
        return None
    if backend.spectral_model is None:
        logger.warning("Gradience: no spectral probe on this run's weights (DeepSpeed ZeRO-3 partitions cut "
                       "across matrices); κ̃ and the risk level are off, the other checks run")
        return None
    return SpectralMonitor(backend.spectral_model, config, telemetry, reduce=shard_reduce(backend, comm))


def snapshot_parts(config: GradienceConfig, out: Path, comm: Comm, global_ranks: tuple[int, ...],
                   telemetry: Telemetry, target: Target) -> tuple[SnapshotStore, Recovery]:
    """The group's snapshot store under ``out`` and the restore mechanics over it."""
    root = snapshot_root(out, list(global_ranks), world_size=default_world_size() or comm.world_size)
    store = SnapshotStore(root, comm, tier=config.guard_snapshot_tier, global_rank=global_ranks[comm.rank],
                          hot=HotTier(config.guard_snapshot_hot, config.guard_snapshot_hot_budget))
    return store, Recovery(store, comm, telemetry, config, target)
