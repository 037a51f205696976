"""The hot tier: in-memory copies of snapshots, so that a rollback restores without reading a file.

This module decides where a copy lives and owns the copies themselves; :class:`~gradience.snapshot.SnapshotStore`
decides which snapshots have one.

* **Placement** (:meth:`HotTier.where`): on a CUDA device, device memory while the copies there stay within
  ``guard_snapshot_hot_budget`` of the device's memory (and fit what is free), else page-locked host memory;
  on a CPU, host memory. Both device placements are filled by copies enqueued on the current stream: the host
  does not wait, and the stream orders them before the next update touches the live state. An event recorded
  behind them says when the copy is complete (:meth:`HotCopy.ready`).
* **Reading back for the disk tier** (:meth:`HotCopy.host_tensors`): a background writer needs host tensors;
  device copies come back on a side stream, so the training stream never waits for the transfer.

A copy that does not fit (an out-of-memory error while copying to the device) moves the tier to host memory
for the rest of the run, and the log says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from gradience.config import SNAPSHOT_HOT as MODES
from gradience.state import take

logger = logging.getLogger(__name__)


@dataclass
class HotCopy:
    """One snapshot's tensors and metadata held in memory, with the event behind their copies (None: ready)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    event: Any = None

    @property
    def device_bytes(self) -> int:
        """Bytes this copy holds in accelerator memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t.device.type != "cpu")

    def ready(self) -> None:
        """Wait (this thread only) until every copy into the hot tensors has completed."""
        if self.event is not None:
            self.event.synchronize()

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in host memory, for a disk write; device copies are fetched on a side stream, so the
        training stream never waits for the transfer. Blocks the calling (writer) thread only."""
        self.ready()
        on_device = [k for k, t in self.tensors.items() if t.device.type == "cuda"]
        if not on_device:
            return self.tensors
        out = dict(self.tensors)
        side = torch.cuda.Stream(device=self.tensors[on_device[0]].device)
        with torch.cuda.stream(side):
            for k in on_device:
                out[k] = take(out[k], False, "pinned")
        side.synchronize()
        return out


class HotTier:
    """Placement of hot copies (see the module docstring); ``mode`` from :data:`MODES`, ``budget`` the share
    of a CUDA device's memory the copies held there may take."""

    def __init__(self, mode: str = "auto", budget: float = 0.25) -> None:
        if mode not in MODES:
            raise ValueError(f"hot tier mode must be one of {MODES}, got {mode!r}")
        self.mode, self.budget = mode, budget
        #: Bytes of the last copy made (the estimate for the next one: a snapshot's size hardly changes).
        self.last_bytes = 0
        self._fell_back = False

    @property
    def enabled(self) -> bool:
        """Whether snapshots get an in-memory copy at all."""
        return self.mode != "off"

    def where(self, held_device_bytes: int) -> str:
        """Where the next copy goes (:data:`gradience.state.PLACES`), given what copies already hold on the
        device. "device" only on CUDA, in auto mode, within the budget and the free memory."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return "cpu"
        if self.mode == "host" or self._fell_back or self.budget <= 0:
            return "pinned"
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        free, _ = torch.cuda.mem_get_info(device)
        need = self.last_bytes
        if held_device_bytes + need <= self.budget * total and need < free:
            return "device"
        self.fall_back(f"{(held_device_bytes + need) / 2**30:.2f} GiB of snapshot copies would exceed the budget "
                       f"({self.budget:g} of {total / 2**30:.1f} GiB) or the free device memory")
        return "pinned"

    def fall_back(self, why: str) -> None:
        """Keep later copies in host memory, and say so once."""
        if not self._fell_back:
            self._fell_back = True
            logger.warning("Gradience: hot snapshot copies go to pinned host memory from now on: %s "
                           "(guard_snapshot_hot_budget)", why)

    def made(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> HotCopy:
        """Wrap a capture as a hot copy, with an event behind its enqueued copies when any were enqueued."""
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized() and any(
                t.device.type == "cuda" or t.is_pinned() for t in tensors.values()):
            event = torch.cuda.Event()
            event.record()
        self.last_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return HotCopy(tensors, meta, event)
