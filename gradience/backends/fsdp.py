"""The state a PyTorch FSDP2 rank owns (``fully_shard``: parameters and optimizer state as ``DTensor``s): its
local shards, checked, captured and restored in place, never gathered.

Every parameter must be a DTensor sharded on dim 0 (FSDP) or replicated and sharded (HSDP, a 2-D mesh of
(Replicate, Shard(0))); anything else is refused by name at ``initialize``. The verdict group is every rank of
the mesh (the default group): ranks holding different shards must agree, and so must the replicas of HSDP.
"""

from __future__ import annotations

from typing import Any

import torch

from gradience.backends import copy_into, to_cpu, unique
from gradience.errors import ConfigError
from gradience.probe import BadTensors, bad_named, named_persistent_buffers


def _dtensor_types() -> tuple[type, type, type] | None:
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch build without distributed
        return None
    return DTensor, Replicate, Shard


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2, or tensor parallelism)."""
    types = _dtensor_types()
    return types is not None and any(isinstance(p, types[0]) for p in model.parameters())


def _local(t: Any) -> torch.Tensor:
    types = _dtensor_types()
    return t.to_local() if types is not None and isinstance(t, types[0]) else t


class FSDP2Backend:
    """Local shards of a ``fully_shard`` model and of its optimizer's state."""

    replicated = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        dtensor, replicate, shard = _dtensor_types()
        named = list(model.named_parameters())
        plain = [n for n, p in named if not isinstance(p, dtensor)]
        if plain:
            raise ConfigError(f"FSDP2: parameters {plain[:5]} are plain tensors beside DTensor ones; Gradience "
                              "maps a model whose parameters are all fully_shard DTensors (shard the whole model)")
        for name, p in named:
            places = tuple(p.placements)
            ok = places[-1:] == (shard(0),) and all(isinstance(x, replicate) for x in places[:-1])
            if not ok:
                raise ConfigError(f"FSDP2: parameter {name} has placements {places}; supported are (Shard(0),) "
                                  "(FSDP) and (Replicate(), Shard(0)) (HSDP)")
        self.model, self.optimizer = model, optimizer
        self.names = {id(p): n for n, p in named}
        mesh = named[0][1].device_mesh
        #: Ranks of the mesh, and copies of each shard among them (HSDP replicas): the sharded spectral
        #: probe sums partial products over all ranks, then divides by the copies.
        self.mesh_size = mesh.size()
        self.spectral_replicas = mesh.size() // mesh.size(mesh.ndim - 1)
        self.spectral_model: torch.nn.Module | None = model

    def _params(self) -> list[torch.nn.Parameter]:
        if self.optimizer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        return list(self.model.parameters())

    def gate_tensors(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self._params() if p.grad is not None]

    def close_gate(self) -> None:
        for p in self._params():
            p.grad = None

    def check_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights = [t for t in (_local(p) for p in self.model.parameters()) if t.numel()]
        return weights, [b for _, b in named_persistent_buffers(self.model) if b.is_floating_point() or b.is_complex()]

    def bad(self, threshold: float, *, grads: bool) -> BadTensors:
        named = ((n, _local(p.grad) if grads and p.grad is not None else None if grads else _local(p))
                 for n, p in self.model.named_parameters())
        return bad_named(named, () if grads else named_persistent_buffers(self.model), threshold=threshold)

    def _named_state(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"param.{n}", _local(p)) for n, p in self.model.named_parameters()]
        return named + [(f"buffer.{n}", b) for n, b in named_persistent_buffers(self.model)]

    def capture(self, *, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        live, aliases = unique(self._named_state())
        tensors = {n: to_cpu(t, copy) for n, t in live.items()}
        scalars: dict[str, dict[str, Any]] = {}
        if self.optimizer is not None:
            for p in self._params():
                name = self.names[id(p)]
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optim.{name}.{key}"] = to_cpu(_local(value), copy)
                    else:
                        scalars.setdefault(name, {})[key] = value
        return tensors, {"backend": "fsdp2", "aliases": aliases, "optimizer_scalars": scalars}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("backend") != "fsdp2":
            raise ValueError(f"snapshot is of a {meta.get('backend', 'plain')} model, this one is FSDP2-sharded")
        live, _ = unique(self._named_state())
        missing = sorted(set(live) - set(tensors))
        if missing:
            raise ValueError(f"snapshot lacks {missing[:5]} of this model's shards")
        with torch.no_grad():
            for name, t in live.items():
                copy_into(t, tensors[name], name)
            if self.optimizer is not None:
                self._restore_optimizer(tensors, meta.get("optimizer_scalars", {}))

    def _restore_optimizer(self, tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]) -> None:
        dtensor = _dtensor_types()[0]
        for p in self._params():
            name = self.names[id(p)]
            prefix = f"optim.{name}."
            saved: dict[str, Any] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            saved.update(scalars.get(name, {}))
            if not saved:  # the snapshot predates the first update: the optimizer starts afresh
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state.setdefault(p, {})
            for key, value in saved.items():
                current = state.get(key)
                if not isinstance(value, torch.Tensor):
                    state[key] = value
                elif isinstance(current, torch.Tensor):
                    copy_into(_local(current), value, prefix + key)
                elif value.dim() == 0:  # a step count: plain, as the optimizer keeps it
                    state[key] = value.clone()
                else:  # a moment the live optimizer has not created yet: shaped and placed like the parameter
                    local = value.to(_local(p).device, copy=True)
                    state[key] = dtensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                                    stride=p.stride())

    def replica_tensors(self) -> list[torch.Tensor]:
        return []

