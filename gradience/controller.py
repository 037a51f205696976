"""GradienceController: probe -> agree -> decide -> execute, for any training loop.

The controller measures (probe), agrees (consensus, or the asynchronous gate on the device), asks the pure
:mod:`gradience.policy` for every decision and every change of the guard state, and hands each Decision to the
:class:`~gradience.executor.Executor`. Both verdict paths feed the same policy with the same Verdicts; the
asynchronous one judges each step one step later (see :mod:`gradience.deferred` and the README).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradience import deferred, policy, reports
from gradience.backends import PlainBackend, StateBackend, default_backend
from gradience.comm import Comm, default_comm
from gradience.config import GradienceConfig
from gradience.consensus import agree
from gradience.errors import EXIT_GUARD_HALTED, CollectiveError, CollectiveMismatch, ConfigError, SnapshotError
from gradience.executor import Executor, blame
from gradience.guardrails import detect_scaler, install_sigterm, refuse_inside_join, unscale, watch_join
from gradience.hot import HotTier
from gradience.lr import CallbackLR, LRScale, current_lr, unwrap_optimizer, unwrap_scheduler
from gradience.norms import TotalNorm
from gradience.probe import fingerprint_tensor, probe_grad_tensors, probe_step
from gradience.recovery import Recovery, Target, check_replicas
from gradience.resume import resume_latest
from gradience.rundir import RunLock, lock_everywhere, snapshot_root
from gradience.sinks import make_sinks
from gradience.snapshot import SnapshotStore
from gradience.spectral_monitor import SpectralMonitor
from gradience.telemetry import Telemetry
from gradience.types import Action, Decision, GuardState, Phase, ProbeReport, Reason, Verdict

logger = logging.getLogger(__name__)


class GradienceController:
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
        self._group, self.comm = process_group, comm
        #: The guard state; only :mod:`gradience.policy` makes new ones.
        self.state: GuardState = policy.initial_state()
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: What this rank owns and how it is checked, captured and restored (see gradience.backends).
        self.backend: StateBackend | None = None
        self.scheduler: Any | None = None
        #: Where the LR scale of the guard state is applied (None: no LR to scale).
        self.lr: LRScale | CallbackLR | None = None
        self.store: SnapshotStore | None = None
        self.recovery: Recovery | None = None
        self.executor: Executor | None = None
        self.telemetry: Telemetry | None = None
        #: step() calls so far; ``tick``: the guard's clock, the tick of the newest step it counted (the loop's
        #: step numbers are labels and may repeat; a step discarded by an asynchronous rollback is not counted).
        self.steps_seen, self.tick = 0, -1
        self.last_step: int | None = None
        self.last_loss: float | None = None
        #: Step label of the snapshot ``initialize(resume="latest")`` continued from (None: a fresh start).
        self.resumed_step: int | None = None
        self._scaler: Any | None = None
        self._scaler_searched = False
        self._skipped = False  # this step's update was dropped by the gate
        self._discarded = False  # this step's state was replaced by a rollback of an earlier step's verdict
        self._probe_errors: dict[str, str] = {}  # this rank's error text of each check it switched off
        self._last_error: str | None = None
        self._monitored: Reason | None = None
        self._lock: RunLock | None = None
        self._spectral: SpectralMonitor | None = None
        #: Plans of the per-step norm passes (gradients, weights, buffers), kept between steps.
        self._norms = (TotalNorm(), TotalNorm(), TotalNorm())
        #: The asynchronous verdict's device side, when this run can use it (settled at the first gate).
        self._deferred: deferred.Deferred | None = None
        self._async_settled = False
        self._notes: set[str] = set()
        self._ahead: tuple[int, dict[str, Any]] = (-1, {})  # κ̃ measured for the asynchronous verdict of a tick

    # ------------------------------------------------------------------------------------------ set-up
    def initialize(self, model: torch.nn.Module, save_fn: Callable[[str], None] | None = None,
                   load_fn: Callable[[str], None] | None = None, get_lr: Callable[[], float] | None = None,
                   set_lr: Callable[[float], None] | None = None, *, optimizer: torch.optim.Optimizer | None = None,
                   scheduler: Any | None = None, start_step: int = -1, resume: bool | str = False,
                   backend: StateBackend | None = None) -> None:
        """Attach to a model and take the initial snapshot (collective).

        Either pass ``optimizer=`` (and ``scheduler=``) and Gradience snapshots model + optimizer state
        itself as safetensors and applies the LR backoff where the optimizer consumes the LR, or pass
        ``save_fn(path)`` / ``load_fn(path)`` that write / restore a checkpoint at ``path`` and ``get_lr()`` /
        ``set_lr(lr)`` (the guard then moves the loop's LR by each change of its scale). Optimizers and
        schedulers wrapped by accelerate are unwrapped here. ``start_step`` labels the initial snapshot (the step
        before the first one the loop will report). Every rank must call this.

        ``resume="latest"``: continue a crashed or requeued run from the newest committed snapshot in
        ``out_dir`` whose shards verify on every rank — model, optimizer, scheduler, LR scale and guard state
        (rollback budget, counts, as the live run had them right after that snapshot's commit) — instead of
        clearing the directory; :attr:`resumed_step` is then its step (None when there was none and the run
        started fresh, which telemetry and the log say). The world size must match the snapshot's.
        ``resume=True`` only appends to the telemetry files (the Trainer callback uses it when the Trainer
        resumes from its own checkpoint).

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
        out = Path(self.config.out_dir)
        self._lock = lock_everywhere(out, self.comm, self.global_rank)
        try:
            self._attach(out, save_fn, load_fn, get_lr, set_lr, start_step, resume)
        except BaseException:
            self.close()  # a failed start must not keep out_dir locked, nor hooks on the optimizer
            raise

    def _attach(self, out: Path, save_fn: Any, load_fn: Any, get_lr: Any, set_lr: Any, start_step: int,
                resume: bool | str) -> None:
        comm, config = self.comm, self.config
        self.telemetry = Telemetry(out, rank=self.global_rank, redact_max_chars=config.redact_max_chars,
                                   append=bool(resume), world_size=comm.world_size, group_rank=comm.rank,
                                   log_all_ranks=config.log_all_ranks, summary_writer=comm.rank == 0,
                                   sinks=make_sinks(config.tensorboard, out, leader=comm.rank == 0))
        self.telemetry.emit("start", world_size=comm.world_size, global_ranks=list(self.global_ranks),
                            backend=type(self.backend).__name__, config=config.to_dict())
        self.tick = start_step
        if get_lr is not None:
            self.lr = CallbackLR(get_lr, set_lr)
        elif self.optimizer is not None:
            self.lr = LRScale(self.optimizer)
        self._apply_lr(adopt=True)  # a guard state loaded before initialize carries its scale
        install_sigterm(self)
        watch_join()
        if config.spectral_enabled and self.backend.spectral_model is None:
            logger.warning("Gradience: no spectral probe on this run's weights (DeepSpeed ZeRO-3 partitions cut "
                           "across matrices); κ̃ and the risk level are off, the other checks run")
        elif config.spectral_enabled:
            self._spectral = SpectralMonitor(self.backend.spectral_model, config, self.telemetry,
                                             reduce=self._spectral_reduce())
        if not config.guard_enabled:
            return
        if config.fingerprint_interval:
            self._collective(None, check_replicas, comm, self.model)
        root = snapshot_root(out, list(self.global_ranks), world_size=_world_size() or comm.world_size)
        self.store = SnapshotStore(root, comm, tier=config.guard_snapshot_tier, global_rank=self.global_rank,
                                   hot=HotTier(config.guard_snapshot_hot, config.guard_snapshot_hot_budget))
        target = Target(self.backend, self.optimizer, save_fn, load_fn, self.lr, self.scheduler)
        self.recovery = Recovery(self.store, comm, self.telemetry, config, target)
        self.executor = Executor(store=self.store, recovery=self.recovery, telemetry=self.telemetry, config=config,
                                 comm=comm, collective=self._collective, fatal=self._fatal,
                                 global_ranks=self.global_ranks, bad_tensors=lambda: self._bad(None, grads=False),
                                 read_lr=self._lr)
        if resume == "latest" and self._resume_latest():
            return
        self._collective(None, self.store.reset)
        self.state = policy.on_fresh_start(self.state)  # reset() removed every earlier snapshot
        self.state = self.executor.snapshot(self.state, start_step, self.tick, confirmed=True)
        if self.state.pending is not None:  # a commit lag: not for the first target
            self.state = self.executor.commit(self.state, start_step)
        persisted = self._collective(None, self.recovery.persist, start_step) if self.state.committed_sids else None
        if not self.state.committed_sids or persisted is False:  # the first target must be on disk
            error = self.store.last_error
            raise SnapshotError(f"could not commit the initial snapshot under {root}: "
                                + (f"{type(error).__name__}: {error}" if error else "another rank failed"))

    def _resume_latest(self) -> bool:
        """Continue from the newest committed, verified snapshot in out_dir (collective); False if none."""
        last = self._collective(None, self.store.scan)
        rec = self.recovery
        resumed = resume_latest(self.store, self.comm, lambda sid: self._collective(None, rec.prepare_everywhere, sid),
                                rec.resume)
        if resumed is None:
            self.telemetry.emit("resume", step=None, path=None, detail="no committed snapshot: starting fresh")
            return False
        info, meta = resumed.info, resumed.meta
        committed = self.store.committed()
        self.state = policy.on_resume(info.extra.get("guard_state") or meta.get("guard_state"),
                                      tuple(i.sid for i in committed))
        self._apply_lr(adopt=True)
        rec.labels.update({i.sid: i.step for i in committed})
        self.executor.next_sid = last + 1
        self.tick = int(meta.get("tick", -1))
        self.resumed_step = self.last_step = info.step
        self.telemetry.emit("resume", step=info.step, snapshot_id=info.sid, path=str(info.path),
                            lr_scale=self.state.lr_scale, total_rollbacks=self.state.total_rollbacks)
        return True

    # ------------------------------------------------------------------------------------------ per step
    def before_optimizer_step(self, model: torch.nn.Module | None = None,
                              optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
                              scaler: Any | None = None, loss: torch.Tensor | float | None = None) -> bool:
        """Gradient gate, after backward (and clipping), before ``optimizer.step()`` (collective).

        Returns False when this update must not happen; the gradients are then dropped (``p.grad = None``)
        so even an unconditional ``optimizer.step()`` leaves parameters and optimizer state bitwise unchanged.
        Under the asynchronous verdict it returns True and the fused optimizer skips a bad update on the device.
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
        if not (self.config.guard_enabled and self.config.guard_check_grads):
            return True
        step = self._next_step() if step is None else step
        optimizer = unwrap_optimizer(optimizer) or self.optimizer
        own = optimizer is self.optimizer and model in (None, self.model)
        source = self.backend if own else PlainBackend(model or self.model, optimizer)
        scaler = scaler if scaler is not None else self._detected_scaler()
        if own and self._asynchronous(scaler):
            self._deferred.gate(source.gate_tensors(), loss, step, self.tick + 1)
            return True  # the device skips a bad update; step() reads the verdict
        if not self._drain(step) or Phase.GRADS.value in self.state.disabled_checks:
            if self._discarded or self.halted:  # these gradients belong to a state that is gone
                source.close_gate()
            return not (self._discarded or self.halted)

        def probe() -> ProbeReport:
            overflow = unscale(scaler, optimizer)
            report = probe_grad_tensors(source.gate_tensors(), step=step, loss=loss, norm=self._norms[0] if own
                                        else None, threshold=self.config.guard_violation_threshold)
            if overflow:  # inf/NaN explained by the loss scale: the scaler skips this step and lowers it
                report = dataclasses.replace(report, nonfinite_grads=False, violation_grads=False,
                                             scaler_overflow=True)
            return report

        verdict = self._agree(self._probe(Phase.GRADS, step, probe), self.tick + 1)
        faulty = self.comm.rank in verdict.faulty_ranks
        decision = self._judge_grads(step, verdict, lambda: self._bad(None, grads=True) if faulty else None)
        if decision.action is Action.CONTINUE and not verdict.scaler_overflow:
            return True
        source.close_gate()
        self._skipped = True
        if decision.action is Action.CONTINUE:
            self.state = policy.on_scaler_overflow(self.state)
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
        self.steps_seen += 1
        self.last_step = step
        skipped, self._skipped = self._skipped, False
        if self._deferred is not None and self._deferred.gated():
            return self._step_async(step, loss)
        self.state = policy.on_verdict_path(self.state, "sync")
        self._drain(step)
        if self._discarded or self.halted:  # an asynchronous verdict replaced the state this step made
            self._discarded = False
            return not self.halted
        self.tick += 1
        tick, fp_every = self.tick, self.config.fingerprint_interval
        # With fingerprints on, every snapshot is of a state verified equal on all replicas.
        fingerprint = bool(fp_every) and (tick % fp_every == 0 or policy.snapshot_due(tick, self.config))
        if Phase.STEP.value in self.state.disabled_checks:
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
        self._judge_step(step, self._agree(report, tick), verified=fingerprint or not fp_every)
        return not self.halted

    def _step_async(self, step: int, loss: torch.Tensor | float | None) -> bool:
        """``step`` under the asynchronous verdict: judge the previous step (its vectors are done by now), then
        leave this step's checks on the device, copying the state ahead if a healthy verdict would keep it."""
        d, tick = self._deferred, self.tick + 1
        if not self._read_async(step) or self.halted:
            d.forget()  # this step's gate and loss judged the state that was just replaced
            return not self.halted
        self.tick = tick
        kappa = self._spectral.measure() if self._spectral and policy.spectral_due(tick, self.config, self.state) else {}
        self._ahead = (tick, kappa)
        ahead = policy.capture_ahead(self.state, tick, kappa.get("spectral_kappa"), self.config)
        if ahead.capture:
            self._execute(step, ahead, None, tick)
        weights, buffers = self.backend.check_tensors()
        d.note_step(weights, buffers, loss, step, busy=self.store is not None and self.store.persist_busy())
        return not self.halted

    def _drain(self, step: int | None) -> bool:
        """Judge verdicts the asynchronous path left in flight before a synchronous step (or the end): a staged
        verdict is never dropped. False when that replaced this step's state (it is then discarded) or halted."""
        if self._deferred is None or not self._deferred.staged():
            return True
        self._discarded = not self._read_async(step)
        return not (self._discarded or self.halted)

    def _read_async(self, step: int | None) -> bool:
        """Read and judge the previous step's asynchronous verdicts; False when a rollback replaced the state."""
        d = self._deferred
        grads, weights = self._collective(step, d.read, self.config.collective_timeout_s)
        d.release()
        rollbacks = self.state.total_rollbacks
        if grads is not None:
            self._judge_grads(step, grads, lambda: d.bad_grads(self.model, self.config.guard_violation_threshold))
        if weights is not None and self.state.total_rollbacks == rollbacks and not self.halted:
            kappa = self._ahead[1] if self._ahead[0] == weights.tick else {}
            self.last_loss = weights.loss
            self._judge_step(step, dataclasses.replace(weights, **kappa), verified=True)
        return self.state.total_rollbacks == rollbacks

    def _judge_grads(self, step: int | None, verdict: Verdict, bad: Callable[[], Any]) -> Decision:
        """The policy on a gradient verdict (either path) and what it says to report or do (``bad()``: the
        offending gradients by name, asked for on a skip)."""
        self._note_probe_errors(Phase.GRADS, verdict)
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if decision.reason is Reason.SPIKE and decision.action is Action.CONTINUE:
            self.telemetry.emit("spike", step=verdict.step, action="log", detail=decision.detail, **self._blame(verdict))
        if decision.action is Action.SKIP_STEP:
            self.telemetry.emit("skip_step", step=verdict.step, reason=decision.reason, **self._blame(verdict),
                                grad_norm=verdict.grad_norm, bad=bad(), detail=decision.detail)
        elif decision.action is not Action.CONTINUE:
            self._execute(step, decision, verdict, verdict.tick)
        return decision

    def _judge_step(self, step: int | None, verdict: Verdict, *, verified: bool) -> None:
        """The policy on a step's verdict (either path), its reactions and reports."""
        self._note_probe_errors(Phase.STEP, verdict)
        previous = self.state.risk_level
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if verdict.spectral_kappa is not None and self._spectral is not None:
            self._spectral.report(verdict.step, verdict.tick, verdict, previous, self.state)
        if decision.detail and decision.reason is None:  # a reaction to the spectral risk level
            self.telemetry.emit("risk_reaction", step=verdict.step, level=self.state.risk_level,
                                detail=decision.detail, lr_scale=self.state.lr_scale, kappa=verdict.spectral_kappa)
        if not self.config.guard_enabled and decision.reason is not self._monitored:
            # Monitor mode: a corrupted run stays faulty every step; report when the condition changes.
            self._monitored = decision.reason
            if decision.reason is not None:
                self.telemetry.emit("fault", step=verdict.step, reason=decision.reason, **self._blame(verdict))
        self._execute(step, decision, verdict, verdict.tick, verified=verified)
        if verdict.step % self.config.telemetry_interval == 0:
            self.telemetry.emit("telemetry", step=verdict.step, train_loss=self.last_loss, lr=self._lr(),
                                lr_scale=self.state.lr_scale, weight_norm=verdict.weight_norm,
                                spectral_kappa=self._spectral.last_kappa if self._spectral else None,
                                risk_level=self.state.risk_level)

    def _execute(self, step: int | None, decision: Decision, verdict: Verdict | None, tick: int | None, *,
                 verified: bool = True) -> None:
        if self.executor is not None:
            self.state = self.executor.carry_out(self.state, decision, verdict, step=step,
                                                 tick=self.tick if tick is None else tick, verified=verified)
        elif decision.action is Action.HALT and verdict is not None:
            self.telemetry.emit("abort", step=step, reason=decision.reason, **self._blame(verdict))
        self._apply_lr()  # a DANGER reaction lowers the scale without a rollback

    def _asynchronous(self, scaler: Any) -> bool:
        """Whether this step's gate runs on the device: the run can (settled once) and every parameter about to
        be updated already has optimizer state (re-checked each step: groups, unfrozen parameters)."""
        if not self._async_settled:
            self._async_settled = True
            self._deferred = deferred.choose(self.config, self.optimizer, self.backend, self.comm, scaler)
        path = "sync"
        if self._deferred is not None:
            if deferred.missing_state(self.optimizer):
                self._note_once("missing", "a parameter about to be updated has no optimizer state yet (the first "
                                "step, a new param group, an unfrozen parameter): such steps are synchronous")
            else:
                path = "async"
        self.state = policy.on_verdict_path(self.state, path)
        return path == "async"

    # ------------------------------------------------------------------------------------------ end
    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` (group rank 0) and a ``summary`` event; return the summary dict.

        What is still in flight is settled first: the asynchronous verdict of the last step is judged and acted
        on, a snapshot whose steps were all judged healthy is committed and the last marker written. That is
        collective when something is in flight (the same on every rank): every rank calls ``finalize``.
        """
        self._require_initialized()
        try:
            if not self.halted:
                self._drain(self.last_step)
            if self.executor is not None and not self.halted:
                self.state = self.executor.finish(self.state, self.last_step, self.tick)
        except CollectiveError:
            pass  # recorded as an ABORTED run; the summary below says so
        finally:
            if self.store is not None:
                self.store.abandon()
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

    def terminated(self, signame: str) -> None:
        """Record that the process is being stopped by a signal (the launcher stops survivors of a failed
        peer this way): an ABORTED summary for this rank, written before the process goes."""
        if self.telemetry is not None and not self.halted:
            self._fatal(policy.on_abort(self.state, Reason.TERMINATED), self.last_step, "TERMINATED",
                        f"{signame} received (a launcher stops the surviving ranks this way when a peer fails)")

    # ------------------------------------------------------------------------------------------ reports
    @property
    def halted(self) -> bool:
        """True once the guard stopped training (or a collective failed)."""
        return self.state.halted

    @property
    def exit_code(self) -> int:
        """0, or :data:`~gradience.errors.EXIT_GUARD_HALTED` when the guard stopped the run."""
        return EXIT_GUARD_HALTED if self.halted else 0

    @property
    def lr_scale(self) -> float:
        """The guard's total LR scale (1.0 until a rollback backs it off)."""
        return self.state.lr_scale

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """Global rank of each member of the guard's group, by group rank."""
        return tuple(getattr(self.comm, "global_ranks", range(self.comm.world_size))) if self.comm else (0,)

    @property
    def global_rank(self) -> int:
        """This process's rank in the default group (its group rank when the group is unregistered)."""
        return self.global_ranks[self.comm.rank] if self.comm is not None else 0

    def integrity_status(self) -> str:
        """OK (no fault), RECOVERED (faults handled), ABORTED (halted), FAULTED (faults, guard disabled)."""
        return reports.integrity_status(self.state, self.config)

    def summary(self) -> dict[str, Any]:
        """The run summary (what :meth:`finalize` writes)."""
        held = self.backend.check_tensors()[0] if self.backend is not None else []
        return reports.summary(
            self.state, self.config, steps_seen=self.steps_seen, last_step=self.last_step, last_loss=self.last_loss,
            world_size=self.comm.world_size if self.comm else 1, rank=self.comm.rank if self.comm else 0,
            global_rank=self.global_rank, labels=self.recovery.labels if self.recovery is not None else {},
            lr_supported=self.lr.supported if self.lr is not None else None, probe_errors=self._probe_errors,
            spectral=self._spectral, weights_fingerprint=f"{int(fingerprint_tensor(held)):013x}" if held else None)

    def state_dict(self) -> dict[str, Any]:
        """Guard state for checkpoints (identical on all ranks)."""
        return {"version": reports.STATE_VERSION, "guard_state": self.state.to_dict(), "steps_seen": self.steps_seen,
                "last_step": self.last_step, "tick": self.tick}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, before or after :meth:`initialize` (after it, the snapshots
        on record stay those this run committed)."""
        if state.get("version") not in (1, 2, reports.STATE_VERSION):
            raise ValueError(f"unsupported gradience state version {state.get('version')!r}")
        self.state = policy.on_checkpoint_loaded(state["guard_state"], self.state if self.store else None)
        self.steps_seen = int(state["steps_seen"])
        self.last_step = state["last_step"]
        self.tick = int(state.get("tick", self.tick))
        self._apply_lr(adopt=True)

    # ------------------------------------------------------------------------------------------ plumbing
    def _probe(self, phase: Phase, step: int, fn: Callable[[], ProbeReport]) -> ProbeReport:
        try:
            return fn()
        except Exception as e:  # a raising probe must still take part in the collective
            self._last_error = f"{type(e).__name__}: {e}"
            return ProbeReport(phase=phase, step=step, probe_error=True)

    def _note_probe_errors(self, phase: Phase, verdict: Verdict) -> None:
        """A probe that raises is a defect of the guard, not a fault of the run: report it; the policy switches
        the check off on every rank after ``probe_error_limit`` in a row (the count is agreed)."""
        self.state, off = policy.on_probe_errors(self.state, phase, verdict.probe_error, self.config)
        if verdict.probe_error:
            local, self._last_error = self._last_error, None
            if off and local:
                self._probe_errors[phase.value] = local
            self.telemetry.emit("probe_error", step=verdict.step, phase=phase, **self._blame(verdict),
                                error=local or "raised on another rank",
                                consecutive=self.state.probe_error_streaks[phase is Phase.STEP], disabled=off)

    def _agree(self, report: ProbeReport, tick: int) -> Verdict:
        if report.phase is Phase.STEP and self.store is not None and self.store.persist_busy():
            report = dataclasses.replace(report, persist_busy=True)  # no marker while any rank writes
        return self._collective(report.step, agree, report, self.comm, tick)

    def _collective(self, step: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a collective call; a failed one ends the run on this rank with an ABORTED summary, then raises."""
        try:
            return fn(*args)
        except CollectiveError as e:
            reason = Reason.COLLECTIVE_MISMATCH if isinstance(e, CollectiveMismatch) else Reason.CONSENSUS_TIMEOUT
            self._fatal(policy.on_abort(self.state, reason), step, reason.value, str(e))
            raise

    def _fatal(self, state: GuardState, step: int | None, reason: str, error: str) -> None:
        """An error that stops every rank: the state, the event, and summaries that say ABORTED (the caller
        raises). Every rank writes its own ``summary_rank<r>.json``, and group rank 0 ``summary.json`` too: the
        rank that died may be rank 0."""
        self.state = state
        self.telemetry.emit("abort", step=step, reason=reason, error=error)
        summary = self.summary()
        self.telemetry.write_summary(summary, name=f"summary_rank{self.global_rank}.json", force=True)
        self.telemetry.write_summary(summary)

    def _apply_lr(self, *, adopt: bool = False) -> None:
        """Bring the LR in force to the guard state's scale. ``adopt``: the state came with the loop's own
        checkpoint, whose LR (``set_lr`` form) already carries that scale."""
        if self.lr is None or self.lr.scale == self.state.lr_scale or self.halted:
            return
        if adopt and isinstance(self.lr, CallbackLR):
            self.lr.adopt(self.state.lr_scale)
        else:
            self.lr.set(self.state.lr_scale)

    def _note_once(self, key: str, why: str) -> None:
        if key not in self._notes:
            self._notes.add(key)
            logger.info("Gradience: asynchronous verdict: %s", why)

    def _blame(self, verdict: Verdict) -> dict[str, Any]:
        return blame(verdict, self.global_ranks)

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

    def _lr(self) -> float | None:
        if self.lr is not None:
            lrs = [x for x in self.lr.effective_lrs() if x is not None]
            return lrs[0] if lrs else None
        return current_lr(self.optimizer) if self.optimizer is not None else None

    def _require_initialized(self) -> None:
        if self.telemetry is None:
            raise RuntimeError("GradienceController.initialize(model, ...) must be called first")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0
