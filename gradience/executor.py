"""Carrying out the policy's Decisions: reporting each one (skips, spikes, risk reactions, faults in monitor mode,
the periodic telemetry), snapshots begun, committed, abandoned and written to disk, rollbacks with their restores
and replica repair, halts, and opening a run (fresh, or resumed from its newest snapshot). Every result goes back
through a :mod:`gradience.policy` transition, so the executor never builds or edits a GuardState itself; each
action is reported to telemetry.

Its dependencies are declared in the constructor: the snapshot store and the restore mechanics
(:class:`~gradience.recovery.Recovery`), the group, telemetry, the config, and ``collective`` - the controller's
runner for collective calls, which turns a failed collective into an ABORTED run on every rank, and ``fatal``,
which records an error that stops every rank (event, guard state, summaries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradience import policy
from gradience.comm import agree_all
from gradience.config import GradienceConfig
from gradience.errors import SnapshotError
from gradience.recovery import Recovery, check_backoff_target
from gradience.resume import Resumed, resume_latest
from gradience.snapshot import SnapshotStore
from gradience.telemetry import Telemetry, telemetry_filename
from gradience.types import Action, Decision, GuardState, Phase, Reason, Verdict

#: The controller's runner for collective calls: ``collective(step, fn, *args, state=the guard state now)``.
Collective = Callable[..., Any]


class Executor:
    """Carries out Decisions for one controller (see the module docstring)."""

    def __init__(self, *, store: SnapshotStore | None, recovery: Recovery | None, telemetry: Telemetry,
                 config: GradienceConfig, comm: Any, collective: Collective,
                 fatal: Callable[[GuardState, int | None, str, str], None], global_ranks: tuple[int, ...],
                 bad_tensors: Callable[[], dict[str, Any] | None], read_lr: Callable[[], float | None],
                 spectral: Any | None) -> None:
        self.store, self.recovery, self.telemetry, self.config = store, recovery, telemetry, config
        self.comm, self.collective, self.fatal, self.global_ranks = comm, collective, fatal, global_ranks
        self._bad_tensors, self._read_lr, self._spectral = bad_tensors, read_lr, spectral
        #: The next snapshot id to hand out (ids are never reused, also across a resume).
        self.next_sid = 0
        self._warned_backoff = False
        self._monitored: Any = None  # monitor mode: the fault reason last reported
        self._at_tick: dict[int, GuardState] = {}  # snapshot id -> the guard state of its own step

    # ------------------------------------------------------------------------------------------ opening
    def start(self, state: GuardState, label: int, tick: int) -> GuardState:
        """*Collective.* A fresh run: clear the snapshot directory and commit the initial snapshot, on disk
        before the first step (it is the first rollback target and the first resume point)."""
        self.collective(None, self.store.reset, state=state)
        state = self.snapshot(policy.on_fresh_start(state), label, tick, confirmed=True, initial=True)
        persisted = self.collective(None, self.recovery.persist, label, state=state) if state.committed_sids else None
        if not state.committed_sids or persisted is False:
            error = self.store.last_error
            raise SnapshotError(f"could not commit the initial snapshot under {self.store.root}: "
                                + (f"{type(error).__name__}: {error}" if error else "another rank failed"))
        return state

    def resume(self) -> tuple[GuardState, Resumed] | None:
        """*Collective.* Continue from the newest committed snapshot whose shards verify on every rank: restored,
        with the guard state stored with it; None (reported) when there is none."""
        last = self.collective(None, self.store.scan)
        rec = self.recovery
        resumed = resume_latest(self.store, self.comm, lambda sid: self.collective(None, rec.prepare_everywhere, sid),
                                rec.resume)
        if resumed is None:
            self.telemetry.emit("resume", step=None, path=None, detail="no committed snapshot: starting fresh")
            return None
        info, committed = resumed.info, self.store.committed()
        state = policy.on_resume(info.extra.get("guard_state"), tuple(i.sid for i in committed))
        rec.labels.update({i.sid: i.step for i in committed})
        self.next_sid = last + 1
        self.telemetry.emit("resume", step=info.step, snapshot_id=info.sid, path=str(info.path),
                            lr_scale=state.lr_scale, total_rollbacks=state.total_rollbacks)
        return state, resumed

    # ------------------------------------------------------------------------------------------ one decision
    def carry_out(self, state: GuardState, decision: Decision, verdict: Verdict | None, *, step: int | None,
                  tick: int, verified: bool = True, before: GuardState | None = None,
                  bad: Callable[[], Any] | None = None, last_loss: float | None = None) -> GuardState:
        """Report ``decision`` and do what it says (``verdict``: the agreed verdict it came from, None for a
        transition of its own; ``before``: the state the policy decided from; ``bad()``: the offending gradients
        by name, asked for on a skip); returns the guard state after every result was reported back to the
        policy."""
        if verdict is not None:
            self._report(state, decision, verdict, before or state, bad)
        if self.store is not None:
            state = self._act(state, decision, verdict, step, tick, verified)
        elif decision.action is Action.HALT and verdict is not None:
            self.report_halt(state, decision, verdict, step)
        if verdict is not None and verdict.phase is Phase.STEP and verdict.step % self.config.telemetry_interval == 0:
            self.telemetry.emit("telemetry", step=verdict.step, train_loss=last_loss, lr=self._read_lr(),
                                lr_scale=state.lr_scale, weight_norm=verdict.weight_norm,
                                spectral_kappa=self._spectral.last_kappa if self._spectral else None,
                                risk_level=state.risk_level)
        return state

    def _report(self, state: GuardState, decision: Decision, verdict: Verdict, before: GuardState,
                bad: Callable[[], Any] | None) -> None:
        """What a decision tells the user before anything is done (the actions report their own results)."""
        if decision.reason is Reason.SPIKE and decision.action is Action.CONTINUE:
            self.telemetry.emit("spike", step=verdict.step, action="log", detail=decision.detail, **self.blame(verdict))
        if decision.action is Action.SKIP_STEP and decision.reason is not None:  # (None: the GradScaler's own)
            self.telemetry.emit("skip_step", step=verdict.step, reason=decision.reason, **self.blame(verdict),
                                grad_norm=verdict.grad_norm, bad=bad() if bad else None, detail=decision.detail)
        if verdict.phase is not Phase.STEP:
            return
        if verdict.spectral_kappa is not None and self._spectral is not None:
            self._spectral.report(verdict.step, verdict.tick, verdict, before.risk_level, state)
        if decision.detail and decision.reason is None:  # a reaction to the spectral risk level
            self.telemetry.emit("risk_reaction", step=verdict.step, level=state.risk_level, detail=decision.detail,
                                lr_scale=state.lr_scale, kappa=verdict.spectral_kappa)
        if not self.config.guard_enabled and decision.reason is not self._monitored:
            # Monitor mode: a corrupted run stays faulty every step; report when the condition changes.
            self._monitored = decision.reason
            if decision.reason is not None:
                self.telemetry.emit("fault", step=verdict.step, reason=decision.reason, **self.blame(verdict))

    def _act(self, state: GuardState, decision: Decision, verdict: Verdict | None, step: int | None, tick: int,
             verified: bool) -> GuardState:
        if decision.confirm_sid is not None:
            self._at_tick[decision.confirm_sid] = state  # a copy taken ahead, confirmed by its own verdict just now
        if decision.action is Action.HALT or (
                verdict is not None and verdict.phase is Phase.STEP and not verdict.persist_busy):
            # Every rank sees the same verdict: the marker is written together, once no rank is still writing.
            self.persist(state, step)
        if decision.abandon_sid is not None:
            fault = decision.action in (Action.ROLLBACK, Action.HALT)
            state = self.abandon(state, step, decision.abandon_sid, fault=fault)
        if decision.commit_sid is not None:
            state = self.commit(state, step, decision.commit_sid)
        if decision.capture:
            state = self.snapshot(state, step, tick, confirmed=decision.action is Action.SNAPSHOT, verified=verified)
        if decision.action is Action.ROLLBACK:
            state = self.rollback(state, decision, verdict, step)
        elif decision.action is Action.HALT and verdict is not None:
            self.report_halt(state, decision, verdict, step)
        return state

    def ahead(self, state: GuardState, step: int | None, tick: int) -> tuple[GuardState, dict[str, Any]]:
        """Asynchronous verdict, the step just made (``tick``): its κ̃ when due (it travels with the step's flags,
        agreed as on the synchronous path), and a copy of it when its verdict may make it a snapshot
        (:func:`policy.capture_ahead`)."""
        spectral = self._spectral
        kappa = spectral.measure() if spectral is not None and policy.spectral_due(tick, self.config, state) else {}
        decision = policy.capture_ahead(state, tick, self.config)
        if decision.capture:
            state = self.carry_out(state, decision, None, step=step, tick=tick)
        return state, kappa

    def count_probe_errors(self, state: GuardState, verdict: Verdict, local: str | None,
                           switched_off: dict[str, str]) -> GuardState:
        """A probe that raises is a defect of the guard, not a fault of the run: report it (``local``: this rank's
        error text, None when it raised elsewhere); the policy switches the check off on every rank after
        ``probe_error_limit`` in a row (the count is agreed), and ``switched_off`` keeps this rank's reason."""
        phase = verdict.phase
        state, off = policy.on_probe_errors(state, phase, verdict.probe_error, self.config)
        if verdict.probe_error:
            if off and local:
                switched_off[phase.value] = local
            self.telemetry.emit("probe_error", step=verdict.step, phase=phase, **self.blame(verdict),
                                error=local or "raised on another rank",
                                consecutive=state.probe_error_streaks[phase is Phase.STEP], disabled=off)
        return state

    # ------------------------------------------------------------------------------------------ snapshots
    def snapshot(self, state: GuardState, step: int | None, tick: int, *, confirmed: bool,
                 verified: bool = True, initial: bool = False) -> GuardState:
        """Capture the state as it is now as the next snapshot; committed at once when nothing is left to judge."""
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        self.persist(state, step)  # one write in flight at a time, reported
        background = not (confirmed or initial) or self.config.guard_snapshot_commit_lag > 0
        self.recovery.begin(sid, step, {"lr_scale": state.lr_scale, "verified": verified, "tick": tick},
                            background=background)
        state, decision = policy.on_snapshot_begun(state, sid, tick, self.config, confirmed=confirmed,
                                                   verified=verified, initial=initial)
        if confirmed or initial:
            self._at_tick[sid] = state  # the guard state of its own step, this snapshot in flight
        return self.commit(state, step, sid) if decision.commit_sid is not None else state

    def commit(self, state: GuardState, step: int | None, sid: int) -> GuardState:
        """*Collective.* Commit snapshot ``sid`` (the one in flight). The guard state stored with it is the state
        of its own step (the step a resumed run continues from, whatever a commit lag judged since) after its
        commit: a run resumed from it continues exactly as the live run did from that step."""
        _in_flight(self.store.pending_id, sid)
        verified = state.pending.verified if state.pending is not None and state.pending.sid == sid else True
        stored = policy.on_snapshot_committed(self._at_tick.pop(sid, state), sid, self.config, verified=verified)
        _, ok = self.collective(step, self.recovery.commit, step, {"guard_state": stored.to_dict()}, state=state)
        if not ok:
            return policy.on_snapshot_abandoned(state, sid)
        after = policy.on_snapshot_committed(state, sid, self.config, verified=verified)
        state = policy.on_snapshots_lost(after, self.store.unrestorable())
        self.collective(step, self.recovery.prune, state.committed_sids, state=state)
        return state

    def abandon(self, state: GuardState, step: int | None, sid: int, *, fault: bool = True) -> GuardState:
        """*Local.* Drop snapshot ``sid``, the one in flight (every rank drops it at the same decision)."""
        _in_flight(self.store.pending_id, sid)
        self._at_tick.pop(sid, None)
        self.recovery.abandon(step, fault=fault)
        return policy.on_snapshot_abandoned(state, sid)

    def persist(self, state: GuardState, step: int | None) -> None:
        """*Collective.* Write the marker of a snapshot committed from memory, if one is being written."""
        if self.store.persisting_id is not None:
            self.collective(step, self.recovery.persist, step, state=state)

    def finish(self, state: GuardState, step: int | None, tick: int) -> GuardState:
        """The run ended: commit a snapshot whose steps were all judged healthy, write the last marker."""
        if self.store is None:
            return state
        state = self.carry_out(state, policy.on_finalize(state), None, step=step, tick=tick)
        self.persist(state, step)
        return state

    def drop_in_flight(self, state: GuardState, step: int | None) -> GuardState:
        """*Local.* What a halt or an abort left in flight is never committed: dropped, and reported."""
        if self.store is None:
            return state
        if self.store.pending_id is not None:
            state = self.abandon(state, step, self.store.pending_id)
        self.store.abandon_persist()
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
            prepared, local_ok = self.collective(step, self.recovery.prepare_everywhere, sid, state=state)
            if prepared is not None:
                state = policy.on_restored(state, sid, self.config)
                state = self._restore_everywhere(state, step, prepared)
                divergence = verdict is not None and verdict.replica_divergence
                if divergence:
                    self.collective(step, self.recovery.repair_replicas, state=state)
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
            self.collective(step, self.recovery.prune, state.committed_sids, state=state)
        self.report_halt(state, decision, verdict, step)
        return state

    def _restore_everywhere(self, state: GuardState, step: int | None, prepared: Any) -> GuardState:
        """Restore on this rank, then agree that every rank managed; a failure anywhere stops every rank."""
        error = None
        try:
            self.recovery.restore(prepared, state.lr_scale)
        except Exception as e:  # the model may be half-restored: no rank may train on
            error = e
        if not self.collective(step, agree_all, self.comm, error is None, state=state):
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
        """Which ranks a verdict blames, by group and global rank, and where each wrote its evidence."""
        ranks = list(verdict.faulty_ranks) if verdict is not None else []
        g = [self.global_ranks[r] for r in ranks if r < len(self.global_ranks)]
        # Each faulty rank names its own bad tensors ("bad") in its own telemetry file.
        return {"faulty_ranks": ranks, "faulty_global_ranks": g, "evidence_in": [telemetry_filename(r) for r in g]}

    def _warn_backoff(self, step: int | None) -> None:
        why = check_backoff_target(self.recovery.target)
        if why and not self._warned_backoff:
            self._warned_backoff = True
            self.telemetry.emit("lr_backoff_unavailable", step=step, detail=why)


def _in_flight(pending: int | None, sid: int) -> None:
    if pending != sid:  # the policy and the store disagree on what is in flight: a defect, never a fault
        raise RuntimeError(f"Gradience: snapshot {sid} was to be settled, but {pending} is in flight")
