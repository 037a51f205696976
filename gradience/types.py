"""Plain data exchanged between probe, consensus, policy and controller. No torch, no IO."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from gradience.spike import SpikeState


class Reason(str, enum.Enum):
    """Why the guard skipped, rolled back or halted. Values appear verbatim in telemetry and summary."""

    NONFINITE_WEIGHTS = "NONFINITE_WEIGHTS"
    NONFINITE_BUFFERS = "NONFINITE_BUFFERS"
    NONFINITE_GRADS = "NONFINITE_GRADS"
    NONFINITE_LOSS = "NONFINITE_LOSS"
    VIOLATION_THRESHOLD = "VIOLATION_THRESHOLD"
    SPECTRAL_INSTABILITY = "SPECTRAL_INSTABILITY"
    REPLICA_DIVERGENCE = "REPLICA_DIVERGENCE"
    PROBE_ERROR = "PROBE_ERROR"
    ROLLBACK_BUDGET_EXHAUSTED = "ROLLBACK_BUDGET_EXHAUSTED"
    NO_GOOD_SNAPSHOT = "NO_GOOD_SNAPSHOT"
    RESTORE_FAILED = "RESTORE_FAILED"
    SPIKE = "SPIKE"
    #: A peer did not answer a guard collective within ``collective_timeout_s`` (died, stalled, left the loop).
    CONSENSUS_TIMEOUT = "CONSENSUS_TIMEOUT"
    #: Ranks made different guard calls (a different number of steps, or a different check).
    COLLECTIVE_MISMATCH = "COLLECTIVE_MISMATCH"
    #: The process was stopped by a signal (a launcher stops the survivors of a failed peer this way).
    TERMINATED = "TERMINATED"


class Phase(str, enum.Enum):
    """Where in the step a probe ran: before the optimizer update (gradients) or after it (loss, weights)."""

    GRADS = "grads"
    STEP = "step"


class Action(str, enum.Enum):
    """What the controller must do with the step; every rank derives the same one."""

    CONTINUE = "continue"
    SKIP_STEP = "skip_step"
    SNAPSHOT = "snapshot"
    ROLLBACK = "rollback"
    HALT = "halt"


@dataclass(frozen=True, kw_only=True)
class ProbeReport:
    """One rank's local health observation for one phase of one step."""

    phase: Phase
    step: int
    probe_error: bool = False
    nonfinite_loss: bool = False
    nonfinite_grads: bool = False
    nonfinite_weights: bool = False
    #: A persistent floating-point buffer (BatchNorm running stat, ...) holds NaN.
    nonfinite_buffers: bool = False
    violation_loss: bool = False
    violation_grads: bool = False
    violation_weights: bool = False
    update_skipped: bool = False
    #: A GradScaler found inf/NaN: the scaler skips this update by design (not a fault).
    scaler_overflow: bool = False
    #: This rank is still writing a snapshot's shard in the background (not a fault: it delays the marker).
    persist_busy: bool = False
    #: Total L2 norm of this rank's gradients / parameters (the verdict holds the largest over ranks): NaN if
    #: an element is NaN; +inf if an element is inf or the norm overflowed.
    grad_norm: float = 0.0
    weight_norm: float = 0.0
    #: This rank's loss as reported by the loop (None if not given or the probe failed).
    loss: float | None = None
    #: Order-independent checksum of the weights, or None when not computed this step.
    fingerprint: float | None = None
    #: Spectral probe κ̃ and stable-rank concentration, or None on steps without a probe.
    spectral_kappa: float | None = None
    stable_rank: float | None = None

    @property
    def faulty(self) -> bool:
        """True when this rank saw anything that the policy acts on."""
        return (
            self.probe_error
            or self.nonfinite_loss
            or self.nonfinite_grads
            or self.nonfinite_weights
            or self.nonfinite_buffers
            or self.violation_loss
            or self.violation_grads
            or self.violation_weights
        )


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The agreed view of all ranks for one phase of one step; identical on every rank."""

    phase: Phase
    step: int
    world_size: int = 1
    probe_error: bool = False
    nonfinite_loss: bool = False
    nonfinite_grads: bool = False
    nonfinite_weights: bool = False
    nonfinite_buffers: bool = False
    violation_loss: bool = False
    violation_grads: bool = False
    violation_weights: bool = False
    update_skipped: bool = False
    scaler_overflow: bool = False
    #: Some rank is still writing a snapshot's shard in the background.
    persist_busy: bool = False
    replica_divergence: bool = False
    grad_norm: float = 0.0
    weight_norm: float = 0.0
    #: Ranks whose local report was faulty (sorted).
    faulty_ranks: tuple[int, ...] = ()
    #: The guard's own clock for this step (the loop's step numbers are labels and may repeat); None = use
    #: ``step``.
    tick: int | None = None
    #: Agreed spectral probe values (None on steps without a probe).
    spectral_kappa: float | None = None
    stable_rank: float | None = None
    #: The largest loss any rank reported for this check (None when no rank gave one).
    loss: float | None = None
    #: Judged after the state moved on (the asynchronous verdict): nothing of the judged step can be captured.
    late: bool = False

    def fault_reason(self) -> Reason | None:
        """The most specific reason this verdict calls for action, or None when healthy."""
        if self.phase is Phase.GRADS:
            if self.nonfinite_grads:
                return Reason.NONFINITE_GRADS
            if self.violation_grads:
                return Reason.VIOLATION_THRESHOLD
            if self.probe_error:
                return Reason.PROBE_ERROR
            return None
        if self.nonfinite_weights:
            return Reason.NONFINITE_WEIGHTS
        if self.nonfinite_buffers:
            return Reason.NONFINITE_BUFFERS
        if self.replica_divergence:
            return Reason.REPLICA_DIVERGENCE
        if self.violation_weights:
            return Reason.VIOLATION_THRESHOLD
        # A bad loss whose update the gradient gate already skipped left the weights untouched.
        if self.nonfinite_loss and not self.update_skipped:
            return Reason.NONFINITE_LOSS
        if self.violation_loss and not self.update_skipped:
            return Reason.VIOLATION_THRESHOLD
        if self.probe_error:
            return Reason.PROBE_ERROR
        return None


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do, as data; the controller carries it out."""

    action: Action
    reason: Reason | None = None
    #: Id of the snapshot to restore (ROLLBACK only).
    target_sid: int | None = None
    #: LR scale in force after this decision (relative to the undisturbed schedule).
    lr_scale: float = 1.0
    #: Why, in words, when the numbers matter (a spike: the value and the bar it crossed).
    detail: str | None = None
    #: Take a snapshot of the state as it is now (a SNAPSHOT of the step just judged, or the asynchronous
    #: verdict's copy of a step that may become one once judged).
    capture: bool = False
    #: The snapshot of the step just judged, copied ahead of its verdict (asynchronous), is confirmed by it.
    confirm_sid: int | None = None
    #: Commit this snapshot now: its own step and its commit lag were judged healthy.
    commit_sid: int | None = None
    #: Drop this snapshot now: a fault came before its commit, or its step was not a snapshot after all.
    abandon_sid: int | None = None


@dataclass(frozen=True, kw_only=True)
class PendingSnapshot:
    """A snapshot begun and not yet committed or abandoned (one at a time)."""

    sid: int
    #: The guard's tick of the state it holds.
    tick: int
    #: Commit once the verdict of this tick was healthy (``tick`` + ``guard_snapshot_commit_lag``).
    commit_tick: int
    #: Its own step was judged a snapshot step (False: taken ahead of its verdict by the asynchronous path).
    confirmed: bool
    #: False when replica fingerprints are on and this state was not compared across ranks.
    verified: bool = True


@dataclass(frozen=True, kw_only=True)
class GuardState:
    """Everything the policy remembers; identical on all ranks and saved with snapshots and checkpoints."""

    lr_scale: float = 1.0
    total_rollbacks: int = 0
    #: Rollbacks since the last snapshot committed after a recovery; bounded by ``guard_max_rollbacks``.
    episode_rollbacks: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    #: Ids of the committed snapshots, oldest first.
    committed_sids: tuple[int, ...] = ()
    #: (snapshot id, number of rollbacks to it that were followed by another fault).
    target_failures: tuple[tuple[int, int], ...] = ()
    #: Id of the snapshot restored by the current rollback episode, None outside an episode.
    episode_sid: int | None = None
    #: The snapshot begun and not yet committed or abandoned.
    pending: PendingSnapshot | None = None
    #: No further snapshot is taken up to this tick: the last one's commit lag (one snapshot in flight at a time).
    quiet_until: int | None = None
    halted: bool = False
    halt_reason: Reason | None = None
    first_fault_step: int | None = None
    first_fault_ranks: tuple[int, ...] = ()
    #: (tick, κ̃) of the recent spectral probes (what the risk level is fitted on), oldest first.
    kappa_history: tuple[tuple[int, float], ...] = ()
    #: The spectral risk level after the newest probe (a RiskLevel value), None before the first.
    risk_level: str | None = None
    #: The spike rule's memory: a :class:`gradience.spike.SpikeState` (a dict when loaded from JSON, converted
    #: at the next check), None before the first check. Kept as the object: converting 2 × 128 values to and
    #: from a dict every step cost more than the rest of the policy.
    spike_state: Any = None
    #: A DANGER reaction backed the LR off in the current elevated-risk episode (reset at LEARNING or below).
    risk_backoff_done: bool = False
    #: Probe κ̃ every step up to this tick (a WARNING reaction), None when not bursting.
    burst_until: int | None = None
    #: Updates a GradScaler skipped for overflow (by design, not faults).
    scaler_skipped_steps: int = 0
    #: Consecutive agreed probe errors of the gradient check and of the step check.
    probe_error_streaks: tuple[int, int] = (0, 0)
    #: Checks switched off after ``probe_error_limit`` errors in a row (Phase values).
    disabled_checks: tuple[str, ...] = ()
    #: The verdict path of the last step: "sync" (agreed on the host in the step) or "async" (on the device,
    #: read one step later).
    verdict_path: str = "sync"

    def failures(self, sid: int) -> int:
        """How many rollbacks to snapshot ``sid`` were followed by another fault."""
        return dict(self.target_failures).get(sid, 0)

    def to_dict(self) -> dict:
        """JSON-ready form (enums as strings, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["halt_reason"] = self.halt_reason.value if self.halt_reason else None
        out["committed_sids"] = list(self.committed_sids)
        out["probe_error_streaks"] = list(self.probe_error_streaks)
        out["disabled_checks"] = list(self.disabled_checks)
        out["target_failures"] = [list(p) for p in self.target_failures]
        out["first_fault_ranks"] = list(self.first_fault_ranks)
        out["kappa_history"] = [list(p) for p in self.kappa_history]
        spike = self.spike_state
        out["spike_state"] = spike.to_dict() if hasattr(spike, "to_dict") else spike
        return out

    @classmethod
    def from_dict(cls, data: dict) -> GuardState:
        """Inverse of :meth:`to_dict`; unknown keys are rejected (the names of format 2 are read too)."""
        d = {_RENAMED.get(k, k): v for k, v in data.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GuardState field(s): {sorted(unknown)}")
        if d.get("halt_reason") is not None:
            d["halt_reason"] = Reason(d["halt_reason"])
        for key in ("committed_sids", "first_fault_ranks", "probe_error_streaks"):
            if key in d:
                d[key] = tuple(int(x) for x in d[key])
        if "disabled_checks" in d:
            d["disabled_checks"] = tuple(str(x) for x in d["disabled_checks"])
        if isinstance(d.get("pending"), dict):
            d["pending"] = PendingSnapshot(**d["pending"])
        if "target_failures" in d:
            d["target_failures"] = tuple((int(s), int(n)) for s, n in d["target_failures"])
        if "kappa_history" in d:
            d["kappa_history"] = tuple((int(t), float(k)) for t, k in d["kappa_history"])
        if isinstance(d.get("spike_state"), dict):
            d["spike_state"] = SpikeState.from_dict(d["spike_state"])
        return cls(**d)


#: GuardState fields renamed since format 2 of the guard state (old name -> new name).
_RENAMED = {"committed": "committed_sids", "episode_target": "episode_sid"}
