"""The only module that imports torch.distributed: the Comm seam every collective goes through.

``LocalComm`` is the world-size-1 identity. ``TorchComm`` wraps a process group (the default one or a
user-supplied subgroup, gloo or NCCL) and gives every collective a deadline, so a dead or stalled peer
surfaces as :class:`ConsensusTimeout` instead of a hang.
"""

from __future__ import annotations

import datetime
import time
from typing import Protocol, runtime_checkable

import torch

from gradience.errors import ConsensusTimeout


@runtime_checkable
class Comm(Protocol):
    """Collectives the guard needs. Implementations must be usable from every rank in lockstep."""

    rank: int
    world_size: int
    device: torch.device

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise MAX over ranks of a 1-D float tensor (on any device); returns a CPU float64 tensor."""
        ...


class LocalComm:
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Identity (copied to CPU float64)."""
        return values.detach().to("cpu", torch.float64)


class TorchComm:
    """A torch.distributed process group with a deadline on every collective."""

    def __init__(
        self,
        group: object | None = None,
        *,
        timeout_s: float = 300.0,
        device: torch.device | str | None = None,
    ) -> None:
        import torch.distributed as dist

        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("TorchComm needs an initialized torch.distributed default group or a group")
            group = dist.group.WORLD
        self.group = group
        # Threaded test groups are not registered with the default world; use the group's own view.
        self.rank = group.rank()
        self.world_size = group.size()
        self.timeout_s = float(timeout_s)
        if device is None:
            device = _default_device(group)
        self.device = torch.device(device)

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """MAX all-reduce with a deadline of ``timeout_s``; raises ConsensusTimeout when it passes."""
        import torch.distributed as dist

        buf = values.detach().to(self.device, torch.float64)
        buf = buf.clone()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        try:
            work = self.group.allreduce([buf], opts)
            self._wait(work)
        except ConsensusTimeout:
            raise
        except RuntimeError as e:
            raise ConsensusTimeout(
                f"all_reduce on rank {self.rank}/{self.world_size} failed or timed out after "
                f"{self.timeout_s:g}s (a peer died, stalled or left the loop): {e}"
            ) from e
        return buf.to("cpu", torch.float64)

    def _wait(self, work: object) -> None:
        if self.device.type == "cpu":
            work.wait(datetime.timedelta(seconds=self.timeout_s))
            return
        # NCCL's wait() only orders streams; poll completion so the host never blocks past the deadline.
        deadline = time.monotonic() + self.timeout_s
        pause = 1e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise ConsensusTimeout(
                    f"all_reduce on rank {self.rank}/{self.world_size} did not complete within "
                    f"{self.timeout_s:g}s (a peer died, stalled or left the loop)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def _default_device(group: object) -> torch.device:
    import torch.distributed as dist

    try:
        backend = dist.get_backend(group)
    except Exception:  # threaded groups are unknown to the default world
        backend = group.name() if hasattr(group, "name") else "gloo"
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_comm(group: object | None = None, *, timeout_s: float = 300.0) -> Comm:
    """TorchComm over ``group`` (or the default group when torch.distributed is initialized), else LocalComm."""
    import torch.distributed as dist

    if group is not None:
        return TorchComm(group, timeout_s=timeout_s)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm(timeout_s=timeout_s)
    return LocalComm()
