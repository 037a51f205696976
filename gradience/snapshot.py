"""SnapshotStore: per-rank snapshot shards, a commit marker, checksums and retention.

Layout (disk tier)::

    out_dir/snapshots/step_00000100/rank_00000.safetensors   # this rank's model + optimizer state
    out_dir/snapshots/step_00000100/COMMITTED                # JSON, written by rank 0 last

A snapshot is committed only after every rank reported its shard written, fsynced and hashed (one MAX
all-reduce carries the failure flags and every rank's SHA-256), and rank 0 then wrote the marker
(temp -> fsync -> rename) and reported success (a second all-reduce). Restores verify the SHA-256 before
anything is loaded, so a corrupt shard is rejected without touching the live model. The memory tier keeps
the same protocol with CPU copies instead of files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gradience.comm import Comm
from gradience.errors import SnapshotError

MARKER = "COMMITTED"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    """Directory name of a snapshot; the state before the first step (step < 0) is ``step_initial``."""
    return "step_initial" if step < 0 else f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------------------
# model + optimizer <-> flat tensors


def capture_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, copy: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten model and optimizer state into CPU tensors plus JSON-able metadata.

    Tied weights (one storage under several names, e.g. GPT-2's ``wte``/``lm_head``) are stored once and
    recorded as aliases, because safetensors refuses shared storage and a restore must keep the tie.
    """
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, list[Any]] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    skipped: list[str] = []
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            skipped.append(name)
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[f"model.{name}"] = seen[key]
            continue
        seen[key] = f"model.{name}"
        _put(tensors, sparse, f"model.{name}", t, copy)
    scalars: dict[str, dict[str, Any]] = {}
    sequences: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        for idx, st in optimizer.state_dict()["state"].items():
            for k, v in st.items():
                name = f"optimizer.{idx}.{k}"
                if isinstance(v, torch.Tensor):
                    _put(tensors, sparse, name, v, copy)
                elif isinstance(v, (list, tuple)):
                    # e.g. LBFGS history: lists of tensors (and None); tensors go to the shard, the rest to JSON.
                    items = []
                    for i, item in enumerate(v):
                        if isinstance(item, torch.Tensor):
                            _put(tensors, sparse, f"{name}.{i}", item, copy)
                            items.append({"tensor": f"{name}.{i}"})
                        else:
                            items.append({"value": item})
                    sequences.setdefault(str(idx), {})[k] = {"tuple": isinstance(v, tuple), "items": items}
                else:
                    scalars.setdefault(str(idx), {})[k] = v
    meta = {"aliases": aliases, "optimizer_scalars": scalars, "optimizer_sequences": sequences,
            "sparse": sparse, "skipped": skipped}
    return tensors, meta


def restore_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Load what :func:`capture_state` produced back into ``model`` and ``optimizer`` (in place).

    The optimizer's param_groups (LR, betas, ...) are kept as they are now: the schedule is not rewound,
    the caller applies the LR backoff on top.
    """
    tensors = _rebuild_sparse(tensors, meta.get("sparse", {}))
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, canonical in meta.get("aliases", {}).items():
        model_sd[alias[len("model.") :]] = tensors[canonical]
    live = model.state_dict()
    for name in meta.get("skipped", []):
        model_sd[name] = live[name]
    model.load_state_dict(model_sd, strict=True)
    if optimizer is None:
        return
    state: dict[int, dict[str, Any]] = {}
    in_sequences = {item["tensor"] for per in meta.get("optimizer_sequences", {}).values()
                    for seq in per.values() for item in seq["items"] if "tensor" in item}
    for k, v in tensors.items():
        if k.startswith("optimizer.") and k not in in_sequences:
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.clone()
    for idx, kv in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    for idx, per in meta.get("optimizer_sequences", {}).items():
        for key, seq in per.items():
            items = [tensors[it["tensor"]].clone() if "tensor" in it else it["value"] for it in seq["items"]]
            state.setdefault(int(idx), {})[key] = tuple(items) if seq["tuple"] else items
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def _put(tensors: dict[str, torch.Tensor], sparse: dict[str, list[Any]], name: str, t: torch.Tensor,
         copy: bool) -> None:
    if t.is_sparse:
        # safetensors stores dense arrays only: keep a COO tensor as its indices and values, uncoalesced as
        # it is (coalescing would re-sum duplicates in another order: not bitwise the same state).
        t = t.detach()
        tensors[f"{name}.__indices"] = _to_cpu(t._indices(), copy)
        tensors[f"{name}.__values"] = _to_cpu(t._values(), copy)
        sparse[name] = [list(t.shape), t.is_coalesced()]
    else:
        tensors[name] = _to_cpu(t, copy)


def _rebuild_sparse(tensors: dict[str, torch.Tensor], sparse: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    if not sparse:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith((".__indices", ".__values"))}
    for name, (shape, coalesced) in sparse.items():
        out[name] = torch.sparse_coo_tensor(tensors[f"{name}.__indices"], tensors[f"{name}.__values"], shape,
                                            is_coalesced=coalesced, check_invariants=False)
    return out


def _to_cpu(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone().contiguous() if copy else t.contiguous()
    return t.to("cpu").contiguous()


# ---------------------------------------------------------------------------------------------------------
# the store


@dataclass
class Prepared:
    """A verified shard, ready to apply; produced by :meth:`SnapshotStore.prepare`."""

    step: int
    tensors: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    path: Path | None


class SnapshotStore:
    """Per-rank shards with a collective commit. Every method marked *collective* must run on all ranks."""

    def __init__(self, root: str | Path, comm: Comm, *, tier: str = "disk") -> None:
        self.root = Path(root)
        self.comm = comm
        self.tier = tier
        self._memory: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        # step -> sha256 of every rank's shard, known to every rank after the commit all-reduce.
        self._digests: dict[int, list[str]] = {}
        #: This rank's exception from the last failed :meth:`save`, None after a success.
        self.last_error: Exception | None = None

    # ---- paths
    def step_dir(self, step: int) -> Path:
        """Directory holding snapshot ``step``."""
        return self.root / step_dir_name(step)

    def shard_path(self, step: int, suffix: str = ".safetensors") -> Path:
        """This rank's shard of snapshot ``step``."""
        return self.step_dir(step) / f"rank_{self.comm.rank:05d}{suffix}"

    # ---- collective operations
    def reset(self) -> None:
        """*Collective.* Remove snapshots left by an earlier run in the same directory."""
        if self.comm.rank == 0 and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        agree_all(self.comm, True)  # nobody writes before rank 0 has cleared the directory

    def save(
        self,
        step: int,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
        save_fn: Callable[[str], None] | None = None,
        capture: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
    ) -> bool:
        """*Collective.* Write this rank's shard and commit the snapshot if every rank succeeded.

        The shard is ``tensors``, or what ``capture()`` returns (tensors, extra metadata) — called inside the
        failure handling, so a rank whose capture raises still joins the agreement — or what ``save_fn(path)``
        writes. Returns True when committed. On failure nothing is committed, this rank's shard is removed,
        earlier snapshots stay the rollback targets and ``last_error`` holds this rank's exception, if any.
        """
        meta = dict(meta or {})
        digest, error = "", None
        try:
            if capture is not None:
                tensors, extra = capture()
                meta.update(extra)
            digest = self._write_shard(step, tensors, meta, save_fn)
        except Exception as e:  # an IO error on one rank must become a flag, never a skipped collective
            error = e
        self.last_error = error
        digests = _exchange_digests(self.comm, digest, ok=error is None)
        if digests is None:
            self._discard(step)
            return False
        committed = True
        if self.comm.rank == 0:
            try:
                self._write_marker(step, digests, meta)
            except Exception as e:
                self.last_error, committed = e, False
        if not agree_all(self.comm, committed):
            self._discard(step)
            return False
        self._digests[step] = digests
        return True

    def prepare(self, step: int) -> Prepared | None:
        """*Local.* Read and verify this rank's shard of ``step``; None if missing or corrupt."""
        try:
            if self.tier == "memory":
                tensors, meta = self._memory[step]
                return Prepared(step, tensors, meta, None)
            expected = self._expected_digest(step)
            path = self._find_shard(step)
            if path.suffix == ".safetensors":
                blob = path.read_bytes()
                if hashlib.sha256(blob).hexdigest() != expected:
                    return None
                tensors = st_load(blob)
                meta = json.loads(_safetensors_metadata(blob).get("gradience", "{}"))
                return Prepared(step, tensors, meta, path)
            if _hash_path(path) != expected:
                return None
            return Prepared(step, None, {}, path)
        except Exception:
            return None

    def prune(self, keep: Iterable[int]) -> None:
        """*Local.* Delete snapshots not in ``keep``; rank 0 removes the marker first."""
        keep = set(keep)
        known = set(self._digests) | set(self._memory)
        for step in sorted(known - keep):
            self._digests.pop(step, None)
            self._memory.pop(step, None)
            self._discard(step)

    def committed_on_disk(self) -> list[int]:
        """Steps under ``root`` that carry a commit marker (for inspection and resume)."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            marker = d / MARKER
            if marker.is_file():
                try:
                    out.append(int(json.loads(marker.read_text())["step"]))
                except (ValueError, KeyError, json.JSONDecodeError):
                    continue
        return sorted(out)

    # ---- internals
    def _write_shard(self, step: int, tensors, meta, save_fn) -> str:
        if self.tier == "memory":
            if tensors is None:
                raise SnapshotError("the memory tier needs tensors (initialize with optimizer=, not save_fn)")
            self._memory[step] = (tensors, meta)
            return ""
        d = self.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        if tensors is not None:
            blob = st_save(tensors, metadata={"gradience": json.dumps(meta)})
            _atomic_write(self.shard_path(step), blob)
            return hashlib.sha256(blob).hexdigest()
        path = self.shard_path(step, ".ckpt")
        save_fn(str(path))
        if not path.exists():
            raise SnapshotError(f"save_fn did not create {path}")
        _fsync_path(path)
        return _hash_path(path)

    def _write_marker(self, step: int, digests: list[str], meta: dict[str, Any]) -> None:
        d = self.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        shards = []
        for r, h in enumerate(digests):
            names = [p.name for p in d.glob(f"rank_{r:05d}.*")]
            shards.append({"rank": r, "file": names[0] if names else None, "sha256": h})
        marker = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.comm.world_size,
            "tier": self.tier,
            "shards": shards,
            "guard_state": meta.get("guard_state"),
        }
        _atomic_write(d / MARKER, json.dumps(marker, indent=1).encode())

    def _expected_digest(self, step: int) -> str:
        if step in self._digests:
            return self._digests[step][self.comm.rank]
        marker = json.loads((self.step_dir(step) / MARKER).read_text())
        return marker["shards"][self.comm.rank]["sha256"]

    def _find_shard(self, step: int) -> Path:
        for suffix in (".safetensors", ".ckpt"):
            p = self.shard_path(step, suffix)
            if p.exists():
                return p
        raise SnapshotError(f"no shard for rank {self.comm.rank} in {self.step_dir(step)}")

    def _discard(self, step: int) -> None:
        self._memory.pop(step, None)
        d = self.step_dir(step)
        if self.tier == "memory" or not d.exists():
            return
        if self.comm.rank == 0:
            (d / MARKER).unlink(missing_ok=True)
        for p in d.glob(f"rank_{self.comm.rank:05d}.*"):
            _remove(p)
        try:
            d.rmdir()
        except OSError:
            pass  # other ranks' shards are still there; the last one out removes the directory


def _exchange_digests(comm: Comm, digest: str, *, ok: bool) -> list[str] | None:
    """One MAX all-reduce carrying every rank's failure flag and SHA-256; None if any rank failed."""
    n = comm.world_size
    vec = torch.zeros(1 + 32 * n, dtype=torch.float64)
    vec[0] = 0.0 if ok else 1.0
    if ok and digest:
        raw = bytes.fromhex(digest)
        vec[1 + 32 * comm.rank : 1 + 32 * (comm.rank + 1)] = torch.tensor(list(raw), dtype=torch.float64)
    out = comm.all_reduce_max(vec) if n > 1 else vec
    if out[0] > 0:
        return None
    vals = [int(x) for x in out[1:].tolist()]
    digests = []
    for r in range(n):
        raw = bytes(vals[32 * r : 32 * (r + 1)])
        digests.append(raw.hex() if any(raw) else "")
    return digests


def agree_all(comm: Comm, ok: bool) -> bool:
    """*Collective.* True on every rank iff ``ok`` on every rank (one MAX all-reduce of the failure flag)."""
    if comm.world_size == 1:
        return ok
    flag = comm.all_reduce_max(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))
    return bool(flag[0] == 0)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _hash_path(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {}) or {}


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
