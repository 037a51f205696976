"""Hugging Face ``Trainer`` integration: :class:`GradienceCallback`.

This module owns three things: the mapping from Trainer events to
:class:`~gradience.controller.GradienceController` calls, the capture of each optimizer step's loss (the
Trainer does not hand it to callbacks), and the callback's share of a Trainer checkpoint. It owns no policy:
like torchft's ``optim.py`` it only asks the controller and carries the answer back to the Trainer.

======================  ======================================================================================
Trainer event           what the callback does
======================  ======================================================================================
on_train_begin          build a controller and ``initialize(model, optimizer=, scheduler=)`` (first snapshot);
                        on resume, first restore the guard state saved in the checkpoint's trainer_state.json
on_pre_optimizer_step   gradient gate ``before_optimizer_step`` (after clipping, before the update). The Trainer
                        always calls ``optimizer.step()``; a skipped update is one whose gradients the
                        controller dropped (``p.grad = None``), so parameters and optimizer state stay unchanged
on_step_end             ``step(global_step, loss, model)``: loss and weights checked; snapshot, rollback in place
                        (model, optimizer; the LR backoff applies where the optimizer reads the LR) or halt
on_train_end            ``finalize()``: ``summary.json`` in ``out_dir``
======================  ======================================================================================

Usage::

    from gradience import GradienceCallback
    callback = GradienceCallback(out_dir="./gradience_logs", guard_enabled=True)   # any GradienceConfig field
    callback = GradienceCallback.from_yaml("configs/hf_example.yaml")              # or a YAML config
    trainer = Trainer(model=model, args=training_args, callbacks=[callback])
    trainer.train()

Under DDP (``accelerate launch``, ``torchrun``) every rank runs the callback and the controller agrees over the
default process group, so every rank skips, rolls back or halts together. A halt sets
``control.should_training_stop`` (and cancels a checkpoint of that step, whose weights are the faulty ones);
``summary.json`` says why and :attr:`GradienceCallback.exit_code` is
:data:`~gradience.errors.EXIT_GUARD_HALTED`.

Checkpoints: the callback is an ``ExportableState``, so the guard state (LR scale, rollback and skip counts,
first fault) is saved in each checkpoint's ``trainer_state.json`` and restored when training resumes from it,
whether or not ``restore_callback_states_from_checkpoint`` is set; the LR scale in that state is applied
again on resume (the optimizer and scheduler hold the unscaled schedule). With
``restore_callback_states_from_checkpoint=True`` the Trainer replaces this callback object by one built from
the checkpoint, with the checkpoint's config (out_dir included); ``trainer.callback_handler.callbacks`` holds
the live one.

DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 0-3): the callback hooks the Trainer's engine
(:mod:`gradience.integrations.deepspeed`), which gates each ``engine.step()`` on the rank's gradient partition
and snapshots what each rank owns; the Trainer events above then only report. Not supported: FSDP. With fp16,
the gate unscales the gradients through accelerate's GradScaler, and an overflow the scaler skips by design is
counted as ``scaler_skipped_steps``, not as a fault.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "GradienceCallback needs transformers and accelerate (the 'gradience[hf]' extra). Install Gradience "
        "from source with it: pip install -e '.[hf]' in a checkout (the PyPI project named 'gradience' is "
        f"unrelated). Import failed with: {e}"
    ) from e

from gradience.config import GradienceConfig
from gradience.controller import GradienceController
from gradience.errors import ConfigError, GuardHalted
from gradience.lr import unwrap_optimizer

logger = logging.getLogger(__name__)

__all__ = ["GradienceCallback"]

# Key under ExportableState "attributes" that carries controller.state_dict() in trainer_state.json.
_STATE_KEY = "_resume_state"


class GradienceCallback(TrainerCallback, ExportableState):
    """Guards a ``transformers.Trainer`` run with a :class:`~gradience.controller.GradienceController`.

    Args:
        config: a :class:`~gradience.config.GradienceConfig` (default: all defaults).
        **fields: any ``GradienceConfig`` field (``out_dir``, ``guard_enabled``, ``guard_snapshot_interval``,
            ``guard_violation_threshold``, ``guard_max_rollbacks``, ``guard_lr_backoff``, ``spectral_enabled``,
            ``spectral_interval``, ``telemetry_interval``, ...), overriding ``config``. An unknown name raises
            :class:`~gradience.errors.ConfigError` naming it.
    """

    def __init__(self, config: GradienceConfig | None = None, *, on_halt: str = "raise", **fields: Any) -> None:
        if on_halt not in ("raise", "stop"):
            raise ConfigError(f"on_halt must be 'raise' or 'stop', got {on_halt!r}")
        base = config if config is not None else GradienceConfig()
        self.config: GradienceConfig = base.replace(**fields) if fields else base
        #: "raise": a guard halt ends ``trainer.train()`` with :class:`~gradience.errors.GuardHalted` (after the
        #: summary is written); "stop": training stops early and ``train()`` returns (check :attr:`halted`).
        self.on_halt = on_halt
        #: The controller of the current (or last) ``train()`` call; None before training starts.
        self.controller: GradienceController | None = None
        #: What ``finalize()`` returned at the end of the last ``train()`` call.
        self.summary: dict[str, Any] | None = None
        # Set by the Trainer when it rebuilds this callback from a checkpoint (ExportableState "attributes").
        self._resume_state: dict[str, Any] | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._losses: list[torch.Tensor] = []
        self._loss_normalized = False
        self._metrics = _Metrics(self)
        self._ds: Any | None = None  # the DeepSpeed engine hook, under TrainingArguments(deepspeed=...)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> GradienceCallback:
        """Callback configured from a gradience YAML file; ``overrides`` are config fields applied on top."""
        return cls(GradienceConfig.from_yaml(path), **overrides)

    # ------------------------------------------------------------------------------------------ reports
    @property
    def halted(self) -> bool:
        """True once the guard stopped training."""
        return self.controller is not None and self.controller.halted

    @property
    def exit_code(self) -> int:
        """0, or :data:`~gradience.errors.EXIT_GUARD_HALTED` when the guard stopped the run (for scripts)."""
        return self.controller.exit_code if self.controller is not None else 0

    # ------------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """ExportableState: constructor args (the config) and the guard state, saved in trainer_state.json."""
        guard = self.controller.state_dict() if self.controller is not None else self._resume_state
        return {"args": self.config.to_dict(), "attributes": {_STATE_KEY: guard}}

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build and initialize the controller (collective: every rank takes the first snapshot)."""
        _check_supported(args)
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise ConfigError("GradienceCallback needs the Trainer's model and optimizer at on_train_begin")
        resuming = state.global_step > 0
        saved = self._saved_state(state) if resuming else None
        if resuming and saved is None:
            logger.warning("Gradience: resuming at step %d from a checkpoint without Gradience state; "
                           "the guard starts fresh (LR scale 1, no rollbacks counted)", state.global_step)
        controller = GradienceController(self.config)
        if saved is not None:
            controller.load_state_dict(saved)
        self._detach_engine()
        if getattr(args, "deepspeed", None):
            self._ds = _guard_engine(model, controller, state.global_step, resuming)
        else:
            controller.initialize(model, optimizer=optimizer, scheduler=kwargs.get("lr_scheduler"),
                                  start_step=state.global_step, resume=resuming)
        self.controller, self.summary, self._resume_state = controller, None, None
        self._remove_hook()
        self._losses.clear()
        self._metrics.install(self)
        if self._ds is not None:
            return  # the engine hook gates each engine.step() and notes the loss engine.backward gets
        # A forward hook sees every micro-batch's loss as the model returns it; callbacks are not given it.
        self._hook = model.register_forward_hook(self._record_loss, with_kwargs=True)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        """Start collecting the micro-batch losses of a new optimizer step."""
        self._losses.clear()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """Gradient gate (collective). Runs after clipping; the step number is the one on_step_end will report."""
        if self.controller is None or self._ds is not None:
            return
        optimizer = kwargs.get("optimizer")
        # fp16: accelerate's optimizer wrapper owns the GradScaler; the gate unscales through it.
        self.controller.before_optimizer_step(kwargs.get("model"), unwrap_optimizer(optimizer),
                                              step=state.global_step + 1, scaler=getattr(optimizer, "scaler", None),
                                              loss=self._step_loss(args, clear=False))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        """Check loss and weights after the update and act (collective); stop training on a halt."""
        if self.controller is None:
            return control
        if self._ds is not None:  # checked inside engine.step() already
            if self.halted:
                _stop(control)
            return control
        loss = self._step_loss(args)
        if not self.controller.step(state.global_step, loss, kwargs.get("model")):
            _stop(control)
        elif control.should_save and not self.controller.settle():  # never a checkpoint of an unjudged step
            _stop(control)
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        """Keep an epoch-end checkpoint from saving the weights of a halted run, or of an unjudged step."""
        if self.halted or (control.should_save and self.controller is not None and self._ds is None
                           and not self.controller.settle()):
            _stop(control)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Write ``summary.json`` and the final telemetry; raise GuardHalted after a halt (``on_halt="raise"``)."""
        self._remove_hook()
        self._detach_engine()
        if self.controller is not None and self.controller.telemetry is not None and self.summary is None:
            self.summary = self.controller.finalize()
        if self.halted and self.on_halt == "raise":
            guard = (self.summary or {}).get("guard", {})
            reason = guard.get("halt_reason") or "HALTED"
            raise GuardHalted(reason, f"Gradience halted training at step {self.controller.last_step}: {reason} "
                              f"after {guard.get('total_rollbacks')} rollback(s); see "
                              f"{self.controller.telemetry.summary_path}. The weights of the faulty step were not "
                              "checkpointed; the newest good state is in the snapshots (gradience.load_snapshot).")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the guard's metrics to what the Trainer logs (when the front-runner could not be installed)."""
        if not self._metrics.installed:
            self._metrics.on_log(args, state, control, logs=logs)

    # ------------------------------------------------------------------------------------------ plumbing
    def _record_loss(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation forwards are not training steps
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
            self._loss_normalized = kwargs.get("num_items_in_batch") is not None

    def _step_loss(self, args: TrainingArguments, *, clear: bool = True) -> torch.Tensor | None:
        """The step's loss as the Trainer reports it, or None when the model returned none (weights only)."""
        if not self._losses:
            return None
        losses = torch.stack([x.float().reshape(()) for x in self._losses])
        if clear:
            self._losses.clear()
        if not self._loss_normalized:
            return losses.mean()
        # Normalized by num_items_in_batch (the token count of all micro-batches, of all ranks when
        # average_tokens_across_devices): the micro-batch losses add up, and the Trainer rescales by world size.
        loss = losses.sum()
        if args.average_tokens_across_devices and args.world_size > 1:
            loss = loss * args.world_size
        return loss

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        if self._resume_state is not None:  # the Trainer rebuilt this callback from the checkpoint
            return self._resume_state
        entry = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(entry, list):
            entry = entry[0] if entry else None
        if not isinstance(entry, Mapping):
            return None
        return (entry.get("attributes") or {}).get(_STATE_KEY)

    def _detach_engine(self) -> None:
        if self._ds is not None:
            self._ds.detach()
            self._ds = None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


#: ``gradience/integrity`` as a number, so scalar loggers (TensorBoard, W&B) can plot it.
INTEGRITY_CODES = {"OK": 0, "RECOVERED": 1, "FAULTED": 2, "ABORTED": 3}


class _Metrics(TrainerCallback):
    """Adds ``gradience/*`` metrics to every Trainer log. Installed at the FRONT of the Trainer's callback list:
    the Trainer hands ``logs`` to its reporting callbacks (TensorBoard, W&B, ...) before user callbacks and
    appends it to ``log_history`` before any callback runs, so a callback at the user's position would be
    too late for both."""

    def __init__(self, owner: GradienceCallback) -> None:
        self.owner = owner
        self.installed = False

    def install(self, owner: GradienceCallback) -> None:
        """Put this callback first in the handler that holds ``owner`` (found through the GC's referrers)."""
        import gc

        from transformers.trainer_callback import CallbackHandler

        if self.installed:
            return
        for holder in gc.get_referrers(owner):
            if not isinstance(holder, list):
                continue
            for handler in gc.get_referrers(holder):
                if isinstance(handler, CallbackHandler) and handler.callbacks is holder:
                    # A new list: the handler is iterating the old one right now (this runs inside an event).
                    # An earlier callback's helper (the Trainer rebuilt the callback from a checkpoint) goes.
                    handler.callbacks = [self, *(c for c in holder if not isinstance(c, _Metrics))]
                    self.installed = True
                    return

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Add the metrics to ``logs`` (seen by every later callback) and to the log_history entry."""
        ctl = self.owner.controller
        if ctl is None or logs is None:
            return
        metrics = {
            "gradience/lr_scale": ctl.lr_scale,
            "gradience/rollbacks": ctl.state.total_rollbacks,
            "gradience/skipped_steps": ctl.state.skipped_steps,
            "gradience/integrity": INTEGRITY_CODES[ctl.integrity_status()],
        }
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def _stop(control: TrainerControl) -> None:
    control.should_training_stop = True
    # The weights at a halt are the faulty ones: a checkpoint of them would be worse than none.
    control.should_save = False


def _guard_engine(model: torch.nn.Module, controller: GradienceController, start_step: int, resuming: bool) -> Any:
    """Hook the Trainer's DeepSpeed engine: accelerate calls engine.backward and engine.step in its backward."""
    from gradience.integrations.deepspeed import DeepSpeedGuard, find_engine

    engine = find_engine(model)
    if engine is None:
        raise ConfigError("GradienceCallback: TrainingArguments.deepspeed is set but no DeepSpeedEngine wraps the "
                          "Trainer's model at on_train_begin")
    return DeepSpeedGuard(engine, controller=controller, on_halt="stop", start_step=start_step, resume=resuming,
                          step_base=1)


def _check_supported(args: TrainingArguments) -> None:
    if getattr(args, "fsdp", None) and _fsdp_version(args) != 2:
        raise ConfigError("GradienceCallback supports FSDP2 only (fsdp_config={'version': 2}): FSDP1's flat "
                          "parameters have no per-rank shards Gradience can map; use FSDP2, DDP or DeepSpeed")


def _fsdp_version(args: TrainingArguments) -> int:
    import transformers

    cfg = getattr(args, "fsdp_config", None) or {}
    version = cfg.get("version", cfg.get("fsdp_version"))
    if version is None:  # transformers 5 defaults to FSDP2, 4.x to FSDP1
        version = 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1
    return int(version)
