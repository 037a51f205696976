"""Distributed guard on real gloo groups, ranks as threads: one verdict, one rollback target, one LR."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from gradience import ConsensusTimeout, GradienceController
from gradience.comm import TorchComm
from gradience.consensus import agree
from gradience.types import Phase, ProbeReport
from tests.loops import events, make_mlp, mlp_loss, poison, run_loop
from tests.threaded import free_groups, make_groups, run_ranks


@pytest.fixture(scope="module")
def groups2():
    g = make_groups(2)
    yield g
    free_groups(g)


@pytest.fixture(scope="module")
def groups3():
    g = make_groups(3)
    yield g
    free_groups(g)


class RaisingLoss:
    """A loss whose value cannot be read: the probe raises on this rank only."""

    def __float__(self) -> float:
        raise RuntimeError("simulated probe failure")


def _faults(kind: str, bad_rank: int, at: int):
    """Hooks for run_loop that inject ``kind`` on ``bad_rank`` at step ``at``."""
    hooks: dict = {}
    if kind == "weight_nan":
        hooks["on_update"] = lambda r: (lambda s, m: poison("0.weight")(m) if r == bad_rank and s == at else None)
    elif kind == "weight_violation":
        hooks["on_update"] = lambda r: (lambda s, m: poison("2.weight", 1e9)(m) if r == bad_rank and s == at else None)
    elif kind == "grad_nan":
        def grads(r):
            def f(s, m):
                if r == bad_rank and s == at:
                    m[0].weight.grad[0, 0] = float("nan")
            return f
        hooks["on_grads"] = grads
    elif kind == "probe_error":
        hooks["guard_loss"] = lambda r: (lambda s, loss: RaisingLoss() if r == bad_rank and s == at else loss)
    return hooks


def _guarded_run(groups, tmp_path, *, steps=30, kind=None, bad_rank=0, at=17, **cfg):
    models = [make_mlp(0) for _ in groups]  # seeded in this thread: torch's RNG is process-global
    hooks = _faults(kind, bad_rank, at) if kind else {}

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5, **cfg)
        out = run_loop(models[rank], mlp_loss, ctl, steps=steps, **{k: v(rank) for k, v in hooks.items()})
        return ctl, out

    return models, run_ranks(groups, rank_fn)


def _markers(tmp_path):
    return {m.parent: json.loads(m.read_text()) for m in (tmp_path / "snapshots").glob("snap_*/COMMITTED")}


def _committed_labels(tmp_path):
    return sorted(m["step"] for m in _markers(tmp_path).values())


def _snap_dir(tmp_path, label):
    (d,) = [d for d, m in _markers(tmp_path).items() if m["step"] == label]
    return d


def _actions(tmp_path, rank):
    keep = ("snapshot", "skip_step", "rollback_success", "rollback_failed", "abort", "probe_error")
    out = []
    for e in events(tmp_path, rank=rank):
        if e["event"] in keep:
            out.append((e["event"], e.get("step"), e.get("to_step"), e.get("reason"), e.get("lr"),
                        tuple(e.get("faulty_ranks", ())), e.get("committed")))
    return out


@pytest.mark.parametrize("kind,expect", [
    ("weight_nan", ("rollback_success", "NONFINITE_WEIGHTS")),
    ("weight_violation", ("rollback_success", "VIOLATION_THRESHOLD")),
    ("grad_nan", ("skip_step", "NONFINITE_GRADS")),
    # A raising probe is reported on every rank (blaming the rank it raised on) and never rolls back.
    ("probe_error", ("probe_error", None)),
])
@pytest.mark.parametrize("world,bad_rank", [(2, 0), (2, 1), (3, 0), (3, 2)])
def test_same_decision_on_every_rank(request, tmp_path, world, bad_rank, kind, expect):
    groups = request.getfixturevalue(f"groups{world}")
    models, results = _guarded_run(groups, tmp_path, kind=kind, bad_rank=bad_rank)
    per_rank = [_actions(tmp_path, r) for r in range(world)]
    assert all(a == per_rank[0] for a in per_rank), per_rank
    acted = [a for a in per_rank[0] if a[0] == expect[0]]
    assert [(a[1], a[3], a[5]) for a in acted] == [(17, expect[1], (bad_rank,))]
    if expect[0] == "rollback_success":
        assert acted[0][2] == 15  # newest committed snapshot before the fault, on every rank
    lrs = {out["optimizer"].param_groups[0]["lr"] for _, out in results}
    assert len(lrs) == 1
    for m in models[1:]:  # replicas end bitwise identical
        assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), m.parameters(), strict=True))
    summary = results[0][0].summary()
    assert summary["world_size"] == world
    assert summary["guard"]["first_fault_ranks"] == ([] if kind == "probe_error" else [bad_rank])
    if kind == "probe_error":
        assert summary["guard"]["total_rollbacks"] == 0


def test_consensus_reports_every_faulty_rank(groups3):
    def fn(rank, group):
        bad = rank in (0, 2)
        report = ProbeReport(phase=Phase.STEP, step=3, nonfinite_weights=bad, weight_norm=float(rank))
        return agree(report, TorchComm(group, timeout_s=10))

    verdicts = run_ranks(groups3, fn)
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert verdicts[0].faulty_ranks == (0, 2) and verdicts[0].nonfinite_weights
    assert verdicts[0].weight_norm == 2.0


def test_failed_shard_write_on_one_rank_commits_nothing(groups2, tmp_path):
    models = [make_mlp(0) for _ in groups2]

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5)
        if rank == 1:  # rank 1's disk "fills up" when the step-15 snapshot is written
            init = ctl.initialize

            def initialize(*args, **kwargs):
                init(*args, **kwargs)
                write = ctl.store._shard_job

                def flaky(sid, *a, **k):
                    if ctl.recovery.labels.get(sid) == 15:
                        raise OSError(28, "No space left on device")
                    return write(sid, *a, **k)

                ctl.store._shard_job = flaky

            ctl.initialize = initialize
        inject = poison("0.weight")
        return run_loop(models[rank], mlp_loss, ctl, steps=20,
                        on_update=lambda s, m: inject(m) if rank == 0 and s == 17 else None)

    run_ranks(groups2, rank_fn)
    for r in range(2):
        snaps = {e["step"]: e["committed"] for e in events(tmp_path, "snapshot", rank=r)}
        assert snaps[10] is True and snaps[15] is False
        assert [e["to_step"] for e in events(tmp_path, "rollback_success", rank=r)] == [10]
    assert 15 not in _committed_labels(tmp_path)


def test_corrupt_shard_is_rejected_and_everyone_falls_back(groups2, tmp_path):
    models = [make_mlp(0) for _ in groups2]

    def rank_fn(rank, group):
        # No hot copy: the rollback reads (and verifies) the shards on disk.
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5, guard_snapshot_hot="off")

        def hook(s, m):
            if s == 17:
                if rank == 1:  # flip one byte in rank 1's shard of the newest snapshot
                    shard = _snap_dir(tmp_path, 15) / "rank_00001.safetensors"
                    data = bytearray(shard.read_bytes())
                    data[-3] ^= 0xFF
                    shard.write_bytes(bytes(data))
                else:
                    poison("0.weight")(m)

        return run_loop(models[rank], mlp_loss, ctl, steps=20, on_update=hook)

    run_ranks(groups2, rank_fn)
    for r in range(2):
        failed = events(tmp_path, "rollback_failed", rank=r)
        assert [(e["to_step"], e["local_ok"]) for e in failed] == [(15, r != 1)]
        assert [e["to_step"] for e in events(tmp_path, "rollback_success", rank=r)] == [10]
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True))


def test_replica_divergence_is_detected_and_repaired(groups2, tmp_path):
    models, results = _guarded_run(groups2, tmp_path, fingerprint_interval=1)
    assert all(not events(tmp_path, "rollback_success", rank=r) for r in range(2))  # healthy: fingerprints agree

    def nudge(rank):
        def f(s, m):
            if rank == 1 and s == 12:
                with torch.no_grad():
                    m[0].weight[0, 0] += 1e-3  # finite, plausible, silently different
        return f

    models = [make_mlp(0) for _ in groups2]
    out_dir = tmp_path / "div"

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(out_dir), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5, fingerprint_interval=1)
        return run_loop(models[rank], mlp_loss, ctl, steps=20, on_update=nudge(rank))

    run_ranks(groups2, rank_fn)
    for r in range(2):
        rb = events(out_dir, "rollback_success", rank=r)
        assert [(e["step"], e["to_step"], e["reason"]) for e in rb] == [(12, 10, "REPLICA_DIVERGENCE")]
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True))


def test_missing_peer_raises_consensus_timeout_instead_of_hanging(tmp_path):
    groups = make_groups(2)
    try:
        def rank_fn(rank, group):
            ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=1.5),
                                      guard_enabled=False)
            ctl.initialize(make_mlp())
            if rank == 1:
                return None  # initialized, then never joins a step
            t0 = time.monotonic()
            with pytest.raises(ConsensusTimeout, match="1.5s"):
                ctl.step(0, 1.0)
            return time.monotonic() - t0

        elapsed = run_ranks(groups, rank_fn, timeout_s=30)[0]
        assert elapsed < 5
        abort = events(tmp_path, "abort")
        assert abort and abort[0]["reason"] == "CONSENSUS_TIMEOUT"
        import json

        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["guard"]["integrity_status"] == "ABORTED"
    finally:
        free_groups(groups)


def test_capture_error_on_one_rank_commits_nothing_and_nobody_hangs(groups2, tmp_path):
    models = [make_mlp(0) for _ in groups2]

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5)
        if rank == 0:
            real = models[0].state_dict

            def state_dict(*a, **k):  # fails only while the step-10 snapshot is captured
                if ctl.last_step == 10:
                    raise RuntimeError("device lost while copying")
                return real(*a, **k)

            models[0].state_dict = state_dict
        return run_loop(models[rank], mlp_loss, ctl, steps=14)

    run_ranks(groups2, rank_fn)
    for r in range(2):
        snaps = {e["step"]: e for e in events(tmp_path, "snapshot", rank=r)}
        assert snaps[5]["committed"] and not snaps[10]["committed"]
        assert ("device lost" in (snaps[10]["local_error"] or "")) == (r == 0)
    assert 10 not in _committed_labels(tmp_path)


def test_restore_error_on_one_rank_stops_every_rank(groups2, tmp_path):
    from gradience import SnapshotError

    models = [make_mlp(0) for _ in groups2]

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30),
                                  guard_snapshot_interval=5)
        if rank == 1:
            init = ctl.initialize

            def initialize(*args, **kwargs):
                init(*args, **kwargs)

                def broken(prepared, lr_scale):
                    raise RuntimeError("size mismatch for 0.weight")

                ctl.recovery.restore = broken

            ctl.initialize = initialize
        inject = poison("0.weight")
        with pytest.raises(SnapshotError, match="on this rank" if rank == 1 else "on another rank"):
            run_loop(models[rank], mlp_loss, ctl, steps=20, on_update=lambda s, m: inject(m) if s == 7 else None)
        return ctl

    ctls = run_ranks(groups2, rank_fn)
    assert all(c.halted and c.exit_code == 3 for c in ctls)
    abort = events(tmp_path, "abort", rank=1)
    assert abort and abort[0]["reason"] == "RESTORE_FAILED" and "size mismatch" in abort[0]["error"]
    # The summary names what happened, not a snapshot shortage.
    assert all(c.summary()["guard"]["halt_reason"] == "RESTORE_FAILED" for c in ctls)


def test_user_supplied_process_group(groups2, tmp_path):
    """process_group= (a DDP or data-parallel subgroup) is all the controller needs to agree over."""
    models = [make_mlp(0) for _ in groups2]
    inject = poison("0.weight")

    def rank_fn(rank, group):
        ctl = GradienceController(out_dir=str(tmp_path), process_group=group, guard_snapshot_interval=4,
                                  collective_timeout_s=30)
        out = run_loop(models[rank], mlp_loss, ctl, steps=10,
                       on_update=lambda s, m: inject(m) if rank == 1 and s == 6 else None)
        return ctl.comm.world_size, out["summary"]

    results = run_ranks(groups2, rank_fn)
    assert [w for w, _ in results] == [2, 2]
    for r in range(2):
        assert [(e["step"], e["to_step"]) for e in events(tmp_path, "rollback_success", rank=r)] == [(6, 4)]


def test_background_snapshots_commit_and_abandon_in_lockstep(groups2, tmp_path):
    models, _ = _guarded_run(groups2, tmp_path, kind="weight_nan", bad_rank=1, at=12, guard_snapshot_commit_lag=2)
    per_rank = [_actions(tmp_path, r) for r in range(2)]
    assert per_rank[0] == per_rank[1]
    snaps = [(a[1], a[6]) for a in per_rank[0] if a[0] == "snapshot"]
    assert snaps[:4] == [(-1, True), (0, True), (5, True), (10, False)]  # 10 was in flight at the fault
    assert [a[2] for a in per_rank[0] if a[0] == "rollback_success"] == [5]
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True))


@pytest.mark.parametrize("seed", range(20))
def test_a_group_of_one_reaches_the_verdict_the_all_reduce_encoding_gives(seed):
    import math
    import random

    from gradience.consensus import alone, pack, unpack

    rng = random.Random(seed)
    pick = lambda *xs: xs[rng.randrange(len(xs))]  # noqa: E731
    report = ProbeReport(
        phase=pick(Phase.GRADS, Phase.STEP), step=rng.randrange(100), nonfinite_grads=pick(False, True),
        violation_weights=pick(False, True), update_skipped=pick(False, True), scaler_overflow=pick(False, True),
        grad_norm=pick(0.0, 3.5, math.inf, math.nan), weight_norm=pick(1.0, math.nan),
        loss=pick(None, 2.5, math.nan, -math.inf), fingerprint=pick(None, 12345.0),
        spectral_kappa=pick(None, 0.3), stable_rank=pick(None, 4.0))
    via_tensor = unpack(pack(report, 0, 1), report, 1)
    local = alone(report)

    def same(a, b):
        return (a is None and b is None) or a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))

    for field in dataclasses.fields(via_tensor):
        assert same(getattr(local, field.name), getattr(via_tensor, field.name)), field.name
