"""Guard a DeepSpeed engine (ZeRO 0-3): every ``engine.step()`` at a gradient-accumulation boundary is gated on
each rank's gradient partition, followed by the post-update check, snapshots and collective rollbacks.

Usage (the loop is unchanged)::

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(...),
                                                           config=ds_config)
    guard = gradience.integrations.deepspeed.guard(engine, out_dir="runs/gradience")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()          # raises GuardHalted when faults outlive guard_max_rollbacks
    guard.finalize()

Hook points (DeepSpeed 0.19): ``engine.backward`` is wrapped to note the loss; ``engine.step`` is wrapped so
that, at a boundary, the gate runs after DeepSpeed has reduced the gradients into partitions and before its
optimizer consumes them (a closed gate turns the client optimizer's ``step`` into a no-op for that engine step,
see :mod:`gradience.backends.deepspeed`), and the post-update check runs after it; ``engine.get_lr`` reports the
LR in force (schedule × the guard's backoff). DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` are left
alone. Consensus runs over the engine's data-parallel group, which must be the whole world (no model or
pipeline parallelism yet).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gradience.backends.deepspeed import DeepSpeedBackend
from gradience.config import GradienceConfig
from gradience.controller import GradienceController
from gradience.errors import ConfigError, GuardHalted

logger = logging.getLogger("gradience")

__all__ = ["DeepSpeedGuard", "find_engine", "guard"]


def guard(engine: Any, config: GradienceConfig | str | None = None, *, on_halt: str = "raise",
          resume: bool | str = False, **fields: Any) -> DeepSpeedGuard:
    """Attach Gradience to ``engine`` (every rank calls it, after ``deepspeed.initialize``); takes the initial
    snapshot. ``config``: a :class:`GradienceConfig`, a YAML path or packaged config name, or None (defaults);
    ``fields`` override single fields. ``on_halt``: "raise" (``engine.step()`` raises GuardHalted) or "stop"
    (``guard.halted`` turns True and later steps update nothing). ``resume="latest"``: continue from the newest
    committed Gradience snapshot in ``out_dir`` (see ``GradienceController.initialize``)."""
    return DeepSpeedGuard(engine, config, on_halt=on_halt, resume=resume, **fields)


class DeepSpeedGuard:
    """The hooks on one engine; see :func:`guard`. ``controller``: a controller to initialize instead of a new
    one (the Trainer callback's); ``step_base``: added to ``engine.global_steps`` to label steps (the Trainer
    counts from 1)."""

    def __init__(self, engine: Any, config: GradienceConfig | str | None = None, *, on_halt: str = "raise",
                 controller: GradienceController | None = None, start_step: int = -1, resume: bool | str = False,
                 step_base: int = 0, **fields: Any) -> None:
        if on_halt not in ("raise", "stop"):
            raise ConfigError(f"on_halt must be 'raise' or 'stop', got {on_halt!r}")
        if not all(hasattr(engine, a) for a in ("zero_optimization_stage", "basic_optimizer", "backward", "step")):
            raise ConfigError(f"gradience.integrations.deepspeed.guard needs a DeepSpeedEngine, got "
                              f"{type(engine).__name__}")
        _check_data_parallel(engine)
        if isinstance(config, str):
            config = GradienceConfig.from_yaml(config)
        self.engine, self.on_halt, self.step_base = engine, on_halt, step_base
        self.controller = controller if controller is not None else GradienceController(config, **fields)
        self.backend = DeepSpeedBackend(engine)
        self._loss_sum: torch.Tensor | None = None
        self._micro = 0
        self._summary: dict[str, Any] | None = None
        try:
            self.controller.initialize(engine.module, optimizer=engine.basic_optimizer,
                                       scheduler=getattr(engine, "lr_scheduler", None), backend=self.backend,
                                       start_step=start_step, resume=resume)
        except BaseException:
            self.backend.detach()
            raise
        self._backward, self._step, self._get_lr = engine.backward, engine.step, engine.get_lr
        engine.backward, engine.step, engine.get_lr = self._guarded_backward, self._guarded_step, self._lr
        logger.info("Gradience: guarding a DeepSpeed ZeRO-%d engine on %d ranks", self.backend.stage,
                    self.controller.comm.world_size)

    @property
    def halted(self) -> bool:
        """True once the guard stopped training (every later ``engine.step()`` updates nothing)."""
        return self.controller.halted

    def _guarded_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self._backward(loss, *args, **kwargs)
        value = loss.detach().float().mean()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro += 1
        return out

    def _guarded_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.controller.halted:
            self.backend.close_gate()
            try:
                return self._step(*args, **kwargs)
            finally:
                self._halt()
        if not self.engine.is_gradient_accumulation_boundary():
            return self._step(*args, **kwargs)
        label = int(self.engine.global_steps) + self.step_base
        loss = self._loss_sum / self._micro if self._loss_sum is not None else None
        self._loss_sum, self._micro = None, 0
        self.controller.before_optimizer_step(step=label, loss=loss)
        try:
            out = self._step(*args, **kwargs)
        finally:
            self.backend.open_gate()
        if not self.controller.step(label, loss):
            self._halt()
        return out

    def _lr(self) -> list[float]:
        scale = self.controller.lr.scale if self.controller.lr is not None else 1.0
        return [lr * scale for lr in self._get_lr()]

    def _halt(self) -> None:
        self.backend.close_gate()  # no update after a halt, whatever the loop does next
        if self.on_halt == "raise":
            summary = self.finalize()
            guard = summary.get("guard", {})
            reason = guard.get("halt_reason") or "HALTED"
            raise GuardHalted(reason, f"Gradience halted training at step {self.controller.last_step}: {reason} "
                              f"after {guard.get('total_rollbacks')} rollback(s); see "
                              f"{self.controller.telemetry.summary_path}")

    def detach(self) -> None:
        """Take the hooks off the engine (its own backward, step and get_lr come back)."""
        for name in ("backward", "step", "get_lr"):
            self.engine.__dict__.pop(name, None)
        self.backend.detach()

    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` and release the guard's resources (the hooks stay, inert after a halt)."""
        if self._summary is None:
            self._summary = self.controller.finalize()
        return self._summary


def find_engine(module: torch.nn.Module) -> Any | None:
    """The DeepSpeedEngine wrapping ``module``, or None: for callers handed only the module, such as Trainer
    callbacks. One scan of the GC's objects (once per run)."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine

    for obj in gc.get_objects():
        # type(), not isinstance(): the latter reads __class__, which lazy module proxies answer with warnings.
        if issubclass(type(obj), DeepSpeedEngine) and obj.module is module:
            return obj
    return None


def _check_data_parallel(engine: Any) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dp = getattr(engine, "dp_world_size", None)
    if dp is not None and dp != dist.get_world_size():
        raise ConfigError(f"DeepSpeed data-parallel size {dp} != world size {dist.get_world_size()}: Gradience "
                          "supports pure data parallelism (ZeRO 0-3) under DeepSpeed so far")
