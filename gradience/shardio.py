"""Snapshot bytes on disk: directory and shard names, the marker file, a streaming safetensors writer,
atomic writes, fsync and hashing.

Nothing here is collective or decides anything: the :class:`~gradience.snapshot.SnapshotStore` owns the
commit protocol and decides what is written, kept and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gradience.errors import SnapshotError

__all__ = ["FORMAT_VERSION", "MARKER", "TMP_SUFFIX", "atomic_write", "committed_dirs", "fsync_dir", "fsync_path",
           "hash_path", "load_marker", "marker_complete", "path_size", "plan_safetensors", "remove_path",
           "remove_rank_files", "remove_stale", "safetensors_metadata", "shard_file_name", "snapshot_dir_name",
           "snapshot_dirs", "write_planned", "write_safetensors"]

#: Name of the commit marker in a snapshot directory.
MARKER = "COMMITTED"
#: Version of the marker's JSON (2: keyed by snapshot id, shards named by global rank, sizes recorded).
FORMAT_VERSION = 2
#: Suffix of a file being written; renamed onto its final name only after an fsync.
TMP_SUFFIX = ".tmp"
_DIR_RE = re.compile(r"snap_(\d{8,})")
# Shard kinds as the store exchanges them (0: no file, the memory tier).
_SUFFIX = {1: ".safetensors", 2: ".ckpt"}

def snapshot_dir_name(sid: int) -> str:
    """Directory name of snapshot ``sid``: ``snap_00000012``."""
    return f"snap_{sid:08d}"


def shard_file_name(global_rank: int, kind: int) -> str | None:
    """File name of a global rank's shard: kind 1 ``rank_00003.safetensors``, 2 ``rank_00003.ckpt``, 0 None."""
    return f"rank_{global_rank:05d}{_SUFFIX[kind]}" if kind else None


def snapshot_dirs(root: Path) -> list[tuple[int, Path]]:
    """(id, path) of every ``snap_*`` directory directly under ``root``, committed or not, sorted by id."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _DIR_RE.fullmatch(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def load_marker(d: Path, sid: int) -> dict[str, Any]:
    """The marker of snapshot directory ``d``; raises (OSError, ValueError) if absent, unreadable or foreign.

    Format 2: ``{"format": 2, "id": sid, "step": label, "world_size", "tier", "extra": {...}, "shards":
    [{"rank": group rank, "global_rank", "file": "rank_00003.safetensors", "size": bytes, "sha256"}]}``.
    """
    record = json.loads((d / MARKER).read_text())
    if record.get("format") != FORMAT_VERSION or int(record["id"]) != sid or not isinstance(record["shards"], list):
        raise ValueError(f"{d / MARKER} is not a format-{FORMAT_VERSION} marker of snapshot {sid}")
    return record


def marker_complete(d: Path, record: dict[str, Any]) -> bool:
    """Every shard the marker lists is present with its recorded size (cheap: stat only, no hashing)."""
    shards = record["shards"]
    if len(shards) != int(record["world_size"]):
        return False
    for s in shards:
        p = d / s["file"]
        if not p.exists() or path_size(p) != int(s["size"]):
            return False
    return True


def remove_rank_files(d: Path, global_rank: int, *, rmdir: bool = True) -> None:
    """Remove a global rank's shard (and temp files) from snapshot directory ``d``; then ``d`` if empty."""
    for p in d.glob(f"rank_{global_rank:05d}.*"):
        remove_path(p)
    if rmdir:
        with contextlib.suppress(OSError):  # other ranks' shards still there: the last one out removes it
            d.rmdir()


def remove_stale(root: Path, global_rank: int, *, marker_writer: bool) -> None:
    """Remove what a killed process of this rank left under ``root``: its temp files (``marker_writer``: the
    marker's too) and its shards in directories without a marker. Best effort; never touches a committed shard."""
    for _, d in snapshot_dirs(root):
        with contextlib.suppress(OSError):
            for p in d.glob(f"rank_{global_rank:05d}.*{TMP_SUFFIX}"):
                remove_path(p)
            if marker_writer:
                (d / (MARKER + TMP_SUFFIX)).unlink(missing_ok=True)
            if not (d / MARKER).exists():
                remove_rank_files(d, global_rank)


def committed_dirs(root: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(id, path, marker) of every snapshot under ``root`` whose marker is readable and lists complete shards."""
    out = []
    for sid, d in snapshot_dirs(root):
        try:
            record = load_marker(d, sid)
            if marker_complete(d, record):
                out.append((sid, d, record))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or foreign marker: never a rollback target
    return out


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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file (temp -> fsync -> rename) and return the SHA-256 of exactly its bytes.

    Written here rather than with ``safetensors.torch.save`` so that no serialized copy of the whole shard
    is built in memory and the GIL is released while bytes are hashed and written: a background snapshot
    then does not stall the training thread.
    """
    return write_planned(path, *plan_safetensors(tensors, metadata))


def plan_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[torch.Tensor]]:
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


def write_planned(path: Path, head: bytes, raws: list[torch.Tensor]) -> str:
    """Write what :func:`plan_safetensors` returned to ``path`` (temp -> fsync -> rename); return its SHA-256."""
    digest = hashlib.sha256(head)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(head)
        for chunk in _byte_chunks(raws):
            data = memoryview(chunk.numpy())
            digest.update(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return digest.hexdigest()


def _byte_chunks(raws: list[torch.Tensor]) -> Iterator[torch.Tensor]:
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    """Make a rename or unlink in ``d`` durable (best effort: some filesystems refuse directory fsync)."""
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


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def fsync_path(path: Path) -> None:
    """fsync a file, or every file under a directory (what a user ``save_fn`` wrote), and its parent."""
    for p in _files(path):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path.parent)


def hash_path(path: Path) -> str:
    """SHA-256 of a file, or of every file under a directory together with its relative name."""
    h = hashlib.sha256()
    for p in _files(path):
        h.update(str(p.relative_to(path.parent)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def path_size(path: Path) -> int:
    """Bytes in a file, or in every file under a directory (a cheap completeness check: no reading)."""
    return sum(p.stat().st_size for p in _files(path))


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors file held in memory."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {}) or {}


def remove_path(p: Path) -> None:
    """Remove a file or a directory tree; a missing path is not an error."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
