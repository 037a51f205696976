"""GradienceController: probe -> agree -> decide -> execute, for any training loop.

The controller measures (probe), agrees (consensus, or the asynchronous gate on the device), asks the pure
:mod:`gradience.policy` for every decision and every change of the guard state, and hands each Decision to the
:class:`~gradience.executor.Executor`. Both verdict paths feed the same policy with the same Verdicts; the
asynchronous one judges each step one step later (see :mod:`gradience.deferred` and the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradience import attach, deferred, policy, reports
from gradience.backends import PlainBackend, StateBackend, default_backend
from gradience.comm import Comm, default_comm
from gradience.config import GradienceConfig
from gradience.consensus import agree
from gradience.errors import EXIT_GUARD_HALTED, CollectiveError, CollectiveMismatch
from gradience.executor import Executor
from gradience.guardrails import ScalerSearch, install_sigterm, refuse_inside_join, watch_join
from gradience.lr import CallbackLR, LRScale, apply_scale, lr_in_force, unwrap_optimizer, unwrap_scheduler
from gradience.norms import TotalNorm
from gradience.probe import probe_gate, probe_step
from gradience.recovery import Recovery, Target, check_replicas
from gradience.rundir import RunLock, lock_everywhere
from gradience.snapshot import SnapshotStore
from gradience.spectral.monitor import SpectralMonitor
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
        self.scheduler: Any = None
        #: What this rank owns and how it is checked, captured and restored (see gradience.backends).
        self.backend: StateBackend | None = None
        #: Where the LR scale of the guard state is applied (None: no LR to scale).
        self.lr: LRScale | CallbackLR | None = None
        self.store: SnapshotStore | None = None
        self.recovery: Recovery | None = None
        self.executor: Executor | None = None  # carries out every decision (built by initialize)
        self.telemetry: Telemetry | None = None
        #: step() calls so far; ``tick``: the guard's clock, the tick of the newest step it counted (the loop's
        #: step numbers are labels and may repeat; a step discarded by an asynchronous rollback is not counted).
        self.steps_seen, self.tick = 0, -1
        self._start, self._loaded_tick = -1, None  # the initial snapshot's label; a tick from a checkpoint
        self.last_step: int | None = None  # the loop's label of the last step() and its loss
        self.last_loss: float | None = None
        #: Step label of the snapshot ``initialize(resume="latest")`` continued from (None: a fresh start).
        self.resumed_step: int | None = None
        self._skipped = self._discarded = False  # the gate dropped this step's update / a rollback replaced it
        self.probe_errors: dict[str, str] = {}  # this rank's error text of each check switched off for raising
        self._last_error: str | None = None
        self._lock: RunLock | None = None
        self.spectral: SpectralMonitor | None = None  # κ̃ measured and reported (None: off)
        self._scalers = ScalerSearch()
        self._norms = (TotalNorm(), TotalNorm(), TotalNorm())  # plans of the gradient/weight/buffer norm passes
        self._deferred: deferred.Deferred | None = None  # the asynchronous verdict's device side, if the run can

    # ------------------------------------------------------------------------------------------ set-up
    def initialize(self, model: torch.nn.Module, save_fn: Callable[[str], None] | None = None,
                   load_fn: Callable[[str], None] | None = None, get_lr: Callable[[], float] | None = None,
                   set_lr: Callable[[float], None] | None = None, *, optimizer: torch.optim.Optimizer | None = None,
                   scheduler: Any | None = None, start_step: int = -1, resume: bool | str = False,
                   backend: StateBackend | None = None) -> None:
        """Attach to a model and take the initial snapshot (collective: every rank calls it).

        Pass ``optimizer=`` (and ``scheduler=``): Gradience snapshots model + optimizer state as safetensors and
        applies the LR backoff where the optimizer consumes the LR. Or pass ``save_fn(path)`` / ``load_fn(path)``
        and ``get_lr()`` / ``set_lr(lr)`` (the guard moves the loop's LR by each change of its scale).
        ``start_step`` labels the initial snapshot. ``resume="latest"``: continue from the newest committed
        snapshot in ``out_dir`` that verifies on every rank (model, optimizer, scheduler, LR scale, guard state);
        :attr:`resumed_step` is its step (None: a fresh start). ``resume=True`` only appends to the telemetry
        files (the Trainer callback). ``backend=`` (integrations): what this rank owns when not the whole model.
        """
        if self.telemetry is not None:
            raise RuntimeError("GradienceController.initialize() was already called; use a new controller")
        self.model, self.optimizer, self.scheduler = model, unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
        self.backend = backend if backend is not None else default_backend(model, self.optimizer)
        attach.check_arguments(self.config, save_fn=save_fn, load_fn=load_fn, get_lr=get_lr, set_lr=set_lr,
                               optimizer=self.optimizer, scheduler=self.scheduler, resume=resume, backend=self.backend)
        self.comm = self.comm or default_comm(self._group, timeout_s=self.config.collective_timeout_s)
        comm, config, out = self.comm, self.config, Path(self.config.out_dir)
        self._lock = lock_everywhere(out, comm, self.global_rank)
        try:
            self.telemetry = attach.open_telemetry(config, out, comm, self.global_ranks, append=bool(resume),
                                                   backend=self.backend)
            self._start = start_step
            self.tick = self._clock()
            self.lr = attach.lr_target(self.optimizer, get_lr, set_lr)
            self._apply_lr(adopt=True)  # a guard state loaded before initialize carries its scale
            install_sigterm(self)
            watch_join()
            self.spectral = attach.spectral_monitor(config, self.backend, self.telemetry, comm)
            if config.guard_enabled:
                if config.fingerprint_interval:
                    self._collective(None, check_replicas, comm, self.model)
                target = Target(self.backend, self.optimizer, save_fn, load_fn, self.lr, self.scheduler)
                self.store, self.recovery = attach.snapshot_parts(config, out, comm, self.global_ranks,
                                                                  self.telemetry, target)
            threshold = config.guard_violation_threshold
            self.executor = Executor(
                store=self.store, recovery=self.recovery, telemetry=self.telemetry, config=config, comm=comm,
                collective=self._collective, fatal=self._fatal, global_ranks=self.global_ranks,
                bad_tensors=lambda: self.backend.bad(threshold, grads=False), spectral=self.spectral,
                read_lr=lambda: lr_in_force(self.lr, self.optimizer))
            self._deferred = deferred.choose(config, self.optimizer, self.backend, comm)
            found = self.executor.resume() if config.guard_enabled and resume == "latest" else None
            if found is not None:
                self.state, resumed = found
                self._apply_lr(adopt=True)
                self.tick = int(resumed.meta.get("tick", -1))
                self.resumed_step = self.last_step = resumed.info.step
            elif config.guard_enabled:
                self.state = self.executor.start(self.state, start_step, self.tick)
        except BaseException:
            self.close()  # a failed start must not keep out_dir locked, nor hooks on the optimizer
            raise

    # ------------------------------------------------------------------------------------------ per step
    def before_optimizer_step(self, model: torch.nn.Module | None = None,
                              optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
                              scaler: Any | None = None, loss: torch.Tensor | float | None = None) -> bool:
        """Gradient gate, after backward (and clipping), before ``optimizer.step()`` (collective). False: this update
        must not happen; its gradients are dropped, so even an unconditional ``optimizer.step()`` leaves weights and
        optimizer state bitwise unchanged (asynchronous verdict: True, the fused optimizer skips it on the device).
        A ``torch.amp.GradScaler`` (``scaler=``, else the one in the process) unscales first; its own overflow is
        not a fault. ``loss=``: this step's loss, for the spike rule."""
        self._require_initialized()
        if self.halted:
            return False
        refuse_inside_join()
        if not (self.config.guard_enabled and self.config.guard_check_grads):
            return True
        step = (0 if self.last_step is None else self.last_step + 1) if step is None else step
        optimizer = unwrap_optimizer(optimizer) or self.optimizer
        own = optimizer is self.optimizer and model in (None, self.model)
        source = self.backend if own else PlainBackend(model or self.model, optimizer)
        scaler = scaler if scaler is not None else self._scalers.find() if self.optimizer is not None else None
        if own and self._asynchronous(scaler):
            self._deferred.gate(source.gate_tensors(), loss, step, self.tick + 1)
            return True  # the device skips a bad update; step() reads the verdict
        if not self._drain(step) or Phase.GRADS.value in self.state.disabled_checks:
            if self._discarded or self.halted:  # these gradients belong to a state that is gone
                source.close_gate()
            return not (self._discarded or self.halted)
        verdict = self._agree(self._probe(Phase.GRADS, step, lambda: probe_gate(
            source.gate_tensors(), scaler, optimizer, step=step, loss=loss, norm=self._norms[0] if own else None,
            threshold=self.config.guard_violation_threshold)), self.tick + 1)
        threshold, faulty = self.config.guard_violation_threshold, self.comm.rank in verdict.faulty_ranks
        decision = self._decide(step, verdict, bad=lambda: source.bad(threshold, grads=True) if faulty else None)
        if decision.action is Action.CONTINUE:
            return True
        source.close_gate()  # a skip, a rollback, a halt, or the GradScaler's own overflow
        self._skipped = True
        return False

    def step(self, step: int, loss: torch.Tensor | float | None, model: torch.nn.Module | None = None) -> bool:
        """Check loss and weights after the optimizer step and act (collective). False only when training must
        stop (faults outlived ``guard_max_rollbacks``, no good snapshot left, a collective failed: see the summary)."""
        self._require_initialized()
        if self.halted:
            return False
        refuse_inside_join()
        self.steps_seen, self.last_step = self.steps_seen + 1, step
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
        # With fingerprints on, every snapshot is of a state verified equal on all replicas; a step whose check
        # was switched off compares nothing, so a snapshot of it is not verified.
        checked = Phase.STEP.value not in self.state.disabled_checks
        fingerprint = checked and bool(fp_every) and (tick % fp_every == 0 or policy.snapshot_due(tick, self.config))
        tensors = self.backend.check_tensors() if checked and model in (None, self.model) else None
        report = self._probe(Phase.STEP, step, lambda: probe_step(
            loss, model, tensors=tensors, step=step, threshold=self.config.guard_violation_threshold,
            update_skipped=skipped, with_fingerprint=fingerprint, norms=self._norms[1:] if tensors else None,
        )) if checked else ProbeReport(phase=Phase.STEP, step=step, update_skipped=skipped)
        self.last_loss = report.loss
        if self.spectral is not None and policy.spectral_due(tick, self.config, self.state):
            report = dataclasses.replace(report, **self.spectral.measure())
        self._decide(step, self._agree(report, tick), verified=fingerprint or not fp_every)
        return not self.halted

    def _step_async(self, step: int, loss: torch.Tensor | float | None) -> bool:
        """``step`` under the asynchronous verdict: judge the previous step (its vectors are done by now), then
        leave this step's checks on the device, copying the state ahead if a healthy verdict would keep it."""
        d = self._deferred
        if not self._read_async(step) or self.halted:
            d.forget()  # this step's gate and loss judged the state that was just replaced
            return not self.halted
        self.tick += 1
        self.state, kappa = self.executor.ahead(self.state, step, self.tick)
        busy = self.store is not None and self.store.persist_busy()
        d.note_step(*self.backend.check_tensors(), loss, step, busy=busy, spectral=kappa)
        return not self.halted

    def _drain(self, step: int | None) -> bool:
        """Judge verdicts the asynchronous path left in flight before a synchronous step (or the end): a staged
        verdict is never dropped. False when that replaced this step's state (it is then discarded) or halted."""
        if self._deferred is not None and self._deferred.staged():
            self._discarded = not self._read_async(step)
        return not (self._discarded or self.halted)

    def _read_async(self, step: int | None) -> bool:
        """Read and judge the previous step's asynchronous verdicts; False when a rollback replaced the state."""
        d = self._deferred
        grads, weights = self._collective(step, d.read, self.config.collective_timeout_s)
        d.release()  # the update this gate steered is done
        done = None
        if grads is not None:
            done = self._decide(step, grads, bad=lambda: d.bad_grads(self.model, self.config.guard_violation_threshold))
        if weights is not None and (done is None or done.action is not Action.ROLLBACK) and not self.halted:
            self.last_loss = weights.loss
            done = self._decide(step, weights)
        if done is not None and done.action is Action.ROLLBACK and not self.halted:
            self.backend.close_gate()  # gradients accumulated on the replaced state must not reach the restored one
            return False
        return True

    def _decide(self, step: int | None, verdict: Verdict, *, bad: Callable[[], Any] | None = None,
                verified: bool = True) -> Decision:
        """The policy on an agreed verdict (either path, either phase), carried out and reported."""
        late = self._deferred.errors.pop((verdict.tick, verdict.phase), None) if self._deferred else None
        local, self._last_error = self._last_error or late, None
        self.state = self.executor.count_probe_errors(self.state, verdict, local, self.probe_errors)
        before = self.state
        self.state, decision = policy.decide(before, verdict, self.config)
        self._apply_lr()  # a DANGER reaction lowers the scale without a rollback: in force before any snapshot
        self.state = self.executor.carry_out(self.state, decision, verdict, step=step, tick=verdict.tick,
                                             verified=verified, before=before, bad=bad, last_loss=self.last_loss)
        return decision

    def _asynchronous(self, scaler: Any) -> bool:
        """Whether this step's gate runs on the device (the run can, and this step's parameters all have state)."""
        path = deferred.path_of_step(self._deferred, self.optimizer, scaler, self.state.disabled_checks)
        self.state = policy.on_verdict_path(self.state, path)
        return path == "async"

    def settle(self) -> bool:
        """Judge and act on the asynchronous verdict still in flight now (collective; the host waits for the device
        once): call it before saving a checkpoint of your own, never of a faulty step. False: training must stop."""
        self._require_initialized()
        if not self.halted and self._deferred is not None and self._deferred.staged():
            self._read_async(self.last_step)  # nothing is discarded: the loop has not begun the next step
        return not self.halted

    # ------------------------------------------------------------------------------------------ end
    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` (group rank 0) and a ``summary`` event; return the summary dict. What is in
        flight is settled first (the last asynchronous verdict judged and acted on, a snapshot whose steps were
        all judged healthy committed, the last marker written): collective then, so every rank calls it."""
        self._require_initialized()
        with contextlib.suppress(CollectiveError):  # recorded as an ABORTED run: the summary says so
            self._drain(self.last_step)
            if not self.halted:
                self.state = self.executor.finish(self.state, self.last_step, self.tick)
        self.state = self.executor.drop_in_flight(self.state, self.last_step)
        written = reports.write_final(self.telemetry, self.summary())
        self.close()
        return written

    def close(self) -> None:
        """Release what the controller holds (LR hooks, found_inf, the guard's process group, the out_dir lock)."""
        if self._deferred is not None:
            self._deferred.release()
        for held in (self.lr, self.comm):
            if held is not None:
                held.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def terminated(self, signame: str) -> None:
        """Stopped by a signal (how a launcher ends a failed peer's survivors): this rank's ABORTED summary."""
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
        return tuple(self.comm.global_ranks) if self.comm else (0,)

    @property
    def global_rank(self) -> int:
        """This process's rank in the default group (its group rank when the group is unregistered)."""
        return self.global_ranks[self.comm.rank] if self.comm is not None else 0

    def integrity_status(self) -> str:
        """OK (no fault), RECOVERED (faults handled), ABORTED (halted), FAULTED (faults, guard disabled)."""
        return reports.integrity_status(self.state, self.config)

    def summary(self) -> dict[str, Any]:
        """The run summary (what :meth:`finalize` writes)."""
        return reports.summary(self)

    def state_dict(self) -> dict[str, Any]:
        """Guard state for checkpoints (identical on all ranks)."""
        return reports.state_dict(self.state, steps_seen=self.steps_seen, last_step=self.last_step, tick=self.tick)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, before or after :meth:`initialize` (after it, the snapshots
        on record stay those this run committed)."""
        saved = reports.checked_state_dict(state)
        self.state = policy.on_checkpoint_loaded(saved["guard_state"], self.state if self.store else None)
        self.steps_seen, self.last_step = int(saved["steps_seen"]), saved["last_step"]
        self._loaded_tick = int(saved["tick"]) if "tick" in saved else None
        self.tick = self._clock()
        self._apply_lr(adopt=True)

    def _probe(self, phase: Phase, step: int, fn: Callable[[], ProbeReport]) -> ProbeReport:
        try:
            return fn()
        except Exception as e:  # a raising probe must still take part in the collective
            self._last_error = f"{type(e).__name__}: {e}"
            return ProbeReport(phase=phase, step=step, probe_error=True)

    def _agree(self, report: ProbeReport, tick: int) -> Verdict:
        if report.phase is Phase.STEP and self.store is not None and self.store.persist_busy():
            report = dataclasses.replace(report, persist_busy=True)  # no marker while any rank writes
        return self._collective(report.step, agree, report, self.comm, tick)

    def _collective(self, step: int | None, fn: Callable[..., Any], *args: Any, state: GuardState | None = None) -> Any:
        """Run a collective call; a failed one ends the run on this rank with an ABORTED summary (of ``state``,
        the guard state as the caller has it now), then raises."""
        try:
            return fn(*args)
        except CollectiveError as e:
            reason = Reason.COLLECTIVE_MISMATCH if isinstance(e, CollectiveMismatch) else Reason.CONSENSUS_TIMEOUT
            self._fatal(policy.on_abort(state or self.state, reason), step, reason.value, str(e))
            raise

    def _fatal(self, state: GuardState, step: int | None, reason: str, error: str) -> None:
        """An error that stops every rank: the state, the event, and ABORTED summaries (the caller raises)."""
        self.state = state
        self.telemetry.emit("abort", step=step, reason=reason, error=error)
        reports.write_aborted(self.telemetry, self.summary(), self.global_rank)

    def _clock(self) -> int:
        """The clock after a start or a checkpoint load: the loaded tick, or the start plus the steps counted."""
        return self._loaded_tick if self._loaded_tick is not None else self._start + self.steps_seen

    def _apply_lr(self, *, adopt: bool = False) -> None:
        if not self.halted:
            apply_scale(self.lr, self.state.lr_scale, adopt=adopt)

    def _require_initialized(self) -> None:
        if self.executor is None:
            raise RuntimeError("GradienceController.initialize(model, ...) must be called first (and succeed)")

