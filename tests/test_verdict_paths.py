"""The synchronous and the asynchronous verdict against each other: one policy, two timings.

Random fault schedules run through both paths on the same model and data. The asynchronous path judges each step
one step later; a rollback it carries out also discards the step in flight (its gradients and update were made
on the state that was replaced), which it reports (``rollback_success``: ``step`` after ``verdict_step``). The
oracle replays the synchronous path on the same schedule with those steps left out of the loop; then both must
show the same skips, rollbacks (reason, target), snapshots, halts, counters and LR scale, and - when neither
halted - the same final model and optimizer state, bit for bit.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradience import GradienceController
from gradience.comm import TorchComm
from tests.loops import events, make_mlp, mlp_loss, state_copy
from tests.threaded import free_groups, make_groups, run_ranks

STEPS = 24
OPTIMIZERS = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
}
GRAD_FAULTS = {"grad_nan": float("nan"), "grad_inf": float("inf"), "grad_huge": 1e9}
STEP_FAULTS = ("weight_nan", "weight_huge", "loss_nan", "loss_huge")
_SEEDING = threading.Lock()  # make_mlp seeds the global RNG: ranks as threads must not interleave there


def _inject(kind: str, where: str, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Apply a fault of ``kind`` if it belongs at ``where`` ('grads' after backward, 'step' after the update);
    returns the loss the loop reports."""
    with torch.no_grad():
        if where == "grads" and kind in GRAD_FAULTS:
            model[2].weight.grad[0, 3] = GRAD_FAULTS[kind]
        elif where == "step" and kind == "weight_nan":
            model[0].weight[1, 2] = float("nan")
        elif where == "step" and kind == "weight_huge":
            model[0].bias[4] = 1e9
        elif where == "step" and kind in ("loss_nan", "loss_huge"):
            return torch.full_like(loss, float("nan") if kind == "loss_nan" else 1e9)
    return loss


def _train(path: str, schedule: dict, config: dict, out: Path, *, rank: int = 0, comm=None,
           leave_out: frozenset = frozenset()) -> dict:
    """One guarded run; ``schedule``: {(rank, step): fault kind}; ``leave_out``: steps the loop skips."""
    with _SEEDING:
        model = make_mlp(0)
    opt = OPTIMIZERS[config["optimizer"]](model.parameters())
    ctl = GradienceController(out_dir=str(out), comm=comm, guard_verdict=path, spectral_enabled=False,
                              spike_action="off", **{k: v for k, v in config.items() if k != "optimizer"})
    ctl.initialize(model, optimizer=opt)
    halted_at, gate_rollbacks, paths = None, set(), []
    for step in range(STEPS):
        if step in leave_out:
            continue
        kind = schedule.get((rank, step))
        if kind is None and step >= schedule.get("from", STEPS):
            kind = schedule.get((rank, "from"))
        opt.zero_grad(set_to_none=True)
        loss = mlp_loss(model, step, seed=rank)
        loss.backward()
        _inject(kind or "", "grads", model, loss)
        rollbacks = ctl.state.total_rollbacks
        ctl.before_optimizer_step(model, opt, step=step, loss=loss.detach())
        if ctl.state.total_rollbacks != rollbacks:
            gate_rollbacks.add(step)
        paths.append(ctl.state.verdict_path)
        opt.step()
        reported = _inject(kind or "", "step", model, loss.detach())
        if not ctl.step(step, reported, model):
            halted_at = step
            break
    summary = ctl.finalize()
    return {"summary": summary["guard"], "halted_at": halted_at, "state": state_copy(model, opt),
            "events": _actions(out, rank), "paths": paths, "gate_rollbacks": gate_rollbacks}


def _in_domain(schedule: dict, sync: dict) -> bool:
    """False for the one difference that is not a lag: a fault written after the update of a step whose gate
    rolled back. The synchronous path restored before it and judges it in that step; the asynchronous path
    restores after it (the rollback comes a step later) and so erases it. Both outcomes are right."""
    labels = {step for key, kind in schedule.items() if isinstance(key, tuple) and kind in STEP_FAULTS
              for step in ([key[1]] if key[1] != "from" else range(schedule["from"], STEPS))}
    return not labels & sync["gate_rollbacks"]


def _actions(out: Path, rank: int) -> dict:
    skips = [(e["step"], e["reason"]) for e in events(out, "skip_step", rank)]
    rollbacks = [(e.get("verdict_step", e["step"]), e["reason"], e["to_step"])
                 for e in events(out, "rollback_success", rank)]
    discarded = {e["step"] for e in events(out, "rollback_success", rank) if e["step"] != e.get("verdict_step")}
    halts = [e["reason"] for e in events(out, "abort", rank)]
    snapshots = [e["step"] for e in events(out, "snapshot", rank) if e["committed"]]
    return {"skips": skips, "rollbacks": rollbacks, "halts": halts, "snapshots": snapshots, "discarded": discarded}


def _compare(sync: dict, late: dict) -> None:
    a, b = sync["summary"], late["summary"]
    for key in ("integrity_status", "total_rollbacks", "total_skipped_steps", "lr_scale", "halt_reason",
                "first_fault_step", "snapshots"):
        assert a[key] == b[key], (key, a[key], b[key], sync["events"], late["events"])
    for key in ("skips", "rollbacks", "halts", "snapshots"):
        assert sync["events"][key] == late["events"][key], (key, sync["events"], late["events"])
    if sync["halted_at"] is None:
        assert late["halted_at"] is None
        # The same updates on the same data at the same LR: the same bits.
        assert all(torch.equal(x, y) for x, y in zip(sync["state"], late["state"], strict=True))
    else:
        # Judged one step later, the halt comes in the next step (or at finalize, after the last one); in the
        # same step when that step was synchronous (the first update: no optimizer state yet).
        assert late["halted_at"] in (sync["halted_at"], sync["halted_at"] + 1, None)


KINDS = st.sampled_from(sorted(GRAD_FAULTS) + list(STEP_FAULTS))
CONFIGS = st.fixed_dictionaries({
    "optimizer": st.sampled_from(sorted(OPTIMIZERS)),
    "guard_snapshot_interval": st.integers(2, 5),
    "guard_max_rollbacks": st.integers(0, 3),
    "guard_max_consecutive_skips": st.integers(1, 4),
    "guard_snapshot_commit_lag": st.integers(0, 1),  # below every interval drawn
    "guard_snapshot_tier": st.sampled_from(["disk", "memory"]),
})


@st.composite
def schedules(draw, ranks: int) -> dict:
    """Single and repeated faults at random steps (snapshot steps and the steps after skips among them), on a
    random rank, and sometimes one that persists to the end."""
    out: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        out[(draw(st.integers(0, ranks - 1)), draw(st.integers(0, STEPS - 1)))] = draw(KINDS)
    if draw(st.booleans()):
        start = draw(st.integers(1, STEPS - 4))
        out["from"] = start
        out[(draw(st.integers(0, ranks - 1)), "from")] = draw(st.sampled_from(["grad_nan", "weight_nan", "loss_nan"]))
    return out


PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


@PROPS
@given(config=CONFIGS, schedule=schedules(1))
def test_one_rank_sync_and_async_agree_up_to_the_documented_lag(config, schedule):
    with tempfile.TemporaryDirectory() as tmp:
        late = _train("async", schedule, config, Path(tmp) / "async")
        if (0, 0) not in schedule and len(late["paths"]) > 1:  # the first update makes the optimizer state
            assert late["paths"][1] == "async"
        sync = _train("sync", schedule, config, Path(tmp) / "sync", leave_out=frozenset(late["events"]["discarded"]))
    assume(_in_domain(schedule, sync))
    _compare(sync, late)


@pytest.fixture(scope="module")
def groups2():
    g = make_groups(2)
    yield g
    free_groups(g)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(config=CONFIGS, schedule=schedules(2))
def test_two_ranks_sync_and_async_agree_up_to_the_documented_lag(groups2, config, schedule):
    with tempfile.TemporaryDirectory() as tmp:
        def run(path: str, leave_out: frozenset = frozenset()):
            def rank_fn(rank, group):
                return _train(path, schedule, config, Path(tmp) / path, rank=rank,
                              comm=TorchComm(group, timeout_s=30), leave_out=leave_out)
            return run_ranks(groups2, rank_fn)

        late = run("async")
        sync = run("sync", frozenset(late[0]["events"]["discarded"]))
    assume(_in_domain(schedule, sync[0]))
    for rank in (0, 1):
        # Every rank reaches the same decisions on both paths.
        assert late[rank]["events"] == late[0]["events"] and sync[rank]["events"] == sync[0]["events"]
        _compare(sync[rank], late[rank])
