"""The guard's decisions: pure functions of (GuardState, Verdict, GradienceConfig). No torch, IO or clock.

Every rank calls these with the same agreed inputs, so every rank reaches the same Decision without a
broadcast. The controller carries decisions out and reports back through ``on_*`` functions.
"""

from __future__ import annotations

import dataclasses

from gradience import risk, spike
from gradience.config import GradienceConfig
from gradience.types import Action, Decision, GuardState, Phase, Reason, RiskLevel, Verdict


def decide(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, Decision]:
    """Decide what to do with one phase of one step."""
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
    if reason is None:
        return _healthy(state, verdict, config)
    if reason is Reason.PROBE_ERROR:
        # A probe that raised is a defect of the guard, not a fault of the run: rolling back would not cure
        # it and would break a healthy run again and again. No snapshot either: the state was not checked.
        return state, Decision(action=Action.CONTINUE, reason=reason, lr_scale=state.lr_scale)
    if state.first_fault_step is None:
        state = dataclasses.replace(
            state, first_fault_step=verdict.step, first_fault_ranks=verdict.faulty_ranks
        )
    if not config.guard_enabled:
        return state, Decision(action=Action.CONTINUE, reason=reason, lr_scale=state.lr_scale)
    skip_it = reason is not Reason.SPIKE or config.spike_action == "skip"
    if verdict.phase is Phase.GRADS and skip_it and state.consecutive_skips < config.guard_max_consecutive_skips:
        state = dataclasses.replace(
            state, skipped_steps=state.skipped_steps + 1, consecutive_skips=state.consecutive_skips + 1
        )
        return state, Decision(action=Action.SKIP_STEP, reason=reason, lr_scale=state.lr_scale, detail=detail)
    state, decision = _rollback(state, reason, config)
    return state, dataclasses.replace(decision, detail=detail)


def _healthy(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, Decision]:
    if verdict.phase is Phase.GRADS:
        if state.consecutive_skips:
            state = dataclasses.replace(state, consecutive_skips=0)
        return state, Decision(action=Action.CONTINUE, lr_scale=state.lr_scale)
    # A step whose update was skipped is not evidence of health: snapshotting it would close a rollback
    # episode and refill the budget while the fault persists.
    tick = verdict.tick if verdict.tick is not None else verdict.step
    due = config.guard_enabled and not verdict.update_skipped and snapshot_due(tick, config)
    detail = None
    if _reacting(verdict, config):
        state, react, detail = _react(state, tick, config)
        due = due or (react and not verdict.update_skipped)
    action = Action.SNAPSHOT if due else Action.CONTINUE
    return state, Decision(action=action, lr_scale=state.lr_scale, detail=detail)


def _reacting(verdict: Verdict, config: GradienceConfig) -> bool:
    return (config.risk_reactions and config.guard_enabled and verdict.phase is Phase.STEP
            and verdict.spectral_kappa is not None)


def _react(state: GuardState, tick: int, config: GradienceConfig) -> tuple[GuardState, bool, str | None]:
    """WARNING and DANGER reactions of a healthy probe step: (state, take a snapshot?, what was done)."""
    level = state.risk_level
    if level == RiskLevel.WARNING.value:
        state = dataclasses.replace(state, burst_until=tick + config.risk_burst_steps)
        return state, True, f"spectral WARNING: snapshot, probing every step until step tick {state.burst_until}"
    if level == RiskLevel.DANGER.value:
        if state.risk_backoff_done:
            return state, True, "spectral DANGER: snapshot (LR already backed off in this episode)"
        state = dataclasses.replace(state, lr_scale=state.lr_scale * config.guard_lr_backoff, risk_backoff_done=True)
        return state, True, f"spectral DANGER: snapshot and LR backoff to scale {state.lr_scale:g}"
    if state.risk_backoff_done:  # back to LEARNING or STABLE: the episode is over
        state = dataclasses.replace(state, risk_backoff_done=False)
    return state, False, None


def _check_spike(state: GuardState, verdict: Verdict, config: GradienceConfig) -> tuple[GuardState, str | None]:
    """Run the spike rule on the agreed loss and grad norm; the new state and, if it fired, why."""
    memory = state.spike_state
    if not isinstance(memory, spike.SpikeState):
        memory = spike.SpikeState.from_dict(memory) if memory else spike.SpikeState()
    # Logged spikes let the update go ahead: the run moved on, and so does the window.
    memory, fired = spike.check_spike(memory, loss=verdict.loss, grad_norm=verdict.grad_norm,
                                      rule=config.spike_rule(), accept_fired=config.spike_action == "log")
    state = dataclasses.replace(state, spike_state=memory)
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
    tick = verdict.tick if verdict.tick is not None else verdict.step
    bands = config.risk_bands()
    history = risk.append_history(state.kappa_history, tick, verdict.spectral_kappa, bands.window)
    reading = risk.risk_level(history, bands, tick=tick)
    return dataclasses.replace(state, kappa_history=history, risk_level=reading.level.value)


def risk_reading(state: GuardState, config: GradienceConfig, tick: int) -> risk.RiskReading:
    """The risk level with its slope and volatility, from the state's history (for reports)."""
    return risk.risk_level(state.kappa_history, config.risk_bands(), tick=tick)


def snapshot_due(tick: int, config: GradienceConfig) -> bool:
    """True when the step at ``tick`` of the guard's clock is a snapshot step (if healthy)."""
    return tick % config.guard_snapshot_interval == 0


def _rollback(state: GuardState, reason: Reason, config: GradienceConfig) -> tuple[GuardState, Decision]:
    if state.episode_target is not None:
        # A fault after restoring this snapshot and before any newer commit: the restore did not cure it.
        state = _count_failure(state, state.episode_target)
    if state.episode_rollbacks >= config.guard_max_rollbacks:
        return _halt(state, Reason.ROLLBACK_BUDGET_EXHAUSTED)
    target = pick_target(state, config)
    if target is None:
        return _halt(state, Reason.NO_GOOD_SNAPSHOT)
    state = dataclasses.replace(
        state,
        # The restored weights take κ̃ back to an old value: fitted across the jump, it would read as volatility.
        kappa_history=(),
        lr_scale=state.lr_scale * config.guard_lr_backoff,
        total_rollbacks=state.total_rollbacks + 1,
        episode_rollbacks=state.episode_rollbacks + 1,
        episode_target=target,
        consecutive_skips=0,
    )
    return state, Decision(action=Action.ROLLBACK, reason=reason, target_step=target, lr_scale=state.lr_scale)


def pick_target(state: GuardState, config: GradienceConfig) -> int | None:
    """Newest committed snapshot that has not failed ``guard_max_snapshot_failures`` times."""
    for step in reversed(state.committed):
        if state.failures(step) < config.guard_max_snapshot_failures:
            return step
    return None


def on_restore_failed(state: GuardState, step: int, config: GradienceConfig) -> tuple[GuardState, Decision]:
    """Snapshot ``step`` could not be restored on some rank (missing, corrupt): drop it, try the next older.

    This continues the same rollback, so it costs no extra budget and no extra LR backoff.
    """
    committed = tuple(s for s in state.committed if s != step)
    state = dataclasses.replace(state, committed=committed)
    target = pick_target(state, config)
    if target is None:
        return _halt(state, Reason.NO_GOOD_SNAPSHOT)
    state = dataclasses.replace(state, episode_target=target)
    return state, Decision(
        action=Action.ROLLBACK, reason=Reason.NO_GOOD_SNAPSHOT, target_step=target, lr_scale=state.lr_scale
    )


def on_snapshot_committed(state: GuardState, step: int, config: GradienceConfig, *,
                          verified: bool = True) -> GuardState:
    """Record a committed snapshot; a commit of a verified state after a recovery closes the rollback episode.

    ``verified`` is False when replica fingerprints are on but this state was not compared across ranks:
    it may already carry the divergence, so it must not refill the rollback budget.
    """
    committed = tuple(s for s in state.committed if s != step) + (step,)
    state = dataclasses.replace(state, committed=committed)
    if verified:
        state = dataclasses.replace(state, episode_target=None, episode_rollbacks=0)
    keep = retained(state, config)
    failures = tuple(p for p in state.target_failures if p[0] in keep)
    return dataclasses.replace(state, committed=keep, target_failures=failures)


def retained(state: GuardState, config: GradienceConfig) -> tuple[int, ...]:
    """Snapshots to keep: the newest ``guard_snapshot_keep``, plus the newest one that never failed."""
    keep = list(state.committed[-config.guard_snapshot_keep :])
    if all(state.failures(s) > 0 for s in keep):
        clean = [s for s in state.committed if state.failures(s) == 0]
        if clean and clean[-1] not in keep:
            keep.insert(0, clean[-1])
    if state.episode_target is not None and state.episode_target in state.committed:
        keep.append(state.episode_target)
    return tuple(sorted(set(keep)))


def _count_failure(state: GuardState, step: int) -> GuardState:
    failures = dict(state.target_failures)
    failures[step] = failures.get(step, 0) + 1
    return dataclasses.replace(state, target_failures=tuple(sorted(failures.items())))


def _halt(state: GuardState, reason: Reason) -> tuple[GuardState, Decision]:
    state = dataclasses.replace(state, halted=True, halt_reason=reason)
    return state, Decision(action=Action.HALT, reason=reason, lr_scale=state.lr_scale)
