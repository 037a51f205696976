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
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from gradience.comm import Comm
from gradience.errors import SnapshotError
from gradience.state import capture_state, restore_state

__all__ = ["FORMAT_VERSION", "MARKER", "Prepared", "SnapshotStore", "agree_all", "capture_state", "restore_state",
           "step_dir_name"]

MARKER = "COMMITTED"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    """Directory name of a snapshot; the state before the first step (step < 0) is ``step_initial``."""
    return "step_initial" if step < 0 else f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------------------
# the store


@dataclass
class Prepared:
    """A verified shard, ready to apply; produced by :meth:`SnapshotStore.prepare`."""

    step: int
    tensors: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    path: Path | None


@dataclass
class _Pending:
    step: int
    meta: dict[str, Any]
    thread: threading.Thread | None = None
    digest: str = ""
    error: Exception | None = None


class SnapshotStore:
    """Per-rank shards with a collective commit. Every method marked *collective* must run on all ranks."""

    def __init__(self, root: str | Path, comm: Comm, *, tier: str = "disk") -> None:
        self.root = Path(root)
        self.comm = comm
        self.tier = tier
        self._memory: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        # step -> sha256 of every rank's shard, known to every rank after the commit all-reduce.
        self._digests: dict[int, list[str]] = {}
        #: This rank's exception from the last failed :meth:`save` / :meth:`finish`, None after a success.
        self.last_error: Exception | None = None
        self._pending: _Pending | None = None

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

    def save(self, step: int, **shard: Any) -> bool:
        """*Collective.* :meth:`begin` (in the foreground, same keywords) then :meth:`finish`.

        Returns True when committed. On failure nothing is committed, this rank's shard is removed,
        earlier snapshots stay the rollback targets and ``last_error`` holds this rank's exception, if any.
        """
        self.begin(step, **shard)
        return self.finish()

    def begin(
        self,
        step: int,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
        save_fn: Callable[[str], None] | None = None,
        capture: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
        background: bool = False,
    ) -> None:
        """*Local.* Capture now and write this rank's shard, in a background thread if ``background``.

        The shard is ``tensors``, or what ``capture()`` returns (tensors, extra metadata) — called inside the
        failure handling, so a rank whose capture raises still joins the agreement — or what ``save_fn(path)``
        writes. With ``background``, ``capture`` must return copies that later training steps do not modify. :meth:`finish` (collective)
        commits the snapshot, :meth:`abandon` drops it; one snapshot is in flight at a time.
        """
        if self._pending is not None:
            raise SnapshotError(f"snapshot {self._pending.step} is still in flight; finish or abandon it first")
        pending = _Pending(step, dict(meta or {}))
        try:
            if capture is not None:
                tensors, extra = capture()
                pending.meta.update(extra)
        except Exception as e:  # reported through finish(), never by skipping the agreement
            pending.error = e

        job: Callable[[], str] = lambda: ""  # noqa: E731
        if pending.error is None:
            try:
                job = self._shard_job(step, tensors, pending.meta, save_fn)
            except Exception as e:
                pending.error = e

        def write() -> None:
            try:
                pending.digest = job()
            except Exception as e:
                pending.error = e

        if pending.error is None:
            if background:
                thread = threading.Thread(target=write, name=f"gradience-snapshot-{step}", daemon=True)
                try:
                    thread.start()
                    pending.thread = thread
                except RuntimeError as e:  # "can't start new thread": a flag for finish(), not a lone raise
                    pending.error = e
            else:
                write()
        self._pending = pending

    @property
    def pending_step(self) -> int | None:
        """Step of the snapshot begun and not yet finished or abandoned."""
        return self._pending.step if self._pending is not None else None

    def finish(self) -> bool:
        """*Collective.* Wait for this rank's shard, then commit the in-flight snapshot if every rank succeeded."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise SnapshotError("no snapshot in flight")
        if pending.thread is not None:
            pending.thread.join()
        step = pending.step
        self.last_error = pending.error
        digests = _exchange_digests(self.comm, pending.digest, ok=pending.error is None)
        if digests is None:
            self._discard(step)
            return False
        committed = True
        if self.comm.rank == 0:
            try:
                self._write_marker(step, digests, pending.meta)
            except Exception as e:
                self.last_error, committed = e, False
        if not agree_all(self.comm, committed):
            self._discard(step)
            return False
        self._digests[step] = digests
        return True

    def abandon(self) -> int | None:
        """*Local.* Drop the in-flight snapshot (it is never committed); returns its step."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.thread is not None:
            pending.thread.join()
        self._discard(pending.step)
        return pending.step

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
    def _shard_job(self, step: int, tensors, meta, save_fn) -> Callable[[], str]:
        """Do on this thread what must see the state as it is now; return the rest (IO, hashing) as a job
        that yields the shard's SHA-256 and may run on a background thread."""
        if self.tier == "memory":
            if tensors is None:
                raise SnapshotError("the memory tier needs tensors (initialize with optimizer=, not save_fn)")
            self._memory[step] = (tensors, meta)
            return lambda: ""
        d = self.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        if tensors is not None:
            # Planning (header, byte views) here leaves the writer thread a few large GIL-free calls.
            head, raws = _plan_safetensors(tensors, {"gradience": json.dumps(meta)})
            path = self.shard_path(step)
            return lambda: _write_planned(path, head, raws)
        path = self.shard_path(step, ".ckpt")
        save_fn(str(path))
        if not path.exists():
            raise SnapshotError(f"save_fn did not create {path}")

        def finish_file() -> str:
            _fsync_path(path)
            return _hash_path(path)

        return finish_file

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


try:  # the loader's own table, so everything safetensors can read, we can write
    from safetensors.torch import _TYPES as _ST_NAMES
except ImportError:  # pragma: no cover - older safetensors
    _ST_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
_ST_DTYPES = {dtype: code for code, dtype in _ST_NAMES.items()}
# Bytes handed to hashlib / write() per call: each call releases the GIL once, so few large calls keep a
# background write moving even while the training thread runs Python.
_CHUNK = 64 << 20


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file (temp -> fsync -> rename) and return the SHA-256 of exactly its bytes.

    Written here rather than with ``safetensors.torch.save`` so that no serialized copy of the whole shard
    is built in memory and the GIL is released while bytes are hashed and written: a background snapshot
    then does not stall the training thread.
    """
    return _write_planned(path, *_plan_safetensors(tensors, metadata))


def _plan_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[torch.Tensor]]:
    """The file's header (length prefix included) and each tensor's bytes as a flat uint8 view, in file order."""
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise SnapshotError(f"cannot store {name}: dtype {t.dtype} has no safetensors code")
    # Largest elements first keeps every tensor aligned to its element size after the 8-byte-padded header.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    raws = []
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
        if size:
            raws.append(t.contiguous().reshape(-1).view(torch.uint8))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, raws


def _write_planned(path: Path, head: bytes, raws: list[torch.Tensor]) -> str:
    digest = hashlib.sha256(head)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for chunk in _byte_chunks(raws):
            data = memoryview(chunk.numpy())
            digest.update(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest.hexdigest()


def _byte_chunks(raws: list[torch.Tensor]):
    """Flat uint8 tensors in order, small ones concatenated into chunks of about ``_CHUNK`` bytes."""
    batch: list[torch.Tensor] = []
    size = 0
    for raw in raws:
        batch.append(raw)
        size += raw.numel()
        if size >= _CHUNK:
            yield torch.cat(batch) if len(batch) > 1 else batch[0]
            batch, size = [], 0
    if batch:
        yield torch.cat(batch) if len(batch) > 1 else batch[0]


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
