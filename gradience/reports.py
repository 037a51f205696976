"""What the controller reports: halted / exit status / LR scale, the run summary, the integrity status and
the guard state for checkpoints. A mixin of :class:`~gradience.controller.GradienceController` (it reads the
controller's state and changes nothing but what ``load_state_dict`` restores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradience.errors import EXIT_GUARD_HALTED
from gradience.lr import current_lr
from gradience.probe import fingerprint_tensor, parameters
from gradience.types import GuardState

STATE_VERSION = 2


class Reports:
    """Reports of :class:`~gradience.controller.GradienceController` (see module docstring)."""

    @property
    def halted(self) -> bool:
        """True once the guard stopped training (or a collective failed)."""
        return self.state.halted or self._aborted is not None

    @property
    def exit_code(self) -> int:
        """0, or :data:`~gradience.errors.EXIT_GUARD_HALTED` when the guard stopped the run."""
        return EXIT_GUARD_HALTED if self.halted else 0

    @property
    def lr_scale(self) -> float:
        """The guard's total LR scale (1.0 until a rollback backs it off)."""
        return self.state.lr_scale

    @property
    def global_rank(self) -> int:
        """This process's rank in the default group (its group rank when the group is unregistered)."""
        return self.global_ranks[self.comm.rank] if self.comm is not None else 0

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """Global rank of each member of the guard's group, by group rank."""
        return tuple(getattr(self.comm, "global_ranks", range(self.comm.world_size))) if self.comm else (0,)

    def integrity_status(self) -> str:
        """OK (no fault), RECOVERED (faults handled), ABORTED (halted), FAULTED (faults, guard disabled)."""
        if self.halted:
            return "ABORTED"
        if self.state.first_fault_step is None:
            return "OK"
        return "RECOVERED" if self.config.guard_enabled else "FAULTED"

    def summary(self) -> dict[str, Any]:
        """The run summary (what :meth:`finalize` writes)."""
        s = self.state
        labels = self.recovery.labels if self.recovery is not None else {}
        return {
            "total_steps": self.steps_seen,
            "final_step": self.last_step,
            "final_loss": self.last_loss,
            "world_size": self.comm.world_size if self.comm else 1,
            "rank": self.comm.rank if self.comm else 0,
            "global_rank": self.global_rank,
            "guard": {
                "enabled": self.config.guard_enabled,
                "integrity_status": self.integrity_status(),
                "total_rollbacks": s.total_rollbacks,
                "total_skipped_steps": s.skipped_steps,
                "scaler_skipped_steps": self.scaler_skips,
                "halt_reason": (s.halt_reason.value if s.halt_reason else self._aborted),
                "lr_scale": s.lr_scale,
                "lr_backoff_effective": self.lr.supported if self.lr is not None else None,
                "first_fault_step": s.first_fault_step,
                "first_fault_ranks": list(s.first_fault_ranks),
                "snapshots": [labels.get(sid, sid) for sid in s.committed],
                "snapshot_ids": list(s.committed),
                "disabled_checks": self._health.disabled(),
            },
            "spectral": {"final_kappa": self._spectral.last_kappa if self._spectral else None,
                         "final_risk_level": s.risk_level,
                         "definition": self._spectral.definition if self._spectral else None},
            # Identical on every replica of a healthy data-parallel run (compare the ranks' summary events).
            "weights_fingerprint": self._weights_fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Guard state for checkpoints (identical on all ranks)."""
        return {"version": STATE_VERSION, "guard_state": self.state.to_dict(), "steps_seen": self.steps_seen,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, before or after :meth:`initialize`.

        After ``initialize`` the snapshots on record stay those this run committed: the checkpoint's list
        names snapshots of another run (deleted by ``initialize``), which a rollback could never load.
        """
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"unsupported gradience state version {state.get('version')!r}")
        loaded = GuardState.from_dict(state["guard_state"])
        if self.store is not None:
            live = self.state
            loaded = dataclasses.replace(loaded, committed=live.committed, target_failures=live.target_failures,
                                         episode_target=live.episode_target)
        self.state = loaded
        self.steps_seen = int(state["steps_seen"])
        self.last_step = state["last_step"]
        if self.lr is not None:
            self.lr.set(self.state.lr_scale)

    def _weights_fingerprint(self) -> str | None:
        """A checksum of the weights this rank holds (its shards when sharded: never a collective)."""
        backend = getattr(self, "backend", None)
        if backend is not None:
            return f"{int(fingerprint_tensor(backend.check_tensors()[0])):013x}"
        if self.model is None:
            return None
        return f"{int(fingerprint_tensor(parameters(self.model))):013x}"

    def _lr(self) -> float | None:
        if self.recovery is not None and self.recovery.target.get_lr is not None:
            return float(self.recovery.target.get_lr())
        if self.lr is not None:
            lrs = [x for x in self.lr.effective_lrs() if x is not None]
            return lrs[0] if lrs else None
        return current_lr(self.optimizer) if self.optimizer is not None else None

