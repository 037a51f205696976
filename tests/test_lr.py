"""scale_lr: a backoff applied at step k stays exactly in force under every common scheduler.

Two identical optimizer + scheduler pairs run side by side; one is scaled by 0.5 at step k. For every
later step its LR must be exactly 0.5 x the reference LR (the schedule itself is not disturbed).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as S

from gradience.lr import current_lr, scale_lr

STEPS = 40
SCALE_AT = 7
FACTOR = 0.5


def _lambda(opt):
    warmup, total = 10, STEPS

    def f(step):  # HF get_linear_schedule_with_warmup
        if step < warmup:
            return float(step + 1) / warmup
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    return S.LambdaLR(opt, f)


def _lambda_cosine_warmup(opt):
    warmup, total = 5, STEPS

    def f(step):  # HF get_cosine_schedule_with_warmup
        if step < warmup:
            return float(step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return S.LambdaLR(opt, f)


SCHEDULERS = {
    "none": None,
    "lambda_linear_warmup_decay": _lambda,
    "lambda_cosine_warmup": _lambda_cosine_warmup,
    "cosine_eta_min": lambda opt: S.CosineAnnealingLR(opt, T_max=15, eta_min=1e-3),
    "onecycle": lambda opt: S.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS + 5),
    "onecycle_three_phase": lambda opt: S.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=STEPS + 5,
                                                     three_phase=True),
    "step": lambda opt: S.StepLR(opt, step_size=4, gamma=0.7),
    "multistep": lambda opt: S.MultiStepLR(opt, milestones=[5, 12, 20], gamma=0.3),
    "exponential": lambda opt: S.ExponentialLR(opt, gamma=0.95),
    "sequential_linear_cosine": lambda opt: S.SequentialLR(
        opt,
        [S.LinearLR(opt, start_factor=0.1, total_iters=10), S.CosineAnnealingLR(opt, T_max=30, eta_min=1e-4)],
        milestones=[10],
    ),
    # the switch to the cosine phase happens after the backoff, exercising the nested scheduler's bases
    "sequential_switch_after_scale": lambda opt: S.SequentialLR(
        opt,
        [S.LinearLR(opt, start_factor=0.2, total_iters=15), S.CosineAnnealingLR(opt, T_max=20, eta_min=1e-3)],
        milestones=[15],
    ),
}


def _make(build):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4))
    p2 = torch.nn.Parameter(torch.randn(3))
    # two groups with different LRs: the scale must apply per group
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.05}], lr=0.1, momentum=0.9)
    sched = build(opt) if build is not None else None
    return opt, sched, [p1, p2]


def _train_step(opt, params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_backoff_survives_scheduler(name):
    build = SCHEDULERS[name]
    ref_opt, ref_sched, ref_params = _make(build)
    opt, sched, params = _make(build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR / OneCycle emit deprecation chatter on some versions
        for step in range(STEPS):
            if step == SCALE_AT:
                before = _lrs(opt)
                scale_lr(opt, sched, FACTOR)
                assert _lrs(opt) == pytest.approx([FACTOR * x for x in before], rel=1e-12)
            _train_step(ref_opt, ref_params, step)
            _train_step(opt, params, step)
            if ref_sched is not None:
                ref_sched.step()
                sched.step()
            ref, got = _lrs(ref_opt), _lrs(opt)
            expected = ref if step < SCALE_AT else [FACTOR * x for x in ref]
            assert got == pytest.approx(expected, rel=1e-12, abs=0.0), f"{name}: step {step}"
            if sched is not None:
                assert sched.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=0.0), f"{name}: step {step}"


@pytest.mark.parametrize("name", ["lambda_linear_warmup_decay", "cosine_eta_min", "onecycle",
                                  "sequential_linear_cosine"])
def test_repeated_backoff_compounds(name):
    build = SCHEDULERS[name]
    ref_opt, ref_sched, ref_params = _make(build)
    opt, sched, params = _make(build)
    scale = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            if step in (4, 11, 25):
                scale_lr(opt, sched, FACTOR)
                scale *= FACTOR
            _train_step(ref_opt, ref_params, step)
            _train_step(opt, params, step)
            ref_sched.step()
            sched.step()
            assert _lrs(opt) == pytest.approx([scale * x for x in _lrs(ref_opt)], rel=1e-12, abs=0.0)
    assert scale == FACTOR**3


def test_scale_without_scheduler_is_permanent():
    opt, _, params = _make(None)
    scale_lr(opt, None, 0.25)
    for step in range(5):
        _train_step(opt, params, step)
    assert _lrs(opt) == [0.025, 0.0125]
    assert current_lr(opt) == 0.025


def test_factor_one_is_identity():
    ref_opt, ref_sched, _ = _make(_lambda)
    opt, sched, _ = _make(_lambda)
    scale_lr(opt, sched, 1.0)
    assert _lrs(opt) == _lrs(ref_opt)
    assert sched.base_lrs == ref_sched.base_lrs


def test_tensor_lr_scaled_in_place():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    scale_lr(opt, None, 0.5)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.005, rel=1e-6)
    assert current_lr(opt) == pytest.approx(0.005, rel=1e-6)
