"""Carrying out the policy's Decisions: snapshots begun, committed, abandoned and written to disk, rollbacks with
their restores and replica repair, halts. Every result goes back through a :mod:`gradience.policy` transition,
so the executor never builds or edits a GuardState itself; each action is reported to telemetry.

Its dependencies are declared in the constructor: the snapshot store and the restore mechanics
(:class:`~gradience.recovery.Recovery`), the group, telemetry, the config, and ``collective`` - the controller's
runner for collective calls, which turns a failed collective into an ABORTED run on every rank, and ``fatal``,
which records an error that stops every rank (event, guard state, summaries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradience import policy
from gradience.config import GradienceConfig
from gradience.errors import SnapshotError
from gradience.recovery import Recovery, check_backoff_target
from gradience.snapshot import SnapshotStore, agree_all
from gradience.telemetry import Telemetry, telemetry_filename
from gradience.types import Action, Decision, GuardState, Phase, Verdict

#: The controller's runner for collective calls: ``collective(step, fn, *args)``.
Collective = Callable[..., Any]


class Executor:
    """Carries out Decisions for one controller (see the module docstring)."""

    def __init__(self, *, store: SnapshotStore, recovery: Recovery, telemetry: Telemetry, config: GradienceConfig,
                 comm: Any, collective: Collective, fatal: Callable[[GuardState, int | None, str, str], None],
                 global_ranks: tuple[int, ...], bad_tensors: Callable[[], dict[str, Any] | None],
                 read_lr: Callable[[], float | None]) -> None:
        self.store, self.recovery, self.telemetry, self.config = store, recovery, telemetry, config
        self.comm, self.collective, self.fatal, self.global_ranks = comm, collective, fatal, global_ranks
        self._bad_tensors, self._read_lr = bad_tensors, read_lr
        #: The next snapshot id to hand out (ids are never reused, also across a resume).
        self.next_sid = 0
        self._warned_backoff = False

    # ------------------------------------------------------------------------------------------ one decision
    def carry_out(self, state: GuardState, decision: Decision, verdict: Verdict | None, *, step: int | None,
                  tick: int, verified: bool = True) -> GuardState:
        """Do what ``decision`` says (``verdict``: the agreed verdict it came from, None for a transition of its
        own); returns the guard state after every result was reported back to the policy."""
        if self.store.persisting_id is not None and (decision.action is Action.HALT or (
                verdict is not None and verdict.phase is Phase.STEP and not verdict.persist_busy)):
            # Every rank sees the same verdict: the marker is written together, once no rank is still writing.
            self.collective(step, self.recovery.persist, step)
        if decision.abandon_sid is not None:
            state = self.abandon(state, step)
        if decision.commit_sid is not None:
            state = self.commit(state, step)
        if decision.capture:
            state = self.snapshot(state, step, tick, confirmed=decision.action is Action.SNAPSHOT, verified=verified)
        if decision.action is Action.ROLLBACK:
            state = self.rollback(state, decision, verdict, step)
        elif decision.action is Action.HALT and verdict is not None:
            self.report_halt(state, decision, verdict, step)
        return state

    # ------------------------------------------------------------------------------------------ snapshots
    def snapshot(self, state: GuardState, step: int | None, tick: int, *, confirmed: bool,
                 verified: bool = True) -> GuardState:
        """Capture the state as it is now as the next snapshot; committed at once when nothing is left to judge."""
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        if self.store.persisting_id is not None:  # one write in flight at a time, reported
            self.collective(step, self.recovery.persist, step)
        background = not confirmed or self.config.guard_snapshot_commit_lag > 0
        self.recovery.begin(sid, step, {"lr_scale": state.lr_scale, "verified": verified, "tick": tick},
                            background=background)
        state, decision = policy.on_snapshot_begun(state, sid, tick, self.config, confirmed=confirmed,
                                                   verified=verified)
        return self.commit(state, step) if decision.commit_sid is not None else state

    def commit(self, state: GuardState, step: int | None) -> GuardState:
        """*Collective.* Commit the snapshot in flight. The guard state stored with it is the state after its
        commit: a run resumed from it continues exactly as the live run did."""
        pending = state.pending
        sid = self.store.pending_id
        verified = pending.verified if pending is not None and pending.sid == sid else True
        after = policy.on_snapshot_committed(state, sid, self.config, verified=verified)
        _, ok = self.collective(step, self.recovery.commit, step, {"guard_state": after.to_dict()})
        if not ok:
            return policy.on_snapshot_abandoned(state, sid)
        state = policy.on_snapshots_lost(after, self.store.unrestorable())
        self.collective(step, self.recovery.prune, state.committed_sids)
        return state

    def abandon(self, state: GuardState, step: int | None) -> GuardState:
        """*Local.* Drop the snapshot in flight (every rank drops it at the same decision)."""
        sid = self.store.pending_id
        self.recovery.abandon(step)
        return policy.on_snapshot_abandoned(state, sid) if sid is not None else state

    def persist(self, step: int | None) -> None:
        """*Collective.* Write the marker of a snapshot committed from memory, if one is being written."""
        if self.store.persisting_id is not None:
            self.collective(step, self.recovery.persist, step)

    def finish(self, state: GuardState, step: int | None, tick: int) -> GuardState:
        """The run ended: commit a snapshot whose steps were all judged healthy, write the last marker."""
        state = self.carry_out(state, policy.on_finalize(state), None, step=step, tick=tick)
        self.persist(step)
        return state

    # ------------------------------------------------------------------------------------------ rollbacks
    def rollback(self, state: GuardState, decision: Decision, verdict: Verdict | None,
                 step: int | None) -> GuardState:
        """Restore the target on every rank (the next older one when it cannot be read), or halt."""
        first = decision.reason
        faulty = verdict is not None and self.comm.rank in verdict.faulty_ranks
        bad = self._bad_tensors() if faulty else None
        while decision.action is Action.ROLLBACK:
            sid = decision.target_sid
            prepared, local_ok = self.collective(step, self.recovery.prepare_everywhere, sid)
            if prepared is not None:
                state = policy.on_restored(state, sid, self.config)
                state = self._restore_everywhere(state, step, prepared)
                divergence = verdict is not None and verdict.replica_divergence
                if divergence:
                    self.collective(step, self.recovery.repair_replicas)
                self.telemetry.emit(
                    "rollback_success", step=step, to_step=self.recovery.labels.get(sid), to_snapshot=sid,
                    reason=first, lr=self._read_lr(), lr_scale=state.lr_scale, **self.blame(verdict),
                    restored_from="memory" if prepared.path is None else "disk", bad=bad,
                    total_rollbacks=state.total_rollbacks, replicas_repaired=divergence,
                    verdict_step=verdict.step if verdict is not None else None, detail=decision.detail)
                self._warn_backoff(step)
                return state
            self.telemetry.emit("rollback_failed", step=step, to_step=self.recovery.labels.get(sid),
                                to_snapshot=sid, reason="SNAPSHOT_UNREADABLE", local_ok=local_ok)
            state, decision = policy.on_restore_failed(state, sid, first, self.config)
            self.collective(step, self.recovery.prune, state.committed_sids)
        self.report_halt(state, decision, verdict, step)
        return state

    def _restore_everywhere(self, state: GuardState, step: int | None, prepared: Any) -> GuardState:
        """Restore on this rank, then agree that every rank managed; a failure anywhere stops every rank."""
        error = None
        try:
            self.recovery.restore(prepared, state.lr_scale)
        except Exception as e:  # the model may be half-restored: no rank may train on
            error = e
        if not self.collective(step, agree_all, self.comm, error is None):
            where = f"on this rank: {type(error).__name__}: {error}" if error else "on another rank"
            self.fatal(policy.on_restore_crashed(state), step, "RESTORE_FAILED", where)
            raise SnapshotError(f"restoring snapshot {prepared.step} failed {where}") from error
        return state

    # ------------------------------------------------------------------------------------------ reports
    def report_halt(self, state: GuardState, decision: Decision, verdict: Verdict | None, step: int | None) -> None:
        """The ``abort`` event of a halt the policy decided."""
        self.telemetry.emit("abort", step=step, reason=decision.reason, **self.blame(verdict),
                            total_rollbacks=state.total_rollbacks)

    def blame(self, verdict: Verdict | None) -> dict[str, Any]:
        """:func:`blame` with this run's ranks."""
        return blame(verdict, self.global_ranks)

    def _warn_backoff(self, step: int | None) -> None:
        why = check_backoff_target(self.recovery.target)
        if why and not self._warned_backoff:
            self._warned_backoff = True
            self.telemetry.emit("lr_backoff_unavailable", step=step, detail=why)


def blame(verdict: Verdict | None, global_ranks: tuple[int, ...]) -> dict[str, Any]:
    """Which ranks a verdict blames, by group and global rank, and where each wrote its evidence."""
    ranks = list(verdict.faulty_ranks) if verdict is not None else []
    g = [global_ranks[r] for r in ranks if r < len(global_ranks)]
    # Each faulty rank names its own bad tensors ("bad") in its own telemetry file.
    return {"faulty_ranks": ranks, "faulty_global_ranks": g, "evidence_in": [telemetry_filename(r) for r in g]}
