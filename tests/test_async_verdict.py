"""The asynchronous verdict (guard_verdict='async'): the gate decided on the device through the fused optimizers'
found_inf, one all-reduce per step, weight faults acted on one step later with the synchronous path's target."""

from __future__ import annotations

import logging

import pytest
import torch

from gradience import GradienceController
from gradience.comm import TorchComm
from gradience.errors import ConfigError
from tests.loops import bitwise_same, events, make_mlp, mlp_loss, poison, run_loop, state_copy, wait_persisted
from tests.threaded import free_groups, make_groups, run_ranks

FUSED = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True, amsgrad=True),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("name", list(FUSED))
def test_a_nan_gradient_is_skipped_on_the_device_leaving_every_state_tensor_bitwise(tmp_path, name):
    model = make_mlp()
    opt = FUSED[name](model.parameters())
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=5)
    ctl.initialize(model, optimizer=opt)
    assert ctl.config.guard_verdict == "async"
    for step in range(12):
        opt.zero_grad(set_to_none=True)
        loss = mlp_loss(model, step)
        loss.backward()
        if step == 7:
            model[2].bias.grad[0] = float("nan")
        before = state_copy(model, opt)
        assert ctl.before_optimizer_step(model, opt, loss=loss)  # the host does not know yet: the device decides
        opt.step()
        after = state_copy(model, opt)
        # Parameters, moments, momentum buffers, sums and step counts: untouched exactly at the NaN step.
        assert bitwise_same(before, after) == (step == 7), step
        assert ctl.step(step, loss, model)
    ctl.finalize()
    assert ctl._deferred is not None
    skips = events(tmp_path, "skip_step")
    assert [(e["step"], e["reason"]) for e in skips] == [(7, "NONFINITE_GRADS")]
    # Reported in step 8, when the device's verdict is read; the gradients of step 7 are released by then, and
    # this model's small tensors take the flat-copy norm pass, which keeps no per-tensor values: no names.
    assert skips[0]["bad"] is None


def test_an_async_skip_names_the_bad_gradients_from_the_gates_per_tensor_norms(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=50,
                              spectral_enabled=False)
    x = torch.randn(16, 256)

    def loss_fn(m, step):
        return m(x * (1 + step % 3)).pow(2).mean()

    def poison_grads(step, m):
        if step == 6:
            m[2].weight.grad[1, 2] = float("inf")
        if step == 9:
            m[0].bias.grad[0] = float("nan")

    run_loop(model, loss_fn, ctl, steps=12, optimizer=opt, on_grads=poison_grads)
    assert ctl._deferred is not None and ctl._deferred._grads.per_tensor is not None  # the fused norm pass
    skips = events(tmp_path, "skip_step")
    assert [(e["step"], e["reason"], e["bad"]["params"]) for e in skips] == [
        (6, "NONFINITE_GRADS", ["2.weight"]), (9, "NONFINITE_GRADS", ["0.bias"])]
    assert "found_inf" not in opt.__dict__  # the guard stops steering the optimizer when it is done


def _weight_fault_run(tmp_path, mode: str):
    """Train 16 steps with a NaN written into a weight after update 12; return (summary, rollback events, the
    state after update 10 (what the snapshot of step 10 holds), the state right after the rolling-back call)."""
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path / mode), guard_verdict=mode, guard_snapshot_interval=5)
    ctl.initialize(model, optimizer=opt)
    at_10 = restored = None
    for step in range(16):
        opt.zero_grad(set_to_none=True)
        loss = mlp_loss(model, step)
        loss.backward()
        ctl.before_optimizer_step(model, opt, loss=loss)
        opt.step()
        if step == 10:
            at_10 = state_copy(model, opt)
        if step == 12:
            poison("2.weight")(model)
        rollbacks = ctl.state.total_rollbacks
        assert ctl.step(step, loss, model)
        if ctl.state.total_rollbacks > rollbacks:
            restored = state_copy(model, opt)
    return ctl.finalize(), events(tmp_path / mode, "rollback_success"), at_10, restored


def test_a_weight_fault_is_rolled_back_one_step_later_to_the_target_the_sync_path_picks(tmp_path):
    sync, sync_rb, sync_10, sync_restored = _weight_fault_run(tmp_path, "sync")
    late, late_rb, late_10, late_restored = _weight_fault_run(tmp_path, "async")
    assert [(e["step"], e["to_step"]) for e in sync_rb] == [(12, 10)]
    assert [(e["step"], e["to_step"]) for e in late_rb] == [(13, 10)]  # detected one step later, same target
    # Step 13's update ran on NaN weights: the device skipped it, and the rollback puts back the weights and
    # optimizer state of step 10 bitwise, the same state on both paths.
    assert bitwise_same(sync_restored, sync_10) and bitwise_same(late_restored, late_10)
    assert bitwise_same(sync_10, late_10)
    assert sync["guard"]["lr_scale"] == late["guard"]["lr_scale"] == 0.5
    assert sync["guard"]["integrity_status"] == late["guard"]["integrity_status"] == "RECOVERED"


def test_the_async_snapshot_commits_only_after_its_weights_were_judged(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=5)
    # The state of step 10 is bad before its snapshot is taken: it must never become a target.
    run_loop(model, mlp_loss, ctl, steps=14, optimizer=opt,
             on_update=lambda s, m: poison("0.weight")(m) if s == 10 else None)
    rolled = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"]) for e in rolled] == [(11, 5)]


def test_runs_that_cannot_decide_on_the_device_stay_synchronous_and_say_why(tmp_path, caplog):
    with pytest.raises(ConfigError, match="guard_verdict"):
        GradienceController(out_dir=str(tmp_path), guard_verdict="later")
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # not fused: no found_inf
    ctl = GradienceController(out_dir=str(tmp_path / "a"), guard_verdict="async", guard_snapshot_interval=5)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        out = run_loop(model, mlp_loss, ctl, steps=8, optimizer=opt,
                       on_update=lambda s, m: poison("0.weight")(m) if s == 6 else None)
    assert ctl._deferred is None and "found_inf" in caplog.text
    assert [e["step"] for e in events(tmp_path / "a", "rollback_success")] == [6]  # same step: synchronous
    assert out["summary"]["guard"]["total_rollbacks"] == 1
    auto = GradienceController(out_dir=str(tmp_path / "b"))  # auto on a CPU: synchronous
    run_loop(make_mlp(), mlp_loss, auto, steps=3, optimizer=torch.optim.AdamW(make_mlp().parameters(), fused=True))
    assert auto._deferred is None


@pytest.fixture(scope="module")
def groups2():
    g = make_groups(2)
    yield g
    free_groups(g)


def test_two_ranks_skip_together_with_device_all_reduces_only(tmp_path, groups2):
    models = [make_mlp(0) for _ in groups2]
    calls: list[list[str]] = [[], []]

    def rank_fn(rank, group):
        comm = TorchComm(group, timeout_s=30)
        for name in ("all_reduce_max", "all_reduce_device_max", "all_reduce_sum"):
            real = getattr(comm, name)

            def counted(*a, _real=real, _name=name, **k):
                calls[rank].append(_name)
                return _real(*a, **k)
            setattr(comm, name, counted)
        model = models[rank]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ctl = GradienceController(out_dir=str(tmp_path), comm=comm, guard_verdict="async",
                                  guard_snapshot_interval=1000, spectral_enabled=False)
        ctl.initialize(model, optimizer=opt)
        before_nan = None
        for step in range(10):
            opt.zero_grad(set_to_none=True)
            loss = mlp_loss(model, step, seed=rank)
            loss.backward()
            if step == 6 and rank == 1:
                model[0].weight.grad[3, 3] = float("nan")
            if step == 4:
                calls[rank].clear()
            if step == 6:
                before_nan = state_copy(model, opt)
            ctl.before_optimizer_step(model, opt, loss=loss)
            opt.step()
            if step == 6:
                assert bitwise_same(before_nan, state_copy(model, opt)), f"rank {rank} applied the poisoned step"
            ctl.step(step, loss, model)
            wait_persisted(ctl)  # the snapshot of step 0: marked in a step before the count
        steady = list(calls[rank])
        ctl.finalize()
        return steady

    counts = run_ranks(groups2, rank_fn)
    # Steps 4..9: the gate's and the weights' flags, each one device all-reduce (no host-side collective, no
    # host wait: the host reads them a step later).
    assert counts == [["all_reduce_device_max"] * 12] * 2
    for rank in (0, 1):
        skips = events(tmp_path, "skip_step", rank=rank)
        assert [(e["step"], e["faulty_ranks"]) for e in skips] == [(6, [1])]


def test_a_skipped_first_update_cannot_leave_uninitialised_optimizer_state(tmp_path):
    # Fused SGD allocates its momentum buffers with empty_like and fills them in the first update: skipped on
    # the device, they would keep whatever memory they got. The verdict stays synchronous until every trained
    # parameter has state.
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=5,
                              spectral_enabled=False)
    out = run_loop(model, mlp_loss, ctl, steps=12, optimizer=opt,
                   on_grads=lambda s, m: m[2].bias.grad.fill_(float("nan")) if s == 0 else None)
    assert ctl._deferred is not None  # asynchronous once the first update made the state
    assert out["applied"][0] is False and all(out["applied"][2:])
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.isfinite(b).all() and b.abs().max() < 10 for b in bufs)
    assert out["summary"]["guard"]["total_rollbacks"] == 0


# ------------------------------------------------------------------------------------------------ one decision core
def _fused_loop(ctl, model, opt, steps, *, gate=lambda s: True, on_grads=None, on_step=None, on_update=None,
                after=None, finalize=True):
    """A plain loop with hooks: ``on_step`` first, ``on_grads`` after backward, ``on_update`` after the update,
    ``after`` after the guard's step; ``gate(step)``: whether the loop calls the gradient gate."""
    ctl.initialize(model, optimizer=opt)
    for step in range(steps):
        if on_step:
            on_step(step, model, opt)
        opt.zero_grad(set_to_none=True)
        loss = mlp_loss(model, step)
        loss.backward()
        if on_grads:
            on_grads(step, model)
        if gate(step):
            ctl.before_optimizer_step(model, opt, loss=loss)
        opt.step()
        if on_update:
            on_update(step, model)
        assert ctl.step(step, loss, model)
        if after:
            after(step)
    return ctl.finalize() if finalize else None


@pytest.mark.parametrize("name", ["SGD-momentum", "AdamW"])
def test_a_new_param_group_or_an_unfrozen_parameter_leaves_the_same_optimizer_state_as_the_sync_path(tmp_path, name):
    """Parameters that get their first update mid-run (a group added, requires_grad flipped) have no optimizer
    state: such a step runs synchronously, so a NaN in its gradients cannot leave uninitialised moments."""
    results = {}
    for mode in ("sync", "async"):
        model = make_mlp()
        model[2].weight.requires_grad_(False)
        head = torch.nn.Linear(1, 1)
        opt = FUSED[name]([p for p in model.parameters() if p.requires_grad])

        def on_step(step, m, o, head=head):
            if step == 5:
                o.add_param_group({"params": list(head.parameters())})
            if step == 8:
                m[2].weight.requires_grad_(True)
                o.add_param_group({"params": [m[2].weight]})

        def on_grads(step, m, head=head):
            if step >= 5:
                head.weight.grad = torch.full_like(head.weight, float("nan") if step == 5 else 0.1)
                head.bias.grad = torch.full_like(head.bias, 0.1)
            if step == 8:
                m[2].weight.grad[0, 0] = float("nan")

        ctl = GradienceController(out_dir=str(tmp_path / mode), guard_verdict=mode, guard_snapshot_interval=4,
                                  spectral_enabled=False)
        summary = _fused_loop(ctl, model, opt, 14, on_grads=on_grads, on_step=on_step)
        results[mode] = (state_copy(model, opt), summary["guard"], [e["step"] for e in events(tmp_path / mode,
                                                                                                 "skip_step")])
    (sync_state, sync_g, sync_skips), (late_state, late_g, late_skips) = results["sync"], results["async"]
    assert sync_skips == late_skips == [5, 8]
    assert bitwise_same(sync_state, late_state)
    assert all(torch.isfinite(t).all() for t in late_state if t.is_floating_point())
    assert sync_g["total_rollbacks"] == late_g["total_rollbacks"] == 0
    assert late_g["verdict_path"] == "async"  # back on the device once every parameter has state


def test_a_staged_async_skip_is_reported_when_the_loop_stops_calling_the_gate(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=100,
                              spectral_enabled=False)
    # Gate until step 6 (whose NaN the device skips); from step 7 on, step() without the gate.
    summary = _fused_loop(ctl, model, opt, 10, gate=lambda s: s <= 6,
                          on_grads=lambda s, m: m[2].bias.grad.fill_(float("nan")) if s == 6 else None)
    assert [(e["step"], e["reason"]) for e in events(tmp_path, "skip_step")] == [(6, "NONFINITE_GRADS")]
    assert (summary["guard"]["total_skipped_steps"], summary["guard"]["integrity_status"]) == (1, "RECOVERED")
    assert summary["guard"]["verdict_path"] == "sync"


def test_a_healthy_async_run_commits_its_last_snapshot_at_finalize(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=5,
                              spectral_enabled=False)
    summary = _fused_loop(ctl, model, opt, 11)  # step 10 is a snapshot step, judged at finalize
    snaps = events(tmp_path, "snapshot")
    assert [e["step"] for e in snaps if e["committed"]] == [-1, 0, 5, 10]
    assert not [e for e in snaps if e.get("abandoned_at") is not None]
    assert summary["guard"]["snapshots"][-1] == 10
    assert summary["guard"]["integrity_status"] == "OK"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_guard_state_stored_with_a_snapshot_is_the_live_state_after_its_commit(tmp_path, mode):
    """A resume after a kill continues with the budget the live run had right after the snapshot's commit."""
    from gradience.shardio import MARKER, load_marker

    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    out = tmp_path / mode
    ctl = GradienceController(out_dir=str(out), guard_verdict=mode, guard_snapshot_interval=4,
                              guard_snapshot_hot="off", spectral_enabled=False)
    live = {}

    def remember(step):
        for sid in ctl.state.committed_sids:
            live.setdefault(sid, ctl.state)

    # A rollback after step 5: the episode is open until the next commit.
    _fused_loop(ctl, model, opt, 14, on_update=lambda s, m: poison("0.weight")(m) if s == 5 else None,
                after=remember, finalize=False)
    ctl.close()  # killed: no finalize
    newest = max(ctl.state.committed_sids)
    marker = load_marker(ctl.store.snapshot_dir(newest), newest)
    assert (ctl.store.snapshot_dir(newest) / MARKER).exists()
    stored = marker["extra"]["guard_state"]
    assert stored == live[newest].to_dict()
    assert stored["episode_rollbacks"] == 0 and stored["total_rollbacks"] == 1
    again = GradienceController(out_dir=str(out), guard_verdict=mode, guard_snapshot_interval=4,
                                guard_snapshot_hot="off", spectral_enabled=False)
    model2 = make_mlp()
    again.initialize(model2, optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-2, fused=True),
                     resume="latest")
    resumed = again.state
    assert (resumed.episode_rollbacks, resumed.total_rollbacks, resumed.lr_scale) == (0, 1, 0.5)
    assert resumed.committed_sids == tuple(i.sid for i in again.store.committed())
    again.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_resumed_under_a_commit_lag_decides_as_the_live_run_did(tmp_path, mode):
    """The stored guard state is the one of the snapshot's own step: the steps a commit lag judged after it are
    replayed by the resumed run and must not be counted twice (three skips of a limit of three stay skips)."""
    def run(out, kill_after=None, resume=False, start=0):
        model = make_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ctl = GradienceController(out_dir=str(out), guard_verdict=mode, guard_snapshot_interval=4,
                                  guard_snapshot_commit_lag=2, guard_max_consecutive_skips=3, spectral_enabled=False)
        ctl.initialize(model, optimizer=opt, resume="latest" if resume else False)
        first = ctl.resumed_step + 1 if resume else start
        for step in range(first, 14):
            opt.zero_grad(set_to_none=True)
            loss = mlp_loss(model, step)
            loss.backward()
            if 5 <= step <= 7:
                model[2].bias.grad.fill_(float("nan"))
            ctl.before_optimizer_step(model, opt, loss=loss)
            opt.step()
            assert ctl.step(step, loss, model)
            if step == kill_after:
                ctl.close()  # killed: no finalize
                return None
        return ctl.finalize()["guard"], state_copy(model, opt)

    live, live_state = run(tmp_path / "live")
    run(tmp_path / "killed", kill_after=9)
    resumed, resumed_state = run(tmp_path / "killed", resume=True)
    keys = ("total_skipped_steps", "total_rollbacks", "lr_scale", "integrity_status")
    assert [live[k] for k in keys] == [resumed[k] for k in keys] == [3, 0, 1.0, "RECOVERED"]
    assert bitwise_same(live_state, resumed_state)


def _on_both_paths(tmp_path, **loop):
    """(mode, (controller, run_loop's result)) for the same fused-AdamW MLP run on each verdict path."""
    for mode in ("sync", "async"):
        model = make_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ctl = GradienceController(out_dir=str(tmp_path / mode), guard_verdict=mode, guard_snapshot_interval=4,
                                  spectral_enabled=False)
        yield mode, (ctl, run_loop(model, mlp_loss, ctl, optimizer=opt, **loop))


def test_a_numpy_loss_is_judged_on_both_paths(tmp_path):
    import numpy as np

    rolled = {}
    for mode, _ in _on_both_paths(tmp_path, steps=10, guard_loss=lambda s, loss: np.float32(
            "nan") if s == 6 else np.float32(loss.item())):
        rolled[mode] = [(e["verdict_step"], e["reason"], e["to_step"]) for e in events(tmp_path / mode,
                                                                                     "rollback_success")]
    assert rolled["sync"] == rolled["async"] == [(6, "NONFINITE_LOSS", 4)]


def test_a_gradscaler_that_comes_later_makes_its_steps_synchronous(tmp_path):
    """GradScaler.step sets found_inf itself: a step it steps cannot be gated on the device."""
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="async", guard_snapshot_interval=4,
                              spectral_enabled=False)
    ctl.initialize(model, optimizer=opt)
    scaler, paths = None, []
    for step in range(10):
        opt.zero_grad(set_to_none=True)
        loss = mlp_loss(model, step)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if step == 3 else scaler
        (scaler.scale(loss) if scaler else loss).backward()
        ctl.before_optimizer_step(model, opt, scaler=scaler, loss=loss.detach())
        paths.append(ctl.state.verdict_path)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        assert ctl.step(step, loss.detach(), model)
    summary = ctl.finalize()["guard"]
    assert paths == ["sync", "async", "async"] + ["sync"] * 7
    assert (summary["total_skipped_steps"], summary["total_rollbacks"], summary["integrity_status"]) == (0, 0, "OK")


def test_a_checkpoint_loaded_before_or_after_initialize_keeps_the_guards_clock(tmp_path):
    model = make_mlp()
    first = GradienceController(out_dir=str(tmp_path / "a"), guard_snapshot_interval=7, spectral_enabled=False)
    run_loop(model, mlp_loss, first, steps=40)
    saved = first.state_dict()
    ticks = []
    for order in ("before", "after"):
        ctl = GradienceController(out_dir=str(tmp_path / order), guard_snapshot_interval=7, spectral_enabled=False)
        if order == "before":
            ctl.load_state_dict(saved)
        ctl.initialize(make_mlp(), optimizer=torch.optim.AdamW(model.parameters()), start_step=39)
        if order == "after":
            ctl.load_state_dict(saved)
        ticks.append(ctl.tick)
        ctl.close()
    assert ticks == [first.tick, first.tick] == [39, 39]
    old = {k: v for k, v in saved.items() if k != "tick"}  # a checkpoint of format 2 counted steps, not ticks
    ctl = GradienceController(out_dir=str(tmp_path / "v2"), spectral_enabled=False)
    ctl.load_state_dict({**old, "version": 2})
    ctl.initialize(make_mlp(), optimizer=torch.optim.AdamW(model.parameters()))
    assert ctl.tick == 39
    ctl.close()


@pytest.mark.parametrize("lag", [0, 2])
def test_a_snapshot_not_compared_across_replicas_commits_without_closing_the_episode(tmp_path, lag):
    """With fingerprints on, a snapshot whose state was not compared (a risk reaction's between fingerprint
    ticks, a switched-off check) may already hold a divergence: it is a target, but it must not refill the budget."""
    import dataclasses

    from gradience import policy
    from gradience.types import Phase, Verdict

    model = torch.nn.Linear(4, 2)
    ctl = GradienceController(out_dir=str(tmp_path), guard_verdict="sync", spectral_enabled=False,
                              guard_snapshot_interval=5, guard_snapshot_commit_lag=lag, fingerprint_interval=5)
    ctl.initialize(model, optimizer=torch.optim.AdamW(model.parameters()))
    open_episode = dataclasses.replace(ctl.state, episode_sid=ctl.state.committed_sids[-1], episode_rollbacks=1)
    s = ctl.executor.snapshot(open_episode, 7, 7, confirmed=True, verified=False)
    for tick in range(8, 8 + lag):
        s, decision = policy.decide(s, Verdict(phase=Phase.STEP, step=tick, tick=tick), ctl.config)
        s = ctl.executor.carry_out(s, decision, None, step=tick, tick=tick)
    assert s.pending is None and s.committed_sids[-1] == 1
    assert (s.episode_rollbacks, s.episode_sid) == (1, 0)
    ctl.state = s
    ctl.finalize()


def test_a_persistent_gradient_fault_halts_on_both_paths_with_the_same_budget(tmp_path):
    """NaN gradients on every step from step 20 (the report: 48 rollbacks, LR scale 3.6e-15 and exit 0 under the
    asynchronous verdict): both paths halt with exit status 3 after guard_max_rollbacks rollbacks."""
    out = {}
    for mode, (ctl, res) in _on_both_paths(tmp_path, steps=600, on_grads=lambda s, m: m[2].bias.grad.fill_(
            float("nan")) if s >= 20 else None):
        g = res["summary"]["guard"]
        out[mode] = (res["stopped_at"], ctl.exit_code, g["halt_reason"], g["total_rollbacks"], g["lr_scale"])
    sync, late = out["sync"], out["async"]
    assert sync[1:] == late[1:] == (3, "ROLLBACK_BUDGET_EXHAUSTED", 3, 0.125)
    # One step later per rollback (each discards the step in flight), plus the one-step lag of the verdict.
    assert late[0] - sync[0] == 3 + 1
    # The copies taken ahead of skipped steps (every step from 20 on) were dropped as what they are, not as
    # faults that came before a commit.
    ahead = [e["step"] for e in events(tmp_path / "async", "snapshot") if e.get("fault") is False]
    assert ahead and min(ahead) == 20
    assert not [e for e in events(tmp_path / "sync", "snapshot") if e.get("fault") is False]


def _skip_then_weight_fault(rank: int, out, mode: str, comm=None) -> tuple[list, list]:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctl = GradienceController(out_dir=str(out), comm=comm, guard_verdict=mode, guard_snapshot_interval=3,
                              spectral_enabled=False)
    _fused_loop(ctl, model, opt, 12,
                on_grads=lambda s, m: m[2].bias.grad.fill_(float("nan")) if s == 5 and rank == 0 else None,
                on_update=lambda s, m: poison("0.weight")(m) if s == 9 and rank == 0 else None)
    snaps = [e["step"] for e in events(out, "snapshot", rank) if e["committed"]]
    return snaps, [e["to_step"] for e in events(out, "rollback_success", rank)]


def test_the_snapshot_after_a_skip_is_taken_on_both_paths(tmp_path, groups2):
    """A NaN gradient at step 5, a NaN weight after step 9, snapshots every 3 steps: the step that reads step 5's
    skip must not pass it on to its own snapshot (the report: async never took step 6 and rolled back to 3)."""
    for mode in ("sync", "async"):
        snaps, targets = _skip_then_weight_fault(0, tmp_path / mode, mode)
        assert snaps[:4] == [-1, 0, 3, 6] and targets == [6], mode
        ranks = run_ranks(groups2, lambda r, g, mode=mode: _skip_then_weight_fault(
            r, tmp_path / f"{mode}2", mode, TorchComm(g, timeout_s=30)))
        assert ranks[0] == ranks[1] and ranks[0][0][:4] == [-1, 0, 3, 6] and ranks[0][1] == [6], (mode, ranks)


def test_gradient_accumulation_drops_the_gradients_a_late_rollback_made_stale(tmp_path):
    """Micro-steps call step(), every second one the gate: a weight fault judged in a micro-step without the gate
    rolls back there, and the gradients that micro-step accumulated on the faulty weights go with the state."""
    out = {}
    for mode in ("sync", "async"):
        model = make_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ctl = GradienceController(out_dir=str(tmp_path / mode), guard_verdict=mode, spectral_enabled=False,
                                  guard_snapshot_interval=2)
        ctl.initialize(model, optimizer=opt)
        for step in range(12):
            loss = mlp_loss(model, step)
            loss.backward()
            if step % 2 == 1:
                ctl.before_optimizer_step(model, opt, step=step, loss=loss.detach())
                opt.step()
                opt.zero_grad(set_to_none=True)
            if step == 3:
                poison("0.weight")(model)
            assert ctl.step(step, loss.detach(), model)
        g = ctl.finalize()["guard"]
        out[mode] = (g["total_rollbacks"], g["total_skipped_steps"], g["integrity_status"])
    assert out["sync"] == out["async"] == (1, 0, "RECOVERED")


def test_an_asynchronous_check_that_raises_on_one_rank_is_a_probe_error_on_every_rank(tmp_path, groups2):
    """A defect of the guard on the device path (here its gradient norm pass, on rank 1 from step 4) must not
    stop that rank from joining the all-reduce: every rank reports the probe error, the check goes off after
    probe_error_limit in a row (the run then continues synchronously) and nobody waits for a timeout."""
    def rank_fn(rank, group):
        model = make_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30), guard_verdict="async",
                                  spectral_enabled=False, guard_snapshot_interval=3)

        def broken(step, m, o):
            if rank == 1 and step == 4:
                def boom(*args, **kwargs):
                    raise RuntimeError("norm pass failed")
                ctl._deferred._grads = boom

        summary = _fused_loop(ctl, model, opt, 10, on_step=broken)["guard"]
        return summary["integrity_status"], summary["disabled_checks"], summary["verdict_path"]

    results = run_ranks(groups2, rank_fn)
    assert [r[0] for r in results] == ["OK", "OK"] and [r[2] for r in results] == ["sync", "sync"]
    assert results[0][1] == {"grads": "raised on another rank"}
    assert results[1][1] == {"grads": "RuntimeError: norm pass failed"}
    errors = events(tmp_path, "probe_error", rank=0)
    assert [e["step"] for e in errors][:3] == [4, 5, 6] and errors[2]["disabled"] and errors[0]["faulty_ranks"] == [1]
