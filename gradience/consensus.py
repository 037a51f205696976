"""Agreement: pack a rank's ProbeReport into one vector, ONE all-reduce (MAX), unpack the same Verdict.

Everything is encoded so that MAX is the right reduction: flags are 0/1 (MAX = any), magnitudes are
non-negative (MAX = worst; NaN travels as its own flag, since MAX over NaN is not defined across backends),
a fingerprint is sent as (f, -f) so MAX yields (max f, -min f) and a mismatch shows as max != min, and a
one-hot slot per rank turns MAX into the set of faulty ranks. A rank without a fingerprint (its probe raised,
or it has none this step) sends (-inf, -inf), which MAX ignores, so it cannot fake a divergence.

The comm's frame header carries the phase (call kind) and the step label, so ranks in different checks are
detected there (:class:`~gradience.errors.CollectiveMismatch`), not MAX-ed together.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from gradience.comm import Comm
from gradience.types import Phase, ProbeReport, Verdict

_FLAGS = (
    "probe_error",
    "nonfinite_loss",
    "nonfinite_grads",
    "nonfinite_weights",
    "nonfinite_buffers",
    "violation_loss",
    "violation_grads",
    "violation_weights",
    "update_skipped",
    "scaler_overflow",
    "persist_busy",
)
_MAGS = ("grad_norm", "weight_norm")
_NAN = len(_FLAGS) + len(_MAGS)  # one "is NaN" flag per magnitude
_FP = _NAN + len(_MAGS)
# κ̃, stable rank and loss: MAX over ranks (κ̃ is equal on replicas; the loss is each rank's own, and the
# largest is what the spike rule judges, so one rank's spike is everyone's decision). Absent: -inf.
_SPEC = ("spectral_kappa", "stable_rank", "loss")
_SP = _FP + 2
_RANKS = _SP + len(_SPEC)


def pack(report: ProbeReport, rank: int, world_size: int) -> torch.Tensor:
    """The vector this rank contributes to the all-reduce (CPU float64), built as one list: element-wise
    tensor writes cost microseconds each, and this runs twice per step."""
    vals = [float(getattr(report, name)) for name in _FLAGS]
    mags = [getattr(report, name) for name in _MAGS]
    vals += [math.inf if math.isnan(v) else v for v in mags]
    vals += [1.0 if math.isnan(v) else 0.0 for v in mags]
    fp = report.fingerprint
    vals += [fp, -fp] if fp is not None else [-math.inf, -math.inf]
    for name in _SPEC:
        v = getattr(report, name)
        vals.append(v if v is not None and not math.isnan(v) else -math.inf)
    ranks = [0.0] * world_size
    if report.faulty:
        ranks[rank] = 1.0
    return torch.tensor(vals + ranks, dtype=torch.float64)


def unpack(vec: torch.Tensor, report: ProbeReport, world_size: int, tick: int | None = None) -> Verdict:
    """The Verdict encoded by a reduced vector (``tick``: the guard's clock, carried along)."""
    v = vec.tolist()
    flags = {name: v[i] > 0 for i, name in enumerate(_FLAGS)}
    mags = {name: (math.nan if v[_NAN + i] > 0 else v[len(_FLAGS) + i]) for i, name in enumerate(_MAGS)}
    hi, neg_lo = v[_FP], v[_FP + 1]
    return Verdict(
        phase=report.phase,
        step=report.step,
        world_size=world_size,
        tick=tick,
        # Both -inf: nobody sent a fingerprint this step.
        replica_divergence=math.isfinite(hi) and hi != -neg_lo,
        faulty_ranks=tuple(r for r in range(world_size) if v[_RANKS + r] > 0),
        **{name: (v[_SP + i] if v[_SP + i] != -math.inf else None) for i, name in enumerate(_SPEC)},
        **flags,
        **mags,
    )


def agree(report: ProbeReport, comm: Comm, tick: int | None = None) -> Verdict:
    """One all-reduce; every rank returns the same Verdict (``tick``: the guard's clock, carried along).

    Raises ConsensusTimeout if a peer is missing and CollectiveMismatch if the ranks are in different checks.
    """
    if comm.world_size == 1:
        return alone(report, tick)
    vec = pack(report, comm.rank, comm.world_size)
    kind = "check:grads" if report.phase is Phase.GRADS else "check:step"
    vec = comm.all_reduce_max(vec, kind=kind, step=report.step)
    verdict = unpack(vec, report, comm.world_size, tick)
    if verdict.replica_divergence and not verdict.faulty_ranks:
        # No rank saw a fault of its own: which replica is "right" is unknowable, so every rank is suspect.
        verdict = dataclasses.replace(verdict, faulty_ranks=tuple(range(comm.world_size)))
    return verdict


def alone(report: ProbeReport, tick: int | None = None) -> Verdict:
    """The Verdict of a group of one: what ``unpack(pack(report))`` gives, without the round trip through a
    tensor (it runs twice per step)."""
    spec = {name: getattr(report, name) for name in _SPEC}
    return Verdict(
        phase=report.phase, step=report.step, world_size=1, tick=tick,
        faulty_ranks=(0,) if report.faulty else (),
        grad_norm=report.grad_norm, weight_norm=report.weight_norm,
        **{name: getattr(report, name) for name in _FLAGS},
        **{name: None if v is None or math.isnan(v) or v == -math.inf else v for name, v in spec.items()},
    )
