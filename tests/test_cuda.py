"""The accelerator path, end to end on a CUDA device (skipped without one): the asynchronous verdict with no host
sync in the steady state, the gate on the device, weight faults rolled back one step later from a hot copy in
device memory, and the disk shard written from that copy equal to the state it was taken from."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradience import GradienceController
from tests.loops import bitwise_same, events, state_copy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(32, 64, device="cuda", generator=g)
    return model(x).pow(2).mean()


def test_async_verdict_has_no_host_sync_in_the_steady_state(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=1000, spectral_enabled=False)
    ctl.initialize(model, optimizer=opt)
    syncs = []
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, step)
        loss.backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ctl.before_optimizer_step(model, opt, loss=loss)
                torch.cuda.set_sync_debug_mode(0)
                opt.step()
                torch.cuda.set_sync_debug_mode("warn")
                ctl.step(step, loss, model)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        if step >= 5:  # after the first steps (the initial snapshot's write, the first read-back)
            syncs.append(sum("synchroniz" in str(w.message).lower() for w in caught))
    ctl.finalize()
    assert ctl._deferred is not None  # auto on a GPU with a fused optimizer: asynchronous
    assert sum(syncs) == 0, syncs


def test_gate_on_the_device_and_a_weight_fault_rolled_back_from_device_memory(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, spectral_enabled=False)
    ctl.initialize(model, optimizer=opt)
    at_10 = restored = None
    for step in range(16):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, step)
        loss.backward()
        if step == 7:
            model[2].bias.grad[0] = float("nan")
        before = state_copy(model, opt) if step == 7 else None
        ctl.before_optimizer_step(model, opt, loss=loss)
        opt.step()
        if step == 7:
            assert bitwise_same(before, state_copy(model, opt))  # skipped on the device, bitwise
        if step == 10:
            at_10 = state_copy(model, opt)
            at_10_cpu = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if step == 12:
            with torch.no_grad():
                model[0].weight.view(-1)[0] = float("nan")
        n = ctl.state.total_rollbacks
        assert ctl.step(step, loss, model)
        if ctl.state.total_rollbacks > n:
            restored = state_copy(model, opt)
        if step == 11:  # snapshot 10 committed (one step late under async): its copy lives in device memory
            hot = ctl.store._hot[max(ctl.store._hot)]
            assert all(t.is_cuda for t in hot.tensors.values())
    ctl.finalize()
    assert [(e["step"], e["reason"]) for e in events(tmp_path, "skip_step")] == [(7, "NONFINITE_GRADS")]
    rb = events(tmp_path, "rollback_success")
    assert [(e["step"], e["to_step"], e["restored_from"]) for e in rb] == [(13, 10, "memory")]
    assert bitwise_same(restored, at_10)
    from safetensors.torch import load_file

    sid = next(i.sid for i in ctl.store.committed_on_disk() if i.step == 10)
    disk = load_file(ctl.store.shard_path(sid))
    assert all(torch.equal(disk[f"model.{k}"], v) for k, v in at_10_cpu.items())
