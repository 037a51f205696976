"""SnapshotStore + capture_state/restore_state: bitwise round trips, ties, commit markers, checksums."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from gradience.comm import LocalComm
from gradience.snapshot import MARKER, SnapshotStore, capture_state, restore_state, step_dir_name

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


def marker_of(store: SnapshotStore, step: int) -> dict:
    return json.loads((store.step_dir(step) / MARKER).read_text())


def disk_save(store, model, opt, step: int, **meta) -> bool:
    tensors, extra = capture_state(model, opt, copy=False)
    return store.save(step, tensors=tensors, meta={**meta, **extra})


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("factory", [make_mlp, make_tied], ids=["mlp", "tied_bn"])
@pytest.mark.parametrize("fresh_store", [False, True], ids=["same_store", "fresh_store"])
def test_disk_round_trip_bitwise(tmp_path, factory, fresh_store):
    model, opt = factory()
    train(model, opt, 4)
    want_model, want_opt = clone_model_state(model), clone_opt_state(opt)
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert disk_save(store, model, opt, 4, guard_state={"lr_scale": 1.0})

    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    mutate(model, opt)
    for g in opt.param_groups:
        g["lr"] = 0.123  # the schedule moved on / a backoff was applied: restore must keep it

    reader = SnapshotStore(tmp_path / "snaps", LocalComm()) if fresh_store else store
    prepared = reader.prepare(4)
    assert prepared is not None and prepared.step == 4
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
    assert not (tmp_path / "snaps").exists() or not any((tmp_path / "snaps").rglob("*.safetensors"))


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
    assert disk_save(store, model, opt, 2, guard_state={"lr_scale": 0.5, "total_rollbacks": 1})
    d = tmp_path / step_dir_name(2)
    shard = d / "rank_00000.safetensors"
    assert shard.is_file() and (d / MARKER).is_file()
    marker = marker_of(store, 2)
    assert marker["step"] == 2 and marker["world_size"] == 1 and marker["tier"] == "disk"
    assert marker["shards"] == [
        {"rank": 0, "file": "rank_00000.safetensors", "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    ]
    assert marker["guard_state"] == {"lr_scale": 0.5, "total_rollbacks": 1}
    assert not list(tmp_path.rglob("*.tmp")), "temporary file left behind"


def test_initial_snapshot_dir_name(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    assert disk_save(store, model, opt, -1)  # before the first step, no optimizer state yet
    assert (tmp_path / "step_initial" / MARKER).is_file()
    assert store.committed_on_disk() == [-1]
    prepared = SnapshotStore(tmp_path, LocalComm()).prepare(-1)
    assert prepared is not None


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
    (store.step_dir(2) / MARKER).unlink()
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
    assert not (store.step_dir(20) / MARKER).exists()
    assert store.committed_on_disk() == [10]
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
    assert not (store.step_dir(20) / MARKER).exists()
    assert not store.step_dir(20).exists() or not any(store.step_dir(20).iterdir())
    assert store.committed_on_disk() == [10]
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
    assert not store.step_dir(20).exists() or not any(store.step_dir(20).iterdir())
    assert store.committed_on_disk() == [10]
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
    assert store.committed_on_disk() == [3]

    mutate(model, opt)
    for reader in (store, SnapshotStore(tmp_path / "snaps", LocalComm())):
        prepared = reader.prepare(3)
        assert prepared is not None and prepared.tensors is None
        assert prepared.path == store.step_dir(3) / "rank_00000.ckpt"
    load_fn(str(prepared.path))
    assert_model_equal(model, want_model)
    assert_opt_equal(opt, want_opt)

    path = store.step_dir(3) / "rank_00000.ckpt"
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
    victim = store.step_dir(7) / "rank_00000.ckpt" / "sub" / "optimizer.bin"
    victim.write_bytes(b"\x02" * 499 + b"\x03")
    assert store.prepare(7) is None
    assert SnapshotStore(tmp_path, LocalComm()).prepare(7) is None


# ------------------------------------------------------------------------------------------------ retention


def test_prune_keeps_only_requested_steps(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path, LocalComm())
    for step in (-1, 0, 10, 20, 30):
        train(model, opt, 1, seed=step + 2)
        assert disk_save(store, model, opt, step)
    assert store.committed_on_disk() == [-1, 0, 10, 20, 30]
    store.prune([0, 20])
    assert store.committed_on_disk() == [0, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(0), step_dir_name(20)]
    for gone in (-1, 10, 30):
        assert store.prepare(gone) is None
    for kept in (0, 20):
        assert store.prepare(kept) is not None
    store.prune([])
    assert store.committed_on_disk() == []
    assert not any(tmp_path.iterdir())


def test_committed_on_disk_lists_only_marked_steps(tmp_path):
    model, opt = make_mlp()
    store = SnapshotStore(tmp_path / "snaps", LocalComm())
    assert store.committed_on_disk() == []  # root does not exist yet
    for step in (30, 5, 100):
        assert disk_save(store, model, opt, step)
    # a directory with a shard but no marker (a crash between shard and commit) is not committed
    stray = store.step_dir(77)
    stray.mkdir()
    (stray / "rank_00000.safetensors").write_bytes(b"partial")
    # an unreadable marker is ignored rather than crashing the listing
    broken = store.step_dir(88)
    broken.mkdir()
    (broken / MARKER).write_text("{not json")
    assert store.committed_on_disk() == [5, 30, 100]
    assert SnapshotStore(tmp_path / "snaps", LocalComm()).committed_on_disk() == [5, 30, 100]


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

    from gradience.snapshot import _write_safetensors

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float64),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.tensor([True, False, True]),
        "d": torch.tensor(3.5),
        "e": torch.zeros(0, 4),
        "f": torch.arange(9, dtype=torch.int16).reshape(3, 3).t(),  # non-contiguous
    }
    digest = _write_safetensors(tmp_path / "x.safetensors", tensors, {"gradience": "{}"})
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
