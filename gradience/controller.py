"""GradienceController: runs probe -> consensus -> policy -> effects -> telemetry for any training loop.

The controller owns the per-step flow and no policy: it measures (probe), agrees (consensus), asks
``policy.decide`` and has :mod:`gradience.recovery` carry out snapshots and rollbacks, reporting each action
to telemetry (which also turns it into a log line).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradience import policy
from gradience.backends import PlainBackend, StateBackend, default_backend
from gradience.comm import Comm, default_comm
from gradience.config import GradienceConfig
from gradience.consensus import agree
from gradience.deferred import AsyncVerdict, Deferred
from gradience.effects import Effects
from gradience.errors import ConfigError, SnapshotError
from gradience.guardrails import ProbeHealth, detect_scaler, install_sigterm, refuse_inside_join, unscale, watch_join
from gradience.hot import HotTier
from gradience.lr import LRScale, unwrap_optimizer, unwrap_scheduler
from gradience.norms import TotalNorm
from gradience.probe import probe_grad_tensors, probe_step
from gradience.recovery import Recovery, Target, check_replicas
from gradience.reports import Reports
from gradience.rundir import RunLock, lock_everywhere, snapshot_root
from gradience.sinks import make_sinks
from gradience.snapshot import SnapshotStore
from gradience.spectral_monitor import SpectralMonitor
from gradience.telemetry import Telemetry
from gradience.types import Action, GuardState, Phase, ProbeReport, Reason, Verdict

logger = logging.getLogger(__name__)


class GradienceController(Reports, Effects, AsyncVerdict):
    """Guards a training loop. Call :meth:`initialize` once, then per step
    :meth:`before_optimizer_step` (optional gradient gate) and :meth:`step`; :meth:`finalize` at the end.

    Args:
        config: a :class:`GradienceConfig`; any config field may also be given as a keyword.
        process_group: torch.distributed group to agree over (default: the default group when
            torch.distributed is initialized, else a single process).
        comm: an explicit :class:`~gradience.comm.Comm` (overrides ``process_group``; used by tests).
    """

    def __init__(self, config: GradienceConfig | None = None, *, process_group: Any | None = None,
                 comm: Comm | None = None, **fields: Any) -> None:
        base = config or GradienceConfig()
        self.config = base.replace(**fields) if fields else base
        self._group = process_group
        self.comm: Comm | None = comm
        self.state = GuardState()
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: What this rank owns and how it is checked, captured and restored (see gradience.backends).
        self.backend: StateBackend | None = None
        self.scheduler: Any | None = None
        self.lr: LRScale | None = None
        self.store: SnapshotStore | None = None
        self.recovery: Recovery | None = None
        self.telemetry: Telemetry | None = None
        #: step() calls so far: the guard's own clock (the loop's step numbers are labels and may repeat).
        self.steps_seen = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        #: Updates the GradScaler skipped for overflow (not faults; see ``before_optimizer_step``).
        self.scaler_skips = 0
        self._tick0 = 0
        self._next_sid = 0
        self._skipped_this_step = False
        self._aborted: str | None = None
        self._monitored_reason: Reason | None = None
        self._scaler: Any | None = None
        self._scaler_searched = False
        self._health = ProbeHealth(self.config.probe_error_limit)
        self._lock: RunLock | None = None
        self._warned_backoff = False
        self._spectral: SpectralMonitor | None = None
        #: Step label of the snapshot ``initialize(resume="latest")`` continued from (None: a fresh start).
        self.resumed_step: int | None = None
        self._prior = self.state
        self._pending_verified = True
        #: Plans of the per-step norm passes (gradients, weights, buffers), kept between steps.
        self._norms = (TotalNorm(), TotalNorm(), TotalNorm())
        #: The asynchronous verdict when this run decides on the device (chosen at the first gate; None: sync).
        self._deferred: Deferred | None = None
        self._verdict_chosen = False

    # ------------------------------------------------------------------------------------------ set-up
    def initialize(
        self,
        model: torch.nn.Module,
        save_fn: Callable[[str], None] | None = None,
        load_fn: Callable[[str], None] | None = None,
        get_lr: Callable[[], float] | None = None,
        set_lr: Callable[[float], None] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        start_step: int = -1,
        resume: bool | str = False,
        backend: StateBackend | None = None,
    ) -> None:
        """Attach to a model and take the initial snapshot (collective).

        Either pass ``optimizer=`` (and ``scheduler=``) and Gradience snapshots model + optimizer state
        itself as safetensors and applies the LR backoff where the optimizer consumes the LR, or pass
        ``save_fn(path)`` / ``load_fn(path)`` that write / restore a checkpoint at ``path`` and ``get_lr()`` /
        ``set_lr(lr)``. Optimizers and schedulers wrapped by accelerate are unwrapped here. ``start_step``
        labels the initial snapshot (the step before the first one the loop will report). Every rank must
        call this.

        ``resume="latest"``: continue a crashed or requeued run from the newest committed snapshot in
        ``out_dir`` whose shards verify on every rank — model, optimizer, scheduler, LR scale and guard state
        (rollback budget, counts) — instead of clearing the directory; :attr:`resumed_step` is then its step
        (None when there was none and the run started fresh, which telemetry and the log say). The world
        size must match the snapshot's. ``resume=True`` only appends to the telemetry files (the Trainer
        callback uses it when the Trainer resumes from its own checkpoint).

        ``backend=`` (integrations pass it, e.g. gradience.integrations.deepspeed): what this rank owns when it
        is not ``model`` + ``optimizer`` whole; the optimizer is then the one the LR scale hooks into.
        """
        if self.telemetry is not None:
            raise RuntimeError("GradienceController.initialize() was already called; use a new controller")
        if resume not in (False, True, "latest"):
            raise ConfigError(f"initialize: resume must be False, True or 'latest', got {resume!r}")
        if (save_fn is None) != (load_fn is None):
            raise ConfigError("initialize: save_fn and load_fn must be given together")
        if (get_lr is None) != (set_lr is None):
            raise ConfigError("initialize: get_lr and set_lr must be given together")
        optimizer, scheduler = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
        guard = self.config.guard_enabled
        if guard and save_fn is None and optimizer is None:
            raise ConfigError("initialize: pass optimizer= (Gradience snapshots it) or save_fn and load_fn")
        if guard and get_lr is None and optimizer is None and self.config.guard_lr_backoff != 1.0:
            raise ConfigError("initialize: LR backoff needs optimizer= or get_lr and set_lr")
        if scheduler is not None and optimizer is None:
            raise ConfigError("initialize: scheduler= needs optimizer= (the LR backoff goes through it)")
        if guard and save_fn is not None and self.config.guard_snapshot_tier == "memory":
            raise ConfigError("guard_snapshot_tier='memory' stores tensors; use optimizer= instead of save_fn")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.backend = backend if backend is not None else default_backend(model, optimizer)
        if self.config.fingerprint_interval and not self.backend.replicated:
            raise ConfigError("fingerprint_interval needs every rank to hold the same state; this run's ranks "
                              "hold different partitions (set it to 0)")
        if self.comm is None:
            self.comm = default_comm(self._group, timeout_s=self.config.collective_timeout_s)
        comm = self.comm
        out = Path(self.config.out_dir)
        self._lock = lock_everywhere(out, comm, self.global_rank)
        try:
            self._attach(out, model, optimizer, scheduler, save_fn, load_fn, get_lr, set_lr, start_step, resume)
        except BaseException:
            self.close()  # a failed start must not keep out_dir locked, nor hooks on the optimizer
            raise

    def _attach(self, out: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, save_fn: Any,
                load_fn: Any, get_lr: Any, set_lr: Any, start_step: int, resume: bool | str) -> None:
        comm, guard = self.comm, self.config.guard_enabled
        self.telemetry = Telemetry(out, rank=self.global_rank, redact_max_chars=self.config.redact_max_chars,
                                   append=bool(resume), world_size=comm.world_size, group_rank=comm.rank,
                                   log_all_ranks=self.config.log_all_ranks, summary_writer=comm.rank == 0,
                                   sinks=make_sinks(self.config.tensorboard, out, leader=comm.rank == 0))
        self.telemetry.emit("start", world_size=comm.world_size, global_ranks=list(self.global_ranks),
                            backend=type(self.backend).__name__, config=self.config.to_dict())
        self._tick0 = start_step + 1
        if optimizer is not None and get_lr is None:
            self.lr = LRScale(optimizer)
            self.lr.set(self.state.lr_scale)  # a guard state loaded before initialize carries its scale
        install_sigterm(self)
        watch_join()
        if self.config.spectral_enabled and self.backend.spectral_model is None:
            logger.warning("Gradience: no spectral probe on this run's weights (DeepSpeed ZeRO-3 partitions cut "
                           "across matrices); κ̃ and the risk level are off, the other checks run")
        elif self.config.spectral_enabled:
            self._spectral = SpectralMonitor(self.backend.spectral_model, self.config, self.telemetry,
                                             reduce=self._spectral_reduce())
        if not guard:
            return
        if self.config.fingerprint_interval:
            self._collective(None, check_replicas, self.comm, self.model)
        root = snapshot_root(out, list(self.global_ranks), world_size=_world_size() or comm.world_size)
        hot = HotTier(self.config.guard_snapshot_hot, self.config.guard_snapshot_hot_budget)
        self.store = SnapshotStore(root, comm, tier=self.config.guard_snapshot_tier, global_rank=self.global_rank,
                                   hot=hot)
        target = Target(self.backend, optimizer, save_fn, load_fn, get_lr, set_lr, self.lr, scheduler)
        self.recovery = Recovery(self.store, comm, self.telemetry, self.config, target)
        if resume == "latest" and self._resume_latest():
            return
        self._collective(None, self.store.reset)
        # reset() removed every earlier snapshot: a restored GuardState must not name them as targets.
        self.state = dataclasses.replace(self.state, committed=(), target_failures=(), episode_target=None)
        self._snapshot(start_step, background=False)
        if self.store.persisting_id is not None:  # not a step: the first target is on disk before training
            if self._collective(None, self.recovery.persist, start_step) is False:
                self.state = dataclasses.replace(self.state, committed=())
        if not self.state.committed:
            error = self.store.last_error
            raise SnapshotError(f"could not commit the initial snapshot under {root}: "
                                + (f"{type(error).__name__}: {error}" if error else "another rank failed"))

    # ------------------------------------------------------------------------------------------ per step
    def before_optimizer_step(
        self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
        *, step: int | None = None, scaler: Any | None = None, loss: torch.Tensor | float | None = None,
    ) -> bool:
        """Gradient gate, after backward (and clipping), before ``optimizer.step()`` (collective).

        Returns False when this update must not happen; the gradients are then dropped (``p.grad = None``)
        so even an unconditional ``optimizer.step()`` leaves parameters and optimizer state bitwise unchanged.
        With a ``torch.amp.GradScaler`` the gradients are unscaled first (``unscale_``, as for clipping) so
        thresholds apply to true values, and an overflow the scaler will skip anyway is not counted as a
        fault (``scaler_skipped_steps``). Pass ``scaler=``; without it the one enabled GradScaler in the
        process is found and used (a second one is ambiguous and reported). Pass ``loss=`` (this step's loss)
        so the spike rule (``spike_action``) judges it with the gradient norm; without it, the grad norm alone.
        """
        self._require_initialized()
        if self.halted:
            return False
        refuse_inside_join()
        if not (self.config.guard_enabled and self.config.guard_check_grads) or self._health.off(Phase.GRADS):
            return True
        step = self._next_step() if step is None else step
        optimizer = unwrap_optimizer(optimizer) or self.optimizer
        own = optimizer is self.optimizer and model in (None, self.model)
        source = self.backend if own else PlainBackend(model or self.model, optimizer)
        scaler = scaler if scaler is not None else self._detected_scaler()
        if not self._verdict_chosen:
            self._choose_verdict(scaler)
        if self._deferred is not None and own:
            self._deferred.gate(source.gate_tensors(), loss, step)
            return True  # the device skips a bad update; step() reads the verdict

        def probe() -> ProbeReport:
            overflow = unscale(scaler, optimizer)
            report = probe_grad_tensors(source.gate_tensors(), step=step, loss=loss, norm=self._norms[0] if own
                                        else None, threshold=self.config.guard_violation_threshold)
            if overflow:  # inf/NaN explained by the loss scale: the scaler skips this step and lowers it
                report = dataclasses.replace(report, nonfinite_grads=False, violation_grads=False,
                                             scaler_overflow=True)
            return report

        report = self._probe(Phase.GRADS, step, probe)
        verdict = self._agree(report)
        self._note_probe_errors(Phase.GRADS, step, verdict)
        self._prior = self.state
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if decision.reason is Reason.SPIKE and decision.action is Action.CONTINUE:
            self.telemetry.emit("spike", step=step, action="log", detail=decision.detail, **self._blame(verdict))
        if decision.action is Action.CONTINUE and not verdict.scaler_overflow:
            return True
        bad = self._bad(report, grads=True) if decision.reason is not None else None  # before the grads go
        source.close_gate()
        self._skipped_this_step = True
        if decision.action is Action.CONTINUE:
            self.scaler_skips += 1
        elif decision.action is Action.SKIP_STEP:
            self.telemetry.emit("skip_step", step=step, reason=decision.reason, **self._blame(verdict),
                                grad_norm=verdict.grad_norm, bad=bad, detail=decision.detail)
        else:
            self._act(step, verdict, decision)
        return False

    def step(self, step: int, loss: torch.Tensor | float | None, model: torch.nn.Module | None = None) -> bool:
        """Check loss and weights after the optimizer step and act (collective).

        Returns False only when training must stop (faults outlived ``guard_max_rollbacks``, no good
        snapshot is left, or a collective failed); ``summary.json`` then says why.
        """
        self._require_initialized()
        if self.halted:
            return False
        refuse_inside_join()
        tick = self._tick0 + self.steps_seen
        self.steps_seen += 1
        self.last_step = step
        fp_every = self.config.fingerprint_interval
        # With fingerprints on, every snapshot is of a state verified equal on all replicas.
        fingerprint = bool(fp_every) and (tick % fp_every == 0 or policy.snapshot_due(tick, self.config))
        skipped, self._skipped_this_step = self._skipped_this_step, False
        if self._deferred is not None:
            if self._deferred.pending():
                return self._step_async(step, loss, tick)
            logger.warning("Gradience: step() came without before_optimizer_step(); the verdict is synchronous "
                           "from here on")
            self._deferred.release()
            self._deferred = None
        if self._health.off(Phase.STEP):
            fingerprint = False  # nothing compared this step: a snapshot of it is not verified
            report = ProbeReport(phase=Phase.STEP, step=step, update_skipped=skipped)
        else:
            tensors = self.backend.check_tensors() if model in (None, self.model) else None
            report = self._probe(Phase.STEP, step, lambda: probe_step(
                loss, model, tensors=tensors, step=step, threshold=self.config.guard_violation_threshold,
                update_skipped=skipped, with_fingerprint=fingerprint,
                norms=self._norms[1:] if tensors is not None else None))
        self.last_loss = report.loss
        if self._spectral is not None and policy.spectral_due(tick, self.config, self.state):
            report = dataclasses.replace(report, **self._spectral.measure())
        verdict = self._agree(report, tick)
        self._note_probe_errors(Phase.STEP, step, verdict)
        return self._decide_step(step, verdict, verified=fingerprint or not fp_every)

    def _decide_step(self, step: int, verdict: Verdict, *, verified: bool) -> bool:
        """The policy on a step's agreed verdict, its reactions and reports (sync and async alike)."""
        self._prior = self.state
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if verdict.spectral_kappa is not None:
            self._spectral.report(step, verdict.tick, verdict, self._prior.risk_level, self.state)
        if decision.detail and decision.reason is None:  # a reaction to the spectral risk level
            self.telemetry.emit("risk_reaction", step=step, level=self.state.risk_level, detail=decision.detail,
                                lr_scale=self.state.lr_scale, kappa=verdict.spectral_kappa)
        if self.lr is not None and self.lr.scale != self.state.lr_scale and not self.state.halted:
            self.lr.set(self.state.lr_scale)  # a DANGER reaction lowered the scale without a rollback
        if not self.config.guard_enabled and decision.reason is not self._monitored_reason:
            # Monitor mode: a corrupted run stays faulty every step; report when the condition changes.
            self._monitored_reason = decision.reason
            if decision.reason is not None:
                self.telemetry.emit("fault", step=step, reason=decision.reason, **self._blame(verdict))
        self._act(step, verdict, decision, verified=verified)
        if step % self.config.telemetry_interval == 0:
            self.telemetry.emit("telemetry", step=step, train_loss=self.last_loss, lr=self._lr(),
                                lr_scale=self.state.lr_scale, weight_norm=verdict.weight_norm,
                                spectral_kappa=self._spectral.last_kappa if self._spectral else None,
                                risk_level=self.state.risk_level)
        return not self.halted

    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` (group rank 0) and a ``summary`` event; return the summary dict."""
        self._require_initialized()
        if self.recovery is not None and self.recovery.pending is not None:
            # finalize() is not collective, so an in-flight snapshot cannot be agreed on: drop it.
            self.recovery.abandon(self.last_step)
        if self.store is not None and self.store.persisting_id is not None:
            if self.comm.world_size == 1:  # a group of one agrees alone: the last snapshot reaches the disk
                self.recovery.persist(self.last_step)
            else:
                logger.info("Gradience: snapshot %s was still being written at finalize (not collective): it is "
                            "not committed on disk; the previous one is the resume point", self.store.persisting_id)
                self.store.abandon_persist()
        summary = self.summary()
        written = self.telemetry.write_summary(summary)
        self.telemetry.emit("summary", **summary, summary_path=str(self.telemetry.summary_path))
        self.telemetry.close()
        self.close()
        return written

    def close(self) -> None:
        """Release what the controller holds (LR hooks, found_inf, the guard's process group, the out_dir lock)."""
        if self._deferred is not None:
            self._deferred.release()
        if self.lr is not None:
            self.lr.close()
        if self.comm is not None and hasattr(self.comm, "close"):
            self.comm.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------------------------------ plumbing
    def _probe(self, phase: Phase, step: int, fn: Callable[[], ProbeReport]) -> ProbeReport:
        try:
            return fn()
        except Exception as e:  # a raising probe must still take part in the collective
            self._health.last_error = f"{type(e).__name__}: {e}"
            return ProbeReport(phase=phase, step=step, probe_error=True)

    def _note_probe_errors(self, phase: Phase, step: int, verdict: Verdict) -> None:
        """A probe that raises is a defect of the guard, not a fault of the run: report it, and after
        ``probe_error_limit`` in a row on any rank stop that check on every rank (the count is agreed)."""
        event = self._health.record(phase, verdict.probe_error)
        if event is not None:
            self.telemetry.emit("probe_error", step=step, phase=phase, **self._blame(verdict), **event)

    def _agree(self, report: ProbeReport, tick: int | None = None) -> Verdict:
        if report.phase is Phase.STEP and self.store is not None and self.store.persist_busy():
            report = dataclasses.replace(report, persist_busy=True)  # no marker while any rank writes
        return self._collective(report.step, agree, report, self.comm, tick)

    def _spectral_reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A SUM over the ranks holding the shards, for a sharded spectral probe (None when nothing is sharded)."""
        copies = getattr(self.backend, "spectral_replicas", 0)
        if not copies:
            return None
        if getattr(self.backend, "mesh_size", None) != self.comm.world_size:
            logger.warning("Gradience: the model's device mesh is not the guard's group; no spectral probe")
            return None
        return lambda t: self.comm.all_reduce_sum(t) / copies

    def _detected_scaler(self) -> Any | None:
        if not self._scaler_searched and self.optimizer is not None:
            self._scaler_searched = True
            self._scaler, note = detect_scaler()
            if note:
                logger.warning("Gradience: %s", note)
        return self._scaler

    def _next_step(self) -> int:
        return 0 if self.last_step is None else self.last_step + 1

    def _bad(self, report: ProbeReport | None, *, grads: bool) -> dict[str, Any] | None:
        if self.backend is None or (report is not None and not report.faulty):
            return None
        return self.backend.bad(self.config.guard_violation_threshold, grads=grads)

    def _require_initialized(self) -> None:
        if self.telemetry is None:
            raise RuntimeError("GradienceController.initialize(model, ...) must be called first")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0

