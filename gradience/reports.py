"""What a run reports about itself: the integrity status and the run summary (``summary.json``), built from the
guard state and what the controller measured. Pure functions of their arguments: nothing here changes a run.
"""

from __future__ import annotations

from typing import Any

from gradience.config import GradienceConfig
from gradience.types import GuardState

#: Version of the controller's ``state_dict`` (3: GuardState names snapshots by id, ``committed_sids``).
STATE_VERSION = 3


def integrity_status(state: GuardState, config: GradienceConfig) -> str:
    """OK (no fault), RECOVERED (faults handled), ABORTED (halted), FAULTED (faults, guard disabled)."""
    if state.halted:
        return "ABORTED"
    if state.first_fault_step is None:
        return "OK"
    return "RECOVERED" if config.guard_enabled else "FAULTED"


def summary(state: GuardState, config: GradienceConfig, *, steps_seen: int, last_step: int | None,
            last_loss: float | None, world_size: int, rank: int, global_rank: int, labels: dict[int, int],
            lr_supported: bool | None, probe_errors: dict[str, str], spectral: Any | None,
            weights_fingerprint: str | None) -> dict[str, Any]:
    """The run summary (what ``GradienceController.finalize`` writes). ``probe_errors``: this rank's error text
    of each check it switched off; ``spectral``: the controller's spectral monitor, if any."""
    s = state
    return {
        "total_steps": steps_seen,
        "final_step": last_step,
        "final_loss": last_loss,
        "world_size": world_size,
        "rank": rank,
        "global_rank": global_rank,
        "guard": {
            "enabled": config.guard_enabled,
            "integrity_status": integrity_status(s, config),
            "total_rollbacks": s.total_rollbacks,
            "total_skipped_steps": s.skipped_steps,
            "scaler_skipped_steps": s.scaler_skipped_steps,
            "halt_reason": s.halt_reason.value if s.halt_reason else None,
            "lr_scale": s.lr_scale,
            "lr_backoff_effective": lr_supported,
            "first_fault_step": s.first_fault_step,
            "first_fault_ranks": list(s.first_fault_ranks),
            "snapshots": [labels.get(sid, sid) for sid in s.committed_sids],
            "snapshot_ids": list(s.committed_sids),
            "disabled_checks": {p: probe_errors.get(p, "raised on another rank") for p in s.disabled_checks},
            "verdict_path": s.verdict_path,
        },
        "spectral": {"final_kappa": spectral.last_kappa if spectral else None,
                     "final_risk_level": s.risk_level,
                     "definition": spectral.definition if spectral else None},
        # Identical on every replica of a healthy data-parallel run (compare the ranks' summary events).
        "weights_fingerprint": weights_fingerprint,
    }
