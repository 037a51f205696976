"""The state a DeepSpeed engine's rank owns, ZeRO stages 0-3, for the guard: its gradient partition at the gate,
its weight partitions after the update, and its snapshot shard (captured and restored in place, never gathered).

Duck-typed on the engine (``deepspeed`` is not imported here). Read against DeepSpeed 0.19:

=====  ==========================================  ==========================================  ===============
stage  gradients at the gate                       snapshot shard                              module weights
=====  ==========================================  ==========================================  ===============
0      the module's ``.grad`` (all-reduced)        module weights + optimizer state (full)     the same tensors
1, 2   ``optimizer.averaged_gradients`` (this      module weights (full) + fp32 master          restored from
       rank's partition)                           partition + its moments                      the shard
3      ``optimizer.averaged_gradients``            fp32 master partition + its moments (1/N)   re-synced from
                                                                                               the master
=====  ==========================================  ==========================================  ===============

The gate closes by turning the client optimizer's ``step`` (the one DeepSpeed calls on the fp32 partitions) into
a no-op for one engine step: weights, moments and step counts stay bitwise unchanged whatever the dtype
(DeepSpeed's own overflow skip covers fp16, and invalid grad norms in fp32 at ZeRO 1-3 only).
"""

from __future__ import annotations

from typing import Any

import torch

from gradience.backends.shard import (
    capture_shard,
    restore_live,
    restore_optimizer_state,
    saved_optimizer_states,
    state_tensors,
    unique,
)
from gradience.errors import ConfigError
from gradience.probe import BadTensors, bad_named, grad_tensors, named_persistent_buffers, persistent_buffers

_SUPPORTED = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")


class DeepSpeedBackend:
    """One rank of a ``DeepSpeedEngine``: pass it to ``GradienceController.initialize(backend=...)`` (the
    :mod:`gradience.integrations.deepspeed` hook does)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.module: torch.nn.Module = engine.module
        self.base: torch.optim.Optimizer = engine.basic_optimizer
        self.zero = engine.optimizer
        if self.base is None:
            raise ConfigError("DeepSpeed: the engine has no optimizer (pass one to deepspeed.initialize)")
        kind = type(self.zero).__name__
        if self.stage == 0 and self.zero is not self.base:
            raise ConfigError(f"DeepSpeed ZeRO-0 with {kind} (fp16/bf16 at stage 0) is not supported: use ZeRO "
                              "stage 1 or higher for mixed precision, or fp32 at stage 0")
        if self.stage > 0 and kind not in _SUPPORTED:
            raise ConfigError(f"DeepSpeed ZeRO-{self.stage}: unsupported optimizer wrapper {kind}")
        if self.stage > 0 and (getattr(self.zero, "cpu_offload", False) or getattr(self.zero, "offload_optimizer",
                                                                                   False)):
            raise ConfigError("DeepSpeed optimizer offload is not supported by Gradience yet")
        self.replicated = self.stage == 0
        #: ZeRO-3 modules hold empty tensors outside forward: no spectral probe there yet.
        self.spectral_model: torch.nn.Module | None = self.module if self.stage < 3 else None
        self._closed = False
        self._step = self.base.step
        self.base.step = self._guarded_step  # an instance attribute: DeepSpeed calls self.optimizer.step()

    # ---- the gate
    def _guarded_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            return None
        return self._step(*args, **kwargs)

    def close_gate(self) -> None:
        self._closed = True

    def open_gate(self) -> None:
        """Called after the engine step the gate closed (the hook does)."""
        self._closed = False

    def detach(self) -> None:
        """Give the client optimizer its own ``step`` back."""
        if self.base.__dict__.get("step") == self._guarded_step:
            del self.base.step

    def gate_tensors(self) -> list[torch.Tensor]:
        if self.stage == 0:
            return grad_tensors(self._module_params())
        groups = getattr(self.zero, "averaged_gradients", None) or {}
        out: list[torch.Tensor] = []
        for grads in groups.values():
            out.extend(g for g in (grads or []) if isinstance(g, torch.Tensor))
        return out

    # ---- what the rank holds
    def _module_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.numel()]

    def _masters(self) -> list[torch.Tensor]:
        if self.stage == 0:
            return [p for g in self.base.param_groups for p in g["params"]]
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _named_weights(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"master.{i}", m) for i, m in enumerate(self._masters())]
        if self.stage == 3:  # the bit16 partitions; module tensors are empty (persistent ones are copies)
            named += [(f"part16.{i}", t) for i, t in enumerate(self.zero.fp16_partitioned_groups_flat)]
        else:
            named += [(f"module.{n}", p) for n, p in self.module.named_parameters() if p.numel()]
        return named

    def check_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, _ = unique(self._named_weights())
        return list(weights.values()), persistent_buffers(self.module)

    def bad(self, threshold: float, *, grads: bool) -> BadTensors:
        if grads:
            return bad_named(((f"grad.{i}", g) for i, g in enumerate(self.gate_tensors())), (),
                             threshold=threshold)
        return bad_named(self._named_weights(), named_persistent_buffers(self.module), threshold=threshold)

    # ---- snapshots
    def _named_state(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"master.{i}", m) for i, m in enumerate(self._masters())]
        if self.stage < 3:
            named += [(f"module.{n}", p) for n, p in self.module.named_parameters() if p.numel()]
        named += [(f"buffer.{n}", b) for n, b in named_persistent_buffers(self.module)]
        return named

    def capture(self, *, copy: bool, where: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        masters = self._masters()
        states = ((str(i), self.base.state.get(m, {})) for i, m in enumerate(masters))
        tensors, aliases, scalars = capture_shard(self._named_state(), states, copy=copy, where=where)
        meta = {"backend": "deepspeed", "zero_stage": self.stage, "aliases": aliases, "optimizer_scalars": scalars,
                "masters": len(masters)}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("backend") != "deepspeed" or meta.get("zero_stage") != self.stage:
            raise ValueError(f"snapshot is of {meta.get('backend', 'a plain model')} ZeRO-{meta.get('zero_stage')}"
                             f", this engine runs ZeRO-{self.stage}")
        with torch.no_grad():
            restore_live(self._named_state(), tensors, "this engine's state")
            saved = saved_optimizer_states(tensors, meta.get("optimizer_scalars", {}))
            relink = False
            for i, master in enumerate(self._masters()):
                relink |= restore_optimizer_state(self.base.state, master, saved.get(str(i)),
                                                  lambda v, m=master: v.to(m.device, copy=True), reset=True)
            if relink and hasattr(self.zero, "_hp_optimizer_states_linked"):
                self.zero._hp_optimizer_states_linked = False  # DeepSpeed re-links its fragments after a step
            if self.stage == 3:
                self._resync_stage3()

    def _resync_stage3(self) -> None:
        # What DeepSpeed does around an update: release every gathered parameter (a gathered copy, e.g. a tied
        # embedding left AVAILABLE, would otherwise keep the pre-rollback values), bit16 partitions from the fp32
        # masters, then the persistent (small, always gathered) parameters re-gathered (collective).
        self.zero._partition_all_parameters()
        for part, master in zip(self.zero.fp16_partitioned_groups_flat, self._masters(), strict=True):
            part.copy_(master)
        persistent = getattr(self.zero, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)

    def replica_tensors(self) -> list[torch.Tensor]:
        if not self.replicated:
            return []
        return state_tensors(self.module, self.base)

