"""The distributed contract under faults, with real processes and real gloo groups: a frozen or dead peer,
ranks making different calls, a launcher's SIGTERM, a rank outside its group, groups sharing an out_dir.
Each rank runs tests/fault_worker.py (a DDP MLP under a GradienceController)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradience import CollectiveMismatch, ConsensusTimeout, GradienceController
from gradience.comm import TorchComm
from tests.conftest import free_port
from tests.loops import make_mlp, mlp_loss
from tests.threaded import free_groups, make_groups, run_ranks

WORKER = Path(__file__).with_name("fault_worker.py")
ROOT = WORKER.parents[1]


def launch(scenario: str, out: Path, world: int = 2, **env: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT), **env}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def result(out: Path, rank: int) -> dict:
    return json.loads((out / f"result_rank{rank}.json").read_text())


def summary(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def wait(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        text, _ = p.communicate()
        pytest.fail(f"process still alive after {timeout}s:\n{text[-3000:]}")
    return p.returncode, text


@pytest.mark.slow
def test_a_frozen_peer_lets_the_survivor_exit_within_the_timeout(tmp_path):
    procs = launch("freeze", tmp_path, GUARD_TIMEOUT="3")
    try:
        code, text = wait(procs[0], 60)
        ended = time.time()
    finally:
        procs[1].kill()  # SIGKILL reaches a stopped process
        procs[1].communicate()
    r = result(tmp_path, 0)
    assert r["status"] == "ConsensusTimeout", text[-2000:]
    print(f"frozen peer, collective_timeout_s=3: ConsensusTimeout {r['t_error'] - r['t_start']:.1f}s after start "
          f"(5 steps + the deadline); the survivor's process ended {ended - r['t_error']:.1f}s after it")
    # The exception comes within the timeout; the process ends within the timeout plus a margin.
    assert r["t_error"] - r["t_start"] < 30
    assert ended - r["t_error"] < 3 + 10, text[-2000:]
    assert code != 0
    s = summary(tmp_path, "summary_rank0.json")
    assert s["guard"]["integrity_status"] == "ABORTED" and s["guard"]["halt_reason"] == "CONSENSUS_TIMEOUT"
    assert summary(tmp_path, "summary.json")["guard"]["halt_reason"] == "CONSENSUS_TIMEOUT"


@pytest.mark.slow
def test_when_rank_0_dies_the_survivor_leaves_an_aborted_summary(tmp_path):
    procs = launch("die", tmp_path, GUARD_TIMEOUT="3")
    codes = [wait(p, 60)[0] for p in procs]
    assert codes[0] == 17
    assert result(tmp_path, 1)["status"] == "ConsensusTimeout"
    s = summary(tmp_path, "summary_rank1.json")
    assert (s["global_rank"], s["guard"]["integrity_status"]) == (1, "ABORTED")
    assert s["guard"]["halt_reason"] == "CONSENSUS_TIMEOUT"
    aborts = [json.loads(x) for x in (tmp_path / "telemetry_rank1.jsonl").read_text().splitlines()
              if '"abort"' in x]
    assert aborts and "a peer died" in aborts[0]["error"]


@pytest.mark.slow
def test_ranks_making_different_calls_stop_with_a_mismatch_naming_both_sides(tmp_path):
    procs = launch("mismatch", tmp_path)
    outs = [wait(p, 60) for p in procs]
    for rank in (0, 1):
        r = result(tmp_path, rank)
        assert r["status"] == "CollectiveMismatch", outs[rank][1][-2000:]
        assert "check:grads" in r["error"] and "check:step" in r["error"]
        s = summary(tmp_path, f"summary_rank{rank}.json")
        assert s["guard"]["halt_reason"] == "COLLECTIVE_MISMATCH"


@pytest.mark.slow
def test_sigterm_from_the_launcher_leaves_an_aborted_summary_per_rank(tmp_path):
    procs = launch("sigterm", tmp_path)
    deadline = time.time() + 60
    while not all((tmp_path / f"ready_rank{r}").exists() for r in (0, 1)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [wait(p, 30)[0] for p in procs]
    assert codes == [-signal.SIGTERM, -signal.SIGTERM]  # the signal still ends the process
    for rank in (0, 1):
        s = summary(tmp_path, f"summary_rank{rank}.json")
        assert s["guard"]["integrity_status"] == "ABORTED"
        assert s["guard"]["halt_reason"].startswith("TERMINATED")


@pytest.mark.slow
def test_a_rank_outside_its_process_group_gets_a_config_error(tmp_path):
    procs = launch("nonmember", tmp_path)
    codes = [wait(p, 60)[0] for p in procs]
    assert codes[1] == 2
    assert "not a member" in result(tmp_path, 1)["config_error"]


@pytest.mark.slow
def test_ddp_join_is_refused_at_the_first_call_inside_it(tmp_path):
    procs = launch("join", tmp_path)
    codes = [wait(p, 60)[0] for p in procs]
    assert codes == [2, 2]
    for rank in (0, 1):
        assert "does not support DDP join()" in result(tmp_path, rank)["config_error"]


@pytest.mark.slow
def test_data_parallel_groups_share_an_out_dir_without_collisions(tmp_path):
    procs = launch("subgroups", tmp_path, world=4, STEPS="10")
    outs = [wait(p, 120) for p in procs]
    for rank in range(4):
        r = result(tmp_path, rank)
        assert r["status"] == "finished", outs[rank][1][-2000:]
        g = r["summary"]["guard"]
        assert g["integrity_status"] == "RECOVERED" and g["total_rollbacks"] == 1
    roots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert roots == ["group_0-2", "group_1-3"]
    shards = sorted(p.name for p in (tmp_path / "snapshots" / "group_1-3").glob("snap_*/rank_*"))
    assert shards and {n.split(".")[0] for n in shards} == {"rank_00001", "rank_00003"}


# --------------------------------------------------------------------------------------- threaded ranks
def test_after_a_timeout_every_later_call_refuses_without_a_collective(tmp_path):
    groups = make_groups(2)

    def rank_fn(rank, group):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=1.0),
                                  guard_snapshot_interval=5)
        ctl.initialize(model, optimizer=opt)
        if rank == 1:
            time.sleep(2.5)  # stalls past the deadline, then comes back late
        loss = mlp_loss(model, 0)
        loss.backward()
        caught = None
        try:
            ctl.before_optimizer_step(model, opt)
        except ConsensusTimeout as e:
            caught = e
        t0 = time.monotonic()
        try:
            later = (ctl.before_optimizer_step(model, opt), ctl.step(0, loss, model))
        except ConsensusTimeout as e:
            # The late rank's first all-reduce completes against the one rank 0 abandoned (gloo finishes it
            # in the background); its next collective finds nobody and times out.
            later = e
        return caught, later, time.monotonic() - t0, ctl

    try:
        results = run_ranks(groups, rank_fn, timeout_s=60)
    finally:
        free_groups(groups)
    caught, later, elapsed, ctl = results[0]
    assert caught is not None
    assert later == (False, False) and elapsed < 0.5 and ctl.halted and ctl.exit_code == 3
    late = results[1]
    assert isinstance(late[0] or late[1], ConsensusTimeout) and late[3].halted  # the late rank stops too


def test_a_rank_that_skips_the_gate_is_detected_on_every_rank(tmp_path):
    groups = make_groups(2)

    def rank_fn(rank, group):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=10),
                                  guard_snapshot_interval=5)
        ctl.initialize(model, optimizer=opt)
        try:
            for step in range(6):
                loss = mlp_loss(model, step)
                loss.backward()
                if not (rank == 1 and step == 2):
                    ctl.before_optimizer_step(model, opt)
                opt.step()
                ctl.step(step, loss, model)
        except CollectiveMismatch as e:
            return str(e), ctl.summary()["guard"]["halt_reason"]
        return None, None

    try:
        results = run_ranks(groups, rank_fn, timeout_s=60)
    finally:
        free_groups(groups)
    for error, reason in results:
        assert error is not None and "'check:grads' vs 'check:step'" in error and "step labels 2 vs 2" in error
        assert reason == "COLLECTIVE_MISMATCH"


@pytest.mark.parametrize("kind", ["nan", "probe_error"])
def test_blame_with_fingerprints_on_names_only_the_rank_at_fault(tmp_path, kind):
    """A NaN (or a raising probe) on rank 1 changes rank 1's fingerprint too: it is still rank 1's fault, not a
    divergence of every replica."""
    groups = make_groups(2)
    models = [make_mlp(0) for _ in groups]  # seeded here: torch's RNG is process-global

    class Raising:
        def detach(self):
            raise RuntimeError("probe defect")

    def rank_fn(rank, group):
        model = models[rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=10),
                                  guard_snapshot_interval=5, fingerprint_interval=1)
        ctl.initialize(model, optimizer=opt)
        for step in range(8):
            opt.zero_grad()
            loss = mlp_loss(model, step)
            loss.backward()
            opt.step()
            reported = loss
            if rank == 1 and step == 6:
                if kind == "nan":
                    with torch.no_grad():
                        model[0].weight.view(-1)[0] = float("nan")
                else:
                    reported = Raising()
            ctl.step(step, reported, model)
        return ctl.finalize()

    try:
        summaries = run_ranks(groups, rank_fn, timeout_s=60)
    finally:
        free_groups(groups)
    for rank in (0, 1):
        from tests.loops import events

        if kind == "nan":
            (rb,) = events(tmp_path, "rollback_success", rank=rank)
            assert (rb["reason"], rb["faulty_ranks"], rb["faulty_global_ranks"]) == ("NONFINITE_WEIGHTS", [1], [1])
        else:
            assert events(tmp_path, "rollback_success", rank=rank) == []
            (pe,) = events(tmp_path, "probe_error", rank=rank)
            assert pe["faulty_ranks"] == [1]
    assert all(s["guard"]["first_fault_ranks"] == ([1] if kind == "nan" else []) for s in summaries)


def test_broadcast_repair_copies_every_dtype_bitwise_and_refuses_non_replicas():
    groups = make_groups(2)

    def state(rank):
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(3, 4, generator=g).t(),  # non-contiguous
                torch.randn(5, generator=g).to(torch.bfloat16), torch.tensor(float(rank)),  # 0-d
                torch.randint(-9, 9, (7,), generator=g, dtype=torch.int8), torch.rand(6, generator=g) > 0.5,
                torch.randn(2, dtype=torch.complex64, generator=g)]

    def rank_fn(rank, group):
        comm = TorchComm(group, timeout_s=10)
        mine = state(rank)
        comm.broadcast_(mine, src=0)
        odd = [torch.zeros(3 + rank)]
        with pytest.raises(CollectiveMismatch, match="not replicas"):
            comm.broadcast_(odd, src=0)
        return mine

    try:
        results = run_ranks(groups, rank_fn, timeout_s=60)
    finally:
        free_groups(groups)
    expected = state(0)
    for got in results:
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
