"""The Comm seam every collective of the guard goes through, and the only module that runs torch.distributed
collectives or asks about its process groups (:func:`default_rank`, :func:`default_world_size`). Elsewhere the
package only reads DTensor layouts (FSDP2, the sharded spectral products) and watches DDP's ``Join``.

``LocalComm`` is the world-size-1 identity. ``TorchComm`` wraps a process group (the default one or a
user-supplied subgroup, gloo or NCCL) and owns three promises:

- **a deadline on every collective**: a dead or stalled peer surfaces as :class:`ConsensusTimeout`. The guard
  runs its collectives on a group of its own, created with ``timeout=collective_timeout_s``, because
  ``work.wait(timeout)`` does not cancel an abandoned gloo all-reduce: the worker thread stays inside it until
  the *group's* timeout (30 min for the default group), and the process cannot exit before it does.
- **no silent mismatch**: every collective starts with a fixed-length frame whose header carries the call
  kind, the caller's step label and a per-comm call counter, each sent as (x, -x) so that MAX reveals any
  difference between ranks. Ranks in different calls get :class:`CollectiveMismatch`, naming both sides,
  instead of MAX-ing one rank's gradient check with another's weight check (or aborting inside gloo on a
  length mismatch: every first exchange has the same length).
- **refusal after failure**: once a collective failed, every later call raises at once, without a
  collective, so a loop that catches the error cannot pair a late all-reduce with an abandoned one.

:func:`exit_process` is the one robust way for a script that used torch.distributed to end (see its docstring).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from gradience.errors import CollectiveMismatch, ConfigError, ConsensusTimeout

logger = logging.getLogger("gradience")
# Set once any guard collective failed in this process: exit_process() must not wait for a dead peer.
_FAILED = False

#: Call kinds in the header (codes > 0; 0 would be indistinguishable from padding).
KINDS = ("check:grads", "check:step", "agree", "digests", "broadcast", "verify", "lock", "spectral")
_HDR = 6  # (kind, -kind, step, -step, seq, -seq)


@runtime_checkable
class Comm(Protocol):
    """Every collective the guard uses, and what callers read of a group. Implementations must be usable from every
    rank in lockstep; each call ends within the group's deadline or raises :class:`ConsensusTimeout`."""

    #: This rank's index in the group, the group's size, and the device its collectives run on.
    rank: int
    world_size: int
    device: torch.device
    #: The global rank of each member, by group rank.
    global_ranks: tuple[int, ...]
    #: Why the collectives stopped (an earlier failure), None while they work.
    broken: str | None

    def all_reduce_max(self, values: torch.Tensor, *, kind: str = "agree", step: int | None = None) -> torch.Tensor:
        """Element-wise MAX over ranks of a 1-D float tensor (on any device); returns a CPU float64 tensor."""
        ...

    def all_reduce_sum(self, values: torch.Tensor, *, kind: str = "spectral") -> torch.Tensor:
        """Element-wise SUM over ranks (the sharded spectral products)."""
        ...

    def all_reduce_device_max(self, values: torch.Tensor) -> None:
        """MAX in place on the group's device, framed by the caller (the asynchronous verdict)."""
        ...

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with group rank ``src``'s (replica repair)."""
        ...

    def close(self) -> None:
        """Release what the comm holds (its own process group)."""
        ...


class LocalComm:
    """World size 1: every collective is the identity."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")
    global_ranks = (0,)
    broken: str | None = None

    def all_reduce_max(self, values: torch.Tensor, *, kind: str = "agree", step: int | None = None) -> torch.Tensor:
        """Identity (copied to CPU float64)."""
        return values.detach().to("cpu", torch.float64)

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Nothing to do with one rank."""

    def all_reduce_sum(self, values: torch.Tensor, *, kind: str = "spectral") -> torch.Tensor:
        """Identity."""
        return values

    def all_reduce_device_max(self, values: torch.Tensor) -> None:
        """Identity (in place: nothing to do)."""

    def close(self) -> None:
        """Nothing to release."""


class TorchComm:
    """A torch.distributed process group with a deadline, a mismatch check and a refusal after failure.

    Args:
        group: the group to agree over (default: the default group).
        timeout_s: deadline of every collective.
        device: where the reduction runs (default: the current CUDA device for NCCL, else CPU).
        own_group: run the guard's collectives on a group of its own over the same ranks (see the module
            docstring). Only possible for groups registered with torch.distributed; threaded test groups are
            used as they are.
    """

    def __init__(
        self,
        group: object | None = None,
        *,
        timeout_s: float = 300.0,
        device: torch.device | str | None = None,
        own_group: bool = True,
    ) -> None:
        import torch.distributed as dist

        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("TorchComm needs an initialized torch.distributed default group or a group")
            group = dist.group.WORLD
        if not hasattr(group, "rank") or not callable(group.rank):
            # dist.new_group() hands non-members the int GroupMember.NON_GROUP_MEMBER.
            me = dist.get_rank() if dist.is_initialized() else "?"
            raise ConfigError(f"process_group: global rank {me} is not a member of the group it was given "
                              f"({group!r}); pass each rank the group that contains it")
        self.timeout_s = float(timeout_s)
        self.global_ranks = _global_ranks(group)
        if device is None:
            device = _default_device(group)
        self.device = torch.device(device)
        self.owned = False
        if own_group and _registered(group):
            backend = str(dist.get_backend(group))
            # A subgroup: only its members call new_group (use_local_synchronization), since peers in other
            # groups never enter this constructor. Such groups are named by a hash of their ranks, so a second
            # guard over the same ranks in one process would reuse the first one's rendezvous keys (seen to
            # hang): a whole-world group is created by every rank instead and gets a fresh, counted name.
            local = len(self.global_ranks) < dist.get_world_size()
            group = dist.new_group(list(self.global_ranks), timeout=datetime.timedelta(seconds=self.timeout_s),
                                   backend=backend, use_local_synchronization=local)
            self.owned = True
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()
        #: Why the comm refuses every call (a failed or mismatched collective), None while healthy.
        self.broken: str | None = None
        self._seq = 0
        # Every first exchange has this many payload slots: the consensus vector (about 16 + world size)
        # fits; longer payloads follow in a second exchange once the header matched.
        self.frame = max(64, self.world_size + 32)

    def all_reduce_max(self, values: torch.Tensor, *, kind: str = "agree", step: int | None = None) -> torch.Tensor:
        """MAX all-reduce with a deadline of ``timeout_s``.

        Raises ConsensusTimeout when the deadline passes or the group fails, CollectiveMismatch when the
        ranks are not in the same call (kind, step label, call count), and ConsensusTimeout at once, without
        a collective, after any earlier failure.
        """
        self._refuse_if_broken()
        self._seq += 1
        code = KINDS.index(kind) + 1
        values = values.detach().reshape(-1).to(self.device, torch.float64)
        n = values.numel()
        label = float(step) if step is not None else 0.0
        frame = torch.zeros(_HDR + self.frame, dtype=torch.float64, device=self.device)
        frame[:_HDR] = torch.tensor([code, -code, label, -label, self._seq, -self._seq], dtype=torch.float64)
        inline = n <= self.frame
        if inline:
            frame[_HDR:_HDR + n] = values
        out = self._reduce(frame, kind)
        head = out[:_HDR].tolist()
        if head[0] != -head[1] or head[2] != -head[3] or head[4] != -head[5]:
            self._mismatch(kind, step, head)
        if inline:
            return out[_HDR:_HDR + n].to("cpu")
        return self._reduce(values.clone(), kind).to("cpu")

    def all_reduce_sum(self, values: torch.Tensor, *, kind: str = "spectral") -> torch.Tensor:
        """SUM all-reduce of a small tensor (the sharded spectral probe's partial products), same deadline and
        refusal rules, no frame: the framed calls around it catch ranks out of step. Returns a new tensor on
        ``values``' device and dtype."""
        import torch.distributed as dist

        self._refuse_if_broken()
        buf = values.detach().to(self.device, copy=True).contiguous()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self._run(kind, lambda: self.group.allreduce([buf], opts))
        return buf.to(values.device)

    def all_reduce_device_max(self, values: torch.Tensor) -> None:
        """MAX all-reduce in place of a tensor on the group's device, framed by the caller (the asynchronous
        verdict). Under NCCL it is only enqueued: the current stream waits for it, the host does not, and the
        group's timeout (``timeout_s``) bounds it; under gloo it completes within ``timeout_s`` here."""
        import torch.distributed as dist

        self._refuse_if_broken()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        if self.device.type == "cpu":
            self._run("check:grads", lambda: self.group.allreduce([values], opts))
            return
        try:
            self.group.allreduce([values], opts).wait()  # stream order only
        except RuntimeError as e:
            self._break(f"check:grads: {e}")
            raise ConsensusTimeout(f"check:grads on rank {self.rank}/{self.world_size} failed: {e}") from e

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite dense ``tensors`` on every rank with ``src``'s, bitwise (in place; one framed size check,
        then one byte broadcast; same deadline and refusal rules)."""
        import torch.distributed as dist

        self._refuse_if_broken()
        raws = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        total = sum(r.numel() for r in raws)
        sizes = self.all_reduce_max(torch.tensor([total, -total], dtype=torch.float64), kind="broadcast")
        if sizes[0] != -sizes[1]:
            self._break("broadcast: ranks hold states of different sizes")
            raise CollectiveMismatch(f"broadcast from rank {src}: ranks hold {-sizes[1]:g} to {sizes[0]:g} bytes of "
                                     "state; they are not replicas of one model")
        flat = torch.cat(raws).to(self.device) if raws else torch.zeros(0, dtype=torch.uint8, device=self.device)
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._run("broadcast", lambda: self.group.broadcast([flat], opts))
        offset = 0
        for t, r in zip(tensors, raws, strict=True):
            n = r.numel()
            piece = flat[offset:offset + n].to(t.device, copy=True)  # a fresh, aligned buffer for view(dtype)
            offset += n
            t.detach().copy_(piece.view(t.dtype).view(t.shape))

    def close(self) -> None:
        """Destroy the guard's own group, unless a collective failed (a destroy could then wait for a peer)."""
        if self.owned and self.broken is None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(self.group)
            except Exception as e:  # already destroyed with the default group, or torch shut down
                logger.debug("Gradience: destroying the guard's process group failed: %s", e)
            self.owned = False

    # ---- internals
    def _refuse_if_broken(self) -> None:
        if self.broken is not None:
            raise ConsensusTimeout(f"the guard's collectives stopped after an earlier failure ({self.broken})")

    def _break(self, why: str) -> None:
        global _FAILED
        self.broken = why
        _FAILED = True

    def _reduce(self, buf: torch.Tensor, kind: str) -> torch.Tensor:
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._run(kind, lambda: self.group.allreduce([buf], opts))
        return buf

    def _run(self, kind: str, start: Callable[[], object]) -> None:
        """Start a collective and wait for it within the deadline; any failure breaks the comm for good."""
        try:
            self._wait(start())
        except ConsensusTimeout as e:
            self._break(f"{kind}: {e}")
            raise
        except RuntimeError as e:
            self._break(f"{kind}: {e}")
            raise ConsensusTimeout(
                f"{kind} on rank {self.rank}/{self.world_size} failed or timed out after {self.timeout_s:g}s "
                f"(a peer died, stalled or left the loop): {e}"
            ) from e

    def _mismatch(self, kind: str, step: int | None, head: list[float]) -> None:
        def name(code: float) -> str:
            i = int(code) - 1
            return KINDS[i] if 0 <= i < len(KINDS) else f"kind {code:g}"

        lo_kind, hi_kind = name(-head[1]), name(head[0])
        sides = (f"calls '{lo_kind}' vs '{hi_kind}'" if lo_kind != hi_kind else f"both in '{kind}'")
        detail = (f"{sides}; step labels {-head[3]:g} vs {head[2]:g}; call counts {-head[5]:g} vs {head[4]:g}")
        self._break(f"collective mismatch: {detail}")
        raise CollectiveMismatch(
            f"ranks are not making the same Gradience call (rank {self.rank}/{self.world_size} is in '{kind}' at "
            f"step {step}): {detail}. Every rank must call before_optimizer_step/step the same number of times, "
            "in the same order, with the same step numbers.")

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


def _registered(group: object) -> bool:
    import torch.distributed as dist

    try:
        dist.get_process_group_ranks(group)
        return True
    except Exception:  # threaded groups are unknown to the default world
        return False


def _global_ranks(group: object) -> tuple[int, ...]:
    import torch.distributed as dist

    try:
        return tuple(dist.get_process_group_ranks(group))
    except Exception:  # an unregistered (threaded test) group: its own numbering is all there is
        return tuple(range(group.size()))


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
    """TorchComm over ``group`` (or the default group when torch.distributed is initialized), else LocalComm.

    Raises ConfigError when the environment says this is one of several processes (``WORLD_SIZE`` > 1, as
    ``torchrun`` sets it) but torch.distributed was never initialized: each process would run a guard of its
    own, agreeing with nobody and writing the same files.
    """
    import torch.distributed as dist

    if group is not None:
        return TorchComm(group, timeout_s=timeout_s)
    if dist.is_available() and dist.is_initialized():
        return TorchComm(timeout_s=timeout_s) if dist.get_world_size() > 1 else LocalComm()
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ConfigError(
            f"WORLD_SIZE={world} (set by torchrun or another launcher) but torch.distributed is not initialized: "
            "call torch.distributed.init_process_group() before GradienceController.initialize(), so the "
            "ranks agree with each other (or unset WORLD_SIZE for independent single-process runs)")
    return LocalComm()


def exit_process(status: int = 0) -> None:
    """End a process that used torch.distributed, cleanly and at once, with exit status ``status``.

    torch 2.13's gloo backend aborts the interpreter at exit ("terminate called without an active
    exception", SIGABRT) in a fraction of runs, with or without ``destroy_process_group``: gloo worker threads
    still hold work objects whose tensors are freed while the interpreter is being torn down. No amount of
    cleanup before a normal exit closes that window, so this helper destroys the process groups while the
    interpreter is fully alive (skipped when a collective already failed: a destroy would wait for the dead
    peer), flushes Python's streams and logging handlers, and leaves with ``os._exit`` — no interpreter
    finalization, so nothing is freed under a worker thread's feet. Call it as the last statement of a
    training script (``gradience.exit_process(code)``); ``atexit`` handlers do not run after it.
    """
    import torch.distributed as dist

    try:
        if not _FAILED and dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "gloo":
                # Ranks that end together leave together: a launcher that sees one rank exit stops the others
                # (SIGTERM), and a bounded barrier keeps that from cutting a rank's own exit short.
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=10))
            dist.destroy_process_group()
    except Exception as e:  # a failed group: leaving is still the right thing to do
        logger.debug("Gradience: destroy_process_group at exit failed: %s", e)
    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not keep the process alive
            pass
    os._exit(status)


def agree_all(comm: Comm, ok: bool) -> bool:
    """*Collective.* True on every rank iff ``ok`` on every rank (one MAX all-reduce of the failure flag)."""
    if comm.world_size == 1:
        return ok
    flag = comm.all_reduce_max(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))
    return bool(flag[0] == 0)


def default_rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialized."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def default_world_size() -> int:
    """The default group's world size, 0 when torch.distributed is not initialized."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0
