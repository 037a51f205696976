"""GradienceController: runs probe -> consensus -> policy -> effects -> telemetry for any training loop.

The controller owns no policy: it measures (probe), agrees (consensus), asks ``policy.decide`` and carries
out the Decision (skip, snapshot, rollback with LR backoff, halt), reporting each action to telemetry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradience import policy
from gradience.comm import Comm, default_comm
from gradience.config import GradienceConfig
from gradience.consensus import agree
from gradience.errors import EXIT_GUARD_HALTED, ConfigError, ConsensusTimeout, SnapshotError
from gradience.lr import current_lr, scale_lr
from gradience.probe import bad_parameters, fingerprint_tensor, parameters, probe_grads, probe_step
from gradience.snapshot import SnapshotStore, agree_all
from gradience.state import capture_state, restore_state
from gradience.telemetry import Telemetry
from gradience.types import Action, Decision, GuardState, Phase, ProbeReport, Reason, Verdict

STATE_VERSION = 1
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

    def __init__(
        self,
        config: GradienceConfig | None = None,
        *,
        process_group: Any | None = None,
        comm: Comm | None = None,
        **fields: Any,
    ) -> None:
        base = config or GradienceConfig()
        self.config = base.replace(**fields) if fields else base
        self._group = process_group
        self.comm: Comm | None = comm
        self.state = GuardState()
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any | None = None
        self._save_fn = self._load_fn = self._get_lr = self._set_lr = None
        self.store: SnapshotStore | None = None
        self.telemetry: Telemetry | None = None
        self.steps_seen = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self._skipped_this_step = False
        self._aborted: str | None = None
        self._monitored_reason: Reason | None = None
        self._pending_due = 0
        #: Updates the GradScaler skipped for overflow (not faults; see ``before_optimizer_step``).
        self.scaler_skips = 0

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
        resume: bool = False,
    ) -> None:
        """Attach to a model and take the initial snapshot (collective).

        Either pass ``optimizer=`` (and ``scheduler=``) and Gradience snapshots model + optimizer state
        itself as safetensors and applies LR backoff through the scheduler, or pass ``save_fn(path)`` /
        ``load_fn(path)`` that write / restore a checkpoint at ``path`` and ``get_lr()`` / ``set_lr(lr)``.
        ``start_step`` labels the initial snapshot (the step before the first one the loop will report);
        ``resume=True`` appends to the telemetry files instead of starting them anew. Every rank must call
        this: the initial snapshot is committed collectively.
        """
        if (save_fn is None) != (load_fn is None):
            raise ConfigError("initialize: save_fn and load_fn must be given together")
        if (get_lr is None) != (set_lr is None):
            raise ConfigError("initialize: get_lr and set_lr must be given together")
        guard = self.config.guard_enabled
        if guard and save_fn is None and optimizer is None:
            raise ConfigError("initialize: pass optimizer= (Gradience snapshots it) or save_fn and load_fn")
        if guard and get_lr is None and optimizer is None and self.config.guard_lr_backoff != 1.0:
            raise ConfigError("initialize: LR backoff needs optimizer= or get_lr and set_lr")
        if scheduler is not None and optimizer is None:
            raise ConfigError("initialize: scheduler= needs optimizer= (the LR backoff scales both)")
        if guard and save_fn is not None and self.config.guard_snapshot_tier == "memory":
            raise ConfigError("guard_snapshot_tier='memory' stores tensors; use optimizer= instead of save_fn")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._save_fn, self._load_fn, self._get_lr, self._set_lr = save_fn, load_fn, get_lr, set_lr
        if self.comm is None:
            self.comm = default_comm(self._group, timeout_s=self.config.collective_timeout_s)
        out = Path(self.config.out_dir)
        self.telemetry = Telemetry(out, rank=self.comm.rank, redact_max_chars=self.config.redact_max_chars,
                                   append=resume)
        self.telemetry.emit("start", world_size=self.comm.world_size, config=self.config.to_dict())
        if not guard:
            return
        self.store = SnapshotStore(out / "snapshots", self.comm, tier=self.config.guard_snapshot_tier)
        self._collective(self.store.reset)
        # reset() removed every earlier snapshot: a restored GuardState must not name them as targets.
        self.state = dataclasses.replace(self.state, committed=(), target_failures=(), episode_target=None)
        if not self._collective(self._snapshot, start_step):
            raise SnapshotError(f"could not commit the initial snapshot under {out / 'snapshots'}")

    # ------------------------------------------------------------------------------------------ per step
    def before_optimizer_step(
        self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
        *, step: int | None = None, scaler: Any | None = None,
    ) -> bool:
        """Gradient gate, after backward (and clipping), before ``optimizer.step()`` (collective).

        Returns False when this update must not happen; the gradients are then dropped (``p.grad = None``)
        so even an unconditional ``optimizer.step()`` leaves parameters and optimizer state bitwise unchanged.
        With a ``torch.amp.GradScaler`` pass ``scaler=``: the gradients are unscaled first (``unscale_``, as
        for clipping) so thresholds apply to true values, and an overflow the scaler will skip anyway is not
        counted as a fault (``scaler_skipped_steps`` in the summary).
        """
        self._require_initialized()
        if not (self.config.guard_enabled and self.config.guard_check_grads) or self.state.halted:
            return not self.state.halted
        step = self._next_step() if step is None else step
        optimizer = optimizer or self.optimizer
        params = _params_of(optimizer, model or self.model)

        def probe() -> ProbeReport:
            overflow = _unscale(scaler, optimizer)
            report = probe_grads(params, step=step, threshold=self.config.guard_violation_threshold)
            if overflow:  # inf/NaN explained by the loss scale: the scaler skips this step and lowers it
                report = dataclasses.replace(report, nonfinite_grads=False, violation_grads=False,
                                             scaler_overflow=True)
            return report

        report = self._probe(Phase.GRADS, step, probe)
        verdict = self._agree(report)
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if decision.action is Action.CONTINUE and not verdict.scaler_overflow:
            return True
        bad = self._bad_grads(report) if decision.reason is not None else []  # before the grads go
        for p in params:
            p.grad = None
        self._skipped_this_step = True
        if decision.action is Action.CONTINUE:
            self.scaler_skips += 1
        elif decision.action is Action.SKIP_STEP:
            self.telemetry.emit("skip_step", step=step, reason=decision.reason, faulty_ranks=verdict.faulty_ranks,
                                grad_norm=verdict.grad_norm, local_bad_grads=bad)
        else:
            self._act(step, verdict, decision)
        return False

    def step(self, step: int, loss: torch.Tensor | float | None, model: torch.nn.Module | None = None) -> bool:
        """Check loss and weights after the optimizer step and act (collective).

        Returns False only when training must stop (faults outlived ``guard_max_rollbacks`` or no good
        snapshot is left); ``summary.json`` then says why.
        """
        self._require_initialized()
        if self.state.halted:
            return False
        model = model or self.model
        self.steps_seen += 1
        self.last_step = step
        fp_every = self.config.fingerprint_interval
        report = self._probe(Phase.STEP, step, lambda: probe_step(
            loss, model, step=step, threshold=self.config.guard_violation_threshold,
            update_skipped=self._skipped_this_step, with_fingerprint=bool(fp_every) and step % fp_every == 0))
        self._skipped_this_step = False
        self.last_loss = report.loss
        verdict = self._agree(report)
        self.state, decision = policy.decide(self.state, verdict, self.config)
        if not self.config.guard_enabled and decision.reason is not self._monitored_reason:
            # Monitor mode: a corrupted run stays faulty every step; report when the condition changes.
            self._monitored_reason = decision.reason
            if decision.reason is not None:
                self.telemetry.emit("fault", step=step, reason=decision.reason, faulty_ranks=verdict.faulty_ranks)
        self._act(step, verdict, decision)
        if step % self.config.telemetry_interval == 0:
            self.telemetry.emit("telemetry", step=step, train_loss=self.last_loss, lr=self._lr(),
                                lr_scale=self.state.lr_scale, weight_norm=verdict.weight_norm,
                                spectral_kappa=None, risk_level=None)
        return not self.state.halted

    def finalize(self) -> dict[str, Any]:
        """Write ``summary.json`` (rank 0) and a ``summary`` event; return the summary dict."""
        self._require_initialized()
        if self.store is not None and self.store.pending_step is not None:
            # finalize() is not collective, so an in-flight snapshot cannot be agreed on: drop it.
            self._abandon_pending(self.last_step if self.last_step is not None else -1)
        summary = self.summary()
        self.telemetry.emit("summary", **summary)
        written = self.telemetry.write_summary(summary)
        self.telemetry.close()
        return written

    # ------------------------------------------------------------------------------------------ reports
    @property
    def halted(self) -> bool:
        """True once the guard stopped training (or a collective failed)."""
        return self.state.halted or self._aborted is not None

    @property
    def exit_code(self) -> int:
        """0, or :data:`~gradience.errors.EXIT_GUARD_HALTED` when the guard stopped the run."""
        return EXIT_GUARD_HALTED if self.halted else 0

    def integrity_status(self) -> str:
        """OK (no fault), RECOVERED (faults handled), ABORTED (halted), FAULTED (faults, guard disabled)."""
        s = self.state
        if self.halted:
            return "ABORTED"
        if s.first_fault_step is None:
            return "OK"
        return "RECOVERED" if self.config.guard_enabled else "FAULTED"

    def summary(self) -> dict[str, Any]:
        """The run summary (what :meth:`finalize` writes)."""
        s = self.state
        return {
            "total_steps": self.steps_seen,
            "final_step": self.last_step,
            "final_loss": self.last_loss,
            "world_size": self.comm.world_size if self.comm else 1,
            "guard": {
                "enabled": self.config.guard_enabled,
                "integrity_status": self.integrity_status(),
                "total_rollbacks": s.total_rollbacks,
                "total_skipped_steps": s.skipped_steps,
                "scaler_skipped_steps": self.scaler_skips,
                "halt_reason": (s.halt_reason.value if s.halt_reason else self._aborted),
                "lr_scale": s.lr_scale,
                "first_fault_step": s.first_fault_step,
                "first_fault_ranks": list(s.first_fault_ranks),
                "snapshots": list(s.committed),
            },
            "spectral": {"final_kappa": None, "final_risk_level": None},
            # Identical on every replica of a healthy data-parallel run (compare the ranks' summary events).
            "weights_fingerprint": self._weights_fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Guard state for checkpoints (identical on all ranks)."""
        return {"version": STATE_VERSION, "guard_state": self.state.to_dict(), "steps_seen": self.steps_seen,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported gradience state version {state.get('version')!r}")
        self.state = GuardState.from_dict(state["guard_state"])
        self.steps_seen = int(state["steps_seen"])
        self.last_step = state["last_step"]

    # ------------------------------------------------------------------------------------------ effects
    def _act(self, step: int, verdict: Verdict, decision: Decision) -> None:
        if self.store is not None and self.store.pending_step is not None:
            # Every rank sees the same decisions and steps, so they finish or drop it at the same point.
            if decision.action in (Action.ROLLBACK, Action.HALT):
                self._abandon_pending(step)
            elif decision.action is Action.SNAPSHOT or step >= self._pending_due:
                self._commit_pending(step)
        if decision.action is Action.SNAPSHOT:
            self._snapshot(step, background=self.config.guard_snapshot_commit_lag > 0)
        elif decision.action is Action.ROLLBACK:
            self._rollback(step, verdict, decision)
        elif decision.action is Action.HALT:
            self._emit_halt(step, verdict, decision)

    def _snapshot(self, step: int, *, background: bool = False) -> bool | None:
        """Snapshot ``step``: committed now, or (``background``) written in a thread and committed
        ``guard_snapshot_commit_lag`` steps later if no rollback comes first."""
        meta = {"step": step, "rank": self.comm.rank, "world_size": self.comm.world_size,
                "lr_scale": self.state.lr_scale, "guard_state": self.state.to_dict()}
        if self._save_fn is not None:
            self.store.begin(step, meta=meta, save_fn=self._save_fn)
        else:
            # A background write reads the copy while training goes on: it must not alias live tensors.
            copy = self.config.guard_snapshot_tier == "memory" or background
            self.store.begin(step, meta=meta, capture=lambda: capture_state(self.model, self.optimizer, copy=copy),
                             background=background)
        if background:
            self._pending_due = step + self.config.guard_snapshot_commit_lag
            return None
        return self._commit_pending(step)

    def _commit_pending(self, step: int) -> bool:
        snap = self.store.pending_step
        ok = self._collective(self.store.finish)
        if ok:
            self.state = policy.on_snapshot_committed(self.state, snap, self.config)
            self.store.prune(self.state.committed)
        error = self.store.last_error
        if not ok:
            logger.warning("Gradience: snapshot of step %d was not committed (%s); the rollback target stays at "
                           "step %s", snap, f"{type(error).__name__}: {error}" if error else "another rank failed",
                           self.state.committed[-1] if self.state.committed else None)
        self.telemetry.emit("snapshot", step=snap, committed=ok, committed_at=step,
                            tier=self.config.guard_snapshot_tier, path=str(self.store.step_dir(snap)) if ok else None,
                            local_error=f"{type(error).__name__}: {error}" if error else None)
        return ok

    def _abandon_pending(self, step: int) -> None:
        snap = self.store.abandon()
        if snap is not None:
            self.telemetry.emit("snapshot", step=snap, committed=False, committed_at=None,
                                tier=self.config.guard_snapshot_tier, path=None,
                                local_error=f"abandoned at step {step}: a fault came before its commit")

    def _rollback(self, step: int, verdict: Verdict, decision: Decision) -> None:
        first_reason = decision.reason
        bad = self._bad_weights(verdict)  # before the restore overwrites the evidence
        while decision.action is Action.ROLLBACK:
            target = decision.target_step
            prepared = self.store.prepare(target)
            if self._collective(agree_all, self.comm, prepared is not None):
                self._restore_everywhere(step, prepared)
                self.telemetry.emit(
                    "rollback_success", step=step, to_step=target, reason=first_reason, lr=self._lr(),
                    lr_scale=self.state.lr_scale, faulty_ranks=verdict.faulty_ranks,
                    local_bad_params=bad, total_rollbacks=self.state.total_rollbacks)
                return
            self.telemetry.emit("rollback_failed", step=step, to_step=target, reason="SNAPSHOT_UNREADABLE",
                                local_ok=prepared is not None)
            self.state, decision = policy.on_restore_failed(self.state, target, self.config)
            self.store.prune(self.state.committed)
        self._emit_halt(step, verdict, decision)

    def _emit_halt(self, step: int, verdict: Verdict, decision: Decision) -> None:
        self.telemetry.emit("abort", step=step, reason=decision.reason, faulty_ranks=verdict.faulty_ranks,
                            total_rollbacks=self.state.total_rollbacks)

    def _restore_everywhere(self, step: int, prepared: Any) -> None:
        """Restore on this rank, then agree that every rank managed; a failure anywhere stops every rank."""
        error = None
        try:
            self._restore(prepared)
        except Exception as e:  # the model may be half-restored: no rank may train on
            error = e
        if not self._collective(agree_all, self.comm, error is None):
            where = f"on this rank: {type(error).__name__}: {error}" if error else "on another rank"
            self.state = dataclasses.replace(self.state, halted=True, halt_reason=Reason.NO_GOOD_SNAPSHOT)
            self._emit_fatal(step, "RESTORE_FAILED", where)
            raise SnapshotError(f"restoring snapshot {prepared.step} failed {where}") from error

    def _restore(self, prepared: Any) -> None:
        factor = self.config.guard_lr_backoff
        optimizer = self.optimizer
        # The LR in force now (schedule position x current scale); a restore must not rewind it.
        lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else None
        lr = self._get_lr() if optimizer is None and self._get_lr is not None else None
        if self._load_fn is not None:
            self._load_fn(str(prepared.path))
        else:
            restore_state(prepared.tensors, prepared.meta, self.model, optimizer)
        if optimizer is not None:
            for group, value in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = value
            scale_lr(optimizer, self.scheduler, factor)
        elif self._set_lr is not None:
            self._set_lr(lr * factor)

    # ------------------------------------------------------------------------------------------ plumbing
    def _probe(self, phase: Phase, step: int, fn: Callable[[], ProbeReport]) -> ProbeReport:
        try:
            return fn()
        except Exception as e:  # a raising probe must still take part in the collective
            self.telemetry.emit("probe_error", step=step, phase=phase, error=f"{type(e).__name__}: {e}")
            return ProbeReport(phase=phase, step=step, probe_error=True)

    def _agree(self, report: ProbeReport) -> Verdict:
        return self._collective(agree, report, self.comm)

    def _collective(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ConsensusTimeout as e:
            self._aborted = "CONSENSUS_TIMEOUT"
            self._emit_fatal(self.last_step, "CONSENSUS_TIMEOUT", str(e))
            raise

    def _emit_fatal(self, step: int | None, reason: str, error: str) -> None:
        """An error that stops every rank: the event, and a summary that says ABORTED (the caller raises)."""
        self.telemetry.emit("abort", step=step, reason=reason, error=error)
        self.telemetry.write_summary(self.summary())

    def _weights_fingerprint(self) -> str | None:
        if self.model is None:
            return None
        return f"{int(fingerprint_tensor(parameters(self.model))):013x}"

    def _lr(self) -> float | None:
        if self._get_lr is not None:
            return float(self._get_lr())
        return current_lr(self.optimizer) if self.optimizer is not None else None

    def _next_step(self) -> int:
        return 0 if self.last_step is None else self.last_step + 1

    def _bad_grads(self, report: ProbeReport) -> list[str]:
        if not report.faulty or self.model is None:
            return []
        named = ((n, p.grad) for n, p in self.model.named_parameters())
        return bad_parameters(named, threshold=self.config.guard_violation_threshold)

    def _bad_weights(self, verdict: Verdict) -> list[str]:
        if self.comm.rank not in verdict.faulty_ranks or self.model is None:
            return []
        return bad_parameters(self.model.named_parameters(), threshold=self.config.guard_violation_threshold)

    def _require_initialized(self) -> None:
        if self.telemetry is None:
            raise RuntimeError("GradienceController.initialize(model, ...) must be called first")


def _params_of(optimizer: torch.optim.Optimizer | None, model: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    if optimizer is not None:
        return [p for g in optimizer.param_groups for p in g["params"]]
    if model is not None:
        return list(model.parameters())
    raise ValueError("before_optimizer_step needs a model or an optimizer")



def _unscale(scaler: Any | None, optimizer: torch.optim.Optimizer | None) -> bool:
    """Unscale the gradients once (as clipping would) and say whether the scaler found inf/NaN."""
    if scaler is None or optimizer is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    return bool(sum(v.item() for v in state["found_inf_per_device"].values()))
