"""LRScale: the LR the update actually uses is exactly scale x what the loop/scheduler set, for every step.

Two identical optimizer + scheduler pairs run side by side; the guarded one gets ``LRScale.set(0.5)`` at one
step and ``set(0.25)`` later (two rollbacks). "LR used" is read from the update itself: SGD without momentum
or weight decay on float64 parameters reset to 0 with gradient 1.0 leaves ``p == -lr`` exactly. Outside
``step()`` the guarded groups and scheduler must hold exactly the reference values (the schedule is never
disturbed, so nothing can compound).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as S
from torch.optim.swa_utils import SWALR

from gradience.lr import LRScale, current_lr, unwrap_optimizer, unwrap_scheduler

try:  # optional (the hf extra): only the tests that use it are skipped without it
    import transformers
    from transformers.optimization import (
        Adafactor,
        AdafactorSchedule,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )
except ImportError:  # pragma: no cover
    transformers = None
try:
    from transformers.optimization import GreedyLR
except ImportError:  # transformers missing, or older than GreedyLR
    GreedyLR = None

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers not installed")

STEPS = 40
ROLLBACKS = {7: 0.5, 19: 0.25}  # step -> absolute scale set before that step
LRS = (0.1, 0.05)  # two groups with different LRs: the scale applies per group


def _metric(step: int) -> float:
    """A loss that improves, plateaus, improves: drives ReduceLROnPlateau and GreedyLR both ways."""
    if step < 8:
        return 1.0 / (1 + step)
    if step < 22:
        return 0.2
    return 0.2 / (step - 20)


def _sched_step(sched, step: int) -> None:
    if isinstance(sched, S.ReduceLROnPlateau) or (GreedyLR is not None and isinstance(sched, GreedyLR)):
        sched.step(_metric(step))
    else:
        sched.step()


def _nano_lr(it: int) -> float:  # nanoGPT's get_lr: linear warmup, cosine decay to min_lr
    warmup, decay, lr, min_lr = 5, 30, 6e-4, 6e-5
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _linear_warmup(step: int) -> float:  # HF get_linear_schedule_with_warmup, without HF
    warmup = 10
    return (step + 1) / warmup if step < warmup else max(0.0, (STEPS - step) / (STEPS - warmup))


SCHEDULERS = {
    "none": None,
    "lambda_linear_warmup": lambda o: S.LambdaLR(o, _linear_warmup),
    "step": lambda o: S.StepLR(o, step_size=4, gamma=0.7),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.3),
    # chainable: reads group["lr"] and multiplies - would compound if the scale were visible outside step()
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.95),
    "cosine_eta_min": lambda o: S.CosineAnnealingLR(o, T_max=15, eta_min=1e-3),
    "cosine_warm_restarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=1e-3),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 5, cycle_momentum=False),
    "onecycle_three_phase": lambda o: S.OneCycleLR(o, max_lr=[0.1, 0.05], total_steps=STEPS + 5,
                                                   three_phase=True, cycle_momentum=False),
    "cyclic_triangular2": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=[0.1, 0.2], step_size_up=4,
                                               mode="triangular2", cycle_momentum=False),
    "polynomial": lambda o: S.PolynomialLR(o, total_iters=30, power=2.0),
    "linear": lambda o: S.LinearLR(o, start_factor=0.1, total_iters=12),
    "sequential_linear_cosine": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=10), S.CosineAnnealingLR(o, T_max=30, eta_min=1e-4)],
        milestones=[10]),
    # the switch happens between the two rollbacks
    "sequential_switch_after_scale": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.2, total_iters=15), S.CosineAnnealingLR(o, T_max=20, eta_min=1e-3)],
        milestones=[15]),
    "chained_exp_step": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.95), S.StepLR(o, 4, 0.7)]),
    "reduce_on_plateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=2),
    # SWALR recomputes from group["swa_lr"] and the previous group["lr"]
    "swalr_cos": lambda o: SWALR(o, swa_lr=0.01, anneal_epochs=10),
    "swalr_linear": lambda o: SWALR(o, swa_lr=[0.2, 0.01], anneal_epochs=5, anneal_strategy="linear"),
}
if transformers is not None:
    SCHEDULERS["hf_linear_warmup"] = lambda o: get_linear_schedule_with_warmup(o, 10, STEPS)
    SCHEDULERS["hf_cosine_warmup"] = lambda o: get_cosine_schedule_with_warmup(o, 5, STEPS)
if GreedyLR is not None:
    # GreedyLR keeps _init_lrs and resets to them; patience 2 and reset_start 3 exercise increase, reduce, reset
    SCHEDULERS["greedy"] = lambda o: GreedyLR(o, factor=0.5, patience=2, min_lr=0.02, reset_start=3)


def _params(dtype=torch.float64):
    return [torch.nn.Parameter(torch.zeros(4, dtype=dtype)), torch.nn.Parameter(torch.zeros(3, dtype=dtype))]


def _make(build=None):
    params = _params()
    opt = torch.optim.SGD([{"params": [params[0]], "lr": LRS[0]}, {"params": [params[1]], "lr": LRS[1]}],
                          lr=LRS[0], momentum=0.0, weight_decay=0.0)
    return opt, (build(opt) if build is not None else None), params


def _used_lrs(opt, params) -> list[float]:
    """Run one step and read the LR each group's update used: p = 0 - lr * 1.0 exactly."""
    for p in params:
        with torch.no_grad():
            p.zero_()
        p.grad = torch.ones_like(p)
    opt.step()
    used = []
    for p in params:
        assert torch.all(p == p[0]), "one LR per group"
        used.append(-float(p[0]))
    return used


def _lrs(opt) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _approx(values, scale=1.0):
    return pytest.approx([scale * v for v in values], rel=1e-12, abs=0.0)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler deprecation chatter varies by torch version
        yield


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_used_lr_is_scale_times_schedule(name):
    ref_opt, ref_sched, ref_params = _make(SCHEDULERS[name])
    opt, sched, params = _make(SCHEDULERS[name])
    guard = LRScale(opt)
    scale = 1.0
    for step in range(STEPS):
        if step in ROLLBACKS:
            scale = ROLLBACKS[step]
            guard.set(scale)
        assert _used_lrs(opt, params) == _approx(_used_lrs(ref_opt, ref_params), scale), f"{name}: step {step}"
        # outside step(): exactly the schedule's values, so schedulers and state dicts never see the scale
        assert _lrs(opt) == _lrs(ref_opt), f"{name}: step {step}"
        assert guard.effective_lrs() == _approx(_lrs(ref_opt), scale)
        if sched is not None:
            _sched_step(ref_sched, step)
            _sched_step(sched, step)
            assert _lrs(opt) == _lrs(ref_opt), f"{name}: step {step}"
            assert [float(x) for x in sched.get_last_lr()] == [float(x) for x in ref_sched.get_last_lr()]
    assert guard.scale == 0.25


def test_schedules_are_not_trivial():
    """The matrix must exercise moving LRs (incl. GreedyLR's increase/reduce), not constants."""
    for name in ("reduce_on_plateau", "swalr_cos", "cyclic_triangular2") + (("greedy",) if GreedyLR else ()):
        opt, sched, params = _make(SCHEDULERS[name])
        seen = set()
        for step in range(STEPS):
            _used_lrs(opt, params)
            _sched_step(sched, step)
            seen.add(round(_lrs(opt)[0], 12))
        assert len(seen) >= 3, name


def test_loop_that_writes_lr_every_iteration():
    """nanoGPT: ``for g in optimizer.param_groups: g['lr'] = get_lr(it)`` before each step."""
    opt, _, params = _make()
    guard = LRScale(opt)
    scale = 1.0
    for it in range(STEPS):
        if it in ROLLBACKS:
            scale = ROLLBACKS[it]
            guard.set(scale)
        lr = _nano_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr
        assert _used_lrs(opt, params) == _approx([lr, lr], scale), it
        assert guard.effective_lrs() == _approx([lr, lr], scale)
        assert current_lr(opt) == lr  # the loop's value, unscaled


@pytest.mark.parametrize("name", ["lambda_linear_warmup", "exponential", "onecycle", "swalr_cos",
                                  "sequential_switch_after_scale", "reduce_on_plateau"]
                         + (["greedy"] if GreedyLR else []))
def test_restoring_state_dicts_between_steps(name):
    """A user load_fn restores optimizer + scheduler state dicts at each rollback (a checkpoint taken before
    the first rollback, then one taken between the rollbacks): the scale stays exactly what was set."""
    ref_opt, ref_sched, ref_params = _make(SCHEDULERS[name])
    opt, sched, params = _make(SCHEDULERS[name])
    guard = LRScale(opt)
    checkpoints = {3: None, 12: None}
    restore_from = {7: 3, 19: 12}
    scale = 1.0
    for step in range(STEPS):
        if step in checkpoints:
            checkpoints[step] = [(o.state_dict(), s.state_dict()) for o, s in ((ref_opt, ref_sched), (opt, sched))]
            # the guard leaves no trace in what a checkpoint saves
            assert checkpoints[step][0][0]["param_groups"] == checkpoints[step][1][0]["param_groups"]
        if step in restore_from:
            scale = ROLLBACKS[step]
            guard.set(scale)
            for (o, s), (osd, ssd) in zip(((ref_opt, ref_sched), (opt, sched)), checkpoints[restore_from[step]],
                                          strict=True):
                o.load_state_dict(osd)
                s.load_state_dict(ssd)
        assert _used_lrs(opt, params) == _approx(_used_lrs(ref_opt, ref_params), scale), f"{name}: step {step}"
        _sched_step(ref_sched, step)
        _sched_step(sched, step)
        assert _lrs(opt) == _lrs(ref_opt)


def test_accelerate_prepared_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    ref_opt, ref_sched, ref_params = _make(SCHEDULERS["lambda_linear_warmup"])
    opt, sched, params = _make(SCHEDULERS["lambda_linear_warmup"])
    acc_opt, acc_sched = accelerator.prepare(opt, sched)
    assert type(acc_opt).__name__ == "AcceleratedOptimizer" and type(acc_sched).__name__ == "AcceleratedScheduler"
    assert unwrap_optimizer(acc_opt) is opt
    assert unwrap_scheduler(acc_sched) is sched
    guard = LRScale(acc_opt)
    assert guard.optimizer is opt
    scale = 1.0
    for step in range(STEPS):
        if step in ROLLBACKS:
            scale = ROLLBACKS[step]
            guard.set(scale)
        # the loop steps the wrapper; every third step it steps the inner optimizer directly
        stepped = opt if step % 3 == 0 else acc_opt
        assert _used_lrs(stepped, params) == _approx(_used_lrs(ref_opt, ref_params), scale), step
        acc_sched.step()
        ref_sched.step()
        assert _lrs(opt) == _lrs(ref_opt)
        assert acc_sched.get_last_lr() == ref_sched.get_last_lr()


def test_unwrap_nested_and_shaped_wrappers():
    opt, sched, _ = _make(SCHEDULERS["step"])

    class Wrap:  # anything with accelerate's shape
        def __init__(self, **kw):
            self.__dict__.update(kw)
            self.param_groups = opt.param_groups

        def step(self):
            pass

    assert unwrap_optimizer(Wrap(optimizer=Wrap(optimizer=opt))) is opt
    assert unwrap_scheduler(Wrap(scheduler=Wrap(scheduler=sched))) is sched
    assert unwrap_optimizer(opt) is opt and unwrap_scheduler(sched) is sched
    assert unwrap_optimizer(None) is None and unwrap_scheduler(None) is None
    odd = Wrap(optimizer="not an optimizer")
    assert unwrap_optimizer(odd) is odd
    a, b = Wrap(), Wrap()
    a.optimizer, b.optimizer = b, a
    with pytest.raises(ValueError, match="nested"):
        unwrap_optimizer(a)
    guard = LRScale(Wrap(optimizer=Wrap(optimizer=opt)))
    assert guard.optimizer is opt
    guard.close()
    with pytest.raises(TypeError):
        LRScale(Wrap())


def _zero_and_step(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        with torch.no_grad():
            p.zero_()
        p.grad = g.clone()
    opt.step()
    return [p.detach().clone() for p in params]


def _grads(step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(4, generator=gen, dtype=dtype), torch.randn(3, generator=gen, dtype=dtype)]


@needs_hf
def test_adafactor_with_lr_and_adafactor_schedule():
    """Adafactor(relative_step=False, lr=...) uses group["lr"]: the update scales exactly (updates are
    linear in lr; params reset to 0 and fixed gradients make the rest of the update identical)."""
    def build():
        params = _params()
        opt = Adafactor([{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 5e-3}],
                        lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
        # AdafactorSchedule overwrites every group's lr with initial_lr (default 0.0!) at construction
        return opt, AdafactorSchedule(opt, initial_lr=1e-2), params

    ref_opt, ref_sched, ref_params = build()
    opt, sched, params = build()
    guard = LRScale(opt)
    assert guard.supported
    scale = 1.0
    for step in range(STEPS):
        if step in ROLLBACKS:
            scale = ROLLBACKS[step]
            guard.set(scale)
        ref_p = _zero_and_step(ref_opt, ref_params, _grads(step))
        got = _zero_and_step(opt, params, _grads(step))
        for r, g in zip(ref_p, got, strict=True):
            torch.testing.assert_close(g, r * scale, rtol=1e-12, atol=0.0)
        ref_sched.step()
        sched.step()
        assert _lrs(opt) == _lrs(ref_opt) == [1e-2, 1e-2]
        assert sched.get_last_lr() == ref_sched.get_last_lr()


@needs_hf
def test_adafactor_relative_step_is_unsupported_and_harmless():
    """Default Adafactor (lr=None, relative_step=True) computes its own step size: no backoff possible."""
    def build():
        params = _params()
        opt = Adafactor(params)
        return opt, AdafactorSchedule(opt), params

    bare = Adafactor(_params())
    assert bare.param_groups[0]["lr"] is None and current_lr(bare) is None and not LRScale(bare).supported
    ref_opt, ref_sched, ref_params = build()
    opt, sched, params = build()
    assert current_lr(opt) == 0.0  # AdafactorSchedule's initial_lr, written into the group for logging
    guard = LRScale(opt)
    assert not guard.supported
    assert guard.effective_lrs() == [None]
    guard.set(0.5)
    for step in range(10):
        ref_p = _zero_and_step(ref_opt, ref_params, _grads(step))
        got = _zero_and_step(opt, params, _grads(step))
        for r, g in zip(ref_p, got, strict=True):
            torch.testing.assert_close(g, r, rtol=0.0, atol=0.0)  # untouched, not crashed
        ref_sched.step()
        sched.step()
    # AdafactorSchedule wrote a float into group["lr"] for logging; Adafactor still ignores it
    assert isinstance(opt.param_groups[0]["lr"], float)
    assert not guard.supported and guard.effective_lrs() == [None]


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": False}], ids=["fused", "single_tensor"])
def test_tensor_lr_is_replaced_not_mutated(kwargs):
    def build():
        params = _params(torch.float32)
        return torch.optim.AdamW(params, lr=torch.tensor(0.01), weight_decay=0.0, **kwargs), params

    ref_opt, ref_params = build()
    opt, params = build()
    lr_tensor = opt.param_groups[0]["lr"]
    guard = LRScale(opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after ours
    guard.set(0.5)
    for step in range(5):
        ref_p = _zero_and_step(ref_opt, ref_params, _grads(step, torch.float32))
        got = _zero_and_step(opt, params, _grads(step, torch.float32))
        for r, g in zip(ref_p, got, strict=True):
            torch.testing.assert_close(g, r * 0.5, rtol=1e-6, atol=0.0)
        assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(0.01, rel=1e-7)
    assert all(t is not lr_tensor and float(t) == pytest.approx(0.005, rel=1e-7) for t in seen)
    assert guard.effective_lrs() == pytest.approx([0.005], rel=1e-7)
    assert current_lr(opt) == pytest.approx(0.01, rel=1e-7)


def test_foreach_float_lr():
    opt = torch.optim.AdamW(_params(), lr=0.01, foreach=True, weight_decay=0.0)
    ref = torch.optim.AdamW(_params(), lr=0.01, foreach=True, weight_decay=0.0)
    LRScale(opt).set(0.25)
    for step in range(5):
        ref_p = _zero_and_step(ref, [p for g in ref.param_groups for p in g["params"]], _grads(step))
        got = _zero_and_step(opt, [p for g in opt.param_groups for p in g["params"]], _grads(step))
        for r, g in zip(ref_p, got, strict=True):
            torch.testing.assert_close(g, r * 0.25, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd_skip_on_inf", "fused_adamw_found_inf"])
def test_grad_scaler_drives_the_step(fused):
    def build():
        params = _params(torch.float32)
        if fused:
            opt = torch.optim.AdamW(params, lr=0.01, fused=True, weight_decay=0.0)
        else:
            opt = torch.optim.SGD(params, lr=0.01, momentum=0.0)
        return opt, torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8), params

    ref_opt, ref_scaler, ref_params = build()
    opt, scaler, params = build()
    guard = LRScale(opt)
    guard.set(0.5)
    for step in range(8):
        outs = []
        for o, sc, ps in ((ref_opt, ref_scaler, ref_params), (opt, scaler, params)):
            grads = _grads(step, torch.float32)
            if step == 3:
                grads[0][0] = float("inf")  # the scaler must skip this update (or the fused kernel ignore it)
            for p in ps:
                with torch.no_grad():
                    p.zero_()
            loss = sum((p * g).sum() for p, g in zip(ps, grads, strict=True))
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
            o.zero_grad(set_to_none=True)
            outs.append([p.detach().clone() for p in ps])
        for r, g in zip(*outs, strict=True):
            torch.testing.assert_close(g, r * 0.5, rtol=1e-6, atol=0.0)
            if step == 3:
                assert torch.all(g == 0)
        assert _lrs(opt) == [0.01]
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_step_that_raises_does_not_compound():
    ref_opt, ref_sched, ref_params = _make(SCHEDULERS["lambda_linear_warmup"])
    opt, sched, params = _make(SCHEDULERS["lambda_linear_warmup"])
    guard = LRScale(opt)
    guard.set(0.5)
    raise_now = [False]

    def boom(o, args, kwargs):  # registered after ours: raises between our pre- and post-hook
        if raise_now[0]:
            raise RuntimeError("boom")

    opt.register_step_pre_hook(boom)
    for step in range(12):
        raise_now[0] = step in (3, 6, 7)
        if raise_now[0]:
            with pytest.raises(RuntimeError, match="boom"):
                _used_lrs(opt, params)
            # the scaled values stay in the groups until the next step or any LRScale call
            assert _lrs(opt) == _approx(_lrs(ref_opt), 0.5)
            assert guard.effective_lrs() == _approx(_lrs(ref_opt), 0.5)  # read through the leftover: not 0.25
            if step == 3:
                guard.set(0.5)  # set() between steps puts the schedule's values back
                assert _lrs(opt) == _lrs(ref_opt)
            # at 6 LambdaLR below overwrites the scaled value: the next pre-hook must keep the new one
        else:
            assert _used_lrs(opt, params) == _approx(_used_lrs(ref_opt, ref_params), 0.5), step
        ref_sched.step()
        sched.step()
        assert _lrs(opt) == _lrs(ref_opt)


def test_failed_step_then_next_step_scales_once():
    """No scheduler between a failed and the next step: the next pre-hook restores, then scales once."""
    opt, _, params = _make()
    LRScale(opt).set(0.5)
    fail = [True]

    def boom(o, args, kwargs):
        if fail and fail.pop():
            raise RuntimeError("boom")

    opt.register_step_pre_hook(boom)
    with pytest.raises(RuntimeError):
        opt.step()
    for _ in range(3):
        assert _used_lrs(opt, params) == _approx(LRS, 0.5)
        assert _lrs(opt) == list(LRS)


def test_value_written_during_step_is_not_clobbered():
    opt, _, params = _make()
    guard = LRScale(opt)
    guard.set(0.5)
    inside = []

    def writer(o, args, kwargs):
        inside.append(guard.effective_lrs())  # read-only from inside a step: must not unscale this update
        o.param_groups[0]["lr"] = 0.123

    handle = opt.register_step_pre_hook(writer)
    assert _used_lrs(opt, params) == _approx([0.123, LRS[1] * 0.5])
    assert _lrs(opt) == [0.123, LRS[1]]  # the writer owns its value; our own write is undone
    assert inside == [_approx(LRS, 0.5)]
    handle.remove()
    assert _used_lrs(opt, params) == _approx([0.0615, LRS[1] * 0.5])


def test_scale_one_is_a_no_op():
    opt, _, params = _make()
    guard = LRScale(opt)
    objs = [g["lr"] for g in opt.param_groups]
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    assert _used_lrs(opt, params) == list(LRS)
    guard.set(0.5)
    guard.set(1.0)
    assert _used_lrs(opt, params) == list(LRS)
    assert all(a is b for s in seen for a, b in zip(s, objs, strict=True))
    assert guard.effective_lrs() == list(LRS)


def test_set_is_absolute_and_validated():
    opt, _, params = _make()
    guard = LRScale(opt)
    guard.set(0.5)
    guard.set(0.25)
    assert guard.scale == 0.25
    assert _used_lrs(opt, params) == _approx(LRS, 0.25)
    guard.set(guard.scale * 0.5)  # how a third backoff composes
    assert _used_lrs(opt, params) == _approx(LRS, 0.125)
    for bad in (0.0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            guard.set(bad)
    assert guard.scale == 0.125


def test_close_restores_and_detaches():
    opt, _, params = _make()
    guard = LRScale(opt)
    guard.set(0.5)

    def boom(o, args, kwargs):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(boom)
    with pytest.raises(RuntimeError):
        opt.step()
    assert _lrs(opt) == _approx(LRS, 0.5)  # a failed step left the scaled values in place ...
    guard.close()
    assert _lrs(opt) == list(LRS)  # ... close() puts them back
    handle.remove()
    assert _used_lrs(opt, params) == list(LRS)  # hooks gone
    guard.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        guard.set(0.5)
    again = LRScale(opt)  # a closed one no longer blocks a new one
    again.set(0.5)
    assert _used_lrs(opt, params) == _approx(LRS, 0.5)


def test_second_attachment_supersedes_the_first(caplog):
    opt, _, params = _make()
    first = LRScale(opt)
    first.set(0.5)
    second = LRScale(opt)  # e.g. a new controller after one that was never closed: scales must not multiply
    assert "still attached" in caplog.text
    with pytest.raises(RuntimeError, match="closed"):
        first.set(0.25)
    assert _used_lrs(opt, params) == list(LRS)
    second.set(0.25)
    assert _used_lrs(opt, params) == _approx(LRS, 0.25)


def test_registry_does_not_keep_optimizers_alive():
    import gc
    import weakref

    opt, _, _ = _make()
    LRScale(opt).set(0.5)
    dead = weakref.ref(opt)
    del opt
    gc.collect()
    assert dead() is None


def test_survives_optimizer_load_state_dict():
    opt, _, params = _make()
    guard = LRScale(opt)
    state = opt.state_dict()
    guard.set(0.5)
    opt.load_state_dict(state)  # new param-group dicts; hooks belong to the instance
    assert _used_lrs(opt, params) == _approx(LRS, 0.5)
    assert opt.state_dict()["param_groups"] == state["param_groups"]


def test_current_lr():
    opt, _, _ = _make()
    assert current_lr(opt) == LRS[0]

    class Wrap:
        optimizer = opt

    assert current_lr(Wrap()) == LRS[0]
    t = torch.optim.Adam(_params(torch.float32), lr=torch.tensor(0.5))
    assert current_lr(t) == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (capturable foreach / fused on GPU)")
@pytest.mark.parametrize("kwargs", [{"foreach": True, "capturable": True}, {"fused": True}],
                         ids=["foreach_capturable", "fused"])
def test_cuda_tensor_lr_scaled_without_host_sync(kwargs):
    def build():
        params = [torch.nn.Parameter(torch.zeros(4, device="cuda"))]
        lr = torch.tensor(0.01, device="cuda")
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kwargs), params

    ref_opt, ref_params = build()
    opt, params = build()
    guard = LRScale(opt)
    guard.set(0.5)
    lr_tensor = opt.param_groups[0]["lr"]
    for step in range(3):
        grad = _grads(step, torch.float32)[0].cuda()
        ref_p = _zero_and_step(ref_opt, ref_params, [grad])
        with torch.no_grad():
            params[0].zero_()
        params[0].grad = grad.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the hooks must not read the LR to the host
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(params[0].detach(), ref_p[0] * 0.5, rtol=1e-6, atol=0.0)
        assert opt.param_groups[0]["lr"] is lr_tensor
