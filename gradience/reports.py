"""What a run reports about itself: the integrity status, the run summary (``summary.json``, built from the guard
state and the controller's public attributes) and the checkpointable state. Nothing here changes a run.
"""

from __future__ import annotations

from typing import Any

from gradience.config import GradienceConfig
from gradience.probe import fingerprint_tensor
from gradience.telemetry import Telemetry
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


def summary(controller: Any) -> dict[str, Any]:
    """The run summary of a ``GradienceController`` (what its ``finalize`` writes), from its public attributes."""
    c, s, config = controller, controller.state, controller.config
    held = c.backend.check_tensors()[0] if c.backend is not None else []
    labels = c.recovery.labels if c.recovery is not None else {}
    return {
        "total_steps": c.steps_seen,
        "final_step": c.last_step,
        "final_loss": c.last_loss,
        "world_size": c.comm.world_size if c.comm else 1,
        "rank": c.comm.rank if c.comm else 0,
        "global_rank": c.global_rank,
        "guard": {
            "enabled": config.guard_enabled,
            "integrity_status": integrity_status(s, config),
            "total_rollbacks": s.total_rollbacks,
            "total_skipped_steps": s.skipped_steps,
            "scaler_skipped_steps": s.scaler_skipped_steps,
            "halt_reason": s.halt_reason.value if s.halt_reason else None,
            "lr_scale": s.lr_scale,
            "lr_backoff_effective": c.lr.supported if c.lr is not None else None,
            "first_fault_step": s.first_fault_step,
            "first_fault_ranks": list(s.first_fault_ranks),
            "snapshots": [labels.get(sid, sid) for sid in s.committed_sids],
            "snapshot_ids": list(s.committed_sids),
            "disabled_checks": {p: c.probe_errors.get(p, "raised on another rank") for p in s.disabled_checks},
            "verdict_path": s.verdict_path,
        },
        "spectral": {"final_kappa": c.spectral.last_kappa if c.spectral else None,
                     "final_risk_level": s.risk_level,
                     "definition": c.spectral.definition if c.spectral else None},
        # Identical on every replica of a healthy data-parallel run (compare the ranks' summary events); this
        # rank's shards when sharded (never a collective).
        "weights_fingerprint": f"{int(fingerprint_tensor(held)):013x}" if held else None,
    }


def write_final(telemetry: Telemetry, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (the summary writer only), the ``summary`` event, telemetry closed; the summary written."""
    written = telemetry.write_summary(summary)
    telemetry.emit("summary", **summary, summary_path=str(telemetry.summary_path))
    telemetry.close()
    return written


def write_aborted(telemetry: Telemetry, summary: dict[str, Any], global_rank: int) -> None:
    """An ABORTED run's summaries: every rank its own ``summary_rank<r>.json``, and the summary writer
    ``summary.json`` too (the rank that died may be rank 0)."""
    telemetry.write_summary(summary, name=f"summary_rank{global_rank}.json", force=True)
    telemetry.write_summary(summary)


def state_dict(state: GuardState, *, steps_seen: int, last_step: int | None, tick: int) -> dict[str, Any]:
    """The controller's checkpointable state (identical on all ranks)."""
    return {"version": STATE_VERSION, "guard_state": state.to_dict(), "steps_seen": steps_seen,
            "last_step": last_step, "tick": tick}


def checked_state_dict(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` when a controller can load it (versions 1 to :data:`STATE_VERSION`), else ValueError."""
    if saved.get("version") not in (1, 2, STATE_VERSION):
        raise ValueError(f"unsupported gradience state version {saved.get('version')!r}")
    return saved
