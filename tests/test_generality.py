"""Models, optimizers and loops beyond the plain MLP: sparse gradients, GradScaler, tensor LRs, LBFGS,
legitimately non-finite buffers, and user checkpoint functions next to a scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from gradience import ConfigError, GradienceController
from gradience.comm import TorchComm
from gradience.probe import probe_step
from tests.loops import events, make_mlp, mlp_loss, poison, run_loop, used_lrs, warmup_decay
from tests.threaded import free_groups, make_groups, run_ranks


class SparseBag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def _sparse_loss(model: SparseBag, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 50, (16, 4), generator=g)
    return (model(ids).squeeze(1) - ids.float().mean(1) / 50).pow(2).mean()


def test_nan_in_a_sparse_gradient_is_skipped(tmp_path):
    model = SparseBag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = GradienceController(out_dir=str(tmp_path))
    ctl.initialize(model, optimizer=opt)
    for step in range(3):
        opt.zero_grad()
        _sparse_loss(model, step).backward()
        assert ctl.before_optimizer_step(model, opt)
        opt.step()
        ctl.step(step, 0.0)
    opt.zero_grad()
    _sparse_loss(model, 3).backward()
    assert model.emb.weight.grad.is_sparse
    model.emb.weight.grad._values()[0, 0] = float("nan")
    before = model.emb.weight.detach().clone(), opt.state[model.emb.weight]["momentum_buffer"].to_dense()
    assert ctl.before_optimizer_step(model, opt) is False
    opt.step()
    assert torch.equal(before[0], model.emb.weight)
    assert torch.equal(before[1], opt.state[model.emb.weight]["momentum_buffer"].to_dense())
    assert all(e["committed"] for e in events(tmp_path, "snapshot"))  # sparse optimizer state is snapshotted
    from gradience.snapshot import capture_state, restore_state

    tensors, meta = capture_state(model, opt, copy=True)
    opt.state[model.emb.weight]["momentum_buffer"].mul_(3.0)
    restore_state(tensors, meta, model, opt)
    buf = opt.state[model.emb.weight]["momentum_buffer"]
    assert buf.is_sparse and torch.equal(buf.to_dense(), before[1])
    assert events(tmp_path, "skip_step")[0]["bad"]["params"] == ["emb.weight"]


def test_diagnostics_on_sparse_models_never_desynchronise_ranks(tmp_path):
    groups = make_groups(2)
    try:
        models = [SparseBag() for _ in groups]

        def rank_fn(rank, group):
            opt = torch.optim.SGD(models[rank].parameters(), lr=0.1)
            ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=10))
            ctl.initialize(models[rank], optimizer=opt)
            _sparse_loss(models[rank], 0).backward()
            if rank == 1:
                models[rank].head.weight.grad[0, 0] = float("nan")
            return ctl.before_optimizer_step(models[rank], opt), [p.grad for p in models[rank].parameters()]

        results = run_ranks(groups, rank_fn, timeout_s=30)
        assert [ok for ok, _ in results] == [False, False]
        assert all(g is None for _, grads in results for g in grads)
    finally:
        free_groups(groups)


def test_grad_scaler_overflow_is_the_scalers_skip_not_a_fault(tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # True gradients are ~1e-1; scaled they would be ~1e4 and trip this threshold if checked scaled.
    ctl = GradienceController(out_dir=str(tmp_path), guard_violation_threshold=1e3)
    ctl.initialize(model, optimizer=opt)
    applied = []
    for step in range(8):
        opt.zero_grad()
        scaler.scale(mlp_loss(model, step)).backward()
        if step == 5:
            model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow looks like
            state = [t.clone() for p in model.parameters() for t in opt.state[p].values()]
        ok = ctl.before_optimizer_step(model, opt, scaler=scaler)
        applied.append(ok)
        scale = scaler.get_scale()
        scaler.step(opt)  # must not raise, whatever the gate did
        scaler.update()
        if step == 5:
            assert scaler.get_scale() == scale / 2
            after = [t for p in model.parameters() for t in opt.state[p].values()]
            assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True))
        assert ctl.step(step, 0.0)
    summary = ctl.finalize()
    assert applied == [True] * 5 + [False] + [True] * 2
    assert (summary["guard"]["total_skipped_steps"], summary["guard"]["scaler_skipped_steps"]) == (0, 1)
    assert summary["guard"]["integrity_status"] == "OK"


def test_tensor_learning_rates_are_backed_off(tmp_path):
    total = 40
    sched_fn = warmup_decay(total, warmup=5)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    inject = poison("0.weight")
    out = run_loop(model, mlp_loss, ctl, steps=total, schedule=sched_fn, optimizer=opt,
                   on_update=lambda s, m: inject(m) if s == 22 else None)
    for step in range(23, total):
        assert out["lrs"][step] == pytest.approx(1e-2 * sched_fn(step) * 0.5, rel=1e-6), step


def test_user_load_fn_with_optimizer_compounds_backoff_and_keeps_the_schedule(tmp_path):
    """save_fn/load_fn restore an old LR; the guard must still apply lr_scale x schedule(now)."""
    total, base = 60, 1e-2
    sched_fn = warmup_decay(total, warmup=5)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)

    def save_fn(path):
        torch.save({"m": model.state_dict(), "o": opt.state_dict()}, path)

    def load_fn(path):
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["m"])
        opt.load_state_dict(ck["o"])  # rewinds param_group["lr"] to the snapshot's

    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)
    ctl.initialize(model, save_fn, load_fn, optimizer=opt, scheduler=sched)
    lrs = used_lrs(opt)
    for step in range(total):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        loss.backward()
        if ctl.before_optimizer_step(model, opt):
            opt.step()
        sched.step()
        if step in (25, 41):
            poison("0.weight")(model)
        assert ctl.step(step, loss, model)
    assert ctl.state.lr_scale == 0.25
    for step in range(42, total):
        assert lrs[step] == pytest.approx(base * sched_fn(step) * 0.25, rel=1e-12), step


def test_scheduler_without_optimizer_is_rejected(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    with pytest.raises(ConfigError, match="scheduler= needs optimizer="):
        GradienceController(out_dir=str(tmp_path)).initialize(
            model, lambda p: None, lambda p: None, lambda: 0.1, lambda lr: None, scheduler=sched)


def test_lbfgs_state_is_snapshotted_and_restored(tmp_path):
    model = make_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=4, max_iter=3)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=3)
    ctl.initialize(model, optimizer=opt)
    history_at_3 = None
    for step in range(8):
        def closure(step=step):
            opt.zero_grad()
            loss = mlp_loss(model, step)
            loss.backward()
            return loss
        loss = opt.step(closure)
        if step == 6:
            poison("0.weight")(model)
        assert ctl.step(step, loss, model)
        if step == 3:
            history_at_3 = [t.clone() for t in opt.state[opt._params[0]]["old_dirs"]]
        if step == 6:
            restored = opt.state[opt._params[0]]["old_dirs"]
            assert isinstance(restored, list) and history_at_3
            assert all(torch.equal(a, b) for a, b in zip(history_at_3, restored, strict=True))
    snaps = {e["step"]: e["committed"] for e in events(tmp_path, "snapshot")}
    assert snaps == {-1: True, 0: True, 3: True}  # no snapshot on the faulty step 6
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"]) for e in rb] == [(6, 3)]


class CausalMaskNet(torch.nn.Module):
    """A custom attention-style block whose persistent buffer is a -inf causal mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 1)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x[:, :16].reshape(-1, 16))
        scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) + self.mask
        h = self.bn(h) * scores.softmax(-1)[0, 0]
        return self.out(h)


def test_minus_inf_mask_buffer_is_legitimate_but_nan_running_stats_are_not(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=10)

    def corrupt(step, model):
        if step == 24:
            model.bn.running_mean[0] = float("nan")

    out = run_loop(CausalMaskNet(), mlp_loss, ctl, steps=40, on_update=corrupt)
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"], e["reason"]) for e in rb] == [(24, 20, "NONFINITE_BUFFERS")]
    assert rb[0]["bad"] == {"params": [], "buffers": ["bn.running_mean"], "more": 0, "skipped": []}
    assert out["summary"]["guard"]["total_rollbacks"] == 1
    assert math.isfinite(out["summary"]["final_loss"])


def test_fingerprint_covers_parameters_not_running_stats():
    model = CausalMaskNet()
    fp = lambda: probe_step(0.0, model, step=0, threshold=1e6, with_fingerprint=True).fingerprint  # noqa: E731
    base = fp()
    with torch.no_grad():
        model.bn.running_var.mul_(1.5)  # DDP ranks update these from their own batches
    assert fp() == base
    with torch.no_grad():
        model.proj.weight[0, 0] = torch.nextafter(model.proj.weight[0, 0], torch.tensor(1.0))  # one ulp
    assert fp() != base
