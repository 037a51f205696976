"""The guard's decisions and the only writer of :class:`GuardState`: pure transitions of (GuardState, event,
GradienceConfig) -> (GuardState, Decision). No torch, IO or clock.

Every rank calls these with the same agreed inputs, so every rank reaches the same Decision without a
broadcast. The events are: a verdict (:func:`decide`, both verdict paths), a snapshot begun, committed,
abandoned or lost (:func:`on_snapshot_begun` ...), a restore that worked or failed, probes that raised, a scaler
overflow (in decide), a resume or a checkpoint loaded, a switch of verdict path, a collective that failed, the end of the
run. The controller measures and agrees, the executor carries decisions out and reports each result back here.

A snapshot's life is decided here too, the same way on both verdict paths: a SNAPSHOT decision of the step
just judged captures it (``capture``); the asynchronous path, whose state has moved on by the time a step is
judged, captures a step ahead of its verdict when a healthy verdict would make it a snapshot
(:func:`capture_ahead`) and the verdict then confirms or drops it. A snapshot commits once the verdict of
its own tick plus ``guard_snapshot_commit_lag`` was healthy, and is dropped by a rollback or a halt before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradience import risk, spike
from gradience.config import GradienceConfig
from gradience.risk import RiskLevel
from gradience.types import Action, Decision, GuardState, PendingSnapshot, Phase, Reason, Verdict

_replace = dataclasses.replace


def initial_state() -> GuardState:
    """The state of a run that has not started."""
    return GuardState()


def decide(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, Decision]:
    """Decide what to do with one phase of one step, including what happens to a snapshot in flight."""
    state, decision = _settle_pending(*_judge(state, verdict, config), verdict)
    decision = _one_at_a_time(state, decision, verdict)
    if verdict.late and decision.capture:  # the judged state is gone; only a copy taken ahead could be kept
        decision = _replace(decision, capture=False)
    return state, decision


def _settle_pending(state: GuardState, decision: Decision, verdict: Verdict) -> tuple[GuardState, Decision]:
    """The snapshot in flight after this verdict: dropped by a fault, confirmed or dropped by the verdict of its
    own tick (taken ahead), committed once the verdict of its commit tick was healthy. It stays in the state until
    the executor reports the commit or the drop (:func:`on_snapshot_committed`, :func:`on_snapshot_abandoned`)."""
    p = state.pending
    if p is None:
        return state, decision
    if decision.action in (Action.ROLLBACK, Action.HALT):
        return state, _replace(decision, abandon_sid=p.sid)
    if verdict.phase is not Phase.STEP:
        return state, decision
    tick = _tick(verdict)
    if not p.confirmed and p.tick == tick:
        if decision.action is not Action.SNAPSHOT:  # a skipped update, or not a snapshot step after all
            return state, _replace(decision, abandon_sid=p.sid)
        p = _replace(p, confirmed=True)
        state = _replace(state, pending=p, quiet_until=p.commit_tick)
        decision = _replace(decision, capture=False, confirm_sid=p.sid)
    if p.confirmed and tick >= p.commit_tick:
        return state, _replace(decision, commit_sid=p.sid)
    return state, decision


def _one_at_a_time(state: GuardState, decision: Decision, verdict: Verdict) -> Decision:
    """One snapshot in flight at a time: a snapshot step (a risk reaction's) that comes while an older one still
    waits for its commit lag (up to ``quiet_until``) is not taken. The asynchronous path, which copies a step
    before its verdict, could not take it either; and a run resumed from the older snapshot knows it too."""
    quiet = state.quiet_until is not None and _tick(verdict) <= state.quiet_until
    if decision.action is Action.SNAPSHOT and decision.confirm_sid is None and quiet:
        return _replace(decision, action=Action.CONTINUE, capture=False)
    return decision


def _judge(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, Decision]:
    """The action a verdict calls for (snapshots in flight aside)."""
    if state.halted:
        return state, Decision(action=Action.HALT, reason=state.halt_reason, lr_scale=state.lr_scale)
    state = observe_spectral(state, verdict, config)
    reason = verdict.fault_reason()
    detail = None
    if reason is None and verdict.phase is Phase.GRADS and config.spike_action != "off":
        state, detail = _check_spike(state, verdict, config)
        if detail is not None:
            reason = Reason.SPIKE
            if config.spike_action == "log":
                return state, Decision(action=Action.CONTINUE, reason=reason, lr_scale=state.lr_scale, detail=detail)
    if reason is None and _reacting(verdict, config) and state.risk_level == RiskLevel.INSTABILITY.value:
        reason = Reason.SPECTRAL_INSTABILITY
    if reason is None and verdict.phase is Phase.GRADS and verdict.scaler_overflow:
        # The GradScaler skips this update by design (and lowers its scale): not a fault, but not applied either.
        state = _replace(state, scaler_skipped_steps=state.scaler_skipped_steps + 1)
        return state, Decision(action=Action.SKIP_STEP, lr_scale=state.lr_scale)
    if reason is None:
        return _healthy(state, verdict, config)
    if reason is Reason.PROBE_ERROR:
        # A probe that raised is a defect of the guard, not a fault of the run: rolling back would not cure
        # it and would break a healthy run again and again. No snapshot either: the state was not checked.
        return state, Decision(action=Action.CONTINUE, reason=reason, lr_scale=state.lr_scale)
    if state.first_fault_step is None:
        state = _replace(state, first_fault_step=verdict.step, first_fault_ranks=verdict.faulty_ranks)
    if not config.guard_enabled:
        return state, Decision(action=Action.CONTINUE, reason=reason, lr_scale=state.lr_scale)
    skip_it = reason is not Reason.SPIKE or config.spike_action == "skip"
    if verdict.phase is Phase.GRADS and skip_it and state.consecutive_skips < config.guard_max_consecutive_skips:
        state = _replace(state, skipped_steps=state.skipped_steps + 1, consecutive_skips=state.consecutive_skips + 1)
        return state, Decision(action=Action.SKIP_STEP, reason=reason, lr_scale=state.lr_scale, detail=detail)
    state, decision = _rollback(state, reason, config)
    return state, _replace(decision, detail=detail)


def _tick(verdict: Verdict) -> int:
    return verdict.tick if verdict.tick is not None else verdict.step


def _healthy(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, Decision]:
    if verdict.phase is Phase.GRADS:
        if state.consecutive_skips:
            state = _replace(state, consecutive_skips=0)
        return state, Decision(action=Action.CONTINUE, lr_scale=state.lr_scale)
    # A step whose update was skipped is not evidence of health: snapshotting it would close a rollback
    # episode and refill the budget while the fault persists.
    tick = _tick(verdict)
    due = config.guard_enabled and not verdict.update_skipped and snapshot_due(tick, config)
    detail = None
    if _reacting(verdict, config):
        state, react, detail = _react(state, tick, config)
        due = due or (react and not verdict.update_skipped)
    action = Action.SNAPSHOT if due else Action.CONTINUE
    return state, Decision(action=action, lr_scale=state.lr_scale, detail=detail, capture=due)


def _reacting(verdict: Verdict, config: GradienceConfig) -> bool:
    return (config.risk_reactions and config.guard_enabled and verdict.phase is Phase.STEP
            and verdict.spectral_kappa is not None)


def _react(state: GuardState, tick: int, config: GradienceConfig) -> tuple[GuardState, bool, str | None]:
    """WARNING and DANGER reactions of a healthy probe step: (state, take a snapshot?, what was done)."""
    level = state.risk_level
    if level == RiskLevel.WARNING.value:
        state = _replace(state, burst_until=tick + config.risk_burst_steps)
        return state, True, f"spectral WARNING: snapshot, probing every step until step tick {state.burst_until}"
    if level == RiskLevel.DANGER.value:
        if state.risk_backoff_done:
            return state, True, "spectral DANGER: snapshot (LR already backed off in this episode)"
        state = _replace(state, lr_scale=state.lr_scale * config.guard_lr_backoff, risk_backoff_done=True)
        return state, True, f"spectral DANGER: snapshot and LR backoff to scale {state.lr_scale:g}"
    if state.risk_backoff_done:  # back to LEARNING or STABLE: the episode is over
        state = _replace(state, risk_backoff_done=False)
    return state, False, None


def _check_spike(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, str | None]:
    """Run the spike rule on the agreed loss and grad norm; the new state and, if it fired, why."""
    memory = state.spike_state
    if not isinstance(memory, spike.SpikeState):
        memory = spike.SpikeState.from_dict(memory) if memory else spike.SpikeState()
    # Logged spikes let the update go ahead: the run moved on, and so does the window.
    memory, fired = spike.check_spike(memory, loss=verdict.loss, grad_norm=verdict.grad_norm,
                                      rule=config.spike_rule(), accept_fired=config.spike_action == "log")
    state = _replace(state, spike_state=memory)
    return state, (fired.describe() if fired.fired else None)


def spectral_due(tick: int, config: GradienceConfig, state: GuardState | None = None) -> bool:
    """True when the step at ``tick`` of the guard's clock carries a spectral probe (every step during a
    WARNING burst)."""
    if not config.spectral_enabled:
        return False
    bursting = state is not None and state.burst_until is not None and tick <= state.burst_until
    return bursting or tick % config.spectral_interval == 0


def observe_spectral(state: GuardState, verdict: Verdict, config: GradienceConfig) -> GuardState:
    """Fold an agreed κ̃ into the history and the risk level (identical on every rank)."""
    if verdict.phase is not Phase.STEP or verdict.spectral_kappa is None:
        return state
    tick = _tick(verdict)
    bands = config.risk_bands()
    history = risk.append_history(state.kappa_history, tick, verdict.spectral_kappa, bands.window)
    reading = risk.risk_level(history, bands, tick=tick)
    return _replace(state, kappa_history=history, risk_level=reading.level.value)


def risk_reading(state: GuardState, config: GradienceConfig, tick: int) -> risk.RiskReading:
    """The risk level with its slope and volatility, from the state's history (for reports)."""
    return risk.risk_level(state.kappa_history, config.risk_bands(), tick=tick)


def snapshot_due(tick: int, config: GradienceConfig) -> bool:
    """True when the step at ``tick`` of the guard's clock is a snapshot step (if healthy)."""
    return tick % config.guard_snapshot_interval == 0


def _rollback(state: GuardState, reason: Reason, config: GradienceConfig) -> tuple[GuardState, Decision]:
    """Pick the rollback target, or halt. The rollback's own accounting (LR backoff, budget) happens in
    :func:`on_restored`, once a snapshot was put back: a rollback that restores nothing backs nothing off."""
    if state.episode_sid is not None:
        # A fault after restoring this snapshot and before any newer commit: the restore did not cure it.
        state = _count_failure(state, state.episode_sid)
    if state.episode_rollbacks >= config.guard_max_rollbacks:
        return _halt(state, Reason.ROLLBACK_BUDGET_EXHAUSTED)
    return _to_target(state, reason, config)


def _to_target(state: GuardState, reason: Reason, config: GradienceConfig) -> tuple[GuardState, Decision]:
    target = pick_target(state, config)
    if target is None:
        return _halt(state, Reason.NO_GOOD_SNAPSHOT)
    return state, Decision(action=Action.ROLLBACK, reason=reason, target_sid=target,
                           lr_scale=state.lr_scale * config.guard_lr_backoff)


def pick_target(state: GuardState, config: GradienceConfig) -> int | None:
    """Newest committed snapshot that has not failed ``guard_max_snapshot_failures`` times."""
    for sid in reversed(state.committed_sids):
        if state.failures(sid) < config.guard_max_snapshot_failures:
            return sid
    return None


def on_restored(state: GuardState, sid: int, config: GradienceConfig) -> GuardState:
    """Snapshot ``sid`` was put back on every rank: the rollback happened, with its LR backoff and budget."""
    return _replace(
        state,
        # The restored weights take κ̃ back to an old value: fitted across the jump, it would read as volatility.
        kappa_history=(),
        lr_scale=state.lr_scale * config.guard_lr_backoff,
        total_rollbacks=state.total_rollbacks + 1,
        episode_rollbacks=state.episode_rollbacks + 1,
        episode_sid=sid,
        consecutive_skips=0,
    )


def on_restore_failed(state: GuardState, sid: int, reason: Reason,
                      config: GradienceConfig) -> tuple[GuardState, Decision]:
    """Snapshot ``sid`` could not be read on some rank (missing, corrupt): drop it, try the next older for the
    same rollback (``reason``), or halt when none is left."""
    state = _replace(state, committed_sids=tuple(s for s in state.committed_sids if s != sid))
    return _to_target(state, reason, config)


def on_restore_crashed(state: GuardState) -> GuardState:
    """Putting a verified snapshot back raised on some rank: the model may be half-restored, nobody trains on."""
    return _halt(state, Reason.RESTORE_FAILED)[0]


def on_snapshot_begun(state: GuardState, sid: int, tick: int, config: GradienceConfig, *, confirmed: bool,
                      verified: bool = True, initial: bool = False) -> tuple[GuardState, Decision]:
    """The state of ``tick`` was captured as snapshot ``sid``; commit it now when nothing is left to judge (no
    commit lag, or ``initial``: the run's first target, taken before any step)."""
    pending = PendingSnapshot(sid=sid, tick=tick, commit_tick=tick + config.guard_snapshot_commit_lag,
                              confirmed=confirmed or initial, verified=verified)
    now = initial or (confirmed and config.guard_snapshot_commit_lag == 0)
    quiet = pending.commit_tick if confirmed and not initial else state.quiet_until
    return _replace(state, pending=pending, quiet_until=quiet), Decision(action=Action.CONTINUE, lr_scale=state.lr_scale,
                                                      commit_sid=sid if now else None)


def capture_ahead(state: GuardState, tick: int, config: GradienceConfig) -> Decision:
    """Asynchronous verdict: whether to copy the state of ``tick`` before it is judged (``capture``): a healthy
    verdict of it would make it a snapshot, or it carries a κ̃ probe while risk reactions are on (its verdict,
    with the κ̃ every rank agreed on, may call for a reaction's snapshot). Decided from what every rank holds
    alike, so every rank copies the same steps; not while an older snapshot still waits for its commit lag."""
    none = Decision(action=Action.CONTINUE, lr_scale=state.lr_scale)
    quiet = state.quiet_until is not None and tick <= state.quiet_until
    if state.halted or not config.guard_enabled or state.pending is not None or quiet:
        return none
    # A healthy, applied step is a snapshot on the schedule (what _healthy decides), or by a reaction to its κ̃.
    due = snapshot_due(tick, config) or (config.risk_reactions and spectral_due(tick, config, state))
    return _replace(none, capture=True) if due else none


def on_snapshot_committed(state: GuardState, sid: int, config: GradienceConfig, *,
                          verified: bool = True) -> GuardState:
    """Record a committed snapshot; a commit of a verified state after a recovery closes the rollback episode.

    ``verified`` is False when replica fingerprints are on but this state was not compared across ranks:
    it may already carry the divergence, so it must not refill the rollback budget.
    """
    committed = tuple(s for s in state.committed_sids if s != sid) + (sid,)
    pending = None if state.pending is not None and state.pending.sid == sid else state.pending
    state = _replace(state, committed_sids=committed, pending=pending)
    if verified:
        state = _replace(state, episode_sid=None, episode_rollbacks=0)
    keep = retained(state, config)
    failures = tuple(p for p in state.target_failures if p[0] in keep)
    return _replace(state, committed_sids=keep, target_failures=failures)


def on_snapshot_abandoned(state: GuardState, sid: int) -> GuardState:
    """Snapshot ``sid`` was dropped, or its commit failed on some rank: it is not a target."""
    pending = None if state.pending is not None and state.pending.sid == sid else state.pending
    return _replace(state, pending=pending, committed_sids=tuple(s for s in state.committed_sids if s != sid))


def on_snapshots_lost(state: GuardState, sids: set[int] | frozenset[int]) -> GuardState:
    """Committed snapshots that can no longer be restored (their write failed and their copy is gone)."""
    if not sids:
        return state
    return _replace(state, committed_sids=tuple(s for s in state.committed_sids if s not in sids))


def on_finalize(state: GuardState) -> Decision:
    """The run ended: a snapshot whose step was judged healthy commits (no fault can come after its commit
    lag); one taken ahead of a verdict that never came is dropped."""
    p = state.pending
    if p is None:
        return Decision(action=Action.CONTINUE, lr_scale=state.lr_scale)
    if p.confirmed:
        return Decision(action=Action.CONTINUE, lr_scale=state.lr_scale, commit_sid=p.sid)
    return Decision(action=Action.CONTINUE, lr_scale=state.lr_scale, abandon_sid=p.sid)


def on_fresh_start(state: GuardState) -> GuardState:
    """A new run cleared out_dir: a state loaded before ``initialize`` must not name the deleted snapshots."""
    return _replace(state, committed_sids=(), target_failures=(), episode_sid=None, pending=None)


def on_resume(saved: dict[str, Any] | None, committed_sids: tuple[int, ...]) -> GuardState:
    """The state a resumed run continues with: the one stored with the snapshot it restored (the state after
    that snapshot's commit), with the snapshots now on disk as targets."""
    state = GuardState.from_dict(saved or {})
    return _replace(state, committed_sids=tuple(committed_sids), episode_sid=None, pending=None, halted=False,
                    halt_reason=None)


def on_checkpoint_loaded(saved: dict[str, Any], live: GuardState | None) -> GuardState:
    """A guard state from the loop's own checkpoint. After ``initialize`` (``live`` given) the snapshots on
    record stay this run's: the checkpoint names snapshots of another run, which a rollback could never load."""
    state = GuardState.from_dict(saved)
    if live is None:
        return state
    return _replace(state, committed_sids=live.committed_sids, target_failures=live.target_failures,
                    episode_sid=live.episode_sid, pending=live.pending)


def on_probe_errors(state: GuardState, phase: Phase, error: bool, config: GradienceConfig
                    ) -> tuple[GuardState, bool]:
    """Count one agreed probe result of ``phase``; (state, whether the check was switched off now). After
    ``probe_error_limit`` errors in a row the check is switched off on every rank (the count is agreed)."""
    i = 0 if phase is Phase.GRADS else 1
    streaks = list(state.probe_error_streaks)
    if not error:
        if not streaks[i]:
            return state, False
        streaks[i] = 0
        return _replace(state, probe_error_streaks=tuple(streaks)), False
    streaks[i] += 1
    off = streaks[i] >= config.probe_error_limit and phase.value not in state.disabled_checks
    disabled = state.disabled_checks + ((phase.value,) if off else ())
    return _replace(state, probe_error_streaks=tuple(streaks), disabled_checks=disabled), off


def on_verdict_path(state: GuardState, path: str) -> GuardState:
    """The step's verdict runs ``path`` ("sync" or "async")."""
    return state if state.verdict_path == path else _replace(state, verdict_path=path)


def on_abort(state: GuardState, reason: Reason) -> GuardState:
    """A guard collective failed or the process is being stopped: the run ends here, on this rank."""
    return state if state.halted else _halt(state, reason)[0]


def retained(state: GuardState, config: GradienceConfig) -> tuple[int, ...]:
    """Snapshots to keep: the newest ``guard_snapshot_keep``, plus the newest one that never failed."""
    keep = list(state.committed_sids[-config.guard_snapshot_keep :])
    if all(state.failures(s) > 0 for s in keep):
        clean = [s for s in state.committed_sids if state.failures(s) == 0]
        if clean and clean[-1] not in keep:
            keep.insert(0, clean[-1])
    if state.episode_sid is not None and state.episode_sid in state.committed_sids:
        keep.append(state.episode_sid)
    return tuple(sorted(set(keep)))


def _count_failure(state: GuardState, sid: int) -> GuardState:
    failures = dict(state.target_failures)
    failures[sid] = failures.get(sid, 0) + 1
    return _replace(state, target_failures=tuple(sorted(failures.items())))


def _halt(state: GuardState, reason: Reason) -> tuple[GuardState, Decision]:
    state = _replace(state, halted=True, halt_reason=reason)
    return state, Decision(action=Action.HALT, reason=reason, lr_scale=state.lr_scale)
