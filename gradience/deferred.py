"""The asynchronous verdict (``guard_verdict="async"``): the gradient gate decided on the device, one all-reduce
per step, the host reading the verdict one step later.

Per step ``t``:

* ``gate(t)`` (before ``optimizer.step()``): the gradients' total norm and this step's loss, plus the weights,
  buffers and loss that ``note_step(t-1)`` left on the device, become flags in one float64 vector on the
  device; one MAX all-reduce (enqueued on the stream under NCCL) makes them every rank's; the fused optimizer
  reads the result as ``found_inf`` and skips the update on the device, as under a ``GradScaler``: parameters,
  moments and step counts stay bitwise unchanged. The vector is copied to pinned host memory behind an event.
* ``read()`` (in ``step(t)``, after the update was enqueued): waits on that event, which was recorded before the
  optimizer's kernels, so the device keeps running the update meanwhile, and returns the gradients' verdict of
  ``t`` and the weights' verdict of ``t-1``.
* ``note_step(t)``: the weights' check of ``t`` on the device, for ``gate(t+1)``.

So a bad gradient is skipped in its own step, and a weight fault is acted on one step later; in between the
gate skips the update it would poison (NaN weights give NaN gradients, and the weights' flags of ``t-1`` close
the gate of ``t`` themselves). The price of deciding on the device: a total norm above
``guard_violation_threshold`` counts as a violation (the exact max|x| fallback would need the host), and an
overflowing norm as non-finite.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from gradience import policy
from gradience.comm import KINDS
from gradience.errors import CollectiveMismatch, ConsensusTimeout
from gradience.norms import TotalNorm
from gradience.probe import loss_reads
from gradience.types import Action, Phase, Reason, Verdict

logger = logging.getLogger(__name__)

MODES = ("auto", "sync", "async")
_G = 4  # gradient block: nonfinite, violation, norm (inf for NaN), NaN, loss (-inf: none)
_W = _G + 5  # weights block: present, nonfinite w, violation w, NaN buffer, nonfinite loss, violation loss,
#              norm (inf for NaN), NaN, loss (-inf: none)
_R = _W + 9  # one slot per rank for the gradients' faults, then one per rank for the weights'
_CODE = KINDS.index("check:grads") + 1


def refusal(config: Any, optimizer: Any, backend: Any, comm: Any, scaler: Any) -> str | None:
    """Why this run cannot decide on the device (None: it can)."""
    from gradience.backends import PlainBackend

    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return "the optimizer does not read found_inf (use a fused torch optimizer, e.g. AdamW(fused=True))"
    if not isinstance(backend, PlainBackend):
        return f"the {type(backend).__name__} state is checked by the synchronous path"
    if scaler is not None:
        return "a GradScaler sets found_inf itself"
    if config.spike_action == "skip":
        return "spike_action='skip' needs the host's spike statistics before the update"
    if config.fingerprint_interval:
        return "replica fingerprints are compared by the synchronous path"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = {p.device for p in params}
    if len(devices) != 1:
        return f"the parameters are on {len(devices)} devices"
    if comm.world_size > 1 and getattr(comm, "device", None) != next(iter(devices)):
        return f"the guard's group runs on {getattr(comm, 'device', None)}, the parameters on {next(iter(devices))}"
    return None


class Deferred:
    """Device-side flags and their delayed read-back for one controller (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Any, threshold: float) -> None:
        self.optimizer, self.comm, self.threshold = optimizer, comm, threshold
        self.device = next(p.device for g in optimizer.param_groups for p in g["params"])
        self._grads, self._weights, self._buffers = TotalNorm(), TotalNorm(), TotalNorm()
        self._noted: torch.Tensor | None = None  # weights block left by note_step
        self._pending: tuple[Any, torch.Tensor, int] | None = None  # (event, host vector, step) of the last gate
        self._seq = 0
        self._n = _R + 2 * comm.world_size

    # ---------------------------------------------------------------- per step
    @torch.no_grad()
    def gate(self, grads: list[torch.Tensor], loss: torch.Tensor | float | None, step: int) -> None:
        """Flags of this step's gradients (and the noted weights), agreed on the device; sets ``found_inf``."""
        self._seq += 1
        vec = torch.zeros(self._n, dtype=torch.float64, device=self.device)
        vec[0], vec[1], vec[2], vec[3] = _CODE, -_CODE, self._seq, -self._seq
        norm = self._grads(grads, self.device)
        vec[_G:_W] = torch.stack([*self._screen(norm), _enc(norm), norm.isnan().double(),
                                  _loss_stats(loss, self.device)[0]])
        if self._noted is not None:
            vec[_W:_R] = self._noted
        rank, ws = self.comm.rank, self.comm.world_size
        vec[_R + rank] = vec[_G:_G + 2].amax()
        vec[_R + ws + rank] = vec[_W + 1:_W + 6].amax() * vec[_W]
        if self.comm.world_size > 1:
            self.comm.all_reduce_device_max(vec)
        bad = vec[_R:].amax()  # any rank's gradients or noted weights
        self.optimizer.found_inf = (bad > 0).to(torch.float32)
        if self.device.type == "cuda":
            host = torch.empty(self._n, dtype=torch.float64, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = vec, None
        self._pending = (event, host, step)
        self._noted = None

    @torch.no_grad()
    def note_step(self, weights: list[torch.Tensor], buffers: list[torch.Tensor], loss: Any) -> None:
        """The weights' check of this step, left on the device for the next gate."""
        norm = self._weights(weights, self.device)
        b_nan = self._buffers(buffers, self.device).isnan().double()
        mean, big = _loss_stats(loss, self.device)
        l_nonfinite = (~big.isfinite()).double()
        l_violation = (big.isfinite() & (big > self.threshold)).double()
        one = torch.ones((), dtype=torch.float64, device=self.device)
        self._noted = torch.stack([one, *self._screen(norm), b_nan, l_nonfinite, l_violation, _enc(norm),
                                   norm.isnan().double(), mean])

    def pending(self) -> bool:
        """Whether a gate's vector waits to be read."""
        return self._pending is not None

    def read(self, timeout_s: float) -> tuple[Verdict, Verdict | None]:
        """(this step's gradients' verdict, the previous step's weights' verdict or None) from the last gate;
        both labelled with this step."""
        event, host, step = self._pending
        self._pending = None
        if event is not None:
            deadline = time.monotonic() + timeout_s
            pause = 1e-5
            while not event.query():  # poll: the host never blocks past the deadline
                if time.monotonic() > deadline:
                    raise ConsensusTimeout(f"the guard's flags of step {step} did not arrive within {timeout_s:g}s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        v = host.tolist()
        if v[0] != -v[1] or v[2] != -v[3]:
            raise CollectiveMismatch(
                f"ranks are not making the same Gradience call at step {step}: gate call counts {-v[3]:g} vs "
                f"{v[2]:g}. Every rank must call before_optimizer_step/step the same number of times.")
        ws = self.comm.world_size
        grads = Verdict(phase=Phase.GRADS, step=step, world_size=ws, nonfinite_grads=v[_G] > 0,
                        violation_grads=v[_G + 1] > 0, grad_norm=math.nan if v[_G + 3] > 0 else v[_G + 2],
                        loss=v[_G + 4] if v[_G + 4] != -math.inf else None,
                        faulty_ranks=tuple(r for r in range(ws) if v[_R + r] > 0))
        if not v[_W]:
            return grads, None
        weights = Verdict(phase=Phase.STEP, step=step, world_size=ws,
                          nonfinite_weights=v[_W + 1] > 0, violation_weights=v[_W + 2] > 0,
                          nonfinite_buffers=v[_W + 3] > 0, nonfinite_loss=v[_W + 4] > 0,
                          violation_loss=v[_W + 5] > 0, weight_norm=math.nan if v[_W + 7] > 0 else v[_W + 6],
                          loss=v[_W + 8] if v[_W + 8] != -math.inf else None,
                          faulty_ranks=tuple(r for r in range(ws) if v[_R + ws + r] > 0))
        return grads, weights

    def release(self) -> None:
        """Stop steering the optimizer (after its update, and for good at the end)."""
        if "found_inf" in self.optimizer.__dict__:
            del self.optimizer.found_inf

    def _screen(self, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        finite = norm.isfinite()
        return (~finite).double(), (finite & (norm > self.threshold)).double()


class AsyncVerdict:
    """The controller's side of the asynchronous verdict (a mixin of :class:`GradienceController`)."""

    def _step_async(self, step: int, loss: torch.Tensor | float | None, tick: int) -> bool:
        """``step`` under the asynchronous verdict: act on this step's gradients and the last step's weights
        (read from the gate's vector), then leave this step's weights' check on the device for the next gate."""
        d = self._deferred
        grads, weights = self._collective(step, d.read, self.config.collective_timeout_s)
        d.release()
        skipped = grads.fault_reason() is not None or (weights is not None and weights.fault_reason() is not None)
        self._prior = self.state
        self.state, decision = policy.decide(self.state, grads, self.config)
        if decision.reason is Reason.SPIKE and decision.action is Action.CONTINUE:
            self.telemetry.emit("spike", step=step, action="log", detail=decision.detail, **self._blame(grads))
        if decision.action is Action.SKIP_STEP:
            bad = self.backend.bad(self.config.guard_violation_threshold, grads=True)
            self.telemetry.emit("skip_step", step=step, reason=decision.reason, **self._blame(grads),
                                grad_norm=grads.grad_norm, bad=bad, detail=decision.detail)
        elif decision.action is not Action.CONTINUE:
            self._act(step, grads, decision)  # a rollback or a halt: the weights' verdict is moot
        if decision.action in (Action.CONTINUE, Action.SKIP_STEP):
            base = weights or Verdict(phase=Phase.STEP, step=step, world_size=self.comm.world_size)
            verdict = dataclasses.replace(base, tick=tick, update_skipped=skipped)
            self.last_loss = verdict.loss if weights is not None else self.last_loss
            if self._spectral is not None and policy.spectral_due(tick, self.config, self.state):
                verdict = dataclasses.replace(verdict, **self._spectral.measure())
            self._decide_step(step, verdict, verified=True)
        if not self.halted:
            weights_now, buffers = self.backend.check_tensors()
            d.note_step(weights_now, buffers, loss)
        return not self.halted

    def _choose_verdict(self, scaler: Any) -> None:
        """Pick the synchronous or asynchronous verdict once, at the first gate (every rank alike)."""
        self._verdict_chosen = True
        mode = self.config.guard_verdict
        if mode == "sync" or self.optimizer is None or not self.config.guard_enabled:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if mode == "auto" and (not params or params[0].device.type == "cpu"):
            return
        why = refusal(self.config, self.optimizer, self.backend, self.comm, scaler)
        if why is not None:
            log = logger.warning if mode == "async" else logger.info
            log("Gradience: guard_verdict=%r: the verdict stays synchronous: %s", mode, why)
            return
        self._deferred = Deferred(self.optimizer, self.comm, self.config.guard_violation_threshold)
        logger.info("Gradience: asynchronous verdict: the gradient gate runs on %s (found_inf), weight faults are "
                    "acted on one step later", self._deferred.device)


def _enc(norm: torch.Tensor) -> torch.Tensor:
    """A magnitude MAX can reduce: NaN travels as its own flag and as +inf here."""
    return torch.nan_to_num(norm, nan=math.inf, posinf=math.inf)


def _loss_stats(loss: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max |element|) of the loss as 0-d float64 tensors on ``device``, by the probe's rule for what is
    read of a loss; (-inf, 0) when there is none. A NaN mean reads as -inf, "none", for the spike rule (the
    maximum carries the NaN to the loss check)."""
    reads = loss_reads(loss)
    if len(reads) == 1:
        mean = reads[0].to(device, torch.float64)
        big = mean.abs()
    elif reads:
        mean, big = (r.to(device) for r in reads)
    elif isinstance(loss, int | float):
        mean = torch.full((), float(loss), dtype=torch.float64, device=device)
        big = mean.abs()
    else:
        return (torch.full((), -math.inf, dtype=torch.float64, device=device),
                torch.zeros((), dtype=torch.float64, device=device))
    return torch.nan_to_num(mean, nan=-math.inf), big
