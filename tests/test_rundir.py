"""Who owns an out_dir (RunLock, real processes), per-group snapshot roots, and the store's collective
behaviour on real gloo groups (ranks as threads): shards named by global rank, collective prune, resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from gradience.comm import TorchComm
from gradience.errors import ConfigError
from gradience.rundir import RunLock, group_tag, snapshot_root
from gradience.snapshot import MARKER, SnapshotStore
from tests.threaded import free_groups, make_groups, run_ranks

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ roots


def test_snapshot_root_per_group(tmp_path):
    assert snapshot_root(tmp_path) == tmp_path / "snapshots"
    assert snapshot_root(tmp_path, [0, 1, 2, 3], world_size=4) == tmp_path / "snapshots"
    assert snapshot_root(tmp_path, [2, 3], world_size=4) == tmp_path / "snapshots" / "group_2-3"
    assert snapshot_root(tmp_path, [3, 2]) == snapshot_root(tmp_path, [2, 3])  # members, not their order
    assert snapshot_root(tmp_path, [0, 1]) != snapshot_root(tmp_path, [0, 11])


def test_group_tag_is_short_and_stable_for_large_groups():
    tag = group_tag(range(0, 512, 2))
    assert tag == group_tag(list(range(0, 512, 2))) and len(tag) <= 64 and tag.startswith("group_0-510_n256_")
    assert tag != group_tag(range(0, 512, 2)[:-1])
    with pytest.raises(ConfigError):
        group_tag([])


# ------------------------------------------------------------------------------------------------ RunLock


def test_runlock_holds_pid_host_and_releases_idempotently(tmp_path):
    lock = RunLock(tmp_path, 3)
    assert lock.path == tmp_path / ".lock" / "rank_00003" and not lock.held
    with lock as held:
        assert held is lock and lock.held
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["rank"] == 3
        assert lock.holder()["pid"] == os.getpid()
    assert not lock.held
    lock.release()  # idempotent
    lock.release()
    assert lock.path.exists()  # never unlinked: another process may be about to lock this inode
    with RunLock(tmp_path, 3):  # free again
        pass


def test_runlock_two_objects_in_one_process_conflict(tmp_path):
    """flock belongs to an open file description, so a second RunLock of this very process must fail."""
    first = RunLock(tmp_path, 0).acquire()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path, 0).acquire()
    with RunLock(tmp_path, 1):  # another rank's lock is independent
        pass
    first.release()
    RunLock(tmp_path, 0).acquire().release()


_HOLDER = textwrap.dedent("""
    import sys, time
    from gradience.rundir import RunLock
    lock = RunLock(sys.argv[1], 0).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_runlock_live_process_refused_dead_process_taken_over(tmp_path):
    out = tmp_path / "logs"
    snap = out / "snapshots" / "snap_00000000"
    snap.mkdir(parents=True)
    (snap / MARKER).write_text("{}")
    (snap / "rank_00000.safetensors").write_bytes(b"the first run's weights")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(ConfigError) as err:
            RunLock(out, 0).acquire()
        msg = str(err.value)
        assert str(out) in msg and f"pid {proc.pid} on host {socket.gethostname()} since" in msg
        assert "another live run" in msg and "use another out_dir or stop that run" in msg
        # refusing deleted nothing
        assert (snap / "rank_00000.safetensors").read_bytes() == b"the first run's weights"
        assert (snap / MARKER).is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # the dead run's lock file is still there, but the kernel dropped its flock: taken over silently
    assert json.loads((out / ".lock" / "rank_00000").read_text())["pid"] == proc.pid
    with RunLock(out, 0) as lock:
        assert lock.holder()["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------------ groups (gloo)


@pytest.fixture(scope="module")
def groups2():
    g = make_groups(2)
    yield g
    free_groups(g)


@pytest.fixture(scope="module")
def two_subgroups():
    """Global ranks 0..3 as two data-parallel subgroups {0, 1} and {2, 3}: list index = global rank."""
    g = make_groups(2) + make_groups(2)
    yield g
    free_groups(g)


def _weights(global_rank: int, sid: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(100 * global_rank + sid)), "i": torch.arange(3) + global_rank}


def test_subgroups_write_separate_shards_and_roots(two_subgroups, tmp_path):
    """Each group's rank 0 writes a marker; shard names come from the global rank, roots from the group."""
    members = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}

    def fn(g, group):
        comm = TorchComm(group, timeout_s=30)
        store = SnapshotStore(snapshot_root(tmp_path, members[g], world_size=4), comm, global_rank=g)
        store.reset()
        for sid in range(2):
            assert store.save(sid, step=7, tensors=_weights(g, sid)), store.last_error
        got = store.prepare(1)
        return comm.rank, store.root, got.tensors, store.committed_on_disk()

    results = run_ranks(two_subgroups, fn)
    for g, (group_rank, root, tensors, infos) in enumerate(results):
        assert group_rank == g % 2
        assert root == tmp_path / "snapshots" / f"group_{members[g][0]}-{members[g][1]}"
        assert all(torch.equal(tensors[k], v) for k, v in _weights(g, 1).items())
        assert [(i.sid, i.step, i.world_size) for i in infos] == [(0, 7, 2), (1, 7, 2)]
    for ranks in ([0, 1], [2, 3]):
        d = snapshot_root(tmp_path, ranks) / "snap_00000001"
        assert sorted(p.name for p in d.iterdir()) == [MARKER] + [f"rank_{r:05d}.safetensors" for r in ranks]
        shards = json.loads((d / MARKER).read_text())["shards"]
        assert [(s["rank"], s["global_rank"], s["file"]) for s in shards] == [
            (i, r, f"rank_{r:05d}.safetensors") for i, r in enumerate(ranks)]

    # a fresh run of group {2, 3} clears its own root only; the world root's reset leaves both groups alone
    def reset_second_group(g, group):
        if g >= 2:
            SnapshotStore(snapshot_root(tmp_path, [2, 3]), TorchComm(group, timeout_s=30), global_rank=g).reset()

    run_ranks(two_subgroups, reset_second_group)
    assert not any(snapshot_root(tmp_path, [2, 3]).iterdir())
    assert len(list(snapshot_root(tmp_path, [0, 1]).glob("snap_*/*.safetensors"))) == 4
    world = SnapshotStore(snapshot_root(tmp_path), _Solo(), global_rank=0)
    world.reset()
    assert len(list(snapshot_root(tmp_path, [0, 1]).glob("snap_*/*.safetensors"))) == 4


class _Solo:
    """A one-rank comm (LocalComm would do; this keeps the test's intent visible)."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        return values.detach().to("cpu", torch.float64)


def test_prune_removes_marker_before_any_shard(groups2, tmp_path):
    """Rank 0 is slow to prune; rank 1 must not delete its shard while the marker still lists it."""
    seen: list[tuple[bool, list[int]]] = []

    def fn(rank, group):
        store = SnapshotStore(tmp_path, TorchComm(group, timeout_s=30))
        store.reset()
        for sid in range(3):
            assert store.save(sid, tensors=_weights(rank, sid))
        if rank == 0:
            time.sleep(0.5)
        store.prune([2])
        if rank == 1:
            # the moment rank 1 has deleted its shard of snapshot 0, no marker may list it any more
            seen.append((not store.shard_path(0).exists(), [i.sid for i in store.committed_on_disk()]))
            seen.append(((store.snapshot_dir(0) / MARKER).exists(), []))
        return [i.sid for i in store.committed()]

    assert run_ranks(groups2, fn) == [[2], [2]]
    assert seen[0] == (True, [2]) and seen[1][0] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap_00000002"]


def test_prune_keeps_every_shard_when_marker_removal_fails(groups2, tmp_path, monkeypatch):
    from gradience import snapshot

    real = snapshot.sio.fsync_dir
    failing = threading.local()

    def fsync_dir(d):
        if getattr(failing, "on", False):
            raise OSError(5, "I/O error")
        real(d)

    monkeypatch.setattr(snapshot.sio, "fsync_dir", fsync_dir)

    def fn(rank, group):
        store = SnapshotStore(tmp_path, TorchComm(group, timeout_s=30))
        store.reset()
        for sid in range(2):
            assert store.save(sid, tensors=_weights(rank, sid))
        failing.on = rank == 0
        store.prune([1])
        failing.on = False
        return isinstance(store.last_error, OSError)

    assert run_ranks(groups2, fn) == [True, False]
    # rank 0 could not make the marker removal durable: nobody deleted a shard
    assert sorted(p.name for p in (tmp_path / "snap_00000000").iterdir()) == ["rank_00000.safetensors",
                                                                             "rank_00001.safetensors"]


def test_resume_on_two_ranks_agrees_on_next_id_and_restores_bitwise(groups2, tmp_path):
    def write(rank, group):
        store = SnapshotStore(tmp_path, TorchComm(group, timeout_s=30), global_rank=rank)
        store.reset()
        for sid in range(3):
            assert store.save(sid, step=10 * sid, tensors=_weights(rank, sid), extra={"lr_scale": 0.5})
        store.begin(3, step=30, tensors=_weights(rank, 3))  # "killed" before finish: no marker
        if rank == 1:
            store.shard_path(5).parent.mkdir()  # only rank 1 sees a leftover of id 5 (say, a slow NFS view)
        (store.snapshot_dir(2) / f"rank_{rank:05d}.safetensors.tmp").write_bytes(b"half a rewrite")

    run_ranks(groups2, write)

    def resume(rank, group):
        store = SnapshotStore(tmp_path, TorchComm(group, timeout_s=30), global_rank=rank)
        last = store.scan()
        infos = store.committed()
        newest = store.prepare(infos[-1].sid)
        return last, [(i.sid, i.step, i.extra) for i in infos], newest.tensors

    results = run_ranks(groups2, resume)
    for rank, (last, infos, tensors) in enumerate(results):
        assert last == 5  # agreed: every rank numbers on from the same id
        assert infos == [(0, 0, {"lr_scale": 0.5}), (1, 10, {"lr_scale": 0.5}), (2, 20, {"lr_scale": 0.5})]
        assert all(torch.equal(tensors[k], v) for k, v in _weights(rank, 2).items())
    assert not list(tmp_path.rglob("*.tmp"))
    assert not (tmp_path / "snap_00000003").exists()  # the uncommitted snapshot's shards were removed


def test_duplicate_global_ranks_commit_nothing(groups2, tmp_path):
    """Two ranks of a group claiming one global rank would write one file: refused on every rank."""

    def fn(rank, group):
        store = SnapshotStore(tmp_path, TorchComm(group, timeout_s=30), global_rank=7)
        return store.save(0, tensors=_weights(rank, 0)), store.last_error

    results = run_ranks(groups2, fn)
    # Both write rank_00007: a rank may even fail its rename first; either way nothing is committed.
    assert [ok for ok, _ in results] == [False, False] and any(e is not None for _, e in results)
    assert not (tmp_path / "snap_00000000" / MARKER).exists()
