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

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from gradience.probe import BadTensors, parameters, persistent_buffers
from gradience.state import capture_state, copy_pairs, restore_state, take

__all__ = ["PlainBackend", "StateBackend", "capture_shard", "copy_into", "default_backend", "restore_live",
           "restore_optimizer_state", "saved_optimizer_states", "unique"]


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
        from gradience.probe import bad_tensors

        return bad_tensors(self.model, threshold=threshold, grads=grads)

    def capture(self, *, copy: bool, where: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return capture_state(self.model, self.optimizer, copy=copy, where=where)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_state(tensors, meta, self.model, self.optimizer)

    def replica_tensors(self) -> list[torch.Tensor]:
        from gradience.recovery import state_tensors

        return state_tensors(self.model, self.optimizer)

    def _params(self) -> list[torch.nn.Parameter]:
        if self.optimizer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.model is None:
            raise ValueError("before_optimizer_step needs a model or an optimizer")
        return list(self.model.parameters())


def unique(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(first name -> tensor, alias name -> first name) with each (storage, offset, shape, dtype) kept once:
    safetensors refuses shared memory, and a restore into one alias restores all."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in named:
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, aliases


def copy_into(live: torch.Tensor, saved: torch.Tensor, name: str) -> None:
    """Restore ``saved`` into ``live`` in place, refusing a shape or dtype that does not match."""
    check_match(live, saved, name)
    live.copy_(saved)


def check_match(live: torch.Tensor, saved: torch.Tensor, name: str) -> None:
    """Refuse a saved tensor whose shape or dtype is not the live one's (before anything is copied)."""
    if tuple(live.shape) != tuple(saved.shape) or live.dtype != saved.dtype:
        raise ValueError(f"snapshot tensor {name}: {tuple(saved.shape)} {saved.dtype}, the rank holds "
                         f"{tuple(live.shape)} {live.dtype}")


def capture_shard(named: Iterable[tuple[str, torch.Tensor]], optimizer_states: Iterable[tuple[str, dict]], *,
                  copy: bool, local: Callable[[Any], torch.Tensor] = lambda t: t, where: str = "cpu",
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, Any]]]:
    """A sharded backend's shard: (tensors placed by ``where``, aliases, non-tensor optimizer values).
    ``named``: the live tensors (each storage kept once); ``optimizer_states``: (label, the optimizer's state dict
    of one parameter), whose tensors go in as ``optim.<label>.<key>`` and other values into the JSON side."""
    live, aliases = unique(named)
    tensors = {n: take(t, copy, where) for n, t in live.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for label, state in optimizer_states:
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{label}.{key}"] = take(local(value), copy, where)
            else:
                scalars.setdefault(label, {})[key] = value
    return tensors, aliases, scalars


def restore_live(named: Iterable[tuple[str, torch.Tensor]], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy a shard's tensors into the live ones in place, refusing a shard that lacks any of them."""
    live, _ = unique(named)
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise ValueError(f"snapshot lacks {missing[:5]} of {what}")
    for name, t in live.items():
        check_match(t, tensors[name], name)  # all checked first: a mismatch leaves the live state untouched
    copy_pairs([(t, tensors[name]) for name, t in live.items()])


def saved_optimizer_states(tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]
                           ) -> dict[str, dict[str, Any]]:
    """A :func:`capture_shard` shard's optimizer entries by label (one pass over the shard)."""
    out: dict[str, dict[str, Any]] = {label: dict(values) for label, values in scalars.items()}
    for name, t in tensors.items():
        if name.startswith("optim."):
            label, key = name[len("optim."):].rsplit(".", 1)  # labels may hold dots (names), keys do not
            out.setdefault(label, {})[key] = t
    return out


def restore_optimizer_state(states: dict, param: Any, saved: dict[str, Any] | None,
                            new: Callable[[torch.Tensor], Any], *, reset: bool = False,
                            local: Callable[[Any], torch.Tensor] = lambda t: t) -> bool:
    """Put ``param``'s optimizer state back from its ``saved`` entries (:func:`saved_optimizer_states`): in place
    where the live tensor exists, ``new(saved)`` where it does not; with ``reset``, a live state whose entries
    differ is replaced whole. Returns whether the state's entries changed (created, dropped or replaced)."""
    if not saved:  # the snapshot predates the first update: the optimizer starts afresh
        return states.pop(param, None) is not None
    state = states.get(param)
    changed = state is None or set(state) != set(saved)
    if state is None or (changed and reset):
        states[param] = state = {}
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor):
            state[key] = value
        elif isinstance(state.get(key), torch.Tensor):
            copy_into(local(state[key]), value, f"optim.{key}")
        else:
            state[key] = new(value)
    return changed


def default_backend(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> StateBackend:
    """FSDP2 when the model's parameters are DTensors, else the whole model and optimizer."""
    from gradience.backends.fsdp import FSDP2Backend, is_sharded

    if is_sharded(model):
        return FSDP2Backend(model, optimizer)
    return PlainBackend(model, optimizer)
