"""The controller's effects: carrying out a Decision (snapshot, commit, rollback with restore and replica
repair, halt), resuming from out_dir, and the fatal path that leaves an ABORTED summary on every rank.

A mixin of :class:`~gradience.controller.GradienceController`, kept apart so that the per-step flow and the
effects each stay one file; it works on the controller's state and owns no policy (``policy`` decides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gradience import policy
from gradience.errors import CollectiveError, CollectiveMismatch, SnapshotError
from gradience.recovery import check_backoff_target
from gradience.resume import resume_latest
from gradience.snapshot import agree_all
from gradience.telemetry import telemetry_filename
from gradience.types import Action, Decision, GuardState, Phase, Reason, Verdict


class Effects:
    """Carries out decisions for :class:`~gradience.controller.GradienceController` (see module docstring)."""

    def _resume_latest(self) -> bool:
        """Continue from the newest committed, verified snapshot in out_dir (collective); False if none."""
        last = self._collective(None, self.store.scan)
        rec = self.recovery
        resumed = resume_latest(self.store, self.comm, lambda sid: self._collective(None, rec.prepare_everywhere, sid),
                                rec.resume)
        if resumed is None:
            self.telemetry.emit("resume", step=None, path=None, detail="no committed snapshot: starting fresh")
            return False
        info, meta = resumed.info, resumed.meta
        state = GuardState.from_dict(info.extra.get("guard_state") or meta.get("guard_state") or {})
        self.state = dataclasses.replace(state, committed=tuple(i.sid for i in self.store.committed()),
                                         episode_target=None, halted=False, halt_reason=None)
        if self.lr is not None:
            self.lr.set(self.state.lr_scale)
        rec.labels.update({i.sid: i.step for i in self.store.committed()})
        self._next_sid = last + 1
        self._tick0 = int(meta.get("tick", -1)) + 1
        self.resumed_step = self.last_step = info.step
        self.telemetry.emit("resume", step=info.step, snapshot_id=info.sid, path=str(info.path),
                            lr_scale=self.state.lr_scale, total_rollbacks=self.state.total_rollbacks)
        return True

    def _act(self, step: int, verdict: Verdict, decision: Decision, *, verified: bool = True) -> None:
        rec = self.recovery
        if rec is not None and self.store.persisting_id is not None and (
                decision.action is Action.HALT or (verdict.phase is Phase.STEP and not verdict.persist_busy)):
            # Every rank sees the same verdict: the marker is written together, once no rank is still writing
            # (a new snapshot persists the one before in _snapshot).
            self._collective(step, rec.persist, step)
        if rec is not None and rec.pending is not None:
            # Every rank sees the same decisions and ticks, so they finish or drop it at the same point.
            if decision.action in (Action.ROLLBACK, Action.HALT):
                rec.abandon(step)
            elif decision.action is Action.SNAPSHOT or self.steps_seen >= rec.pending_due:
                self._commit(step)
        if decision.action is Action.SNAPSHOT:
            self._snapshot(step, background=self._commit_lag() > 0, verified=verified)
        elif decision.action is Action.ROLLBACK:
            self._rollback(step, verdict, decision)
        elif decision.action is Action.HALT:
            self._emit_halt(step, verdict, decision)

    def _commit_lag(self) -> int:
        # Under the asynchronous verdict a step's weights are judged one step later: commit no sooner.
        return max(self.config.guard_snapshot_commit_lag, 1 if self._deferred is not None else 0)

    def _snapshot(self, step: int, *, background: bool, verified: bool = True) -> None:
        sid, self._next_sid = self._next_sid, self._next_sid + 1
        meta = {"lr_scale": self.state.lr_scale, "guard_state": self.state.to_dict(), "verified": verified,
                "tick": self._tick0 + self.steps_seen - 1}
        if self.store.persisting_id is not None:  # one write in flight at a time, reported
            self._collective(step, self.recovery.persist, step)
        self.recovery.begin(sid, step, meta, background=background)
        self._pending_verified = verified
        if background:
            self.recovery.pending_due = self.steps_seen + self._commit_lag()
        else:
            self._commit(step)

    def _commit(self, step: int) -> None:
        sid, ok = self._collective(step, self.recovery.commit, step)
        if ok:
            self.state = policy.on_snapshot_committed(self.state, sid, self.config, verified=self._pending_verified)
            dead = self.store.unrestorable()
            if dead:  # its write failed and its copy in memory is gone: not a target any more
                self.state = dataclasses.replace(self.state, committed=tuple(
                    s for s in self.state.committed if s not in dead))
            self._collective(step, self.recovery.prune, self.state.committed)

    def _rollback(self, step: int, verdict: Verdict, decision: Decision) -> None:
        first_reason = decision.reason
        bad = self._bad(None, grads=False) if self.comm.rank in verdict.faulty_ranks else None
        while decision.action is Action.ROLLBACK:
            sid = decision.target_step
            prepared, local_ok = self._collective(step, self.recovery.prepare_everywhere, sid)
            if prepared is not None:
                self._restore_everywhere(step, prepared)
                if verdict.replica_divergence:
                    self._collective(step, self.recovery.repair_replicas)
                self.telemetry.emit(
                    "rollback_success", step=step, to_step=self.recovery.labels.get(sid), to_snapshot=sid,
                    reason=first_reason, lr=self._lr(), lr_scale=self.state.lr_scale, **self._blame(verdict),
                    restored_from="memory" if prepared.path is None else "disk",
                    bad=bad, total_rollbacks=self.state.total_rollbacks,
                    replicas_repaired=verdict.replica_divergence, detail=decision.detail)
                self._warn_backoff(step)
                return
            self.telemetry.emit("rollback_failed", step=step, to_step=self.recovery.labels.get(sid), to_snapshot=sid,
                                reason="SNAPSHOT_UNREADABLE", local_ok=local_ok)
            self.state, decision = policy.on_restore_failed(self.state, sid, self.config)
            self._collective(step, self.recovery.prune, self.state.committed)
        # Nothing was restored: no rollback happened and no LR was backed off.
        s = self.state
        self.state = dataclasses.replace(self._prior, committed=s.committed, target_failures=s.target_failures,
                                         first_fault_step=s.first_fault_step, first_fault_ranks=s.first_fault_ranks,
                                         halted=True, halt_reason=s.halt_reason)
        self._emit_halt(step, verdict, decision)

    def _emit_halt(self, step: int, verdict: Verdict, decision: Decision) -> None:
        self.telemetry.emit("abort", step=step, reason=decision.reason, **self._blame(verdict),
                            total_rollbacks=self.state.total_rollbacks)

    def _restore_everywhere(self, step: int, prepared: Any) -> None:
        """Restore on this rank, then agree that every rank managed; a failure anywhere stops every rank."""
        error = None
        try:
            self.recovery.restore(prepared, self.state.lr_scale)
        except Exception as e:  # the model may be half-restored: no rank may train on
            error = e
        if not self._collective(step, agree_all, self.comm, error is None):
            where = f"on this rank: {type(error).__name__}: {error}" if error else "on another rank"
            self.state = dataclasses.replace(self.state, halted=True, halt_reason=Reason.RESTORE_FAILED)
            self._emit_fatal(step, "RESTORE_FAILED", where)
            raise SnapshotError(f"restoring snapshot {prepared.step} failed {where}") from error

    def _collective(self, step: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except CollectiveError as e:
            self._aborted = "COLLECTIVE_MISMATCH" if isinstance(e, CollectiveMismatch) else "CONSENSUS_TIMEOUT"
            self._emit_fatal(step, self._aborted, str(e))
            raise

    def _emit_fatal(self, step: int | None, reason: str, error: str) -> None:
        """An error that stops every rank: the event, and summaries that say ABORTED (the caller raises).

        Every rank writes its own ``summary_rank<r>.json``, and group rank 0 ``summary.json`` too: the rank
        that died may be rank 0."""
        self.telemetry.emit("abort", step=step, reason=reason, error=error)
        summary = self.summary()
        self.telemetry.write_summary(summary, name=f"summary_rank{self.global_rank}.json", force=True)
        self.telemetry.write_summary(summary)

    def terminated(self, signame: str) -> None:
        """Record that the process is being stopped by a signal (the launcher stops survivors of a failed
        peer this way): an ABORTED summary for this rank, written before the process goes."""
        if self.telemetry is None or self.halted:
            return
        self._aborted = f"TERMINATED ({signame})"
        self._emit_fatal(self.last_step, "TERMINATED", f"{signame} received (a launcher stops the surviving "
                         "ranks this way when a peer fails)")

    def _warn_backoff(self, step: int) -> None:
        why = check_backoff_target(self.recovery.target)
        if why and not self._warned_backoff:
            self._warned_backoff = True
            self.telemetry.emit("lr_backoff_unavailable", step=step, detail=why)

    def _blame(self, verdict: Verdict) -> dict[str, Any]:
        ranks = list(verdict.faulty_ranks)
        g = [self.global_ranks[r] for r in ranks if r < len(self.global_ranks)]
        # Each faulty rank names its own bad tensors ("bad") in its own telemetry file.
        return {"faulty_ranks": ranks, "faulty_global_ranks": g, "evidence_in": [telemetry_filename(r) for r in g]}

