"""Recovery after a crash: a real 2-rank run SIGKILLed (between snapshots, and inside a shard write), then
restarted with ``initialize(resume="latest")``; and ``load_snapshot`` by hand, tied weights and wrappers."""

from __future__ import annotations

import logging

import pytest
import torch

from gradience import ConfigError, GradienceController, SnapshotError, load_snapshot
from tests.loops import make_gpt2, make_mlp, mlp_loss, poison, run_loop
from tests.test_faults import launch, result, summary, wait


@pytest.mark.slow
@pytest.mark.parametrize("crash, expect_step", [("crash", 8), ("crash_write", 8)])
def test_a_killed_run_resumes_from_the_newest_complete_snapshot(tmp_path, crash, expect_step):
    procs = launch(crash, tmp_path, GUARD_TIMEOUT="3", STEPS="16")
    codes = [wait(p, 90)[0] for p in procs]
    assert codes[1] == -9  # SIGKILLed
    assert list((tmp_path / "snapshots").glob("snap_*/*.tmp")) or crash == "crash"
    # What the newest complete snapshot holds, read independently of the resumed run.
    expected = []
    for rank in (0, 1):
        model = make_mlp(1)
        assert load_snapshot(tmp_path, model, rank=rank) == expect_step
        expected.append([p.detach().tolist() for p in model.parameters()])

    live = result(tmp_path, 0)["live"][str(expect_step)]  # the survivor's guard state right after that step
    procs = launch("resume", tmp_path, GUARD_TIMEOUT="10", STEPS="16")
    outs = [wait(p, 90) for p in procs]
    for rank in (0, 1):
        r = result(tmp_path, rank)
        assert r["status"] == "finished", outs[rank][1][-3000:]
        assert r["resumed_step"] == expect_step
        assert r["weights"] == expected[rank]  # bitwise: the same floats, read back as JSON
        # The rollback at step 6 (before the crash) still counts, and its LR backoff is still in force; the
        # snapshot of step 8 closed that episode, so the budget is whole again, as it was in the live run.
        assert (r["lr_scale"], r["total_rollbacks"], r["guard_state"]["episode_rollbacks"]) == (0.5, 1, 0)
        assert {k: v for k, v in r["guard_state"].items() if k != "committed_sids"} == {
            k: v for k, v in live.items() if k != "committed_sids"}
        g = r["summary"]["guard"]
        assert (g["integrity_status"], g["lr_scale"], g["total_rollbacks"]) == ("RECOVERED", 0.5, 1)
        assert r["summary"]["final_step"] == 15
    assert not list((tmp_path / "snapshots").rglob("*.tmp"))  # the half-written shard was cleaned up
    assert summary(tmp_path, "summary.json")["guard"]["integrity_status"] == "RECOVERED"
    # The snapshots are 2-rank shards: one process cannot continue from them, and is told why.
    model = make_mlp()
    with pytest.raises(ConfigError, match="taken by 2 ranks, this run has 1"):
        GradienceController(out_dir=str(tmp_path)).initialize(
            model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), resume="latest")


def test_resume_latest_with_nothing_committed_starts_fresh_and_says_so(tmp_path, caplog):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    model = make_mlp()
    with caplog.at_level(logging.INFO, logger="gradience"):
        ctl.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), resume="latest")
    assert ctl.resumed_step is None
    ctl.finalize()
    assert "no committed snapshot: starting fresh" in caplog.text


def test_resume_latest_in_one_process_restores_state_scale_and_schedule(tmp_path):
    sched_fn = lambda s: 0.9**s  # noqa: E731 - LambdaLR needs a callable
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    model = make_mlp()
    out = run_loop(model, mlp_loss, ctl, steps=13, schedule=sched_fn,
                   on_update=lambda s, m: poison("0.weight")(m) if s == 7 else None)
    assert out["summary"]["guard"]["total_rollbacks"] == 1
    snap = make_mlp(1)
    assert load_snapshot(tmp_path, snap) == 10

    model2 = make_mlp(2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, sched_fn)
    ctl2 = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    ctl2.initialize(model2, optimizer=opt2, scheduler=sched2, resume="latest")
    assert ctl2.resumed_step == 10 and ctl2.lr_scale == 0.5 and ctl2.state.total_rollbacks == 1
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), snap.parameters(), strict=True))
    assert sched2.last_epoch == 11  # the schedule's position at the snapshot (after step 10's scheduler.step)
    assert ctl2.lr.effective_lrs()[0] == pytest.approx(3e-3 * 0.9**11 * 0.5)
    ctl2.finalize()


def test_load_snapshot_round_trip_with_tied_weights_and_wrapper_prefixes(tmp_path):
    model = make_gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=3)
    from tests.loops import gpt2_loss

    run_loop(model, gpt2_loss, ctl, steps=4)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    target = make_gpt2(1)

    class Wrapper(torch.nn.Module):  # the "module." prefix of DDP / DataParallel
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(target)
    assert load_snapshot(tmp_path, wrapped) == 3
    assert target.lm_head.weight is target.transformer.wte.weight  # still tied
    for n, p in target.named_parameters():
        assert torch.equal(p, saved[n]), n

    compiled = torch.compile(make_gpt2(2))  # the "_orig_mod." prefix
    assert load_snapshot(tmp_path, compiled, step=3) == 3
    for n, p in compiled._orig_mod.named_parameters():
        assert torch.equal(p, saved[n]), n

    with pytest.raises(SnapshotError, match="step 99"):
        load_snapshot(tmp_path, make_gpt2(3), step=99)
