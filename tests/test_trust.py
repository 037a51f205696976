"""The guard must never break a healthy run, and every repair must converge: one test per class of defect
found by review (other dtypes, repeated step labels, LR writers other than a torch scheduler, optimizers
without an LR, restores that change dtypes, foreign guard state, a scaler not passed, misleading reports).
Real models, real optimizers, real files; threaded ranks with real gloo groups where it is distributed."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from gradience import ConfigError, GradienceController
from gradience.state import capture_state, restore_state
from tests.loops import events, make_mlp, mlp_loss, poison, run_loop, used_lrs, warmup_decay
from tests.threaded import free_groups, make_groups, run_ranks


# ------------------------------------------------------------------------------------------------ 1. dtypes
class Quantized(torch.nn.Module):
    """float32 compute, an int8 frozen weight (weight-only quantization), float64 and complex buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.codes = torch.nn.Parameter(torch.randint(-127, 127, (8, 8), dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale64", torch.full((8,), 1e-2, dtype=torch.float64))
        self.register_buffer("phase", torch.ones(4, dtype=torch.complex64))
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = h + (self.codes.float() @ h.T).T * self.scale64.float()
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("make, dtype", [(lambda: make_mlp().double(), torch.float64), (Quantized, torch.float32)],
                         ids=["float64", "int8+f64+complex"])
def test_healthy_runs_in_other_dtypes_are_never_touched(tmp_path, make, dtype):
    model = make()

    def loss_fn(m, step):
        x, y = (t.to(dtype) for t in __import__("tests.loops", fromlist=["mlp_batch"]).mlp_batch(step))
        return torch.nn.functional.mse_loss(m(x), y)

    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    out = run_loop(model, loss_fn, ctl, steps=25)
    g = out["summary"]["guard"]
    assert (g["integrity_status"], g["total_rollbacks"], g["total_skipped_steps"]) == ("OK", 0, 0)
    assert events(tmp_path, "probe_error") == []


@pytest.mark.parametrize("threshold, reason", [(1e300, None), (1e100, "VIOLATION_THRESHOLD")])
def test_float64_weight_beyond_float32_range_is_judged_in_float64(tmp_path, threshold, reason):
    model = make_mlp().double()
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, guard_violation_threshold=threshold)

    def big(step, m):
        if step == 11:  # the last update: no gradient of the huge weight is ever taken
            with torch.no_grad():
                m[0].weight.view(-1)[0] = 1e200  # finite in float64, inf if narrowed to float32

    def loss_fn(m, step):
        x, y = (t.double() for t in __import__("tests.loops", fromlist=["mlp_batch"]).mlp_batch(step))
        return torch.nn.functional.mse_loss(m(x), y)

    run_loop(model, loss_fn, ctl, steps=12, on_update=big)
    assert [e["reason"] for e in events(tmp_path, "rollback_success")] == ([reason] if reason else [])


def test_a_raising_probe_never_rolls_back_and_is_switched_off(tmp_path, monkeypatch, caplog):
    import gradience.controller as controller_module

    def broken(*args, **kwargs):
        raise RuntimeError("probe defect")

    monkeypatch.setattr(controller_module, "probe_step", broken)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, probe_error_limit=3)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        out = run_loop(make_mlp(), mlp_loss, ctl, steps=20)
    g = out["summary"]["guard"]
    assert (g["integrity_status"], g["total_rollbacks"], g["halt_reason"]) == ("OK", 0, None)
    errors = events(tmp_path, "probe_error")
    assert [e["consecutive"] for e in errors] == [1, 2, 3] and errors[-1]["disabled"] is True
    assert "probe defect" in errors[0]["error"]
    assert g["disabled_checks"] == {"step": "RuntimeError: probe defect"}
    assert any(r.levelno == logging.ERROR and "disabled" in r.getMessage() for r in caplog.records)
    # The gradient gate is a different check and stays on.
    assert out["applied"] == [True] * 20


# ------------------------------------------------------------------------------------------------ 3. labels
def test_repeated_step_labels_restore_the_newest_snapshot_and_never_overwrite(tmp_path):
    """A per-epoch enumerate: labels 0..9 twice. A fault in epoch 2 must go back to epoch 2's snapshot."""
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    ctl.initialize(model, optimizer=opt)
    kept = {}
    for epoch in range(2):
        for step in range(10):
            opt.zero_grad()
            loss = mlp_loss(model, epoch * 10 + step)
            loss.backward()
            opt.step()
            if epoch == 1 and step == 7:
                poison("0.weight")(model)
            assert ctl.step(step, loss, model)
            if step == 5:
                kept[epoch] = [p.detach().clone() for p in model.parameters()]
            if epoch == 1 and step == 7:
                restored = [p.detach().clone() for p in model.parameters()]
    ctl.finalize()
    assert all(torch.equal(a, b) for a, b in zip(kept[1], restored, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(kept[0], restored, strict=True))
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"]) for e in rb] == [(7, 5)]
    # Every snapshot got its own directory; the marker keeps the label.
    labels = sorted(json.loads(m.read_text())["step"] for m in (tmp_path / "snapshots").glob("snap_*/COMMITTED"))
    assert labels.count(5) <= 1 and len(set(rb[0]["to_snapshot"] for _ in rb)) == 1


def test_snapshots_are_scheduled_by_the_guards_clock_not_by_labels(tmp_path):
    """Epochs of 7 steps labelled 0..6 and a snapshot interval of 10: the labels never reach 10."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    ctl.initialize(model, optimizer=opt)
    for epoch in range(4):
        for step in range(1, 8):
            opt.zero_grad()
            loss = mlp_loss(model, epoch * 7 + step)
            loss.backward()
            opt.step()
            assert ctl.step(step, loss, model)
    ctl.finalize()
    snaps = [e for e in events(tmp_path, "snapshot") if e["committed"]]
    assert len(snaps) == 1 + 3  # the initial one, then at calls 0, 10 and 20 of the guard's clock


# ------------------------------------------------------------------------------------------------ 4, 5, 15: LR
def test_accelerated_scheduler_in_a_plain_loop_keeps_the_backoff(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    total, base = 40, 1e-2
    sched_fn = warmup_decay(total, warmup=5)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
    acc = accelerate.Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    ctl.initialize(model, optimizer=opt, scheduler=sched)
    lrs = used_lrs(opt.optimizer)
    for step in range(total):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        acc.backward(loss)
        if ctl.before_optimizer_step(model, opt):
            opt.step()
        sched.step()
        if step == 17:
            poison("0.weight")(model)
        assert ctl.step(step, loss, model)
    ctl.finalize()
    for step in range(18, total):
        assert lrs[step] == pytest.approx(base * sched_fn(step) * 0.5, rel=1e-12), step


def test_a_loop_that_writes_the_lr_itself_keeps_the_backoff(tmp_path):
    """nanoGPT's train.py: param_group['lr'] = get_lr(it) every iteration, no scheduler object."""
    total, base = 40, 6e-3

    def get_lr(it):
        return base * 0.5 * (1 + math.cos(math.pi * it / total))

    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=base)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    ctl.initialize(model, optimizer=opt)
    lrs = used_lrs(opt)
    for it in range(total):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        opt.zero_grad()
        loss = mlp_loss(model, it)
        loss.backward()
        if ctl.before_optimizer_step(model, opt):
            opt.step()
        if it == 21:
            poison("0.weight")(model)
        assert ctl.step(it, loss, model)
    summary = ctl.finalize()
    assert summary["guard"]["lr_scale"] == 0.5
    for it in range(total):
        assert lrs[it] == pytest.approx(get_lr(it) * (0.5 if it > 21 else 1.0), rel=1e-12), it


def test_adafactor_without_an_lr_rolls_back_and_says_the_backoff_is_unavailable(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    model = make_mlp()
    opt = transformers.optimization.Adafactor(model.parameters())  # lr=None, relative_step=True
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        out = run_loop(model, mlp_loss, ctl, steps=40, optimizer=opt,
                       on_update=lambda s, m: poison("0.weight")(m) if s in (15, 33) else None)
    g = out["summary"]["guard"]
    assert (g["integrity_status"], g["total_rollbacks"], g["lr_backoff_effective"]) == ("RECOVERED", 2, False)
    assert len(events(tmp_path, "lr_backoff_unavailable")) == 1  # said once
    assert sum("cannot lower the LR" in r.getMessage() for r in caplog.records) == 1
    assert math.isfinite(out["summary"]["final_loss"])


def test_load_fn_that_restores_the_scheduler_cannot_change_the_scale(tmp_path):
    """Two rollbacks to the same snapshot with a load_fn restoring optimizer AND scheduler: 0.25, not 0.5."""
    total, base = 50, 1e-2
    sched_fn = warmup_decay(total, warmup=5)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)

    def save_fn(path):
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, path)

    def load_fn(path):
        ck = torch.load(path, weights_only=False)
        model.load_state_dict(ck["m"])
        opt.load_state_dict(ck["o"])
        sched.load_state_dict(ck["s"])

    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=100)
    ctl.initialize(model, save_fn, load_fn, optimizer=opt, scheduler=sched)
    lrs = used_lrs(opt)
    schedule = []  # the schedule's own value between steps (what the next update uses before the scale)
    for step in range(total):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        loss.backward()
        if ctl.before_optimizer_step(model, opt):
            opt.step()
        sched.step()
        if step in (20, 30):
            poison("0.weight")(model)
        assert ctl.step(step, loss, model)
        schedule.append(opt.param_groups[0]["lr"])
    ctl.finalize()
    rb = events(tmp_path, "rollback_success")
    assert [e["to_snapshot"] for e in rb] == [1, 1]  # both to the snapshot of step 0
    assert ctl.lr_scale == 0.25
    # Whatever load_fn restored, each update uses the schedule's value x the guard's total scale.
    for step in range(1, total):
        scale = 1.0 if step <= 20 else 0.5 if step <= 30 else 0.25
        assert lrs[step] == pytest.approx(schedule[step - 1] * scale, rel=1e-12), step


# ------------------------------------------------------------------------------------------------ 9, 10, 11
def test_load_state_dict_after_initialize_keeps_this_runs_snapshots(tmp_path):
    foreign = GuardState_with_snapshots([3, 7, 9])
    ctl = GradienceController(out_dir=str(tmp_path / "b"), guard_snapshot_interval=10)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl.initialize(model, optimizer=opt)
    ctl.load_state_dict(foreign)  # the wrong order a user may well pick
    assert ctl.lr_scale == 0.5  # the scale is taken
    for step in range(15):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        loss.backward()
        opt.step()
        if step == 12:
            poison("0.weight")(model)
        assert ctl.step(step, loss, model)
    ctl.finalize()
    assert events(tmp_path / "b", "rollback_failed") == []
    assert [e["to_step"] for e in events(tmp_path / "b", "rollback_success")] == [10]
    assert ctl.lr_scale == 0.25


def GuardState_with_snapshots(steps):
    from gradience.types import GuardState

    state = GuardState(lr_scale=0.5, total_rollbacks=1, committed_sids=tuple(steps))
    return {"version": 2, "guard_state": state.to_dict(), "steps_seen": 0, "last_step": None}


def test_grad_scaler_not_passed_is_found_and_an_unconditional_scaler_step_is_safe(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # Scaled gradients of this MLP are far above 1e3; unscaled they are below it.
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10, guard_violation_threshold=1e3)
    ctl.initialize(model, optimizer=opt)
    applied = []
    for step in range(12):
        opt.zero_grad()
        scaler.scale(mlp_loss(model, step)).backward()
        if step == 6:
            model[0].weight.grad.view(-1)[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        applied.append(ctl.before_optimizer_step(model, opt))  # no scaler= here
        scaler.step(opt)  # unconditional, as the README allows
        scaler.update()
        if not applied[-1]:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        assert ctl.step(step, 0.0, model)
    summary = ctl.finalize()
    assert applied == [True] * 6 + [False] + [True] * 5
    assert summary["guard"]["total_skipped_steps"] == 0  # the scaler's own overflow skip, not a fault
    assert summary["guard"]["scaler_skipped_steps"] == 1


def test_restores_keep_optimizer_state_dtypes_bitwise():
    model = make_mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn(p.shape, dtype=torch.float32)  # fp32 state, bf16 params
    tensors, meta = capture_state(model, opt, copy=True)
    saved = {n: t.clone() for n, t in tensors.items()}
    for p in model.parameters():
        opt.state[p]["momentum_buffer"].zero_()
    restore_state(tensors, meta, model, opt)
    for i, p in enumerate(model.parameters()):
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == torch.float32
        assert torch.equal(buf, saved[f"optimizer.{i}.momentum_buffer"])


# ------------------------------------------------------------------------------------------------ 12, 13, 14
def test_a_nan_anywhere_in_a_non_scalar_loss_is_a_fault(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=12,
                   guard_loss=lambda s, loss: torch.stack([loss, loss * float("nan") if s == 8 else loss]))
    assert [(e["step"], e["reason"]) for e in events(tmp_path, "rollback_success")] == [(8, "NONFINITE_LOSS")]
    assert out["summary"]["guard"]["total_rollbacks"] == 1


def test_world_size_without_init_process_group_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ctl = GradienceController(out_dir=str(tmp_path))
    model = make_mlp()
    with pytest.raises(ConfigError, match="init_process_group"):
        ctl.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / "telemetry.jsonl").exists()


def test_a_rollback_whose_restores_all_failed_is_no_rollback_and_no_backoff(tmp_path):
    def corrupt_all(step, model):
        if step == 12:
            for shard in (tmp_path / "snapshots").glob("snap_*/rank_*.safetensors"):
                shard.write_bytes(b"garbage")
            poison("0.weight")(model)

    # No hot copy: every restore reads the (corrupted) shards.
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, guard_snapshot_hot="off")
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=20, on_update=corrupt_all)
    g = out["summary"]["guard"]
    assert (g["integrity_status"], g["halt_reason"]) == ("ABORTED", "NO_GOOD_SNAPSHOT")
    assert (g["total_rollbacks"], g["lr_scale"]) == (0, 1.0)
    assert out["stopped_at"] == 12


def test_memory_tier_touches_no_disk_and_nan_norms_are_reported_as_nan(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, guard_snapshot_tier="memory",
                              telemetry_interval=1, guard_enabled=False)
    run_loop(make_mlp(), mlp_loss, ctl, steps=8, on_update=lambda s, m: poison("0.weight")(m) if s == 4 else None)
    assert not (tmp_path / "snapshots").exists()
    norms = {e["step"]: e["weight_norm"] for e in events(tmp_path, "telemetry")}
    assert norms[3] != "nan" and norms[4] == "nan"


def test_a_second_live_run_in_the_same_out_dir_fails_and_deletes_nothing(tmp_path):
    first = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    model = make_mlp()
    first.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    second = GradienceController(out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="in use by another live run"):
        second.initialize(make_mlp(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert before == after
    first.finalize()
    third = GradienceController(out_dir=str(tmp_path))  # released at finalize
    third.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    third.finalize()


# ------------------------------------------------------------------------------------------------ 2. replicas
def test_replica_divergence_repair_converges_to_bitwise_equal_replicas(tmp_path):
    """A divergence that starts between fingerprints and before a snapshot must not be committed into it."""
    groups = make_groups(2)
    models = [make_mlp(0) for _ in groups]  # seeded here: torch's RNG is process-global

    def rank(r, group):
        from gradience.comm import TorchComm

        model = models[r]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5, fingerprint_interval=7)
        ctl.initialize(model, optimizer=opt)
        for step in range(40):
            opt.zero_grad()
            loss = mlp_loss(model, step)  # the same batches on both: replicas stay equal unless perturbed
            loss.backward()
            opt.step()
            if r == 1 and step == 3:
                with torch.no_grad():
                    model[0].weight.view(-1)[0] += 1e-3
            assert ctl.step(step, loss, model)
        return ctl.finalize(), [p.detach().clone() for p in model.parameters()], opt

    try:
        (s0, w0, o0), (s1, w1, o1) = run_ranks(groups, rank)
    finally:
        free_groups(groups)
    assert s0["guard"]["total_rollbacks"] == s1["guard"]["total_rollbacks"] == 1
    assert s0["guard"]["integrity_status"] == "RECOVERED"
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert s0["weights_fingerprint"] == s1["weights_fingerprint"]
    rb = events(tmp_path, "rollback_success")
    assert rb[0]["reason"] == "REPLICA_DIVERGENCE" and rb[0]["step"] == 5 and rb[0]["replicas_repaired"]


def test_a_failed_initialize_releases_the_out_dir(tmp_path):
    from gradience import SnapshotError

    (tmp_path / "snapshots").write_text("a file where the snapshot directory should be")
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SnapshotError, match="could not commit the initial snapshot"):
        GradienceController(out_dir=str(tmp_path)).initialize(model, optimizer=opt)
    (tmp_path / "snapshots").unlink()
    again = GradienceController(out_dir=str(tmp_path))  # neither the lock nor the LR hooks were left behind
    again.initialize(model, optimizer=opt)
    again.finalize()
    with pytest.raises(ConfigError, match="resume must be"):
        GradienceController(out_dir=str(tmp_path)).initialize(model, optimizer=opt, resume="last")
