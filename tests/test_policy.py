"""policy.decide and friends: decision tables, rollback episodes, and properties over random event streams.

The policy is pure (no torch, IO or clock), so everything here runs in microseconds per decision.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradience import policy
from gradience.config import GradienceConfig
from gradience.types import Action, Decision, GuardState, Phase, Reason, Verdict

CFG = GradienceConfig(
    guard_snapshot_interval=10,
    guard_max_rollbacks=3,
    guard_lr_backoff=0.5,
    guard_max_consecutive_skips=3,
    guard_snapshot_keep=2,
    guard_max_snapshot_failures=2,
)
MONITOR = CFG.replace(guard_enabled=False)


def grads(step: int = 11, **flags) -> Verdict:
    return Verdict(phase=Phase.GRADS, step=step, **flags)


def after(step: int = 11, **flags) -> Verdict:
    return Verdict(phase=Phase.STEP, step=step, **flags)


def act(state: GuardState, verdict: Verdict, config: GradienceConfig = CFG) -> tuple[GuardState, object]:
    """decide, then what the executor reports back when a rollback restored its target (``on_restored``)."""
    s, d = policy.decide(state, verdict, config)
    if d.action is Action.ROLLBACK:
        s = policy.on_restored(s, d.target_sid, config)
    return s, d


def with_snaps(*steps: int, **fields) -> GuardState:
    return GuardState(committed_sids=tuple(steps), **fields)


# ------------------------------------------------------------------------------------------------ vocabulary


@pytest.mark.parametrize(
    "name",
    ["NONFINITE_WEIGHTS", "NONFINITE_GRADS", "NONFINITE_LOSS", "VIOLATION_THRESHOLD", "SPECTRAL_INSTABILITY",
     "ROLLBACK_BUDGET_EXHAUSTED", "NO_GOOD_SNAPSHOT"],
)
def test_reason_vocabulary(name):
    assert Reason(name).value == name
    assert Reason[name] == name  # str enum: telemetry writes the value verbatim


def test_action_values():
    assert {a.value for a in Action} == {"continue", "skip_step", "snapshot", "rollback", "halt"}


# ------------------------------------------------------------------------------------------------ fault_reason

FAULT_REASONS = [
    (grads(), None),
    (grads(nonfinite_grads=True), Reason.NONFINITE_GRADS),
    (grads(violation_grads=True), Reason.VIOLATION_THRESHOLD),
    (grads(probe_error=True), Reason.PROBE_ERROR),
    (grads(nonfinite_grads=True, violation_grads=True, probe_error=True), Reason.NONFINITE_GRADS),
    (after(), None),
    (after(nonfinite_weights=True), Reason.NONFINITE_WEIGHTS),
    (after(nonfinite_weights=True, nonfinite_loss=True, violation_weights=True), Reason.NONFINITE_WEIGHTS),
    (after(replica_divergence=True), Reason.REPLICA_DIVERGENCE),
    (after(violation_weights=True), Reason.VIOLATION_THRESHOLD),
    (after(nonfinite_loss=True), Reason.NONFINITE_LOSS),
    (after(nonfinite_loss=True, update_skipped=True), None),
    (after(violation_loss=True), Reason.VIOLATION_THRESHOLD),
    (after(violation_loss=True, update_skipped=True), None),
    (after(nonfinite_weights=True, update_skipped=True), Reason.NONFINITE_WEIGHTS),
    (after(probe_error=True), Reason.PROBE_ERROR),
    (after(probe_error=True, update_skipped=True), Reason.PROBE_ERROR),
]


@pytest.mark.parametrize(("verdict", "reason"), FAULT_REASONS)
def test_fault_reason(verdict, reason):
    assert verdict.fault_reason() is reason


# ------------------------------------------------------------------------------------------------ decide table

DECIDE_TABLE = [
    # id, state, verdict, config, action, reason, target, lr_scale
    ("healthy_grads", with_snaps(0), grads(10), CFG, Action.CONTINUE, None, None, 1.0),
    ("healthy_step_on_interval", with_snaps(0), after(10), CFG, Action.SNAPSHOT, None, None, 1.0),
    ("healthy_step_zero", with_snaps(), after(0), CFG, Action.SNAPSHOT, None, None, 1.0),
    ("healthy_step_off_interval", with_snaps(0), after(11), CFG, Action.CONTINUE, None, None, 1.0),
    ("healthy_keeps_scale", with_snaps(0, lr_scale=0.25), after(20), CFG, Action.SNAPSHOT, None, None, 0.25),
    ("monitor_no_snapshot", with_snaps(0), after(10), MONITOR, Action.CONTINUE, None, None, 1.0),
    ("grads_nan_skip", with_snaps(0), grads(nonfinite_grads=True), CFG,
     Action.SKIP_STEP, Reason.NONFINITE_GRADS, None, 1.0),
    ("grads_violation_skip", with_snaps(0), grads(violation_grads=True), CFG,
     Action.SKIP_STEP, Reason.VIOLATION_THRESHOLD, None, 1.0),
    # A raising probe is the guard's defect, not the run's fault: no skip, no rollback, no snapshot.
    ("grads_probe_error_continue", with_snaps(0), grads(probe_error=True), CFG,
     Action.CONTINUE, Reason.PROBE_ERROR, None, 1.0),
    ("grads_skip_nothing_committed", with_snaps(), grads(nonfinite_grads=True), CFG,
     Action.SKIP_STEP, Reason.NONFINITE_GRADS, None, 1.0),
    ("grads_skips_exhausted_rollback", with_snaps(0, 10, consecutive_skips=3), grads(nonfinite_grads=True), CFG,
     Action.ROLLBACK, Reason.NONFINITE_GRADS, 10, 0.5),
    ("weights_nan_rollback", with_snaps(0, 10), after(nonfinite_weights=True), CFG,
     Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 10, 0.5),
    ("weights_nan_rollback_compounds", with_snaps(0, 10, lr_scale=0.25), after(nonfinite_weights=True), CFG,
     Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 10, 0.125),
    ("weights_nan_backoff_one", with_snaps(0), after(nonfinite_weights=True), CFG.replace(guard_lr_backoff=1.0),
     Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 0, 1.0),
    ("weights_violation_rollback", with_snaps(0, 10), after(violation_weights=True), CFG,
     Action.ROLLBACK, Reason.VIOLATION_THRESHOLD, 10, 0.5),
    ("loss_nan_rollback", with_snaps(0, 10), after(nonfinite_loss=True), CFG,
     Action.ROLLBACK, Reason.NONFINITE_LOSS, 10, 0.5),
    ("loss_nan_update_skipped", with_snaps(0, 10), after(11, nonfinite_loss=True, update_skipped=True), CFG,
     Action.CONTINUE, None, None, 1.0),
    ("loss_violation_update_skipped", with_snaps(0, 10), after(11, violation_loss=True, update_skipped=True), CFG,
     Action.CONTINUE, None, None, 1.0),
    ("divergence_rollback", with_snaps(0, 10), after(replica_divergence=True), CFG,
     Action.ROLLBACK, Reason.REPLICA_DIVERGENCE, 10, 0.5),
    ("step_probe_error_continue", with_snaps(0, 10), after(20, probe_error=True), CFG,
     Action.CONTINUE, Reason.PROBE_ERROR, None, 1.0),
    ("skip_failed_target", with_snaps(0, 10, target_failures=((10, 2),)), after(nonfinite_weights=True), CFG,
     Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 0, 0.5),
    ("once_failed_target_still_ok", with_snaps(0, 10, target_failures=((10, 1),)), after(nonfinite_weights=True),
     CFG, Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 10, 0.5),
    ("nothing_committed", with_snaps(), after(nonfinite_weights=True), CFG,
     Action.HALT, Reason.NO_GOOD_SNAPSHOT, None, 1.0),
    ("all_targets_failed", with_snaps(0, 10, target_failures=((0, 2), (10, 3))), after(nonfinite_weights=True), CFG,
     Action.HALT, Reason.NO_GOOD_SNAPSHOT, None, 1.0),
    ("zero_rollback_budget", with_snaps(0), after(nonfinite_weights=True), CFG.replace(guard_max_rollbacks=0),
     Action.HALT, Reason.ROLLBACK_BUDGET_EXHAUSTED, None, 1.0),
    ("budget_spent", with_snaps(0, episode_rollbacks=3, episode_sid=0, lr_scale=0.125),
     after(nonfinite_weights=True), CFG, Action.HALT, Reason.ROLLBACK_BUDGET_EXHAUSTED, None, 0.125),
    ("monitor_weights", with_snaps(0), after(nonfinite_weights=True), MONITOR,
     Action.CONTINUE, Reason.NONFINITE_WEIGHTS, None, 1.0),
    ("monitor_grads", with_snaps(0), grads(nonfinite_grads=True), MONITOR,
     Action.CONTINUE, Reason.NONFINITE_GRADS, None, 1.0),
    ("monitor_loss", with_snaps(), after(nonfinite_loss=True), MONITOR,
     Action.CONTINUE, Reason.NONFINITE_LOSS, None, 1.0),
    ("halted_absorbs_healthy", with_snaps(0, halted=True, halt_reason=Reason.NO_GOOD_SNAPSHOT), after(10), CFG,
     Action.HALT, Reason.NO_GOOD_SNAPSHOT, None, 1.0),
    ("halted_absorbs_fault", with_snaps(0, halted=True, halt_reason=Reason.ROLLBACK_BUDGET_EXHAUSTED,
                                        lr_scale=0.5),
     grads(nonfinite_grads=True), CFG, Action.HALT, Reason.ROLLBACK_BUDGET_EXHAUSTED, None, 0.5),
]


@pytest.mark.parametrize(
    ("state", "verdict", "config", "action", "reason", "target", "lr_scale"),
    [case[1:] for case in DECIDE_TABLE],
    ids=[case[0] for case in DECIDE_TABLE],
)
def test_decide_table(state, verdict, config, action, reason, target, lr_scale):
    new, d = act(state, verdict, config)
    assert d.action is action
    assert d.reason is reason
    assert d.target_sid == target
    assert d.lr_scale == lr_scale == new.lr_scale
    if action is Action.ROLLBACK:
        assert new.total_rollbacks == state.total_rollbacks + 1
        assert new.episode_rollbacks == state.episode_rollbacks + 1
        assert new.episode_sid == target
        assert new.consecutive_skips == 0
    else:
        assert new.total_rollbacks == state.total_rollbacks
    if action is Action.SKIP_STEP:
        assert new.skipped_steps == state.skipped_steps + 1
        assert new.consecutive_skips == state.consecutive_skips + 1
    if action is Action.HALT:
        assert new.halted and new.halt_reason is reason
    if state.halted:
        assert new is state
    if not config.guard_enabled:
        assert (new.skipped_steps, new.total_rollbacks, new.lr_scale) == (0, 0, 1.0)


def test_monitor_mode_records_first_fault_but_never_acts():
    s = with_snaps(0)
    s, d = policy.decide(s, after(5, nonfinite_weights=True, faulty_ranks=(1,)), MONITOR)
    assert (d.action, d.reason) == (Action.CONTINUE, Reason.NONFINITE_WEIGHTS)
    assert (s.first_fault_step, s.first_fault_ranks) == (5, (1,))
    for step in range(6, 40):
        s, d = policy.decide(s, grads(step, nonfinite_grads=True), MONITOR)
        assert d.action is Action.CONTINUE and d.reason is Reason.NONFINITE_GRADS
        s, d = policy.decide(s, after(step, nonfinite_weights=True), MONITOR)
        assert d.action is Action.CONTINUE and d.reason is Reason.NONFINITE_WEIGHTS
    assert s == with_snaps(0, first_fault_step=5, first_fault_ranks=(1,))


def test_first_fault_recorded_once():
    s = with_snaps(0, 10)
    s, _ = policy.decide(s, grads(12, nonfinite_grads=True, faulty_ranks=(2,)), CFG)
    s, _ = policy.decide(s, after(15, nonfinite_weights=True, faulty_ranks=(0, 1)), CFG)
    assert (s.first_fault_step, s.first_fault_ranks) == (12, (2,))


def test_healthy_grads_reset_consecutive_skips():
    s = with_snaps(0, consecutive_skips=2, skipped_steps=2)
    s, d = policy.decide(s, grads(12), CFG)
    assert d.action is Action.CONTINUE
    assert (s.consecutive_skips, s.skipped_steps) == (0, 2)


# ------------------------------------------------------------------------------------------------ scenarios


def test_skips_escalate_to_rollback_after_max_consecutive():
    s = with_snaps(0, 10)
    for i in range(CFG.guard_max_consecutive_skips):
        s, d = policy.decide(s, grads(11 + i, nonfinite_grads=True), CFG)
        assert d.action is Action.SKIP_STEP and d.reason is Reason.NONFINITE_GRADS
        assert s.consecutive_skips == i + 1
        s, d = policy.decide(s, after(11 + i, nonfinite_loss=True, update_skipped=True), CFG)
        assert d.action is Action.CONTINUE
    s, d = act(s, grads(14, nonfinite_grads=True))
    assert (d.action, d.reason, d.target_sid, d.lr_scale) == (Action.ROLLBACK, Reason.NONFINITE_GRADS, 10, 0.5)
    assert s.consecutive_skips == 0 and s.skipped_steps == 3 and s.total_rollbacks == 1
    # the counter starts over after the rollback
    s, d = policy.decide(s, grads(15, nonfinite_grads=True), CFG)
    assert d.action is Action.SKIP_STEP


def test_interleaved_healthy_updates_never_escalate():
    s = with_snaps(0)
    for step in range(1, 60):
        s, d = policy.decide(s, grads(step, nonfinite_grads=step % 2 == 0), CFG)
        assert d.action in (Action.SKIP_STEP, Action.CONTINUE)
    assert s.total_rollbacks == 0 and s.skipped_steps == 29


def test_rollback_episode_until_budget_exhausted():
    s = with_snaps(0, 10)
    bad = after(nonfinite_weights=True)
    s, d = act(s, bad, CFG)
    assert (d.action, d.target_sid, d.lr_scale) == (Action.ROLLBACK, 10, 0.5)
    assert (s.episode_rollbacks, s.episode_sid, s.failures(10)) == (1, 10, 0)
    # a fault before any newer commit: the restore of 10 did not cure it
    s, d = act(s, bad, CFG)
    assert (d.action, d.target_sid, d.lr_scale) == (Action.ROLLBACK, 10, 0.25)
    assert s.failures(10) == 1
    s, d = act(s, bad, CFG)
    # 10 has now failed guard_max_snapshot_failures times: the next older snapshot is the target
    assert (d.action, d.target_sid, d.lr_scale) == (Action.ROLLBACK, 0, 0.125)
    assert s.failures(10) == 2 and s.episode_rollbacks == 3
    s, d = act(s, bad, CFG)
    assert (d.action, d.reason) == (Action.HALT, Reason.ROLLBACK_BUDGET_EXHAUSTED)
    assert s.halted and s.total_rollbacks == 3 and s.lr_scale == 0.125
    frozen = s
    for v in (after(30), grads(31), after(31, nonfinite_weights=True)):
        s, d = policy.decide(s, v, CFG)
        assert (d.action, d.reason, d.lr_scale) == (Action.HALT, Reason.ROLLBACK_BUDGET_EXHAUSTED, 0.125)
        assert s is frozen


def test_episode_closes_on_snapshot_committed():
    s = with_snaps(0, 10)
    s, d = act(s, after(12, nonfinite_weights=True), CFG)
    s, _ = act(s, after(13, nonfinite_weights=True), CFG)
    assert (s.episode_rollbacks, s.episode_sid, s.failures(10)) == (2, 10, 1)
    s, d = act(s, after(20), CFG)
    assert d.action is Action.SNAPSHOT
    s = policy.on_snapshot_committed(s, 20, CFG)
    assert s.episode_rollbacks == 0 and s.episode_sid is None
    assert s.committed_sids == (10, 20)
    assert s.total_rollbacks == 2 and s.lr_scale == 0.25  # history and backoff survive the episode
    # a new fault is a new episode with a fresh budget, targeting the new snapshot without counting a failure
    targets = []
    for i in range(CFG.guard_max_rollbacks):
        s, d = act(s, after(21 + i, nonfinite_weights=True), CFG)
        assert d.action is Action.ROLLBACK
        targets.append(d.target_sid)
    # 20 fails twice, then the retained 10 (one failure carried over from the old episode) is tried
    assert targets == [20, 20, 10]
    assert (s.failures(20), s.failures(10), s.lr_scale) == (2, 1, 0.25 * 0.5**3)
    s, d = act(s, after(30, nonfinite_weights=True), CFG)
    assert d.action is Action.HALT and d.reason is Reason.ROLLBACK_BUDGET_EXHAUSTED
    assert s.failures(10) == 2


def test_commit_without_episode_does_not_touch_counters():
    s = with_snaps(0, total_rollbacks=4, lr_scale=0.5, skipped_steps=7)
    s2 = policy.on_snapshot_committed(s, 10, CFG)
    assert s2 == dataclasses.replace(s, committed_sids=(0, 10))


def test_on_restore_failed_moves_to_next_older_and_a_rollback_that_restores_nothing_backs_nothing_off():
    s = with_snaps(0, 10, 20)
    s, d = policy.decide(s, after(25, nonfinite_weights=True), CFG)
    # The backoff and the budget are the restore's: decided here, applied by on_restored.
    assert (d.target_sid, d.lr_scale, s.total_rollbacks, s.episode_rollbacks, s.lr_scale) == (20, 0.5, 0, 0, 1.0)
    s, d = policy.on_restore_failed(s, 20, Reason.NONFINITE_WEIGHTS, CFG)
    assert (d.action, d.reason, d.target_sid, d.lr_scale) == (Action.ROLLBACK, Reason.NONFINITE_WEIGHTS, 10, 0.5)
    assert s.committed_sids == (0, 10)
    restored = policy.on_restored(s, 10, CFG)
    assert (restored.total_rollbacks, restored.episode_rollbacks, restored.episode_sid, restored.lr_scale) == (
        1, 1, 10, 0.5)
    s, d = policy.on_restore_failed(s, 10, Reason.NONFINITE_WEIGHTS, CFG)
    assert (d.action, d.target_sid, d.lr_scale, s.committed_sids) == (Action.ROLLBACK, 0, 0.5, (0,))
    s, d = policy.on_restore_failed(s, 0, Reason.NONFINITE_WEIGHTS, CFG)
    assert (d.action, d.reason) == (Action.HALT, Reason.NO_GOOD_SNAPSHOT)
    assert s.halted and s.committed_sids == () and s.lr_scale == 1.0 and s.total_rollbacks == 0


def test_on_restore_failed_skips_exhausted_targets():
    s = with_snaps(0, 10, 20, target_failures=((10, 2),), episode_sid=20, episode_rollbacks=1)
    s, d = policy.on_restore_failed(s, 20, Reason.NONFINITE_WEIGHTS, CFG)
    assert d.target_sid == 0


# ------------------------------------------------------------------------------------------------ retention


@pytest.mark.parametrize(
    ("committed", "failures", "episode_sid", "keep", "expected"),
    [
        ((0, 10, 20, 30), (), None, 2, (20, 30)),
        ((0, 10, 20, 30), (), None, 1, (30,)),
        ((0, 10, 20, 30), (), None, 10, (0, 10, 20, 30)),
        ((10,), (), None, 2, (10,)),
        ((), (), None, 2, ()),
        # newest kept both failed: the newest clean one is kept as well
        ((0, 10, 20, 30), ((20, 1), (30, 1)), None, 2, (10, 20, 30)),
        ((0, 10, 20, 30), ((10, 1), (20, 1), (30, 1)), None, 2, (0, 20, 30)),
        # one of the newest is clean: nothing extra
        ((0, 10, 20, 30), ((30, 1),), None, 2, (20, 30)),
        # nothing clean anywhere: just the newest
        ((0, 10), ((0, 1), (10, 1)), None, 1, (10,)),
        # the snapshot the current episode restored is kept while the episode is open
        ((0, 10, 20, 30), (), 0, 2, (0, 20, 30)),
        ((0, 10, 20, 30), (), 30, 2, (20, 30)),
        ((0, 10, 20, 30), (), 99, 2, (20, 30)),
    ],
)
def test_retained(committed, failures, episode_sid, keep, expected):
    s = GuardState(committed_sids=committed, target_failures=failures, episode_sid=episode_sid)
    assert policy.retained(s, CFG.replace(guard_snapshot_keep=keep)) == expected


def test_on_snapshot_committed_prunes_and_forgets_dropped_failures():
    s = with_snaps(0, 10, 20, target_failures=((0, 1), (10, 1), (20, 1)))
    s = policy.on_snapshot_committed(s, 30, CFG)
    assert s.committed_sids == (20, 30)
    assert s.target_failures == ((20, 1),)


def test_on_snapshot_committed_same_step_not_duplicated():
    s = policy.on_snapshot_committed(with_snaps(0, 10), 10, CFG)
    assert s.committed_sids == (0, 10)


# ------------------------------------------------------------------------------------------------ anti-thrash


def test_persistent_grad_fault_halts_even_with_frequent_snapshots():
    """NaN gradients on every step (bad data, broken loss scale) must end in a halt, not endless rollbacks.

    Mirrors the controller: the gradient gate decides first; the step phase then reports update_skipped=True
    (the update was dropped) and a SNAPSHOT decision is carried out and committed. A step whose update was
    skipped is not a healthy step, so it must not commit a "recovery" snapshot that closes the episode and
    refills the rollback budget (configs/aggressive.yaml uses interval 10 and 3 skips).
    """
    cfg = CFG.replace(guard_snapshot_interval=10, guard_max_consecutive_skips=3, guard_max_rollbacks=3)
    s = policy.on_snapshot_committed(GuardState(), -1, cfg)
    bound = (cfg.guard_max_rollbacks + 1) * (cfg.guard_max_consecutive_skips + 1) + cfg.guard_snapshot_interval
    for step in range(10 * bound):
        s, d = act(s, grads(step, nonfinite_grads=True), cfg)
        if d.action is Action.HALT:
            break
        s, d = act(s, after(step, nonfinite_loss=True, update_skipped=True), cfg)
        if d.action is Action.SNAPSHOT:
            s = policy.on_snapshot_committed(s, step, cfg)
    assert s.halted, (
        f"still running after {10 * bound} steps of NaN gradients: {s.total_rollbacks} rollbacks, "
        f"lr_scale {s.lr_scale:g}"
    )
    # Skipped steps commit nothing, so the initial snapshot stays the only target; after failing twice it is
    # abandoned and nothing is left.
    assert (s.halt_reason, s.total_rollbacks, s.committed_sids) == (Reason.NO_GOOD_SNAPSHOT, 2, (-1,))


# ------------------------------------------------------------------------------------------------ GuardState


FULL_STATE = GuardState(
    lr_scale=0.125,
    total_rollbacks=5,
    episode_rollbacks=2,
    skipped_steps=9,
    consecutive_skips=1,
    committed_sids=(-1, 40, 50),
    target_failures=((40, 1), (50, 2)),
    episode_sid=40,
    halted=True,
    halt_reason=Reason.ROLLBACK_BUDGET_EXHAUSTED,
    first_fault_step=33,
    first_fault_ranks=(0, 3),
)


@pytest.mark.parametrize("state", [GuardState(), FULL_STATE], ids=["default", "full"])
def test_guard_state_round_trip(state):
    d = state.to_dict()
    assert GuardState.from_dict(d) == state
    text = json.dumps(d, allow_nan=False)
    back = GuardState.from_dict(json.loads(text))
    assert back == state
    assert back.failures(50) == state.failures(50)
    assert isinstance(back.committed_sids, tuple) and isinstance(back.target_failures, tuple)
    assert all(isinstance(p, tuple) for p in back.target_failures)


def test_guard_state_to_dict_is_plain_json():
    d = FULL_STATE.to_dict()
    assert d["halt_reason"] == "ROLLBACK_BUDGET_EXHAUSTED"
    assert d["committed_sids"] == [-1, 40, 50]
    assert d["target_failures"] == [[40, 1], [50, 2]]
    assert d["first_fault_ranks"] == [0, 3]
    assert set(d) == {f.name for f in dataclasses.fields(GuardState)}


def test_guard_state_from_partial_dict_uses_defaults():
    assert GuardState.from_dict({"lr_scale": 0.5}) == GuardState(lr_scale=0.5)
    assert GuardState.from_dict({}) == GuardState()


def test_guard_state_rejects_unknown_keys():
    d = GuardState().to_dict()
    d["lr_scael"] = 0.5
    with pytest.raises(ValueError, match="lr_scael"):
        GuardState.from_dict(d)


def test_guard_state_rejects_bad_reason():
    with pytest.raises(ValueError):
        GuardState.from_dict({"halt_reason": "BORED"})


# ------------------------------------------------------------------------------------------------ properties

# None = healthy; repeated so that healthy stretches, commits and recoveries happen between faults
_GRAD_FAULTS = [None, None, None, "nonfinite_grads", "violation_grads", "probe_error"]
_STEP_FAULTS = [None, None, None, None, None, "nonfinite_weights", "violation_weights", "nonfinite_loss",
                "violation_loss", "replica_divergence", "probe_error"]

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("grads"), st.sampled_from(_GRAD_FAULTS)),
        st.tuples(st.just("step"), st.sampled_from(_STEP_FAULTS), st.booleans()),
        st.tuples(st.just("commit")),
        st.tuples(st.just("restore_failed")),
    ),
    min_size=20,
    max_size=120,
)

CONFIGS = st.builds(
    GradienceConfig,
    guard_enabled=st.sampled_from([True, True, True, False]),
    guard_snapshot_interval=st.integers(1, 6),
    guard_max_rollbacks=st.integers(0, 4),
    guard_lr_backoff=st.sampled_from([0.5, 0.25, 0.9, 1.0]),
    guard_max_consecutive_skips=st.integers(1, 4),
    guard_snapshot_keep=st.integers(1, 3),
    guard_max_snapshot_failures=st.integers(1, 3),
)


@dataclasses.dataclass
class Trace:
    config: GradienceConfig
    steps: list  # (event, state_before, state_after, decision or None)
    decide_rollbacks: int = 0
    decide_skips: int = 0


def replay(config: GradienceConfig, events, *, initial: bool) -> Trace:
    """Drive the policy the way the controller and the executor do, with random faults, commits and restore
    failures: a ROLLBACK decision is followed by the restore failures drawn next, then by the restore of the
    target that is left (``on_restored``), as one entry of the trace."""
    s = GuardState()
    if initial:
        s = policy.on_snapshot_committed(s, -1, config)
    trace = Trace(config, [])
    step = 0
    used_steps = {-1} if initial else set()
    events = list(events)
    i = 0
    while i < len(events):
        ev = events[i]
        i += 1
        before = s
        kind = ev[0]
        if kind == "grads":
            flags = {ev[1]: True} if ev[1] else {}
            s, d = policy.decide(s, Verdict(phase=Phase.GRADS, step=step, faulty_ranks=(0,) if flags else (),
                                            **flags), config)
            trace.decide_skips += d.action is Action.SKIP_STEP
        elif kind == "step":
            flags = {ev[1]: True} if ev[1] else {}
            s, d = policy.decide(s, Verdict(phase=Phase.STEP, step=step, update_skipped=ev[2], **flags), config)
            step += 1
        elif kind == "commit":
            if s.halted or step in used_steps:
                continue  # the controller stops at a halt; a step number is committed at most once
            used_steps.add(step)
            s, d = policy.on_snapshot_committed(s, step, config), None
        else:
            continue  # a restore failure only follows a ROLLBACK decision (below)
        if d is not None and d.action is Action.ROLLBACK:
            while d.action is Action.ROLLBACK and i < len(events) and events[i][0] == "restore_failed":
                i += 1
                s, d = policy.on_restore_failed(s, d.target_sid, d.reason, config)
            if d.action is Action.ROLLBACK:
                s = policy.on_restored(s, d.target_sid, config)
                trace.decide_rollbacks += 1
        trace.steps.append((ev, before, s, d))
    return trace


def check_trace(trace: Trace) -> None:
    cfg = trace.config
    banned: set[int] = set()
    rollbacks = 0
    for ev, before, after_, d in trace.steps:
        banned |= {st_ for st_, n in before.target_failures if n >= cfg.guard_max_snapshot_failures}
        # LR scale never rises, and only a rollback from decide lowers it (by exactly one backoff)
        assert after_.lr_scale <= before.lr_scale
        if d is not None:
            assert d.lr_scale == after_.lr_scale
        lowered = d is not None and d.action is Action.ROLLBACK
        assert after_.lr_scale == (before.lr_scale * cfg.guard_lr_backoff if lowered else before.lr_scale)
        # halt is absorbing
        if before.halted:
            assert d is not None and d.action is Action.HALT and d.reason is before.halt_reason
            assert after_ == before
        if d is not None and d.action is Action.HALT:
            assert after_.halted
            assert after_.halt_reason in (Reason.ROLLBACK_BUDGET_EXHAUSTED, Reason.NO_GOOD_SNAPSHOT)
        if after_.halted and not before.halted:
            assert d is not None and d.action is Action.HALT
        # bounded episodes
        assert 0 <= after_.episode_rollbacks <= cfg.guard_max_rollbacks
        # rollback targets: committed, never a snapshot that failed guard_max_snapshot_failures times
        if d is not None and d.action is Action.ROLLBACK:
            assert d.target_sid in after_.committed_sids
            assert d.target_sid not in banned
            assert after_.failures(d.target_sid) < cfg.guard_max_snapshot_failures
            assert after_.episode_sid == d.target_sid
        if d is not None and d.action is Action.ROLLBACK:
            rollbacks += 1
        assert after_.total_rollbacks == rollbacks
        # monitor mode observes only
        if not cfg.guard_enabled:
            assert d is None or d.action is Action.CONTINUE
        # SKIP only at the gradient gate
        if d is not None and d.action is Action.SKIP_STEP:
            assert ev[0] == "grads"
            assert after_.consecutive_skips <= cfg.guard_max_consecutive_skips
        # retention bounds what is kept
        assert len(after_.committed_sids) <= cfg.guard_snapshot_keep + 2
        assert list(after_.committed_sids) == sorted(set(after_.committed_sids))
        # every reachable state survives a JSON round trip
        assert GuardState.from_dict(json.loads(json.dumps(after_.to_dict(), allow_nan=False))) == after_
    assert rollbacks == trace.decide_rollbacks
    final = trace.steps[-1][2] if trace.steps else None
    if final is not None:
        assert final.total_rollbacks == trace.decide_rollbacks
        assert final.skipped_steps == trace.decide_skips


PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(config=CONFIGS, events=EVENTS, initial=st.booleans())
def test_properties_over_random_event_streams(config, events, initial):
    check_trace(replay(config, events, initial=initial))


@PROPS
@given(config=CONFIGS, events=EVENTS, initial=st.booleans())
def test_decide_is_deterministic(config, events, initial):
    a = replay(config, events, initial=initial)
    b = replay(config, list(events), initial=initial)
    assert a.steps == b.steps
    assert (a.decide_rollbacks, a.decide_skips) == (b.decide_rollbacks, b.decide_skips)


@PROPS
@given(config=CONFIGS, events=EVENTS)
def test_halt_is_absorbing_forever(config, events):
    trace = replay(config, events, initial=True)
    s = trace.steps[-1][2] if trace.steps else GuardState()
    if not s.halted:
        s = dataclasses.replace(s, halted=True, halt_reason=Reason.NO_GOOD_SNAPSHOT)
    for v in (grads(1), after(1), grads(2, nonfinite_grads=True), after(3, nonfinite_weights=True),
              after(config.guard_snapshot_interval)):
        s2, d = policy.decide(s, v, config)
        assert s2 == s and d.action is Action.HALT and d.reason is s.halt_reason and d.lr_scale == s.lr_scale


@PROPS
@given(config=CONFIGS, events=EVENTS)
def test_rollback_count_is_bounded_between_commits(config, events):
    """Without a commit in between, decide hands out at most guard_max_rollbacks rollbacks."""
    trace = replay(config, events, initial=True)
    since_commit = 0
    for ev, _, _, d in trace.steps:
        if ev[0] == "commit":
            since_commit = 0
        elif d is not None and d.action is Action.ROLLBACK:
            since_commit += 1
            assert since_commit <= config.guard_max_rollbacks


# ------------------------------------------------------------------------------------------------ one writer
def test_no_module_but_the_policy_builds_or_edits_a_guard_state():
    """policy.py is the only writer of GuardState: nowhere else is one constructed, loaded or ``replace``d."""
    import ast
    from pathlib import Path

    import gradience

    root = Path(gradience.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ("policy.py", "types.py"):
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            builds = func in ("GuardState", "types.GuardState") or func.startswith("GuardState.")
            # A replace of anything called *state* where a GuardState can be at hand (other states, such as the
            # spike rule's own, live in modules that never see one).
            first = ast.unparse(node.args[0]) if node.args else ""
            edits = func.split(".")[-1] == "replace" and "state" in first.lower() and (
                "GuardState" in text or ".state" in first)
            if builds or edits:
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert offenders == []


def test_every_transition_keeps_the_state_json_round_trip():
    s = policy.on_snapshot_committed(GuardState(), 0, CFG)
    s, d = policy.on_snapshot_begun(s, 1, 10, CFG.replace(guard_snapshot_commit_lag=2), confirmed=False)
    s, _ = policy.on_probe_errors(s, Phase.STEP, True, CFG)
    s, d = policy.decide(policy.on_verdict_path(s, "async"), grads(11, scaler_overflow=True), CFG)
    assert (d.action, d.reason) == (Action.SKIP_STEP, None)  # the GradScaler's own skip: not a fault
    assert (s.pending.sid, s.pending.commit_tick, s.probe_error_streaks, s.scaler_skipped_steps) == (1, 12, (0, 1), 1)
    assert (s.skipped_steps, s.first_fault_step, s.verdict_path) == (0, None, "async")
    assert GuardState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # A state stored by format 2 (committed, episode_target) still loads.
    old = {k: v for k, v in s.to_dict().items() if k not in ("committed_sids", "episode_sid")}
    assert GuardState.from_dict({**old, "committed": [0], "episode_target": 0}).committed_sids == (0,)


PENDING_TABLE = [
    # id, pending, verdict, expected (commit_sid, abandon_sid, capture, pending once the executor reported)
    ("sync_due_captures", None, after(20), (None, None, True, None)),
    ("lag_waits", dict(sid=3, tick=20, commit_tick=22, confirmed=True), after(21), (None, None, False, 3)),
    ("one_in_flight_newer_not_taken", dict(sid=3, tick=29, commit_tick=31, confirmed=True), after(30),
     (None, None, False, 3)),
    ("commit_then_no_newer", dict(sid=3, tick=28, commit_tick=30, confirmed=True), after(30),
     (3, None, False, None)),
    ("lag_passed_commits", dict(sid=3, tick=20, commit_tick=21, confirmed=True), after(21), (3, None, False, None)),
    ("fault_abandons", dict(sid=3, tick=20, commit_tick=21, confirmed=True), after(21, nonfinite_weights=True),
     (None, 3, False, None)),
    ("ahead_confirmed_commits", dict(sid=4, tick=30, commit_tick=30, confirmed=False), after(30, late=True),
     (4, None, False, None)),
    ("ahead_of_a_skipped_update_dropped", dict(sid=4, tick=30, commit_tick=30, confirmed=False),
     after(30, update_skipped=True, late=True), (None, 4, False, None)),
    ("ahead_lag_confirmed_waits", dict(sid=4, tick=30, commit_tick=31, confirmed=False), after(30, late=True),
     (None, None, False, 4)),
    ("late_due_never_captures", None, after(40, late=True), (None, None, False, None)),
    ("grads_fault_rollback_abandons", dict(sid=5, tick=30, commit_tick=30, confirmed=False),
     grads(31, nonfinite_grads=True), (None, None, False, 5)),
]


@pytest.mark.parametrize(("pending", "verdict", "expected"), [c[1:] for c in PENDING_TABLE],
                         ids=[c[0] for c in PENDING_TABLE])
def test_a_snapshot_in_flight_is_confirmed_committed_or_dropped_by_the_verdicts(pending, verdict, expected):
    from gradience.types import PendingSnapshot

    cfg = CFG.replace(guard_snapshot_interval=10)
    quiet = pending["commit_tick"] if pending and pending["confirmed"] else None  # as on_snapshot_begun leaves it
    s = with_snaps(0, pending=PendingSnapshot(**pending) if pending else None, quiet_until=quiet)
    s, d = policy.decide(s, verdict, cfg)
    # The snapshot stays in flight until the executor reports the commit or the drop.
    if d.commit_sid is not None:
        assert s.pending.sid == d.commit_sid
        s = policy.on_snapshot_committed(s, d.commit_sid, cfg)
    if d.abandon_sid is not None:
        assert s.pending.sid == d.abandon_sid
        s = policy.on_snapshot_abandoned(s, d.abandon_sid)
    got = (d.commit_sid, d.abandon_sid, d.capture, s.pending.sid if s.pending else None)
    assert got == expected
    confirmed = pending is not None and not pending["confirmed"] and d.abandon_sid is None and verdict.late
    assert d.confirm_sid == (pending["sid"] if confirmed else None)


def test_the_controller_is_one_class_of_at_most_400_lines_without_mixins():
    import inspect

    from gradience import controller

    source = inspect.getsource(controller)
    assert len(source.splitlines()) <= 400
    assert controller.GradienceController.__bases__ == (object,)


def _pending(**kw):
    from gradience.types import PendingSnapshot

    return PendingSnapshot(**{"sid": 9, "tick": 40, "commit_tick": 40, "confirmed": True, **kw})


LIVE = with_snaps(0, 3, episode_sid=3, episode_rollbacks=2, total_rollbacks=2, lr_scale=0.25, pending=_pending())
TRANSITIONS = [
    # id, transition applied to LIVE, what must hold afterwards
    ("resume", lambda s: policy.on_resume(s.to_dict(), (3, 5)),
     lambda s: (s.committed_sids, s.episode_sid, s.pending, s.halted, s.lr_scale, s.total_rollbacks)
     == ((3, 5), None, None, False, 0.25, 2)),
    ("resume_nothing_stored", lambda s: policy.on_resume(None, (1,)),
     lambda s: s == dataclasses.replace(GuardState(), committed_sids=(1,))),
    ("checkpoint_before_initialize", lambda s: policy.on_checkpoint_loaded(
        with_snaps(7, lr_scale=0.5).to_dict(), None), lambda s: (s.committed_sids, s.lr_scale) == ((7,), 0.5)),
    ("checkpoint_after_initialize_keeps_this_runs_snapshots", lambda s: policy.on_checkpoint_loaded(
        with_snaps(7, lr_scale=0.5).to_dict(), s),
     lambda s: (s.committed_sids, s.episode_sid, s.pending, s.lr_scale) == ((0, 3), 3, _pending(), 0.5)),
    ("fresh_start_forgets_snapshots", policy.on_fresh_start,
     lambda s: (s.committed_sids, s.episode_sid, s.pending, s.lr_scale) == ((), None, None, 0.25)),
    ("abort", lambda s: policy.on_abort(s, Reason.CONSENSUS_TIMEOUT),
     lambda s: (s.halted, s.halt_reason) == (True, Reason.CONSENSUS_TIMEOUT)),
    ("abort_keeps_the_first_reason", lambda s: policy.on_abort(policy.on_abort(s, Reason.TERMINATED),
                                                              Reason.CONSENSUS_TIMEOUT),
     lambda s: s.halt_reason is Reason.TERMINATED),
    ("restore_crashed", policy.on_restore_crashed, lambda s: (s.halted, s.halt_reason) == (True,
                                                                                         Reason.RESTORE_FAILED)),
    ("snapshots_lost", lambda s: policy.on_snapshots_lost(s, {3}), lambda s: s.committed_sids == (0,)),
    ("abandoned", lambda s: policy.on_snapshot_abandoned(s, 9), lambda s: (s.pending, s.committed_sids) == (
        None, (0, 3))),
    ("verdict_path", lambda s: policy.on_verdict_path(s, "async"), lambda s: s.verdict_path == "async"),
    ("restored", lambda s: policy.on_restored(s, 3, CFG),
     lambda s: (s.lr_scale, s.total_rollbacks, s.episode_rollbacks, s.episode_sid) == (0.125, 3, 3, 3)),
]


@pytest.mark.parametrize(("transition", "holds"), [c[1:] for c in TRANSITIONS], ids=[c[0] for c in TRANSITIONS])
def test_transition_table(transition, holds):
    after_ = transition(LIVE)
    assert holds(after_)
    assert GuardState.from_dict(json.loads(json.dumps(after_.to_dict()))) == after_


@pytest.mark.parametrize(("streak", "error", "expected"), [
    ((0, 0), False, ((0, 0), (), False)),
    ((2, 0), False, ((0, 0), (), False)),
    ((0, 1), True, ((0, 2), (), False)),
    ((0, 2), True, ((0, 3), ("step",), True)),  # probe_error_limit (3) in a row: switched off on every rank
])
def test_probe_errors_table(streak, error, expected):
    phase = Phase.GRADS if streak[0] else Phase.STEP
    s, off = policy.on_probe_errors(GuardState(probe_error_streaks=streak), phase, error, CFG)
    assert (s.probe_error_streaks, s.disabled_checks, off) == expected


@pytest.mark.parametrize(("pending", "expected"), [
    (None, (None, None)), (_pending(confirmed=True), (9, None)), (_pending(confirmed=False), (None, 9))])
def test_finalize_commits_a_judged_snapshot_and_drops_one_taken_ahead(pending, expected):
    d = policy.on_finalize(dataclasses.replace(GuardState(), pending=pending))
    assert (d.commit_sid, d.abandon_sid) == expected


def test_a_resumed_run_keeps_the_quiet_of_the_snapshot_it_resumed_from():
    """A reaction's snapshot step inside the commit lag of the snapshot a run resumed from is not taken, as the
    live run did not take it: the quiet travels in the stored state."""
    cfg = CFG.replace(guard_snapshot_commit_lag=2)
    s, _ = policy.on_snapshot_begun(with_snaps(0), 1, 30, cfg, confirmed=True)
    stored = policy.on_snapshot_committed(s, 1, cfg)
    resumed = policy.on_resume(stored.to_dict(), (0, 1))
    assert resumed.quiet_until == 32 and resumed.pending is None
    d = policy._one_at_a_time(resumed, Decision(action=Action.SNAPSHOT, capture=True), after(31, tick=31))
    assert (d.action, d.capture) == (Action.CONTINUE, False)
    reacting = cfg.replace(risk_reactions=True, spectral_interval=1)  # every step may call for a snapshot
    assert [policy.capture_ahead(resumed, t, reacting).capture for t in (31, 32, 33)] == [False, False, True]
