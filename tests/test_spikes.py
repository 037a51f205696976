"""Finite spikes caught at the gradient gate: the loss (passed to the gate) and the grad norm against their own
running statistics, with the action the config chooses, identical on every rank."""

from __future__ import annotations

import logging

import pytest
import torch

from gradience import GradienceController
from tests.loops import events, make_mlp, mlp_loss
from tests.threaded import free_groups, make_groups, run_ranks


def spiky_loop(ctl, model, *, steps, spike_at=None, rank=0, spike_rank=0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl.initialize(model, optimizer=opt)
    applied = []
    for step in range(steps):
        opt.zero_grad()
        loss = mlp_loss(model, step)
        loss.backward()
        seen = loss.detach() * (20.0 if step == spike_at and rank == spike_rank else 1.0)
        applied.append(ctl.before_optimizer_step(model, opt, loss=seen))
        opt.step()
        assert ctl.step(step, loss, model)
    return applied, ctl.finalize()


@pytest.mark.parametrize("action", ["log", "skip", "rollback"])
def test_a_loss_spike_is_judged_at_the_gate_with_the_configured_action(tmp_path, action, caplog):
    ctl = GradienceController(out_dir=str(tmp_path), spike_action=action, guard_snapshot_interval=50)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        applied, summary = spiky_loop(ctl, make_mlp(), steps=130, spike_at=110)
    g = summary["guard"]
    if action == "log":
        assert all(applied) and g["integrity_status"] == "OK"
        (ev,) = events(tmp_path, "spike")
        assert ev["step"] == 110 and ev["detail"].startswith("loss ")
        assert any("spike at step 110: loss" in r.getMessage() for r in caplog.records)
    elif action == "skip":
        assert [i for i, a in enumerate(applied) if not a] == [110]
        (ev,) = events(tmp_path, "skip_step")
        assert (ev["step"], ev["reason"]) == (110, "SPIKE") and "zscore" in ev["detail"]
        assert g["total_skipped_steps"] == 1 and g["total_rollbacks"] == 0
    else:
        (rb,) = events(tmp_path, "rollback_success")
        assert (rb["step"], rb["reason"], rb["to_step"]) == (110, "SPIKE", 100) and "loss" in rb["detail"]
        assert g["total_rollbacks"] == 1 and g["lr_scale"] == 0.5


def test_healthy_run_never_fires_and_spike_off_never_checks(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path / "a"), spike_action="skip")
    applied, summary = spiky_loop(ctl, make_mlp(), steps=300)
    assert all(applied) and events(tmp_path / "a", "skip_step") == []
    ctl = GradienceController(out_dir=str(tmp_path / "b"), spike_action="off")
    applied, _ = spiky_loop(ctl, make_mlp(), steps=130, spike_at=110)
    assert all(applied) and events(tmp_path / "b", "spike") == []


def test_a_spike_on_one_ranks_loss_is_every_ranks_decision(tmp_path):
    groups = make_groups(2)
    models = [make_mlp(0) for _ in groups]

    def rank_fn(rank, group):
        from gradience.comm import TorchComm

        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30), spike_action="skip")
        return spiky_loop(ctl, models[rank], steps=120, spike_at=100, rank=rank, spike_rank=1)

    try:
        results = run_ranks(groups, rank_fn)
    finally:
        free_groups(groups)
    for applied, summary in results:
        assert [i for i, a in enumerate(applied) if not a] == [100]
        assert summary["guard"]["total_skipped_steps"] == 1
