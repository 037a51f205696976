"""SnapshotStore + capture_state/restore_state on one process: bitwise round trips, ties, commit markers,
checksums, snapshot ids vs step labels, stale files, resume. Multi-rank behaviour: tests/test_rundir.py."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from gradience.comm import LocalComm
from gradience.errors import SnapshotError
from gradience.snapshot import MARKER, SnapshotStore, capture_state, restore_state, snapshot_dir_name

# ------------------------------------------------------------------------------------------------ models


class TiedNet(torch.nn.Module):
    """Embedding and output projection share one Parameter; BatchNorm carries running-stat buffers."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.BatchNorm1d(dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.norm(self.emb(idx)))))


def make_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def make_tied():
    torch.manual_seed(0)
    model = TiedNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        if isinstance(model, TiedNet):
            idx = torch.randint(0, 11, (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(idx), (idx + 1) % 11)
        else:
            x = torch.randn(8, 6, generator=g)
            loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def clone_model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clone_opt_state(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def assert_model_equal(model, expected: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(expected)
    for k, v in expected.items():
        assert now[k].dtype == v.dtype, k
        assert torch.equal(now[k], v), k


def assert_opt_equal(opt, expected: dict) -> None:
    now = opt.state_dict()
    assert set(now["state"]) == set(expected["state"])
    n_tensors = 0
    for idx, st in expected["state"].items():
        assert set(now["state"][idx]) == set(st), idx
        for k, v in st.items():
            got = now["state"][idx][k]
            if isinstance(v, torch.Tensor):
                assert isinstance(got, torch.Tensor) and got.dtype == v.dtype, (idx, k)
                assert torch.equal(got, v), (idx, k)
                n_tensors += 1
            else:
                assert got == v, (idx, k)
    assert n_tensors > 0


def mutate(model, opt) -> None:
    train(model, opt, 3, seed=99)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(5.0)
            else:
                b.add_(7)


def marker_of(store: SnapshotStore, sid: int) -> dict:
    return json.loads((store.snapshot_dir(sid) / MARKER).read_text())


def disk_save(store, model, opt, sid: int, step: int | None = None, **meta) -> bool:
    tensors, extra = capture_state(model, opt, copy=False)
    return store.save(sid, step=step, tensors=tensors, meta={**meta, **extra})


def sids(infos) -> list[int]:
    return [i.sid for i in infos]


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("factory", [make_mlp, make_tied], ids=["mlp", "tied_bn"])
@pytest.mark.parametrize("fresh_store", [False, True], ids=["same_store", "fresh_store"])
def test_disk_round_trip_bitwise(tmp_path, factory, fresh_store):
    model, opt = factory()
    train(model, opt, 4)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert disk_save(store, model, opt, 4, step=40, guard_state={"lr_scale": 1.0})

    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    mutate(model, opt)
    for g in opt.param_groups:
        g["lr"] = 0.123  # the schedule moved on / a backoff was applied: restore must keep it

    reader = SnapshotStore(tmp_path / "snaps", LocalComm()) if fresh_store else store
    prepared = reader.prepare(4)
    assert prepared is not None and prepared.sid == 4 and prepared.step == 40
    assert prepared.meta["guard_state"] == {"lr_scale": 1.0}
    restore_state(prepared.tensors, prepared.meta, model, opt)

    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)
    assert all(g["lr"] == 0.123 for g in opt.param_groups)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # restored in place
    if isinstance(model, TiedNet):
        assert model.out.weight is model.emb.weight
        assert model.out.weight.data_ptr() == model.emb.weight.data_ptr()


def test_tied_weights_stored_once_with_alias(tmp_path):
    model, opt = make_tied()
    train(model, opt, 2)
    tensors, meta = capture_state(model, opt, copy=False)
    assert ("model.out.weight" in tensors) != ("model.emb.weight" in tensors)
    assert meta["aliases"] in ({"model.out.weight": "model.emb.weight"}, {"model.emb.weight": "model.out.weight"})
    assert "model.norm.running_mean" in tensors and "model.norm.num_batches_tracked" in tensors
    assert tensors["model.norm.num_batches_tracked"].dtype == torch.int64
    store = SnapshotStore(tmp_path, LocalComm())
    assert store.save(2, tensors=tensors, meta=meta)  # safetensors accepts it: no shared storage left


def test_tie_survives_when_restored_into_model_with_diverged_values(tmp_path):
    """A restore into a model whose tied Parameter holds garbage restores both names to the saved value."""
    model, opt = make_tied()
    train(model, opt, 3)
    want = model.emb.weight.detach().clone()
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 3)
    with torch.no_grad():
        model.emb.weight.normal_()
    prepared = store.prepare(3)
    restore_state(prepared.tensors, prepared.meta, model, opt)
    assert torch.equal(model.emb.weight, want) and torch.equal(model.out.weight, want)
    assert model.out.weight is model.emb.weight


@pytest.mark.parametrize("factory", [make_mlp, make_tied], ids=["mlp", "tied_bn"])
def test_restored_training_continues_identically(tmp_path, factory):
    """After a restore, the next steps match a copy taken at snapshot time, bit for bit."""
    model, opt = factory()
    train(model, opt, 3)
    ref_model, ref_opt = factory()
    ref_model.load_state_dict(clone_model_state(model))
    ref_opt.load_state_dict(clone_opt_state(opt))
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 3)
    mutate(model, opt)
    prepared = store.prepare(3)
    restore_state(prepared.tensors, prepared.meta, model, opt)
    train(model, opt, 3, seed=5)
    train(ref_model, ref_opt, 3, seed=5)
    assert_model_equal(model, clone_model_state(ref_model))
    assert_opt_equal(opt, clone_opt_state(ref_opt))


def test_memory_tier_round_trip(tmp_path):
    model, opt = make_tied()
    train(model, opt, 4)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path / "snaps", LocalComm(), tier="memory")
    tensors, meta = capture_state(model, opt, copy=True)
    assert store.save(4, tensors=tensors, meta=meta)
    mutate(model, opt)  # in-place changes must not reach the stored copies
    prepared = store.prepare(4)
    assert prepared is not None and prepared.path is None
    restore_state(prepared.tensors, prepared.meta, model, opt)
    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)
    assert model.out.weight is model.emb.weight
    # restore twice from the same memory snapshot (the first restore must not alias the stored copies)
    mutate(model, opt)
    restore_state(prepared.tensors, prepared.meta, model, opt)
    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)
    assert not (tmp_path / "snaps").exists()  # the memory tier touches no disk


def test_memory_tier_prune_and_missing(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm(), tier="memory")
    for step in (0, 10, 20):
        tensors, meta = capture_state(model, opt, copy=True)
        assert store.save(step, tensors=tensors, meta=meta)
    store.prune([20])
    assert store.prepare(0) is None and store.prepare(10) is None
    assert store.prepare(20) is not None


def test_memory_tier_rejects_save_fn(tmp_path):
    store = SnapshotStore(tmp_path, LocalComm(), tier="memory")
    assert store.save(1, save_fn=lambda path: None) is False
    assert store.prepare(1) is None


# ------------------------------------------------------------------------------------------------ marker, checksums


def test_commit_marker_has_shard_sha256(tmp_path):
    model, opt = make_mlp()
    train(model, opt, 2)
    store = SnapshotStore(tmp_path, LocalComm())
    tensors, meta = capture_state(model, opt, copy=False)
    assert store.save(3, step=2, tensors=tensors, meta=meta, extra={"guard_state": {"lr_scale": 0.5}})
    d = tmp_path / snapshot_dir_name(3)
    assert d.name == "snap_00000003"
    shard = d / "rank_00000.safetensors"
    assert shard.is_file() and (d / MARKER).is_file()
    marker = marker_of(store, 3)
    assert marker["format"] == 2 and marker["id"] == 3 and marker["step"] == 2
    assert marker["world_size"] == 1 and marker["tier"] == "disk"
    assert marker["shards"] == [
        {"rank": 0, "global_rank": 0, "file": "rank_00000.safetensors", "size": shard.stat().st_size,
         "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    ]
    assert marker["extra"] == {"guard_state": {"lr_scale": 0.5}}
    (info,) = store.committed_on_disk()
    assert (info.sid, info.step, info.world_size, info.path, info.extra) == (3, 2, 1, d, marker["extra"])
    assert store.committed() == [info]
    # the label also travels in the shard itself
    from gradience.shardio import safetensors_metadata

    assert json.loads(safetensors_metadata(shard.read_bytes())["gradience_snapshot"]) == {"id": 3, "step": 2}
    assert not list(tmp_path.rglob("*.tmp")), "temporary file left behind"


def test_initial_snapshot_label_minus_one(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 0, step=-1)  # before the first step, no optimizer state yet
    assert (tmp_path / "snap_00000000" / MARKER).is_file()
    assert [(i.sid, i.step) for i in store.committed_on_disk()] == [(0, -1)]
    prepared = SnapshotStore(tmp_path, LocalComm()).prepare(0)
    assert prepared is not None and prepared.step == -1


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3"])
def test_begin_rejects_invalid_ids(tmp_path, bad):
    with pytest.raises(SnapshotError):
        SnapshotStore(tmp_path, LocalComm()).begin(bad, tensors={"a": torch.zeros(1)})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("fresh_store", [False, True], ids=["same_store", "fresh_store"])
@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_byte_rejected(tmp_path, fresh_store, where):
    model, opt = make_mlp()
    train(model, opt, 2)
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 2)
    shard = store.shard_path(2)
    blob = bytearray(shard.read_bytes())
    pos = {"header": 20, "middle": len(blob) // 2, "end": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    shard.write_bytes(bytes(blob))
    reader = SnapshotStore(tmp_path, LocalComm()) if fresh_store else store
    assert reader.prepare(2) is None


def test_missing_shard_or_marker_rejected(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 1)
    assert disk_save(store, model, opt, 2)
    store.shard_path(1).unlink()
    assert store.prepare(1) is None
    (store.snapshot_dir(2) / MARKER).unlink()
    assert SnapshotStore(tmp_path, LocalComm()).prepare(2) is None  # uncommitted: never loaded
    assert store.prepare(3) is None  # never saved


# ------------------------------------------------------------------------------------------------ failed saves


def _assert_restorable(store, step, model, opt, want_model, want_opt):
    prepared = store.prepare(step)
    assert prepared is not None
    restore_state(prepared.tensors, prepared.meta, model, opt)
    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)


def test_write_error_leaves_no_marker_and_earlier_snapshot_restorable(tmp_path, monkeypatch):
    model, opt = make_mlp()
    train(model, opt, 2)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 10)
    train(model, opt, 2, seed=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_shard_job", boom)
    assert disk_save(store, model, opt, 20) is False
    monkeypatch.undo()
    assert not (store.snapshot_dir(20) / MARKER).exists()
    assert sids(store.committed_on_disk()) == [10]
    assert store.prepare(20) is None
    mutate(model, opt)
    _assert_restorable(store, 10, model, opt, want_model, want_opt)


def test_save_fn_raising_midway_cleans_up(tmp_path):
    model, opt = make_mlp()
    train(model, opt, 2)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 10)

    def partial_then_fail(path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    assert store.save(20, meta={}, save_fn=partial_then_fail) is False
    assert not (store.snapshot_dir(20) / MARKER).exists()
    assert not store.snapshot_dir(20).exists() or not any(store.snapshot_dir(20).iterdir())
    assert sids(store.committed_on_disk()) == [10]
    mutate(model, opt)
    _assert_restorable(store, 10, model, opt, want_model, want_opt)


def test_marker_write_error_not_committed(tmp_path, monkeypatch):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, 10)

    def boom(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(store, "_write_marker", boom)
    assert disk_save(store, model, opt, 20) is False
    monkeypatch.undo()
    assert not store.snapshot_dir(20).exists() or not any(store.snapshot_dir(20).iterdir())
    assert sids(store.committed_on_disk()) == [10]
    assert store.prepare(20) is None
    assert store.prepare(10) is not None


def test_save_fn_that_writes_nothing_fails(tmp_path):
    store = SnapshotStore(tmp_path, LocalComm())
    assert store.save(5, meta={}, save_fn=lambda path: None) is False
    assert store.committed_on_disk() == []


# ------------------------------------------------------------------------------------------------ save_fn / load_fn


def test_save_fn_load_fn_file_hashed_and_verified(tmp_path):
    model, opt = make_mlp()
    train(model, opt, 3)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path / "snaps", LocalComm())

    def save_fn(path):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    def load_fn(path):
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])

    assert store.save(3, meta={"guard_state": {"lr_scale": 1.0}}, save_fn=save_fn)
    marker = marker_of(store, 3)
    (entry,) = marker["shards"]
    assert entry["file"] == "rank_00000.ckpt"
    assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0
    assert sids(store.committed_on_disk()) == [3]

    mutate(model, opt)
    for reader in (store, SnapshotStore(tmp_path / "snaps", LocalComm())):
        prepared = reader.prepare(3)
        assert prepared is not None and prepared.tensors is None
        assert prepared.path == store.snapshot_dir(3) / "rank_00000.ckpt"
    load_fn(str(prepared.path))
    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)

    path = store.snapshot_dir(3) / "rank_00000.ckpt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    assert store.prepare(3) is None
    assert SnapshotStore(tmp_path / "snaps", LocalComm()).prepare(3) is None


def test_save_fn_directory_checkpoint_hashed_and_verified(tmp_path):
    """save_fn may write a directory (save_pretrained-style); every file in it is covered by the hash."""
    store = SnapshotStore(tmp_path, LocalComm())

    def save_fn(path):
        import os

        os.makedirs(path)
        with open(os.path.join(path, "weights.bin"), "wb") as f:
            f.write(b"\x01" * 1000)
        os.makedirs(os.path.join(path, "sub"))
        with open(os.path.join(path, "sub", "optimizer.bin"), "wb") as f:
            f.write(b"\x02" * 500)

    assert store.save(7, meta={}, save_fn=save_fn)
    prepared = store.prepare(7)
    assert prepared is not None and prepared.path.is_dir()
    victim = store.snapshot_dir(7) / "rank_00000.ckpt" / "sub" / "optimizer.bin"
    victim.write_bytes(b"\x02" * 499 + b"\x03")
    assert store.prepare(7) is None
    assert SnapshotStore(tmp_path, LocalComm()).prepare(7) is None


# ------------------------------------------------------------------------------------------------ retention


def test_prune_keeps_only_requested_steps(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    for sid in (0, 1, 10, 20, 30):
        train(model, opt, 1, seed=sid + 2)
        assert disk_save(store, model, opt, sid)
    assert sids(store.committed_on_disk()) == [0, 1, 10, 20, 30]
    store.prune([1, 20])
    assert sids(store.committed_on_disk()) == [1, 20] == sids(store.committed())
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_dir_name(1), snapshot_dir_name(20)]
    for gone in (0, 10, 30):
        assert store.prepare(gone) is None
    for kept in (1, 20):
        assert store.prepare(kept) is not None
    store.prune([])
    assert store.committed_on_disk() == []
    assert not any(tmp_path.iterdir())


def test_committed_on_disk_lists_only_marked_steps(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert store.committed_on_disk() == []  # root does not exist yet
    for sid in (30, 5, 100):
        assert disk_save(store, model, opt, sid)
    # a directory with a shard but no marker (a crash between shard and commit) is not committed
    stray = store.snapshot_dir(77)
    stray.mkdir()
    (stray / "rank_00000.safetensors").write_bytes(b"partial")
    # an unreadable marker is ignored rather than crashing the listing
    broken = store.snapshot_dir(88)
    broken.mkdir()
    (broken / MARKER).write_text("{not json")
    # a marker of the old format (keyed by step) is not one of ours
    old = tmp_path / "snaps" / "step_00000040"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"step": 40, "shards": []}))
    assert sids(store.committed_on_disk()) == [5, 30, 100]
    assert sids(SnapshotStore(tmp_path / "snaps", LocalComm()).committed_on_disk()) == [5, 30, 100]


def test_reset_clears_previous_run(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert disk_save(store, model, opt, 1)
    fresh = SnapshotStore(tmp_path / "snaps", LocalComm())
    fresh.reset()
    assert fresh.committed_on_disk() == []
    assert fresh.prepare(1) is None


def test_own_safetensors_writer_is_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    from gradience.shardio import write_safetensors

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float64),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.tensor([True, False, True]),
        "d": torch.tensor(3.5),
        "e": torch.zeros(0, 4),
        "f": torch.arange(9, dtype=torch.int16).reshape(3, 3).t(),  # non-contiguous
    }
    digest = write_safetensors(tmp_path / "x.safetensors", tensors, {"gradience": "{}"})
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


def test_every_safetensors_dtype_and_sparse_model_state_can_be_snapshotted(tmp_path):
    from safetensors.torch import _TYPES

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            for i, dtype in enumerate(_TYPES.values()):
                self.register_buffer(f"b{i}", torch.zeros(3).to(dtype))
            self.register_buffer("sp", torch.eye(3).to_sparse())

    model = Odd()
    tensors, meta = capture_state(model, None, copy=True)
    store = SnapshotStore(tmp_path, LocalComm())
    assert store.save(1, tensors=tensors, meta=meta), store.last_error
    prepared = store.prepare(1)
    restore_state(prepared.tensors, prepared.meta, model, None)
    assert model.sp.is_sparse and torch.equal(model.sp.to_dense(), torch.eye(3))


# ------------------------------------------------------------------------------------------------ ids, not steps


def test_repeated_step_labels_are_distinct_snapshots(tmp_path):
    """A per-epoch enumerate repeats step 3: each epoch's snapshot keeps its own weights under its own id."""
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    train(model, opt, 2)
    epoch1 = clone_model_state(model)
    assert disk_save(store, model, opt, 0, step=3)
    train(model, opt, 2, seed=1)
    epoch2, epoch2_opt = clone_model_state(model), clone_opt_state(opt)
    assert disk_save(store, model, opt, 1, step=3)
    assert [(i.sid, i.step) for i in store.committed_on_disk()] == [(0, 3), (1, 3)]
    mutate(model, opt)
    newest = store.prepare(1)  # a fault in epoch 2 restores epoch 2's weights, not epoch 1's
    restore_state(newest.tensors, newest.meta, model, opt)
    assert_model_equal(model, epoch2)
    assert_opt_equal(opt, epoch2_opt)
    older = store.prepare(0)
    assert older.step == 3 and all(torch.equal(older.tensors[f"model.{k}"], v) for k, v in epoch1.items())


@pytest.mark.parametrize("where", ["same_store", "fresh_store", "memory"])
def test_committed_id_is_never_overwritten(tmp_path, where):
    store = SnapshotStore(tmp_path, LocalComm(), tier="memory" if where == "memory" else "disk")
    assert store.save(5, step=1, tensors={"w": torch.ones(3)})
    before = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    writer = SnapshotStore(tmp_path, LocalComm()) if where == "fresh_store" else store
    with pytest.raises(SnapshotError, match="already committed"):
        writer.begin(5, step=2, tensors={"w": torch.zeros(3)})
    assert writer.pending_id is None
    assert sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before
    assert torch.equal(store.prepare(5).tensors["w"], torch.ones(3))
    assert writer.save(6, step=2, tensors={"w": torch.zeros(3)})  # the next id is fine


def test_pending_id_and_label(tmp_path):
    store = SnapshotStore(tmp_path, LocalComm())
    store.begin(7, step=70, tensors={"w": torch.ones(2)}, background=True)
    assert (store.pending_id, store.pending_label) == (7, 70)
    with pytest.raises(SnapshotError, match="in flight"):
        store.begin(8, tensors={"w": torch.ones(2)})
    assert store.finish() and (store.pending_id, store.pending_label) == (None, None)
    store.begin(8, step=80, tensors={"w": torch.ones(2)}, background=True)
    assert store.abandon() == 8
    assert sids(store.committed_on_disk()) == [7]
    assert not store.snapshot_dir(8).exists()


# ------------------------------------------------------------------------------------------------ memory tier


def test_memory_tier_touches_no_disk(tmp_path):
    root = tmp_path / "snaps"
    store = SnapshotStore(root, LocalComm(), tier="memory")
    store.reset()
    for sid in range(4):
        assert store.save(sid, step=sid * 10, tensors={"w": torch.full((2,), float(sid))}, extra={"k": sid})
    store.begin(4, tensors={"w": torch.zeros(2)})
    store.abandon()
    store.prune([2, 3])
    assert store.scan() == 3
    assert [(i.sid, i.step, i.path, i.extra) for i in store.committed()] == [(2, 20, None, {"k": 2}),
                                                                           (3, 30, None, {"k": 3})]
    assert store.committed_on_disk() == [] and store.max_id_on_disk() == -1
    assert store.prepare(1) is None and torch.equal(store.prepare(3).tensors["w"], torch.full((2,), 3.0))
    assert not root.exists()
    # a memory-tier reset does not delete a disk run's snapshots under the same root either
    assert SnapshotStore(root, LocalComm()).save(0, tensors={"w": torch.ones(1)})
    store.reset()
    assert (root / "snap_00000000" / MARKER).is_file()


def test_memory_tier_uncommitted_snapshot_is_not_prepared(tmp_path):
    store = SnapshotStore(tmp_path, LocalComm(), tier="memory")
    store.begin(0, tensors={"w": torch.ones(1)})
    assert store.prepare(0) is None  # begun, not committed
    store.abandon()
    assert store.prepare(0) is None


# ------------------------------------------------------------------------------------------------ completeness


@pytest.mark.parametrize("damage", ["missing", "truncated", "extended"])
def test_marker_beside_incomplete_shards_is_not_listed(tmp_path, damage):
    """What a kill during an old-style prune left: the marker beside a missing shard. Never a target."""
    store = SnapshotStore(tmp_path, LocalComm())
    assert store.save(0, tensors={"w": torch.ones(4)})
    assert store.save(1, tensors={"w": torch.ones(4)})
    shard = store.shard_path(1)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-4])
    else:
        shard.write_bytes(shard.read_bytes() + b"\0")
    assert sids(store.committed_on_disk()) == [0]
    fresh = SnapshotStore(tmp_path, LocalComm())
    assert fresh.scan() == 1 and sids(fresh.committed()) == [0]


def test_save_fn_directory_size_is_recorded_and_checked(tmp_path):
    store = SnapshotStore(tmp_path, LocalComm())

    def save_fn(path):
        import os

        os.makedirs(path)
        with open(os.path.join(path, "a.bin"), "wb") as f:
            f.write(b"\1" * 100)

    assert store.save(0, save_fn=save_fn)
    assert marker_of(store, 0)["shards"][0]["size"] == 100
    (store.shard_path(0, ".ckpt") / "b.bin").write_bytes(b"x")
    assert store.committed_on_disk() == []


# ------------------------------------------------------------------------------------------------ stale files, resume


def _leave_debris(root):
    """What killed runs leave: temp files in a committed snapshot, and a snapshot that never got its marker."""
    store = SnapshotStore(root, LocalComm())
    assert store.save(2, step=20, tensors={"w": torch.ones(3)})
    committed = store.snapshot_dir(2)
    (committed / "rank_00000.safetensors.tmp").write_bytes(b"half")
    (committed / (MARKER + ".tmp")).write_bytes(b"{")
    half = store.snapshot_dir(3)
    half.mkdir()
    (half / "rank_00000.safetensors").write_bytes(b"no marker")
    (half / "rank_00001.safetensors.tmp").write_bytes(b"another rank's")
    sibling = root / "group_4-5" / "snap_00000001"
    sibling.mkdir(parents=True)
    (sibling / "rank_00004.safetensors.tmp").write_bytes(b"another group's")
    return committed, half, sibling


def test_scan_removes_own_stale_files_and_keeps_committed(tmp_path):
    committed, half, sibling = _leave_debris(tmp_path)
    store = SnapshotStore(tmp_path, LocalComm())
    assert store.scan() == 3  # new ids go past the uncommitted leftover as well
    assert sorted(p.name for p in committed.iterdir()) == [MARKER, "rank_00000.safetensors"]
    assert [p.name for p in half.iterdir()] == ["rank_00001.safetensors.tmp"]  # not this rank's: left
    assert [p.name for p in sibling.iterdir()] == ["rank_00004.safetensors.tmp"]  # another group's root
    assert [(i.sid, i.step) for i in store.committed()] == [(2, 20)]
    assert store.prepare(2) is not None


def test_reset_clears_only_this_root(tmp_path):
    committed, half, sibling = _leave_debris(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    store = SnapshotStore(tmp_path, LocalComm())
    store.reset()
    assert not committed.exists() and not half.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group_4-5", "notes.txt"]
    assert [p.name for p in sibling.iterdir()] == ["rank_00004.safetensors.tmp"]
    assert store.max_id_on_disk() == -1 and store.committed() == []


def test_max_id_on_disk_counts_uncommitted_directories(tmp_path):
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert store.max_id_on_disk() == -1
    assert store.save(4, tensors={"w": torch.ones(1)})
    (store.snapshot_dir(9)).mkdir()
    assert store.max_id_on_disk() == 9


@pytest.mark.parametrize("factory", [make_mlp, make_tied], ids=["mlp", "tied_bn"])
def test_resume_scan_prepare_newest_bitwise(tmp_path, factory):
    """A restarted process: a fresh store on the same root scans the markers and restores the newest."""
    model, opt = factory()
    first = SnapshotStore(tmp_path / "snaps", LocalComm())
    first.reset()
    for sid in range(3):
        train(model, opt, 2, seed=sid)
        tensors, meta = capture_state(model, opt, copy=True)
        assert first.save(sid, step=100 + sid, tensors=tensors, meta=meta, extra={"epoch": sid})
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    first.prune([1, 2])
    del first  # "the process died"

    model2, opt2 = factory()
    train(model2, opt2, 1, seed=42)
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert store.scan() == 2
    infos = store.committed()
    assert [(i.sid, i.step, i.extra) for i in infos] == [(1, 101, {"epoch": 1}), (2, 102, {"epoch": 2})]
    prepared = store.prepare(infos[-1].sid)
    assert prepared is not None and prepared.step == 102
    restore_state(prepared.tensors, prepared.meta, model2, opt2)
    assert_model_equal(model2, want_model)
    assert_opt_equal(opt2, want_opt)
    # the resumed run numbers on after what is on disk, and retention covers the scanned snapshots
    with pytest.raises(SnapshotError):
        store.begin(2, tensors={"w": torch.ones(1)})
    assert store.save(3, step=103, tensors={"w": torch.ones(1)})
    store.prune([3])
    assert sids(store.committed_on_disk()) == [3]
