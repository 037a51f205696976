"""The state a PyTorch FSDP2 rank owns (``fully_shard``: parameters and optimizer state as ``DTensor``s): its
local shards, checked, captured and restored in place, never gathered.

Every parameter must be a DTensor sharded on dim 0 (FSDP) or replicated and sharded (HSDP, a 2-D mesh of
(Replicate, Shard(0))); anything else is refused by name at ``initialize``. The verdict group is every rank of
the mesh (the default group): ranks holding different shards must agree, and so must the replicas of HSDP.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gradience.backends.shard import capture_shard, restore_live, restore_optimizer_state, saved_optimizer_states
from gradience.errors import ConfigError
from gradience.probe import BadTensors, bad_named, named_persistent_buffers, persistent_buffers


@functools.cache
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
        return weights, persistent_buffers(self.model)

    def bad(self, threshold: float, *, grads: bool) -> BadTensors:
        named = ((n, _local(p.grad) if grads and p.grad is not None else None if grads else _local(p))
                 for n, p in self.model.named_parameters())
        return bad_named(named, () if grads else named_persistent_buffers(self.model), threshold=threshold)

    def _named_state(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"param.{n}", _local(p)) for n, p in self.model.named_parameters()]
        return named + [(f"buffer.{n}", b) for n, b in named_persistent_buffers(self.model)]

    def capture(self, *, copy: bool, where: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        states = ((self.names[id(p)], self.optimizer.state.get(p, {})) for p in self._params()) \
            if self.optimizer is not None else ()
        tensors, aliases, scalars = capture_shard(self._named_state(), states, copy=copy, local=_local, where=where)
        return tensors, {"backend": "fsdp2", "aliases": aliases, "optimizer_scalars": scalars}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("backend") != "fsdp2":
            raise ValueError(f"snapshot is of a {meta.get('backend', 'plain')} model, this one is FSDP2-sharded")
        with torch.no_grad():
            restore_live(self._named_state(), tensors, "this model's shards")
            if self.optimizer is None:
                return
            saved = saved_optimizer_states(tensors, meta.get("optimizer_scalars", {}))
            for p in self._params():
                restore_optimizer_state(self.optimizer.state, p, saved.get(self.names[id(p)]),
                                        lambda v, p=p: _like(p, v), local=_local)

    def replica_tensors(self) -> list[torch.Tensor]:
        return []


def _like(param: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """An optimizer-state entry the live optimizer has not created yet: a step count stays plain (as the optimizer
    keeps it), a moment is shaped and placed like its parameter."""
    if saved.dim() == 0:
        return saved.clone()
    dtensor = _dtensor_types()[0]
    return dtensor.from_local(saved.to(_local(param).device, copy=True), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())
