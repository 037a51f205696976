"""Log lines of telemetry events: wording and level per event, rank prefix, leader-only collective lines,
log_all_ranks, skip rate limiting, tolerance of broken fields, and the opt-in handler."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest

from gradience import logs
from gradience.logs import SKIP_BURST, SKIP_QUIET_STEPS, SKIP_SUMMARY_EVERY, EventLogger
from gradience.telemetry import Telemetry
from gradience.types import Phase, Reason

GUARD = {"integrity_status": "RECOVERED", "total_rollbacks": 1, "total_skipped_steps": 0, "lr_scale": 0.5,
         "halt_reason": None}


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.DEBUG, logger="gradience")
    return caplog


def lines(caplog, min_level: int = logging.DEBUG) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("gradience") and r.levelno >= min_level]


def one(caplog, min_level: int = logging.DEBUG) -> tuple[int, str]:
    (out,) = lines(caplog, min_level)
    return out


@pytest.fixture
def tel(tmp_path):
    t = Telemetry(tmp_path)
    yield t
    t.close()


# ------------------------------------------------------------------------------------------------ each event


def test_skip_step(tel, caplog):
    tel.emit("skip_step", step=12, reason=Reason.NONFINITE_GRADS, faulty_ranks=[1], grad_norm=math.nan,
             bad={"params": ["fc.weight"], "buffers": [], "more": 0})
    assert one(caplog) == (logging.WARNING, "Gradience: skipped the update of step 12: NONFINITE_GRADS on rank 1 "
                                            "(grad norm nan) in fc.weight")


def test_skip_step_older_list_field_and_long_lists(tel, caplog):
    tel.emit("skip_step", step=3, reason="VIOLATION_THRESHOLD", faulty_ranks=[0, 1, 2, 3], grad_norm=3.5e38,
             local_bad_grads=[f"layer{i}.weight" for i in range(10)])
    level, msg = one(caplog)
    assert level == logging.WARNING
    assert "on ranks 0, 1, 2, 3" in msg and "(grad norm 3.5e38)" in msg
    assert msg.endswith("in layer0.weight, layer1.weight, layer2.weight (+7 more)")


def test_bad_buffers_and_more(tel, caplog):
    tel.emit("rollback_success", step=9, to_step=5, reason="NONFINITE_BUFFERS", faulty_ranks=[0], lr=1e-3,
             lr_scale=0.5, total_rollbacks=2, bad={"params": ["a"], "buffers": ["bn.running_var"], "more": 4})
    assert "in a, bn.running_var (buffer) (+4 more)" in one(caplog)[1]


def test_rollback_success(tel, caplog):
    tel.emit("rollback_success", step=50, to_step=40, reason=Reason.NONFINITE_WEIGHTS, lr=1.5e-3, lr_scale=0.5,
             faulty_ranks=[0], bad={"params": ["transformer.h.0.attn.c_attn.weight"]}, total_rollbacks=1)
    assert one(caplog) == (logging.WARNING, "Gradience: rolled back at step 50 to the snapshot of step 40 "
                                            "(NONFINITE_WEIGHTS on rank 0 in transformer.h.0.attn.c_attn.weight); "
                                            "LR scale now 0.5 (lr 0.0015); rollback 1")


def test_an_asynchronous_rollback_says_which_step_it_judged_and_which_it_discarded(tel, caplog):
    tel.emit("rollback_success", step=13, verdict_step=12, to_step=10, reason=Reason.NONFINITE_WEIGHTS,
             lr_scale=0.5, faulty_ranks=[0], total_rollbacks=1)
    assert one(caplog) == (logging.WARNING, "Gradience: rolled back at step 13 to the snapshot of step 10 for a "
                                            "fault of step 12, discarding step 13 (NONFINITE_WEIGHTS on rank 0); "
                                            "LR scale now 0.5; rollback 1")


def test_rollback_failed(tel, caplog):
    tel.emit("rollback_failed", step=50, to_step=40, reason="SNAPSHOT_UNREADABLE", local_ok=False)
    level, msg = one(caplog)
    assert level == logging.WARNING
    assert "snapshot of step 40" in msg and "SNAPSHOT_UNREADABLE" in msg and "on this rank" in msg


def test_abort_names_reason_rollbacks_exit_status_and_summary(tel, caplog, tmp_path):
    tel.emit("abort", step=60, reason=Reason.ROLLBACK_BUDGET_EXHAUSTED, faulty_ranks=[1], total_rollbacks=3)
    level, msg = one(caplog)
    assert level == logging.ERROR
    assert msg.startswith("Gradience: halted training at step 60: ROLLBACK_BUDGET_EXHAUSTED after 3 rollbacks")
    assert "exit status 3" in msg and str(tmp_path / "summary.json") in msg


def test_abort_with_error_and_no_summary_writer(tmp_path, caplog):
    t = Telemetry(tmp_path, rank=1, world_size=2, summary_writer=False)
    t.emit("abort", step=None, reason="CONSENSUS_TIMEOUT", error="peer 0 did not answer in 60 s")
    t.close()
    level, msg = one(caplog)
    assert level == logging.ERROR and "CONSENSUS_TIMEOUT (peer 0 did not answer in 60 s)" in msg
    assert "summary" not in msg and " at step" not in msg


def test_fault_monitor_mode(tel, caplog):
    tel.emit("fault", step=50, reason=Reason.NONFINITE_WEIGHTS, faulty_ranks=[0])
    assert one(caplog) == (logging.WARNING, "Gradience: monitor mode: NONFINITE_WEIGHTS at step 50 on rank 0 "
                                            "— guard disabled, nothing was done")


def test_probe_error_warning_then_error_when_disabled(tel, caplog):
    tel.emit("probe_error", step=4, phase=Phase.GRADS, error="RuntimeError: boom", disabled=False)
    tel.emit("probe_error", step=5, phase=Phase.STEP, error="RuntimeError: boom", disabled=True)
    (l1, m1), (l2, m2) = lines(caplog)
    assert l1 == logging.WARNING and "grads probe raised at step 4: RuntimeError: boom" in m1
    assert "disabled" not in m1
    assert l2 == logging.ERROR and m2.endswith("this check is disabled for the rest of the run")


def test_snapshot_levels(tel, caplog):
    tel.emit("snapshot", step=10, committed=True, committed_at=10, tier="disk", path="/x/10", local_error=None)
    tel.emit("snapshot", step=20, committed=False, committed_at=20, tier="disk", path=None,
             local_error="OSError: [Errno 28] No space left on device")
    tel.emit("snapshot", step=30, committed=False, committed_at=None, tier="disk", path=None,
             local_error="abandoned at step 31: a fault came before its commit")
    (l1, m1), (l2, m2), (l3, m3) = lines(caplog)
    assert l1 == logging.DEBUG and "step 10 committed" in m1
    assert l2 == logging.WARNING and "step 20 was not committed: OSError: [Errno 28]" in m2
    assert l3 == logging.INFO and "dropped the pending snapshot of step 30" in m3


def test_a_copy_taken_ahead_and_dropped_is_not_called_a_fault(tel, caplog):
    tel.emit("snapshot", step=40, snapshot_id=5, committed=False, committed_at=None, tier="disk", path=None,
             abandoned_at=41, fault=False)
    tel.emit("snapshot", step=50, snapshot_id=6, committed=False, committed_at=None, tier="disk", path=None,
             abandoned_at=51, fault=True)
    (l1, m1), (l2, m2) = lines(caplog)
    assert l1 == logging.DEBUG and "copy of step 40 taken ahead of its verdict" in m1 and "fault" not in m1
    assert l2 == logging.INFO and "dropped the pending snapshot of step 50: a fault came before its commit" in m2


def test_lr_backoff_unavailable(tel, caplog):
    tel.emit("lr_backoff_unavailable", step=0, detail="no optimizer and no set_lr")
    level, msg = one(caplog)
    assert level == logging.WARNING and "LR backoff unavailable at step 0: no optimizer and no set_lr" in msg


def test_start_and_resume_are_info(tel, caplog):
    tel.emit("start", world_size=1, config={"guard_enabled": True, "out_dir": "./gradience_logs"})
    tel.emit("start", world_size=4, config={"guard_enabled": False, "out_dir": "/o"})
    tel.emit("resume", step=100, path="/ckpt/100", lr_scale=0.25)
    assert lines(caplog) == [
        (logging.INFO, "Gradience: guard on, out_dir ./gradience_logs"),
        (logging.INFO, "Gradience: monitor mode (guard off), out_dir /o, 4 ranks"),
        (logging.INFO, "Gradience: resumed at step 100 (/ckpt/100); LR scale 0.25"),
    ]


def test_summary_info_with_path(tel, caplog):
    tel.emit("summary", total_steps=150, guard=GUARD, summary_path="./gradience_logs/summary.json")
    assert one(caplog) == (logging.INFO, "Gradience: RECOVERED, 1 rollback, 0 skipped updates, LR scale 0.5 "
                                         "— ./gradience_logs/summary.json")


def test_summary_aborted_is_a_warning_and_defaults_to_own_path(tel, caplog, tmp_path):
    guard = dict(GUARD, integrity_status="ABORTED", halt_reason="NO_GOOD_SNAPSHOT", total_rollbacks=2,
                 total_skipped_steps=1, lr_scale=math.nan)
    tel.emit("summary", guard=guard)
    level, msg = one(caplog)
    assert level == logging.WARNING
    assert msg == (f"Gradience: ABORTED (NO_GOOD_SNAPSHOT), 2 rollbacks, 1 skipped update, LR scale nan "
                   f"— {tmp_path / 'summary.json'}")


def test_periodic_telemetry_only_at_debug(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gradience")
    t = Telemetry(tmp_path)
    t.emit("telemetry", step=10, train_loss=2.5, lr=1e-3, lr_scale=1.0, weight_norm=math.inf)
    assert lines(caplog) == []
    caplog.set_level(logging.DEBUG, logger="gradience")
    t.emit("telemetry", step=20, train_loss=math.nan, lr=1e-3, lr_scale=1.0, weight_norm=math.inf)
    t.close()
    level, msg = one(caplog)
    assert level == logging.DEBUG and "loss nan" in msg and "weight norm inf" in msg


def test_unknown_event_is_debug(tel, caplog):
    tel.emit("something_new", step=1, detail="x")
    level, msg = one(caplog)
    assert level == logging.DEBUG and "something_new" in msg and "detail=x" in msg


# ------------------------------------------------------------------------------------------------ who logs


COLLECTIVE = [
    ("skip_step", {"step": 1, "reason": "NONFINITE_GRADS", "faulty_ranks": [0]}),
    ("rollback_success", {"step": 5, "to_step": 0, "reason": "NONFINITE_WEIGHTS", "lr_scale": 0.5}),
    ("rollback_failed", {"step": 5, "to_step": 0, "reason": "SNAPSHOT_UNREADABLE", "local_ok": True}),
    ("abort", {"step": 5, "reason": "ROLLBACK_BUDGET_EXHAUSTED", "total_rollbacks": 3}),
    ("fault", {"step": 5, "reason": "NONFINITE_LOSS", "faulty_ranks": [0]}),
    ("snapshot", {"step": 5, "committed": False, "local_error": None}),
    ("lr_backoff_unavailable", {"step": 0}),
    ("resume", {"step": 7}),
    ("start", {"world_size": 2, "config": {"guard_enabled": True}}),
    ("summary", {"guard": GUARD}),
]

LOCAL = [
    ("probe_error", {"step": 1, "phase": "grads", "error": "E"}),
    ("skip_step", {"step": 1, "reason": "NONFINITE_GRADS", "faulty_ranks": [1], "bad": {"params": ["w"]}}),
    ("rollback_success", {"step": 5, "to_step": 0, "reason": "NONFINITE_WEIGHTS", "local_bad_params": ["w"]}),
    ("rollback_failed", {"step": 5, "to_step": 0, "reason": "SNAPSHOT_UNREADABLE", "local_ok": False}),
    ("snapshot", {"step": 5, "committed": False, "local_error": "OSError: disk full"}),
    ("abort", {"step": 5, "reason": "CONSENSUS_TIMEOUT", "error": "timed out"}),
    ("abort", {"step": 5, "reason": "RESTORE_FAILED", "error": "on this rank: RuntimeError: x"}),
]


@pytest.mark.parametrize(("event", "fields"), COLLECTIVE, ids=[e for e, _ in COLLECTIVE])
def test_collective_events_on_the_leader_only(tmp_path, caplog, event, fields):
    tels = [Telemetry(tmp_path, rank=r, world_size=2) for r in range(2)]
    for t in tels:
        t.emit(event, **fields)
        t.close()
    out = lines(caplog, logging.INFO)
    assert len(out) == 1 and out[0][1].startswith("Gradience [rank 0/2]: ")


@pytest.mark.parametrize(("event", "fields"), COLLECTIVE, ids=[e for e, _ in COLLECTIVE])
def test_log_all_ranks(tmp_path, caplog, event, fields):
    tels = [Telemetry(tmp_path, rank=r, world_size=2, log_all_ranks=True) for r in range(2)]
    for t in tels:
        t.emit(event, **fields)
        t.close()
    out = [m for _, m in lines(caplog, logging.INFO)]
    assert len(out) == 2
    assert out[0].startswith("Gradience [rank 0/2]: ") and out[1].startswith("Gradience [rank 1/2]: ")
    # the same line once per rank; only the summary writer (rank 0) names the summary file
    assert out[0].split(": ", 1)[1].startswith(out[1].split(": ", 1)[1])


@pytest.mark.parametrize(("event", "fields"), LOCAL, ids=[f"{e}-{i}" for i, (e, _) in enumerate(LOCAL)])
def test_local_observations_on_the_rank_that_saw_them(tmp_path, caplog, event, fields):
    t = Telemetry(tmp_path, rank=1, world_size=2)  # not the leader
    t.emit(event, **fields)
    t.close()
    (level, msg), = lines(caplog, logging.INFO)
    assert level >= logging.WARNING and msg.startswith("Gradience [rank 1/2]: ")


@pytest.mark.parametrize(("faulty", "expect"), [([0, 1, 2, 3], [0]), ([2, 3], [0, 2]), (None, [0, 1, 2, 3])])
def test_bad_tensors_reported_by_the_first_faulty_rank_only(tmp_path, caplog, faulty, expect):
    """Under DDP a NaN gradient reaches every replica: 4 ranks holding the same evidence print it once."""
    for r in range(4):
        t = Telemetry(tmp_path, rank=r, world_size=4)
        has = faulty is None or r in faulty
        t.emit("skip_step", step=1, reason="NONFINITE_GRADS", faulty_ranks=faulty, bad={"params": ["w"] if has else []})
        t.close()
    out = [m for _, m in lines(caplog, logging.INFO)]
    assert [int(m.split("rank ")[1].split("/")[0]) for m in out] == expect
    assert all(m.endswith(" in w") for m in out[1:])


def test_faulty_ranks_are_matched_against_the_group_rank(tmp_path, caplog):
    t = Telemetry(tmp_path, rank=5, group_rank=1, world_size=2, leader=False)
    t.emit("skip_step", step=1, reason="NONFINITE_GRADS", faulty_ranks=[1], bad={"params": ["w"]})
    t.close()
    assert one(caplog)[1].startswith("Gradience [rank 5/2]: skipped")


def test_leader_is_the_group_rank_not_the_global_rank(tmp_path, caplog):
    """A second process group: global rank 4 leads it, global rank 0 of another group is not asked."""
    t = Telemetry(tmp_path, rank=4, world_size=8, leader=True)
    t.emit("fault", step=1, reason="NONFINITE_LOSS", faulty_ranks=[5])
    t.close()
    assert one(caplog, logging.INFO)[1].startswith("Gradience [rank 4/8]: monitor mode")
    u = Telemetry(tmp_path / "u", rank=0, world_size=8, leader=False)
    u.emit("fault", step=1, reason="NONFINITE_LOSS", faulty_ranks=[5])
    u.close()
    assert len(lines(caplog, logging.INFO)) == 1


# ------------------------------------------------------------------------------------------------ skip rate limit


def skip(t: Telemetry, step: int, reason: str = "NONFINITE_GRADS") -> None:
    t.emit("skip_step", step=step, reason=reason, faulty_ranks=[0], grad_norm=math.nan)


def test_skips_burst_then_summaries(tel, caplog):
    n = SKIP_BURST + 2 * SKIP_SUMMARY_EVERY + 47
    for s in range(n):
        skip(tel, s, "NONFINITE_GRADS" if s % 2 else "VIOLATION_THRESHOLD")
    out = lines(caplog)
    assert len(out) == SKIP_BURST + 2
    assert all(level == logging.WARNING for level, _ in out)
    assert [m.split(": ", 2)[1] for _, m in out[:SKIP_BURST]] == ["skipped the update of step 0",
                                                                   "skipped the update of step 1",
                                                                   "skipped the update of step 2"]
    assert "further skips are summarised" in out[SKIP_BURST - 1][1]
    assert f"skipped {SKIP_SUMMARY_EVERY} more updates since step {SKIP_BURST} " \
           f"(last at step {SKIP_BURST + SKIP_SUMMARY_EVERY - 1};" in out[SKIP_BURST][1]
    assert "NONFINITE_GRADS x50" in out[SKIP_BURST][1] and "VIOLATION_THRESHOLD x50" in out[SKIP_BURST][1]
    tel.close()  # the rest is summarised on close
    out = lines(caplog)
    assert len(out) == SKIP_BURST + 3 and "skipped 47 more updates" in out[-1][1]


def test_non_skip_event_flushes_and_starts_a_new_burst(tel, caplog):
    for s in range(10):
        skip(tel, s)
    tel.emit("telemetry", step=10)  # routine: neither flushes nor resets
    tel.emit("snapshot", step=10, committed=True)
    assert len(lines(caplog, logging.WARNING)) == SKIP_BURST
    tel.emit("rollback_success", step=11, to_step=5, reason="NONFINITE_WEIGHTS", lr_scale=0.5, total_rollbacks=1)
    out = [m for _, m in lines(caplog, logging.WARNING)]
    assert "skipped 7 more updates since step 3 (last at step 9; NONFINITE_GRADS x7)" in out[SKIP_BURST]
    assert "rolled back" in out[SKIP_BURST + 1]  # after the summary: the log stays in order
    skip(tel, 12)
    assert "skipped the update of step 12" in lines(caplog)[-1][1]


def test_sporadic_skips_each_reported(tel, caplog):
    for s in range(0, 10 * SKIP_QUIET_STEPS, SKIP_QUIET_STEPS):
        skip(tel, s)
    out = lines(caplog)
    assert len(out) == 10 and all("skipped the update of step" in m for _, m in out)


def test_quiet_gap_flushes_pending_before_the_new_burst(tel, caplog):
    for s in range(5):
        skip(tel, s)
    skip(tel, 4 + SKIP_QUIET_STEPS)
    out = [m for _, m in lines(caplog)]
    assert len(out) == SKIP_BURST + 2
    assert "skipped 2 more updates since step 3" in out[SKIP_BURST]
    assert f"skipped the update of step {4 + SKIP_QUIET_STEPS}" in out[-1]


def test_non_leader_without_evidence_keeps_no_skip_state(tmp_path, caplog):
    t = Telemetry(tmp_path, rank=1, world_size=2)
    for s in range(500):
        skip(t, s)
    t.close()
    assert lines(caplog) == []


# ------------------------------------------------------------------------------------------------ robustness


def test_redaction_unaffected_by_logging(tmp_path, caplog):
    t = Telemetry(tmp_path, redact_max_chars=8)
    rec = t.emit("probe_error", step=1, phase="grads", error="E" * 50, loss=math.nan)
    t.close()
    (written,) = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert written == rec and rec["error"] == "EEEEEEEE...[redacted 42 chars]"
    assert "E" * 9 not in one(caplog)[1]  # the log shows the redacted text too


BROKEN = [
    {},
    {"step": None, "reason": None, "faulty_ranks": None, "bad": None, "grad_norm": None},
    {"step": "x", "faulty_ranks": 5, "bad": "w", "grad_norm": "nan", "lr_scale": [1], "total_rollbacks": "many"},
    {"faulty_ranks": {"a": 1}, "bad": {"params": 3, "buffers": "b", "more": "x"}, "config": "s", "guard": [1]},
    {"bad": {"params": None}, "local_bad_params": 7, "guard": {"integrity_status": None}, "summary": {"guard": 3}},
    {"step": 1e309, "to_step": -1e309, "lr": 1e-300, "world_size": "two", "local_ok": "no", "disabled": "yes"},
]
EVENTS = ["skip_step", "rollback_success", "rollback_failed", "abort", "fault", "probe_error", "snapshot",
          "lr_backoff_unavailable", "resume", "start", "summary", "telemetry", "nope"]


@pytest.mark.parametrize("event", EVENTS)
def test_emit_never_raises_with_broken_fields(tmp_path, caplog, event):
    t = Telemetry(tmp_path, rank=1, world_size=3, log_all_ranks=True)
    for fields in BROKEN:
        rec = t.emit(event, **fields)
        assert rec["event"] == event
    t.close()


class _Nasty:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __format__ = __str__  # type: ignore[assignment]


@pytest.mark.parametrize("event", EVENTS)
def test_event_logger_survives_garbage(caplog, event):
    lg = EventLogger(rank=0, world_size=2, log_all_ranks=True)
    nasty = _Nasty()
    for record in ({"event": event, "step": nasty, "reason": nasty, "faulty_ranks": [nasty], "bad": [nasty],
                    "guard": {"integrity_status": nasty}, "config": {"out_dir": nasty}, "error": nasty},
                   {"event": event, "bad": {"params": nasty}, "faulty_ranks": nasty}):
        lg.handle(record)
    lg.handle(None)  # type: ignore[arg-type]
    lg.handle({"event": nasty})
    lg.flush()


def test_numbers(caplog):
    lg = EventLogger()
    lg.handle({"event": "rollback_success", "step": 1, "to_step": 0, "lr": 1.5e-5, "lr_scale": -math.inf,
               "total_rollbacks": 2})
    assert "LR scale now -inf (lr 1.5e-5)" in one(caplog)[1]


# ------------------------------------------------------------------------------------------------ enable()


def test_enable_is_idempotent_and_shows_info(tmp_path):
    gl = logging.getLogger("gradience")
    before = (list(gl.handlers), gl.level)
    stream = io.StringIO()
    try:
        h1 = logs.enable(stream=stream)
        h2 = logs.enable(logging.INFO)
        assert h1 is h2 and sum(getattr(h, "_gradience_enable", False) for h in gl.handlers) == 1
        t = Telemetry(tmp_path)
        t.emit("start", world_size=1, config={"guard_enabled": True, "out_dir": "o"})
        t.emit("telemetry", step=1)
        t.close()
        assert stream.getvalue() == "Gradience: guard on, out_dir o\n"
        logs.enable(logging.WARNING)
        t = Telemetry(tmp_path / "b")
        t.emit("start", world_size=1)
        t.close()
        assert stream.getvalue().count("\n") == 1
    finally:
        for h in list(gl.handlers):
            if h not in before[0]:
                gl.removeHandler(h)
        gl.setLevel(before[1])


def test_a_guarded_loop_says_every_action_in_the_log(tmp_path, caplog):
    """End to end through the controller: a skip, a rollback, a halt and the final line, as a user sees them."""
    from tests.loops import make_mlp, mlp_loss, poison, run_loop

    def grads(step, model):
        if step == 3:
            model[0].weight.grad[0, 0] = float("nan")

    def weights(step, model):
        if step == 6 or step >= 12:
            poison("0.weight")(model)

    from gradience import GradienceController

    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, guard_max_rollbacks=1)
    with caplog.at_level(logging.INFO, logger="gradience"):
        out = run_loop(make_mlp(), mlp_loss, ctl, steps=20, on_grads=grads, on_update=weights)
    assert out["stopped_at"] == 13
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("gradience")]
    assert any(lv == "WARNING" and "skipped the update of step 3: NONFINITE_GRADS" in m for lv, m in msgs)
    assert any(lv == "WARNING" and "rolled back at step 6 to the snapshot of step 5" in m for lv, m in msgs)
    assert sum(lv == "ERROR" and "halted training at step 13" in m for lv, m in msgs) == 1
    final = [m for lv, m in msgs if "ABORTED" in m and "summary.json" in m]
    assert len(final) == 1 and final[0].startswith("Gradience: ABORTED")
