"""The guard on one process around plain PyTorch loops: real models, real AdamW, real snapshots on disk."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from gradience import EXIT_GUARD_HALTED, GradienceController
from tests.loops import MODELS, events, make_mlp, mlp_loss, poison, run_loop, warmup_decay

INJECT_PARAM = {"mlp": "0.weight", "gpt2": "transformer.h.0.attn.c_attn.weight"}


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_weight_nan_caught_same_step_rolled_back_once(tmp_path, name):
    make, loss_fn = MODELS[name]
    inject_at = random.Random(name).randint(15, 70)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    inject = poison(INJECT_PARAM[name])
    model = make(0)
    out = run_loop(model, loss_fn, ctl, steps=90,
                   on_update=lambda s, m: inject(m) if s == inject_at else None)
    rb = events(tmp_path, "rollback_success")
    assert [e["step"] for e in rb] == [inject_at]
    assert rb[0]["to_step"] == (inject_at // 10) * 10 if inject_at % 10 else inject_at - 10
    assert rb[0]["reason"] == "NONFINITE_WEIGHTS"
    assert INJECT_PARAM[name] in rb[0]["bad"]["params"]
    s = out["summary"]
    assert s["guard"]["total_rollbacks"] == 1
    assert s["guard"]["first_fault_step"] == inject_at
    assert s["guard"]["integrity_status"] == "RECOVERED"
    assert math.isfinite(s["final_loss"]) and all(math.isfinite(x) for x in out["losses"][inject_at + 1 :])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weight_beyond_threshold_is_a_violation(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_violation_threshold=50.0)
    inject = poison("2.weight", 1e4)
    run_loop(make_mlp(), mlp_loss, ctl, steps=30, on_update=lambda s, m: inject(m) if s == 17 else None)
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"], e["reason"]) for e in rb] == [(17, 10, "VIOLATION_THRESHOLD")]


def test_nan_gradient_skips_update_and_leaves_adamw_state_bitwise(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl = GradienceController(out_dir=str(tmp_path))
    ctl.initialize(model, optimizer=opt)
    for step in range(5):
        opt.zero_grad()
        mlp_loss(model, step).backward()
        assert ctl.before_optimizer_step(model, opt)
        opt.step()
        assert ctl.step(step, 1.0, model)
    opt.zero_grad()
    mlp_loss(model, 5).backward()
    model[0].weight.grad[3, 3] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    moments = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"].clone())
               for p in model.parameters()]
    assert ctl.before_optimizer_step(model, opt) is False
    opt.step()  # loops (and the Trainer) may step unconditionally: dropped grads make it a no-op
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    for (m, v, n), p in zip(moments, model.parameters(), strict=True):
        assert torch.equal(m, opt.state[p]["exp_avg"]) and torch.equal(v, opt.state[p]["exp_avg_sq"])
        assert torch.equal(n, opt.state[p]["step"])
    assert all(int(m[2]) == 5 for m in moments)  # five real updates came before
    assert ctl.step(5, float("nan"), model)  # the NaN loss of a skipped update is not a second fault
    s = ctl.finalize()
    assert s["guard"]["total_skipped_steps"] == 1 and s["guard"]["total_rollbacks"] == 0
    skip = events(tmp_path, "skip_step")
    assert [(e["step"], e["reason"]) for e in skip] == [(5, "NONFINITE_GRADS")]
    assert skip[0]["bad"]["params"] == ["0.weight"]


def test_persistent_grad_nan_escalates_to_rollback_after_consecutive_skips(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_max_consecutive_skips=3)
    def bad_grads(step, model):
        if 20 <= step < 26:
            model[2].weight.grad.fill_(float("inf"))
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=40, on_grads=bad_grads)
    assert out["applied"][20:26] == [False] * 6
    skips = [e["step"] for e in events(tmp_path, "skip_step")]
    rbs = [(e["step"], e["to_step"], e["reason"]) for e in events(tmp_path, "rollback_success")]
    # step 20 carried bad gradients, so no snapshot was taken there: the target is step 10
    assert skips == [20, 21, 22, 24, 25] and rbs == [(23, 10, "NONFINITE_GRADS")]
    assert out["summary"]["guard"]["integrity_status"] == "RECOVERED"


def test_persistent_nan_exhausts_budget_and_halts(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_max_rollbacks=3)
    inject = poison("0.weight")
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=60, on_update=lambda s, m: inject(m) if s >= 25 else None)
    rbs = events(tmp_path, "rollback_success")
    assert len(rbs) == 3
    # The twice-failed step-20 snapshot is abandoned for the older one on the third try.
    assert [e["to_step"] for e in rbs] == [20, 20, 10]
    assert out["stopped_at"] == 28
    s = out["summary"]
    assert s["guard"]["integrity_status"] == "ABORTED"
    assert s["guard"]["halt_reason"] == "ROLLBACK_BUDGET_EXHAUSTED"
    assert s["guard"]["total_rollbacks"] == 3
    assert ctl.exit_code == EXIT_GUARD_HALTED
    assert ctl.step(29, 0.0) is False  # halt is absorbing
    abort = events(tmp_path, "abort")
    assert abort and abort[0]["reason"] == "ROLLBACK_BUDGET_EXHAUSTED"


@pytest.mark.parametrize("rollbacks", [1, 2])
def test_lr_backoff_survives_lambdalr_schedule(tmp_path, rollbacks):
    total, base = 80, 1e-2
    sched_fn = warmup_decay(total, warmup=10)
    faults = [30, 55][:rollbacks]
    inject = poison("0.weight")
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_lr_backoff=0.5)
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=total, lr=base, schedule=sched_fn,
                   on_update=lambda s, m: inject(m) if s in faults else None)
    for step, lr in enumerate(out["lrs"]):
        n = sum(1 for f in faults if f < step)  # a rollback at step f lowers the LR from update f + 1 on
        assert lr == pytest.approx(base * sched_fn(step) * 0.5**n, rel=1e-12, abs=1e-15), step
    assert out["summary"]["guard"]["lr_scale"] == 0.5**rollbacks
    # The scale is applied where the LR is consumed: the scheduler keeps the unscaled schedule.
    assert out["scheduler"].base_lrs[0] == base


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_healthy_runs_never_intervene(tmp_path, name, seed):
    make, loss_fn = MODELS[name]
    ctl = GradienceController(out_dir=str(tmp_path))
    out = run_loop(make(seed), lambda m, s: loss_fn(m, s, seed), ctl, steps=300, lr=1e-3)
    g = out["summary"]["guard"]
    assert (g["total_rollbacks"], g["total_skipped_steps"], g["integrity_status"]) == (0, 0, "OK")
    assert out["losses"][-1] < out["losses"][0]  # it really trained
    assert [e["step"] for e in events(tmp_path, "snapshot")] == [-1, 0, 100, 200]


def test_seed_api_with_user_save_load_and_lr_functions(tmp_path):
    """The seed's documented form: initialize(model, save_fn, load_fn, get_lr, set_lr)."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def save_fn(path: str) -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    def load_fn(path: str) -> None:
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["model"])
        lr = opt.param_groups[0]["lr"]
        opt.load_state_dict(ck["opt"])
        opt.param_groups[0]["lr"] = lr

    def get_lr() -> float:
        return opt.param_groups[0]["lr"]

    def set_lr(lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr

    controller = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    controller.initialize(model, save_fn, load_fn, get_lr, set_lr)
    kept = None
    for step in range(20):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        loss.backward()
        opt.step()
        if step == 10:
            kept = [p.detach().clone() for p in model.parameters()]
        if step == 12:
            poison("0.weight")(model)
        if not controller.step(step, loss, model):
            break
        if step == 12:
            restored = [p.detach().clone() for p in model.parameters()]
    summary = controller.finalize()
    assert summary["guard"]["total_rollbacks"] == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert kept is not None and all(torch.equal(a, b) for a, b in zip(kept, restored, strict=True))
    markers = [json.loads(m.read_text()) for m in (tmp_path / "snapshots").glob("snap_*/COMMITTED")]
    at15 = [m for m in markers if m["step"] == 15]
    assert len(at15) == 1 and at15[0]["shards"][0]["file"] == "rank_00000.ckpt"
    assert (tmp_path / "snapshots" / f"snap_{at15[0]['id']:08d}" / "rank_00000.ckpt").is_file()


def test_controller_state_dict_round_trip(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    inject = poison("0.weight")
    run_loop(make_mlp(), mlp_loss, ctl, steps=30, on_update=lambda s, m: inject(m) if s == 15 else None)
    sd = ctl.state_dict()
    other = GradienceController(out_dir=str(tmp_path / "b"))
    other.load_state_dict(sd)
    assert other.state == ctl.state and other.state.lr_scale == 0.5 and other.steps_seen == 30
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**sd, "version": 99})


def test_initialize_rejects_incomplete_wiring(tmp_path):
    from gradience import ConfigError

    ctl = GradienceController(out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="optimizer="):
        ctl.initialize(make_mlp())
    with pytest.raises(ConfigError, match="save_fn and load_fn"):
        ctl.initialize(make_mlp(), save_fn=lambda p: None)
    with pytest.raises(RuntimeError, match="initialize"):
        GradienceController(out_dir=str(tmp_path)).step(0, 1.0)


def test_background_snapshots_commit_after_the_lag_and_a_fault_first_abandons_them(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_snapshot_commit_lag=3)
    inject = poison("0.weight")
    model = make_mlp()
    kept = {}

    def hook(step, m):
        if step == 10:
            kept[10] = [p.detach().clone() for p in m.parameters()]
        if step in (22, 35):
            inject(m)

    run_loop(model, mlp_loss, ctl, steps=40, on_update=hook)
    snaps = [(e["step"], e["committed"], e["committed_at"]) for e in events(tmp_path, "snapshot")]
    # 10 commits at 13; 20 is still in flight at the step-22 fault: abandoned, the target is 10.
    assert snaps[:4] == [(-1, True, -1), (0, True, 3), (10, True, 13), (20, False, None)]
    assert (30, True, 33) in snaps
    rbs = [(e["step"], e["to_step"]) for e in events(tmp_path, "rollback_success")]
    assert rbs == [(22, 10), (35, 30)]
    assert not (tmp_path / "snapshots" / "step_00000020").exists()


def test_background_snapshot_restores_the_state_of_its_own_step(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_snapshot_commit_lag=4)
    model = make_mlp()
    kept = []

    def hook(step, m):
        if step == 10:
            kept.extend(p.detach().clone() for p in m.parameters())  # training goes on while it is written
        if step == 16:
            poison("0.weight")(m)

    out = run_loop(model, mlp_loss, ctl, steps=17, on_update=hook)
    assert [(e["step"], e["to_step"]) for e in events(tmp_path, "rollback_success")] == [(16, 10)]
    assert all(torch.equal(a, b) for a, b in zip(kept, model.parameters(), strict=True))
    assert out["summary"]["guard"]["total_rollbacks"] == 1
