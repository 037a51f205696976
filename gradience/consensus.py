"""Agreement: pack a rank's ProbeReport into one vector, ONE all-reduce (MAX), unpack the same Verdict.

Everything is encoded so that MAX is the right reduction: flags are 0/1 (MAX = any), magnitudes are
non-negative (MAX = worst), a fingerprint is sent as (f, -f) so MAX yields (max f, -min f) and a mismatch
shows as max != min, and a one-hot slot per rank turns MAX into the set of faulty ranks.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from gradience.comm import Comm
from gradience.types import ProbeReport, Verdict

_FLAGS = (
    "probe_error",
    "nonfinite_loss",
    "nonfinite_grads",
    "nonfinite_weights",
    "violation_loss",
    "violation_grads",
    "violation_weights",
    "update_skipped",
    "scaler_overflow",
)
_MAGS = ("grad_norm", "weight_norm")
_FP = len(_FLAGS) + len(_MAGS)
_RANKS = _FP + 2


def pack(report: ProbeReport, rank: int, world_size: int) -> torch.Tensor:
    """The vector this rank contributes to the all-reduce (CPU float64)."""
    vec = torch.zeros(_RANKS + world_size, dtype=torch.float64)
    for i, name in enumerate(_FLAGS):
        vec[i] = float(getattr(report, name))
    for i, name in enumerate(_MAGS):
        v = getattr(report, name)
        vec[len(_FLAGS) + i] = v if not math.isnan(v) else math.inf
    if report.fingerprint is not None:
        vec[_FP] = report.fingerprint
        vec[_FP + 1] = -report.fingerprint
    if report.faulty:
        vec[_RANKS + rank] = 1.0
    return vec


def unpack(vec: torch.Tensor, report: ProbeReport, world_size: int) -> Verdict:
    """The Verdict encoded by a reduced vector."""
    v = vec.tolist()
    flags = {name: v[i] > 0 for i, name in enumerate(_FLAGS)}
    mags = {name: v[len(_FLAGS) + i] for i, name in enumerate(_MAGS)}
    return Verdict(
        phase=report.phase,
        step=report.step,
        world_size=world_size,
        replica_divergence=v[_FP] != -v[_FP + 1],
        faulty_ranks=tuple(r for r in range(world_size) if v[_RANKS + r] > 0),
        **flags,
        **mags,
    )


def agree(report: ProbeReport, comm: Comm) -> Verdict:
    """One all-reduce; every rank returns the same Verdict. Raises ConsensusTimeout if a peer is missing."""
    vec = pack(report, comm.rank, comm.world_size)
    if comm.world_size > 1:
        vec = comm.all_reduce_max(vec)
    verdict = unpack(vec, report, comm.world_size)
    if verdict.replica_divergence:
        # Which replica is "right" is unknowable, so every rank counts as faulty.
        verdict = dataclasses.replace(verdict, faulty_ranks=tuple(range(comm.world_size)))
    return verdict
