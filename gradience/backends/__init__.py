"""State backends: what one rank owns, how the guard checks it, captures it into a snapshot shard, puts it back
and where the LR scale is applied. The controller, policy, consensus and snapshot store talk to this seam only.

* :class:`PlainBackend`: a torch module and optimizer held whole by the rank (one process, DDP replicas).
* :class:`gradience.backends.deepspeed.DeepSpeedBackend`: a DeepSpeed engine, ZeRO 0-3 (each rank's
  partitions; nothing is gathered).
* :class:`gradience.backends.fsdp.FSDP2Backend`: a ``fully_shard`` model (each rank's local shards), chosen by
  :func:`default_backend` when the parameters are DTensors.

A backend never talks to other ranks except inside :meth:`StateBackend.restore` where the engine needs it
(ZeRO-3 re-gathers its persistent parameters), and every rank restores together.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from gradience.backends.fsdp import FSDP2Backend, is_sharded
from gradience.backends.shard import state_tensors
from gradience.probe import BadTensors, bad_tensors, parameters, persistent_buffers
from gradience.state import capture_state, restore_state

__all__ = ["PlainBackend", "StateBackend", "default_backend"]


class StateBackend(Protocol):
    """What the controller needs from the state a rank owns."""

    #: Every rank holds the same full state (fingerprints and replica repair make sense).
    replicated: bool
    #: Model the spectral probe reads (None: no spectral probe for this backend).
    spectral_model: torch.nn.Module | None

    def gate_tensors(self) -> list[torch.Tensor]:
        """This rank's gradients, as the update will consume them, for the gradient gate (tensors that cannot
        hold NaN may be among them)."""

    def close_gate(self) -> None:
        """Make the coming optimizer update a no-op, leaving weights and optimizer state bitwise unchanged."""

    def check_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(weights, persistent buffers) this rank holds, checked after the update."""

    def bad(self, threshold: float, *, grads: bool) -> BadTensors:
        """Name the offending tensors (faults only; slow is fine)."""

    def capture(self, *, copy: bool, where: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's state as tensors placed by ``where`` (:data:`gradience.state.PLACES`) plus JSON-able
        metadata (a snapshot shard)."""

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Put a captured shard back in place (every rank calls it together)."""

    def replica_tensors(self) -> list[torch.Tensor]:
        """Every tensor of a replicated state, in an order equal on all replicas (replica repair)."""


class PlainBackend:
    """A module and optimizer held whole by this rank (one process or a DDP replica)."""

    replicated = True

    #: The tensor lists are walked again after this many calls even when the optimizer's groups look the same
    #: (a buffer reassigned by a module, a parameter swapped in a group): a walk of a large model's modules
    #: costs about half a millisecond, too much for every step.
    REFRESH_EVERY = 100

    def __init__(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.model, self.optimizer = model, optimizer
        self.spectral_model: torch.nn.Module | None = model
        self._key: tuple | None = None
        self._calls = 0
        self._cached: tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor]] | None = None

    def gate_tensors(self) -> list[torch.Tensor]:
        # The raw gradients: the norm pass itself skips what holds no NaN (integers, empties) and reads sparse
        # values, and a filtering walk here would cost as much as the pass on a small model.
        return [g for g in (p.grad for p in self._lists()[0]) if g is not None]

    def close_gate(self) -> None:
        # Dropped gradients make even an unconditional optimizer.step() a no-op for these parameters.
        for p in self._lists()[0]:
            p.grad = None

    def check_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        _, weights, buffers = self._lists()
        return weights, buffers

    def _lists(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
        """(the optimizer's parameters, the model's non-empty parameters, its checkable persistent buffers),
        cached while the optimizer's groups keep their shape (walked again every REFRESH_EVERY calls)."""
        groups = self.optimizer.param_groups if self.optimizer is not None else ()
        key = tuple((len(g["params"]), id(g["params"][0]) if g["params"] else 0) for g in groups)
        self._calls += 1
        if self._cached is None or key != self._key or self._calls >= self.REFRESH_EVERY:
            weights = parameters(self.model) if self.model is not None else []
            buffers = persistent_buffers(self.model) if self.model is not None else []
            self._cached, self._key, self._calls = (self._params(), weights, buffers), key, 0
        return self._cached

    def bad(self, threshold: float, *, grads: bool) -> BadTensors:
        return bad_tensors(self.model, threshold=threshold, grads=grads)

    def capture(self, *, copy: bool, where: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return capture_state(self.model, self.optimizer, copy=copy, where=where)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_state(tensors, meta, self.model, self.optimizer)

    def replica_tensors(self) -> list[torch.Tensor]:
        return state_tensors(self.model, self.optimizer)

    def _params(self) -> list[torch.nn.Parameter]:
        if self.optimizer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.model is None:
            raise ValueError("before_optimizer_step needs a model or an optimizer")
        return list(self.model.parameters())


def default_backend(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> StateBackend:
    """FSDP2 when the model's parameters are DTensors, else the whole model and optimizer."""

    if is_sharded(model):
        return FSDP2Backend(model, optimizer)
    return PlainBackend(model, optimizer)
