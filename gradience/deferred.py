"""The asynchronous verdict (``guard_verdict="async"``): the gradient gate decided on the device, the host reading
every verdict one step later, without waiting for the device.

Per step ``t``:

* ``gate(t)`` (before ``optimizer.step()``): the gradients' total norm and this step's loss become flags in a
  float64 vector on the device; with several ranks one MAX all-reduce (enqueued on the stream under NCCL) makes
  them every rank's; the fused optimizer reads the result as ``found_inf`` and skips the update on the device,
  as under a ``GradScaler``: parameters, moments and step counts stay bitwise unchanged.
* ``note_step(t)`` (in ``step(t)``, after the update was enqueued): the weights', buffers' and loss's flags of
  ``t`` in a second vector, agreed the same way.
* Each vector is copied to pinned host memory behind an event. ``read()`` in ``step(t+1)`` takes the vectors of
  ``t``: by then the device has long finished them (it waits only if the host ran more than a step ahead), so
  the host never stops for the device in the steady state.

``read()`` returns the same Verdicts the synchronous path agrees on, tagged with the tick and step they judge
(the weights' one says whether the device skipped that update): the controller feeds them to the same policy.
So a bad gradient is skipped in its own step on the device and reported one step later, and a weight fault of
step ``t`` is acted on in ``step(t+1)``; in between the gate skips the update it would poison (NaN weights
give NaN gradients). This module also decides whether a run (:func:`choose`) and a step (:func:`path_of_step`)
can take this path. The price of deciding on the device: a total norm above ``guard_violation_threshold``
counts as a violation (the exact max|x| fallback would need the host), and an overflowing norm as non-finite.
Nothing is written into a device tensor from a host number in the steady state: each such write is a
synchronous copy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from gradience.backends import PlainBackend
from gradience.comm import KINDS
from gradience.consensus import alone
from gradience.errors import CollectiveMismatch, ConsensusTimeout
from gradience.norms import TotalNorm
from gradience.probe import bad_named, loss_reads
from gradience.state import take
from gradience.types import Phase, ProbeReport, Verdict

logger = logging.getLogger(__name__)

MODES = ("auto", "sync", "async")
_HEAD = 4  # frame (several ranks): call kind, -kind, call count, -count (MAX exposes ranks in different calls)
# Gradients: norm (NaN as +inf, so MAX reduces it), NaN?, loss (-inf: none), the check raised, 5 unused.
# Weights: norm (NaN as +inf), NaN?, a buffer NaN?, loss (-inf: none), max |loss| (NaN as +inf), a rank still
# writing a snapshot's shard, κ̃ and stable rank (-inf: no probe), the check raised. Flags are derived on the
# host from these; several ranks add one slot per rank.
_GRADS, _STEP = KINDS.index("check:grads") + 1, KINDS.index("check:step") + 1


def refusal(config: Any, optimizer: Any, backend: Any, comm: Any) -> str | None:
    """Why this run cannot decide on the device (None: it can)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return "the optimizer does not read found_inf (use a fused torch optimizer, e.g. AdamW(fused=True))"
    if not isinstance(backend, PlainBackend):
        return f"the {type(backend).__name__} state is checked by the synchronous path"
    if config.spike_action == "skip":
        return "spike_action='skip' needs the host's spike statistics before the update"
    if config.fingerprint_interval:
        return "replica fingerprints are compared by the synchronous path"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = {p.device for p in params}
    if len(devices) != 1:
        return f"the parameters are on {len(devices)} devices"
    if comm.world_size > 1 and comm.device != next(iter(devices)):
        return f"the guard's group runs on {comm.device}, the parameters on {next(iter(devices))}"
    return None


class _Channel:
    """One kind of flags vector: with several ranks its device-side frame (no host write per step) and the
    all-reduce; the staged host copy."""

    def __init__(self, kind: int, comm: Any, device: torch.device) -> None:
        self.comm, self.device = comm, device
        self.several = comm.world_size > 1
        self.off = _HEAD if self.several else 0
        if self.several:
            self._head = torch.tensor([kind, -kind, 0.0, -0.0], dtype=torch.float64, device=device)
            self._tick = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64, device=device)
        #: (event, host vector, step, what goes with it: the gate's per-tensor norms or None)
        self.staged: tuple[Any, torch.Tensor, int, torch.Tensor | None] | None = None

    def send(self, values: list[torch.Tensor], bad: Any, step: int, parts: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Pack ``values`` (0-d float64 tensors; ``bad()``: this rank's fault flag, asked for with several
        ranks only), all-reduce them with several ranks, stage the host copy (with ``parts``); returns the
        (reduced) vector."""
        vec = torch.stack(values)
        if self.several:
            self._head.add_(self._tick)
            slots = torch.zeros(self.comm.world_size, dtype=torch.float64, device=self.device)
            slots[self.comm.rank] = bad()
            vec = torch.cat([self._head, vec, slots])
            self.comm.all_reduce_device_max(vec)
        if self.device.type == "cuda":
            host = take(vec, False, "pinned")
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = vec, None
        self.staged = (event, host, step, parts)
        return vec

    def take(self, staged: tuple[Any, torch.Tensor, int, Any] | None,
             timeout_s: float) -> tuple[list[float], tuple[int, ...] | None, int] | None:
        """A staged vector's (values, the ranks that flagged a fault or None with one rank, step), waiting within
        the deadline only if the device is behind."""
        if staged is None:
            return None
        event, host, step, _ = staged
        if event is not None:
            deadline = time.monotonic() + timeout_s
            pause = 1e-5
            while not event.query():  # poll: the host never blocks past the deadline
                if time.monotonic() > deadline:
                    raise ConsensusTimeout(f"the guard's flags of step {step} did not arrive within {timeout_s:g}s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        v = host.tolist()
        if not self.several:
            return v, None, step
        if v[0] != -v[1] or v[2] != -v[3]:
            raise CollectiveMismatch(
                f"ranks are not making the same Gradience call at step {step}: call counts {-v[3]:g} vs "
                f"{v[2]:g}. Every rank must call before_optimizer_step/step the same number of times.")
        ws = self.comm.world_size
        return v[_HEAD:-ws], tuple(r for r, x in enumerate(v[-ws:]) if x > 0), step


class Deferred:
    """Device-side flags and their delayed read-back for one controller (see the module docstring).

    Each step's vectors are staged under the step's tick: the gate's (``gate``), then the weights' (``note_step``);
    :meth:`read` returns the previous step's pair as Verdicts tagged with their tick and step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Any, threshold: float) -> None:
        self.optimizer, self.comm, self.threshold = optimizer, comm, threshold
        self.device = next(p.device for g in optimizer.param_groups for p in g["params"])
        self._grads, self._weights, self._buffers = TotalNorm(), TotalNorm(), TotalNorm()
        self._g = _Channel(_GRADS, comm, self.device)
        self._w = _Channel(_STEP, comm, self.device)
        #: This step's staged vectors (tick, gate's, weights'), and the previous step's (read in this step).
        self._cur: list[Any] | None = None
        self._prev: list[Any] | None = None
        #: This rank's error text of a check that raised, by (tick, phase), until its verdict is judged.
        self.errors: dict[tuple[int | None, Phase], str] = {}
        # Per-tensor gradient norms of the gate just read (names for a skip).
        self._read_parts: torch.Tensor | None = None
        self._zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._one = torch.ones((), dtype=torch.float64, device=self.device)
        self._none = torch.full((), -math.inf, dtype=torch.float64, device=self.device)

    # ---------------------------------------------------------------- per step
    @torch.no_grad()
    def gate(self, grads: list[torch.Tensor], loss: torch.Tensor | float | None, step: int, tick: int) -> None:
        """Flags of this step's gradients, agreed on the device; sets ``found_inf``. A check that raises takes part
        all the same, as a probe error (the update goes ahead, as on the synchronous path)."""
        z = self._zero  # both vectors have one length: ranks in different calls then fail the frame check
        try:
            raw = self._grads(grads, self.device)
            norm = _enc(raw)  # NaN -> inf: "not <= threshold" either way
            values, parts = [norm, raw.isnan().double(), self._loss(loss)[0], z], self._grads.per_tensor
        except Exception as e:  # a defect of the guard: it must not stop this rank from joining the all-reduce
            self.errors[(tick, Phase.GRADS)] = f"{type(e).__name__}: {e}"
            norm, values, parts = z, [z, z, self._none, self._one], None
        vec = self._g.send(values + [z] * 5, lambda: ((norm > self.threshold) | (values[3] > 0)).double(), step, parts)
        self.optimizer.found_inf = (vec[self._g.off] > self.threshold).float()
        self._cur = [tick, self._g.staged, None]

    @torch.no_grad()
    def note_step(self, weights: list[torch.Tensor], buffers: list[torch.Tensor], loss: Any, step: int, *,
                  busy: bool = False, spectral: dict[str, float | None] | None = None) -> None:
        """The weights' check of this step, agreed on the device and read in the next step. ``busy``: this
        rank is still writing a snapshot's shard; ``spectral``: this step's κ̃ and stable rank (probe steps
        only: the one host number written to the device, agreed by the MAX as on the synchronous path). A check
        that raises takes part all the same, as a probe error."""
        z, t = self._zero, self.threshold
        kappa, srank = (self._host(spectral.get(k)) for k in ("spectral_kappa", "stable_rank")) if spectral else (
            self._none, self._none)
        try:
            raw = self._weights(weights, self.device)
            norm = _enc(raw)
            b_nan = self._buffers(buffers, self.device).isnan().double() if buffers else z
            mean, big = self._loss(loss)
            big, error = _enc(big), z
            values = [norm, raw.isnan().double(), b_nan, mean, big]
        except Exception as e:  # a defect of the guard: it must not stop this rank from joining the all-reduce
            self.errors[(self._cur[0] if self._cur else None, Phase.STEP)] = f"{type(e).__name__}: {e}"
            norm = b_nan = big = z
            values, error = [z, z, z, self._none, z], self._one
        self._w.send(values + [self._one if busy else z, kappa, srank, error],
                     lambda: ((norm > t) | (b_nan > 0) | (big > t) | (error > 0)).double(), step)
        if self._cur is not None:
            self._cur[2] = self._w.staged
        self._prev, self._cur = self._cur, None

    def gated(self) -> bool:
        """Whether this step's gate ran on the device (``step()`` then reads the previous step's verdicts)."""
        return self._cur is not None

    def staged(self) -> bool:
        """Whether verdicts are in flight that no step has read yet."""
        return self._prev is not None

    def forget(self) -> None:
        """Drop this step's vectors (after a rollback they describe a state that is gone)."""
        self._cur = None

    def bad_grads(self, model: torch.nn.Module | None, threshold: float) -> dict[str, Any] | None:
        """The parameters whose gradients made the verdict just read a fault, by their per-tensor L2 norm (NaN,
        inf or above ``threshold``), read back now (a fault may sync); None when the gate's norm pass kept no
        per-tensor values (a flat copy on a CPU, mixed dtypes) or they are not one per parameter."""
        if self._read_parts is None or model is None:
            return None
        norms = self._read_parts.unbind()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(norms) != len(params):  # parameters without gradients, or the groups changed since the gate
            return None
        names = {id(p): n for n, p in model.named_parameters()}
        # A tensor's L2 norm judged as a 0-d tensor: the probe's rule (NaN, inf or above the threshold) and listing.
        return bad_named([(names.get(id(p), "?"), v) for p, v in zip(params, norms, strict=True)], (),
                         threshold=threshold)

    def read(self, timeout_s: float) -> tuple[Verdict | None, Verdict | None]:
        """(the gradients' verdict, the weights' verdict) of the previous step, either None when there was none,
        both tagged with the tick and step they judge. The weights' verdict says whether the device skipped that
        step's update (``update_skipped``)."""
        prev, self._prev = self._prev, None
        if prev is None:
            return None, None
        tick, g_staged, w_staged = prev
        self._read_parts = g_staged[3] if g_staged is not None else None
        t = self.threshold
        grads = weights = None
        taken = self._g.take(g_staged, timeout_s)
        if taken is not None:
            (norm, nan, loss, error, *_), ranks, at = taken
            grads = self._verdict(ranks, tick, phase=Phase.GRADS, step=at, nonfinite_grads=norm == math.inf,
                                  probe_error=error > 0,
                                  violation_grads=math.isfinite(norm) and norm > t,
                                  grad_norm=math.nan if nan else norm, loss=loss)
        taken = self._w.take(w_staged, timeout_s)
        if taken is not None:
            (norm, nan, b_nan, loss, big, busy, kappa, srank, error), ranks, at = taken
            skipped = grads is not None and (grads.nonfinite_grads or grads.violation_grads)  # found_inf's rule
            weights = self._verdict(ranks, tick, phase=Phase.STEP, step=at, nonfinite_weights=norm == math.inf,
                                    violation_weights=math.isfinite(norm) and norm > t, nonfinite_buffers=b_nan > 0,
                                    nonfinite_loss=big == math.inf, violation_loss=math.isfinite(big) and big > t,
                                    weight_norm=math.nan if nan else norm, loss=loss, persist_busy=busy > 0,
                                    spectral_kappa=kappa, stable_rank=srank, update_skipped=skipped, late=True,
                                    probe_error=error > 0)
        return grads, weights

    def _verdict(self, ranks: tuple[int, ...] | None, tick: int, **report: Any) -> Verdict:
        """The agreed Verdict of a vector's host values: a group of one's (:func:`alone`: this rank is faulty when
        a flag is set; a loss of -inf is none), or with several ranks the ranks that flagged a fault."""
        late = report.pop("late", False)
        verdict = dataclasses.replace(alone(ProbeReport(**report), tick), late=late)
        if ranks is None:
            return verdict
        return dataclasses.replace(verdict, world_size=self.comm.world_size, faulty_ranks=ranks)

    def release(self) -> None:
        """Stop steering the optimizer (after its update, and for good at the end)."""
        if "found_inf" in self.optimizer.__dict__:
            del self.optimizer.found_inf

    def _host(self, value: float | None) -> torch.Tensor:
        return self._none if value is None else torch.tensor(float(value), dtype=torch.float64, device=self.device)

    def _loss(self, loss: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_stats(loss, self.device, self._none, self._zero)


def choose(config: Any, optimizer: Any, backend: Any, comm: Any) -> Deferred | None:
    """The asynchronous verdict's device side when this run can use it (once, at initialize; every rank alike),
    else None, saying why in the log when it was asked for. Steps a GradScaler steps, and steps whose parameters
    have no optimizer state yet, are synchronous all the same (:func:`path_of_step`)."""
    mode = config.guard_verdict
    if mode == "async" and optimizer is None and config.guard_enabled:
        logger.warning("Gradience: guard_verdict='async': the verdict stays synchronous: it needs optimizer= at "
                       "initialize (a save_fn/load_fn run has no optimizer the device could steer)")
    if mode == "sync" or optimizer is None or not (config.guard_enabled and config.guard_check_grads):
        return None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if mode == "auto" and (not params or params[0].device.type == "cpu"):
        return None
    why = refusal(config, optimizer, backend, comm)
    if why is not None:
        log = logger.warning if mode == "async" else logger.info
        log("Gradience: guard_verdict=%r: the verdict stays synchronous: %s", mode, why)
        return None
    deferred = Deferred(optimizer, comm, config.guard_violation_threshold)
    logger.info("Gradience: asynchronous verdict: the gradient gate runs on %s (found_inf), weight faults are "
                "acted on one step later", deferred.device)
    return deferred


_NOTED: set[tuple[int, str]] = set()


def path_of_step(deferred: Deferred | None, optimizer: Any, scaler: Any, disabled: tuple[str, ...] = ()) -> str:
    """"async" when this step's gate can run on the device: the run can, no check was switched off for raising
    (``disabled``), no GradScaler steps this update (it sets found_inf itself), and every parameter about to be
    updated already has optimizer state (re-checked each step: new groups, unfrozen parameters); else "sync",
    said once per cause and optimizer in the log."""
    if deferred is None:
        return "sync"
    if disabled:
        why = f"the {' and '.join(disabled)} check raised again and again and is off: the synchronous path skips it"
    elif scaler is not None and scaler.is_enabled():
        why = "a GradScaler steps this update and sets found_inf itself: such steps are synchronous"
    elif missing_state(optimizer):
        why = ("a parameter about to be updated has no optimizer state yet (the first step, a new param group, an "
               "unfrozen parameter): such steps are synchronous")
    else:
        return "async"
    if (id(optimizer), why) not in _NOTED:
        _NOTED.add((id(optimizer), why))
        logger.info("Gradience: asynchronous verdict: %s", why)
    return "sync"


def missing_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a parameter about to be updated has no optimizer state yet (a new group, an unfrozen parameter,
    the first step): a first update skipped on the device would leave the state the optimizer allocates
    uninitialised (fused SGD's momentum buffers come from ``empty_like``), so that step must be synchronous."""
    state = optimizer.state
    return any(p.grad is not None and not state.get(p) for g in optimizer.param_groups if not _stateless(optimizer, g)
               for p in g["params"])


def _stateless(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether the group's updates keep no state at all (plain SGD): nothing is left uninitialised by a skip."""
    return isinstance(optimizer, torch.optim.SGD) and not group.get("momentum")


def _enc(norm: torch.Tensor) -> torch.Tensor:
    """A magnitude MAX can reduce: NaN travels as its own flag and as +inf here."""
    return torch.nan_to_num(norm, nan=math.inf, posinf=math.inf)


def _loss_stats(loss: Any, device: torch.device, none: torch.Tensor, zero: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max |element|) of the loss as 0-d float64 tensors on ``device``, by the probe's rule for what is
    read of a loss; (``none`` = -inf, ``zero``) when there is none. A NaN mean reads as -inf, "none", for the
    spike rule (the maximum carries the NaN to the loss check)."""
    reads = loss_reads(loss)
    if len(reads) == 1:
        mean = reads[0].to(device, torch.float64)
        big = mean.abs()
    elif reads:
        mean, big = (r.to(device) for r in reads)
    elif loss is not None and not isinstance(loss, torch.Tensor):  # a number of any kind (numpy scalars too), as
        mean = torch.full((), float(loss), dtype=torch.float64, device=device)  # the synchronous probe reads it
        big = mean.abs()
    else:
        return none, zero
    return torch.nan_to_num(mean, nan=-math.inf), big
