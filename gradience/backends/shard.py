"""What every backend's snapshot shard is made of: each storage once (aliases recorded), tensors placed where the
snapshot keeps them, optimizer state by parameter label, and the in-place restore that refuses a shard that does
not match. Also the replicated state a diverged replica is repaired from (:func:`state_tensors`). Local only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradience.state import copy_pairs, take

__all__ = ["capture_shard", "check_match", "copy_into", "restore_live", "restore_optimizer_state",
           "saved_optimizer_states", "state_tensors", "unique"]


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


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Every dense tensor of the model's state and the optimizer's state, each storage once, in an order
    that is the same on every replica."""
    out: list[torch.Tensor] = []
    seen: set[tuple] = set()

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and not t.is_sparse and t.numel():
            # Tied weights and views share storage: each is sent once.
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                out.append(t.detach())

    for t in model.state_dict(keep_vars=True).values():
        add(t)
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            for _key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, (list, tuple)):
                    for item in value:
                        add(item)
                else:
                    add(value)
    return out
