"""Tiered snapshots: the hot tier (an in-memory copy of the newest snapshot) serves rollbacks, the cold tier
(safetensors shards) is written from it in the background and committed on disk once every rank's write
finished, so a slow or failing disk never stops training and never leaves a marker beside a bad shard."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from gradience import GradienceController
from gradience import shardio as sio
from gradience.comm import TorchComm
from gradience.errors import ConfigError
from gradience.hot import HotTier
from gradience.snapshot import SnapshotStore
from tests.loops import (
    bitwise_same,
    events,
    gpt2_loss,
    make_gpt2,
    make_mlp,
    mlp_loss,
    poison,
    state_copy,
    wait_persisted,
)
from tests.threaded import free_groups, make_groups, run_ranks

MODELS = {"mlp": (make_mlp, mlp_loss, "2.weight"),
          "gpt2": (make_gpt2, gpt2_loss, "transformer.h.0.attn.c_attn.weight")}  # tied embeddings


def _guarded_mlp(out, **config) -> tuple[torch.nn.Module, torch.optim.Optimizer, GradienceController]:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = GradienceController(out_dir=str(out), **{"guard_snapshot_interval": 5, "spectral_enabled": False,
                                                   **config})
    ctl.initialize(model, optimizer=opt)
    return model, opt, ctl


def _one_step(ctl, model, opt, step: int, *, on_grads=None, on_update=None) -> bool:
    """One guarded step of the MLP; ``on_grads`` / ``on_update`` inject faults."""
    opt.zero_grad(set_to_none=True)
    loss = mlp_loss(model, step)
    loss.backward()
    if on_grads is not None:
        on_grads(model)
    ctl.before_optimizer_step(model, opt)
    opt.step()
    if on_update is not None:
        on_update(model)
    return ctl.step(step, loss, model)


def _train(tmp_path, model_name: str, hot: str, *, corrupt_10: bool = False, opt_name: str = "AdamW"):
    """Snapshots every 5 steps; a NaN written into a weight after update 12 (the sync verdict rolls back at
    12). Returns (rollback events, the state after update 10, the state right after the rollback)."""
    make, loss_fn, weight = MODELS[model_name]
    model = make()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if opt_name == "AdamW"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    out = tmp_path / f"{model_name}-{hot}-{corrupt_10}-{opt_name}"
    ctl = GradienceController(out_dir=str(out), guard_snapshot_hot=hot, guard_snapshot_interval=5,
                              spectral_enabled=False)
    ctl.initialize(model, optimizer=opt)
    at_10 = restored = None
    for step in range(14):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, step)
        loss.backward()
        ctl.before_optimizer_step(model, opt)
        opt.step()
        if step == 10:
            at_10 = state_copy(model, opt)
        if step == 12:
            if corrupt_10:  # the shard of step 10 on disk is damaged: only a read from memory restores it
                newest = ctl.store.committed()[-1]
                assert newest.step == 10 and (newest.path / sio.MARKER).exists()
                shard = ctl.store.shard_path(newest.sid)
                blob = bytearray(shard.read_bytes())
                blob[-1] ^= 0xFF
                shard.write_bytes(bytes(blob))
            poison(weight)(model)
        rollbacks = ctl.state.total_rollbacks
        assert ctl.step(step, loss, model)
        if ctl.state.total_rollbacks > rollbacks:
            restored = state_copy(model, opt)
        wait_persisted(ctl)  # a snapshot's marker is then written at the next step, whatever the disk's speed
    ctl.finalize()
    return events(out, "rollback_success"), at_10, restored


@pytest.mark.parametrize("model_name,opt_name", [("mlp", "AdamW"), ("mlp", "SGD"), ("gpt2", "AdamW")])
def test_hot_and_cold_rollbacks_restore_the_same_state_bitwise(tmp_path, model_name, opt_name):
    hot_rb, hot_10, hot_restored = _train(tmp_path, model_name, "auto", opt_name=opt_name)
    cold_rb, cold_10, cold_restored = _train(tmp_path, model_name, "off", opt_name=opt_name)
    assert [(e["step"], e["to_step"], e["restored_from"]) for e in hot_rb] == [(12, 10, "memory")]
    assert [(e["step"], e["to_step"], e["restored_from"]) for e in cold_rb] == [(12, 10, "disk")]
    assert bitwise_same(hot_restored, hot_10) and bitwise_same(cold_restored, cold_10) and bitwise_same(hot_10, cold_10)


def test_the_hot_copy_serves_a_rollback_whose_shard_on_disk_is_damaged(tmp_path):
    rb, at_10, restored = _train(tmp_path, "mlp", "auto", corrupt_10=True)
    assert [(e["to_step"], e["restored_from"]) for e in rb] == [(10, "memory")]
    assert bitwise_same(restored, at_10)
    # Without the hot copy the checksum rejects the damaged shard and the guard falls back to step 5's.
    rb, _, _ = _train(tmp_path, "mlp", "off", corrupt_10=True)
    assert [(e["to_step"], e["restored_from"]) for e in rb] == [(5, "disk")]
    assert events(tmp_path / "mlp-off-True-AdamW", "rollback_failed")[0]["to_step"] == 10


class _HeldWrites:
    """Replace the shard writer: the next shard write waits for ``release`` (or fails with ``error``); later
    ones go straight through."""

    def __init__(self, monkeypatch, error: Exception | None = None) -> None:
        self.error, self.release = error, threading.Event()
        self.started = threading.Event()
        real = sio.write_planned

        def write(path, head, raws):
            if not self.started.is_set():
                self.started.set()
                if self.error is not None:
                    raise self.error
                if not self.release.wait(60):
                    raise TimeoutError("the test never released the write")
            return real(path, head, raws)

        monkeypatch.setattr(sio, "write_planned", write)


def test_a_slow_persist_never_blocks_training_and_its_snapshot_is_a_target_meanwhile(tmp_path, monkeypatch):
    model, opt, ctl = _guarded_mlp(tmp_path)
    held = at_5 = None
    sid_5 = ctl.executor.next_sid + 1  # after the snapshot of step 0

    def after_update(step: int):
        def f(m):
            nonlocal at_5
            if step == 5:
                at_5 = {k: v.clone() for k, v in m.state_dict().items()}
            if step == 7:
                poison("0.weight")(m)
        return f

    for step in range(9):
        if step == 5:
            held = _HeldWrites(monkeypatch)  # the snapshot of step 5's write
        t0 = time.perf_counter()
        assert _one_step(ctl, model, opt, step, on_update=after_update(step))
        assert time.perf_counter() - t0 < 10, f"step {step} waited for the held write"
        if step < 5:
            wait_persisted(ctl)
        else:
            # Committed from memory at its step; on disk nothing is marked while its write is held.
            assert held.started.wait(10) and ctl.store.persisting_id == sid_5
            assert not (ctl.store.snapshot_dir(sid_5) / sio.MARKER).exists()
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"], e["restored_from"]) for e in rb] == [(7, 5, "memory")]
    held.release.set()
    wait_persisted(ctl)
    _one_step(ctl, model, opt, 9)  # the first step after every write finished writes the marker
    assert (ctl.store.snapshot_dir(sid_5) / sio.MARKER).exists() and ctl.store.persisting_id is None
    assert [e["step"] for e in events(tmp_path, "snapshot_persisted")][-1] == 5
    ctl.finalize()
    # What reached the disk is the state of step 5, bitwise (the copy, not the live state written later).
    from safetensors.torch import load_file

    disk = load_file(ctl.store.shard_path(sid_5))
    assert at_5.keys() and all(torch.equal(disk[f"model.{k}"], v) for k, v in at_5.items())


def test_a_failing_background_persist_never_commits_on_disk_and_training_goes_on(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="gradience")
    model, opt, ctl = _guarded_mlp(tmp_path)
    for step in range(14):
        if step == 5:  # the snapshot of step 5's write fails
            _HeldWrites(monkeypatch, error=OSError(28, "No space left on device"))
        # At step 7, snapshot 5 never reached the disk: its copy in memory serves the rollback.
        assert _one_step(ctl, model, opt, step, on_update=poison("0.weight") if step == 7 else None)
        wait_persisted(ctl)
    failed = events(tmp_path, "snapshot_persist_failed")
    assert [e["step"] for e in failed] == [5]
    assert "No space left" in failed[0]["local_error"]
    # The user sees it in the log, not only in telemetry.jsonl.
    assert any("snapshot of step 5 could not be written to disk" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert [(e["to_step"], e["restored_from"]) for e in events(tmp_path, "rollback_success")] == [(5, "memory")]
    summary = ctl.finalize()
    on_disk = [i.step for i in ctl.store.committed_on_disk()]
    assert 5 not in on_disk and 10 in on_disk  # the next snapshot was written and marked as usual
    assert not list(ctl.store.snapshot_dir(failed[0]["snapshot_id"]).glob("rank_*"))  # the failed shard is gone
    assert summary["guard"]["total_rollbacks"] == 1


def test_finalize_persists_the_last_snapshot_of_a_single_process_run(tmp_path):
    model, opt, ctl = _guarded_mlp(tmp_path)
    for step in range(6):
        _one_step(ctl, model, opt, step)
    ctl.finalize()
    assert [i.step for i in ctl.store.committed_on_disk()][-1] == 5


@pytest.fixture(scope="module")
def groups2():
    g = make_groups(2)
    yield g
    free_groups(g)


def test_two_ranks_write_the_marker_together_once_the_slower_rank_finished(tmp_path, monkeypatch, groups2):
    release = threading.Event()
    real = sio.write_planned

    def write(path, head, raws):  # rank 1's shard of the snapshot of step 5 (id 2) waits for the test
        if path.parent.name.endswith("_00000002") and path.name.startswith("rank_00001"):
            release.wait(60)
        return real(path, head, raws)

    monkeypatch.setattr(sio, "write_planned", write)
    marked_at: list[list[int]] = [[], []]

    def rank_fn(rank, group):
        model = make_mlp(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5, spectral_enabled=False)
        ctl.initialize(model, optimizer=opt)
        def release_at_8(_model: torch.nn.Module) -> None:
            release.set()
            wait_persisted(ctl)

        for step in range(12):
            _one_step(ctl, model, opt, step, on_update=release_at_8 if step == 8 and rank == 1 else None)
            if ctl.store.persisting_id is None and not marked_at[rank] and step >= 5:
                marked_at[rank].append(step)
        ctl.finalize()

    run_ranks(groups2, rank_fn)
    # Rank 0 finished writing at once, but the marker waited for rank 1 (released at step 8), on both ranks.
    assert marked_at == [[8], [8]]
    for rank in (0, 1):
        assert [e["step"] for e in events(tmp_path, "snapshot_persisted", rank=rank)][2] == 5


def test_hot_tier_configuration_is_checked_and_placement_is_host_memory_without_a_gpu(tmp_path):
    with pytest.raises(ConfigError, match="guard_snapshot_hot"):
        GradienceController(out_dir=str(tmp_path), guard_snapshot_hot="gpu")
    with pytest.raises(ConfigError, match="hot tier only"):
        GradienceController(out_dir=str(tmp_path), guard_snapshot_tier="memory", guard_snapshot_hot="off")
    with pytest.raises(ConfigError, match="guard_snapshot_hot_budget"):
        GradienceController(out_dir=str(tmp_path), guard_snapshot_hot_budget=1.5)
    if not torch.cuda.is_available():
        assert HotTier("auto").where(0) == "cpu"
    with pytest.raises(ConfigError, match="hot tier only"):
        SnapshotStore(tmp_path, comm=None, tier="memory", hot=HotTier("off"))


def test_a_crash_while_the_newest_snapshot_is_in_memory_only_resumes_from_disk(tmp_path, monkeypatch):
    # keep=1: the newest target is the only one kept, but while its shard is still being written the newest
    # snapshot on disk must stay, or a crash then would find nothing to resume from.
    model, opt, ctl = _guarded_mlp(tmp_path, guard_snapshot_keep=1)
    held = None
    for step in range(8):
        if step == 5:
            held = _HeldWrites(monkeypatch)
        _one_step(ctl, model, opt, step)
        if step < 5:
            wait_persisted(ctl)
        else:
            assert [i.step for i in ctl.store.committed_on_disk()] == [0], step
    ctl.close()  # the process dies here: no finalize, the write of step 5 never finished
    again = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, spectral_enabled=False)
    fresh = make_mlp(1)
    again.initialize(fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-2), resume="latest")
    assert again.resumed_step == 0
    again.finalize()
    held.release.set()


def test_a_rollback_decided_at_the_gate_does_not_wait_for_a_held_write(tmp_path, monkeypatch):
    model, opt, ctl = _guarded_mlp(tmp_path, guard_max_consecutive_skips=2)
    held = None

    def nan_grad(m):
        m[0].weight.grad[0, 0] = float("nan")  # skip, skip, then a rollback decided at the gate

    for step in range(10):
        if step == 5:
            held = _HeldWrites(monkeypatch)
        t0 = time.perf_counter()
        _one_step(ctl, model, opt, step, on_grads=nan_grad if step >= 6 else None)
        assert time.perf_counter() - t0 < 10, f"step {step} waited for the held write"
        if step < 5:
            wait_persisted(ctl)
    assert [(e["step"], e["to_step"], e["restored_from"]) for e in events(tmp_path, "rollback_success")][0] == \
        (8, 5, "memory")
    assert held.started.is_set()  # the write was really held while the gate rolled back
    held.release.set()
    ctl.finalize()


@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
def test_the_in_place_restore_equals_the_load_state_dict_restore(tmp_path, model_name, monkeypatch):
    from gradience import state as st

    make, loss_fn, _ = MODELS[model_name]
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(n: int) -> None:
        for step in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, step).backward()
            opt.step()

    train(3)
    saved, meta = st.capture_state(model, opt, copy=True)
    at_save = state_copy(model, opt)
    results, took = [], []
    real = st._restore_in_place

    def spy(*a) -> bool:
        took.append(real(*a))
        return took[-1]

    monkeypatch.setattr(st, "_restore_in_place", spy)
    for in_place in (True, False):
        train(2)
        if not in_place:
            monkeypatch.setattr(st, "_restore_in_place", lambda *a: False)
        st.restore_state(saved, meta, model, opt)
        results.append(state_copy(model, opt))
    assert took == [True]  # the first restore really took the in-place path
    assert bitwise_same(results[0], at_save) and bitwise_same(results[1], at_save)
    if model_name == "gpt2":  # the tie survives both paths
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
