"""Local health checks of one rank: NaN/Inf and magnitude of loss, gradients, weights and persistent buffers,
a replica fingerprint, and the slow per-tensor diagnostics that name the offenders. No collectives.

Each check is one pass over the tensors and one host sync, because a per-tensor ``isfinite().item()`` loop
costs tens of percent of a GPU step. The pass computes the total L2 norm (:class:`gradience.norms.TotalNorm`:
the norm gradient clipping reports, reduced the cheapest way for the device). NaN and Inf propagate through
it, and max|x| <= ||x||_2, so a norm within the threshold proves there is no violation. Only when the norm
exceeds the threshold (or overflows) is the exact max|x| computed, per tensor. The dtype rules (integers
skipped, float64 kept wide, complex by magnitude, float8 upcast) are :mod:`gradience.norms`'s; host values are
float64, so the threshold comparison never sees a narrowing artefact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypedDict

import torch

from gradience.guardrails import unscale
from gradience.norms import TotalNorm, max_abs, per_tensor
from gradience.norms import values as _values
from gradience.types import Phase, ProbeReport

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}
# 2**52: fingerprints must survive a float64 round trip through the all-reduce exactly.
_FP_MOD = 1 << 52


class BadTensors(TypedDict):
    """Offending tensors of one model, by name (see :func:`bad_tensors`)."""

    params: list[str]
    buffers: list[str]
    #: Offenders beyond ``limit`` that were not listed (0 when the lists are complete).
    more: int
    #: Tensors that could not be inspected (an exotic device or subclass); never counted as offenders.
    skipped: list[str]


def screen(tensors: Sequence[torch.Tensor], norm: float, threshold: float) -> tuple[bool, bool]:
    """(non-finite, violation) from a :func:`~gradience.norms.TotalNorm` value, computing the exact max|x| only
    if needed.

    A NaN norm is always a NaN element; an infinite one may be an overflow of finite elements, so it falls
    through to the exact pass like any norm above the threshold.
    """
    if math.isnan(norm):
        return True, False
    if norm <= threshold:
        return False, False
    with torch.no_grad():
        return _screen_exact(tensors, threshold)


def _screen_exact(tensors: Sequence[torch.Tensor], threshold: float) -> tuple[bool, bool]:
    exact = float(max_abs(tensors))
    if not math.isfinite(exact):
        return True, False
    if exact > threshold or exact * math.sqrt(2.0) <= threshold:
        return False, exact > threshold
    # Complex: |z| can exceed the threshold while no component does (|z| <= sqrt(2) * max component).
    # Magnitudes in complex128 cannot overflow for complex64/complex32 values.
    mags = [torch.linalg.vector_norm(v.to(torch.complex128), math.inf)
            for v in map(_values, tensors) if v is not None and v.is_complex()]
    return False, bool(mags) and max(float(m) for m in mags) > threshold


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Non-empty parameters of any dtype (as the live tensors: probes run under no_grad and never write)."""
    return [p for p in model.parameters() if p.numel()]


def named_persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(qualified name, buffer) for every buffer a snapshot saves, any dtype, each tensor once.

    Non-persistent buffers (rotary caches, masks) are left out: a rollback could not restore them.
    """
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip and id(b) not in seen:
                seen.add(id(b))
                yield (f"{prefix}.{name}" if prefix else name), b


def persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Persistent buffers that can hold NaN (floating or complex, non-empty): BatchNorm running stats, ..."""
    return [b for _, b in named_persistent_buffers(model) if _values(b) is not None]


def grad_tensors(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradients that can hold NaN; a sparse gradient contributes its coalesced stored values."""
    return [v for v in (_values(p.grad) for p in params) if v is not None]


def probe_grads(params: Iterable[torch.nn.Parameter], *, step: int, threshold: float) -> ProbeReport:
    """Check the parameters' gradients before the optimizer step (one host sync unless a norm exceeds
    ``threshold``)."""
    return probe_grad_tensors(grad_tensors(params), step=step, threshold=threshold)


def probe_gate(grads: list[torch.Tensor], scaler: Any, optimizer: Any, *, step: int, loss: Any,
               norm: TotalNorm | None, threshold: float) -> ProbeReport:
    """The gradient gate's check: gradients unscaled first when a GradScaler is in use (inf/NaN that the scaler
    explains is its own overflow, which it skips and lowers its scale for: not a fault)."""
    overflow = unscale(scaler, optimizer)
    report = probe_grad_tensors(grads, step=step, loss=loss, norm=norm, threshold=threshold)
    if overflow:
        report = dataclasses.replace(report, nonfinite_grads=False, violation_grads=False, scaler_overflow=True)
    return report


def probe_grad_tensors(grads: Sequence[torch.Tensor], *, step: int, threshold: float,
                       loss: torch.Tensor | float | None = None, norm: TotalNorm | None = None) -> ProbeReport:
    """:func:`probe_grads` over gradient tensors themselves (a sharded backend's partitions). ``loss`` (for the
    spike rule: its mean) is read back in the same host sync as the norm; ``norm`` keeps the pass's plan
    between steps (pass the same one every step)."""
    squares = (norm or TotalNorm()).squares(grads)
    reads = loss_reads(loss)
    host = _read(squares + reads) if squares or reads else []
    value = math.sqrt(sum(host[:len(squares)]))
    nonfinite, violation = screen(grads, value, threshold)
    return ProbeReport(phase=Phase.GRADS, step=step, nonfinite_grads=nonfinite, violation_grads=violation,
                       grad_norm=value, loss=_loss_values(loss, host[len(squares):])[0])


def _read(parts: list[torch.Tensor]) -> list[float]:
    """Host values of 0-d tensors in one sync (float64 when their dtypes or devices differ)."""
    first = parts[0]
    dtype, device = first.dtype, first.device
    for p in parts:
        if p.dtype is not dtype or p.device != device:
            return torch.stack([p.to(device, torch.float64) for p in parts]).tolist()
    return torch.stack(parts).tolist()


def loss_reads(loss: torch.Tensor | float | None) -> list[torch.Tensor]:
    """What the host sync reads of the loss: nothing (None, a number, an empty tensor), its one element, or
    (mean, max|element|).

    Every element is checked (a per-sample loss may hold one NaN); float64 never narrows; complex counts
    by magnitude; integers are finite by construction.
    """
    if not isinstance(loss, torch.Tensor):
        return []
    t = loss.detach()
    if t.numel() == 1 and t.is_floating_point():  # the common case: read as is
        return [t if t.dim() == 0 else t.reshape(())]
    if t.is_complex():
        t = t.to(torch.complex128).abs()
    t = t.to(torch.float64).reshape(-1)
    return [t.mean(), t.abs().max()] if t.numel() else []


def _loss_values(loss: torch.Tensor | float | None, host: list[float]) -> tuple[float | None, float]:
    """(mean or None, max |element|, 0 when there is none) from what :func:`loss_reads` had read."""
    if loss is None:
        return None, 0.0
    if not isinstance(loss, torch.Tensor):
        v = float(loss)
        return v, abs(v)
    if len(host) == 1:
        return host[0], abs(host[0])
    return (host[0], host[1]) if host else (None, 0.0)


def probe_step(
    loss: torch.Tensor | float | None,
    model: torch.nn.Module | None,
    *,
    tensors: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    step: int,
    threshold: float,
    update_skipped: bool = False,
    with_fingerprint: bool = False,
    norms: tuple[TotalNorm, TotalNorm] | None = None,
) -> ProbeReport:
    """Check loss, parameters and persistent buffers after the optimizer step, with one host sync for all
    of them (and the fingerprint) unless the parameters' norm exceeds ``threshold``.

    Parameters: NaN/Inf and magnitude. Buffers: NaN only (a -inf attention mask or a large running variance
    is legitimate). ``tensors`` = (weights, buffers) replaces the model's (a sharded backend's partitions);
    ``norms`` = (weights', buffers') plans kept between steps.
    """
    params, buffers = tensors if tensors is not None else (parameters(model), persistent_buffers(model))
    wn, bn = norms or (TotalNorm(), TotalNorm())
    w_sq, b_sq, reads = wn.squares(params), bn.squares(buffers) if buffers else [], loss_reads(loss)
    parts = w_sq + b_sq + reads
    if with_fingerprint:
        parts.append(fingerprint_tensor(params).to(torch.float64))  # < 2**52: exact in float64
    host = _read(parts) if parts else []
    i, j, k = len(w_sq), len(w_sq) + len(b_sq), len(w_sq) + len(b_sq) + len(reads)
    wv, bv = math.sqrt(sum(host[:i])), sum(host[i:j])
    loss_mean, loss_max = _loss_values(loss, host[j:k])
    nonfinite, violation = screen(params, wv, threshold)
    return ProbeReport(
        phase=Phase.STEP,
        step=step,
        nonfinite_loss=not math.isfinite(loss_max),
        violation_loss=math.isfinite(loss_max) and loss_max > threshold,
        nonfinite_weights=nonfinite,
        nonfinite_buffers=math.isnan(bv),
        violation_weights=violation,
        update_skipped=update_skipped,
        weight_norm=wv,
        loss=loss_mean,
        fingerprint=float(int(host[k])) if with_fingerprint else None,
    )


def _bit_words(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``t`` as a flat signed-integer tensor of words of at most 32 bits.

    8-byte elements are split into two int32 words: a flip in bit 52..63 of an int64 word changes the sum
    by a multiple of 2**52 and would vanish in the fingerprint's modulus.
    """
    t = t.detach()
    if t.is_quantized:
        t = t.int_repr()  # the stored integer codes (scale and zero point are per-tensor metadata)
    elif t.is_complex():
        t = torch.view_as_real(t)  # complex128 has 16-byte elements; its components have 8
    flat = t.contiguous().reshape(-1)
    return flat.view(_INT_VIEW[min(flat.element_size(), 4)])


def fingerprint_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Order-independent integer checksum of the bit patterns of ``tensors``, any dtype (0-d int64 in
    [0, 2**52), no host sync).

    Integer sums are associative, so identical replicas give identical fingerprints on any hardware and
    thread count, while a single flipped bit changes the value (each word is < 2**32 and each tensor's sum
    is weighted by an odd factor, so no single flip is a multiple of the modulus).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    device = tensors[0].device
    sums = [_bit_words(t).sum(dtype=torch.int64).to(device) * (2 * i + 1) for i, t in enumerate(tensors)]
    return torch.stack(sums).sum() % _FP_MOD


def _offending(tensors: Sequence[torch.Tensor | None], threshold: float, nan_only: bool) -> list[bool]:
    """Whether each tensor holds NaN (``nan_only``) or NaN/Inf/|x| > ``threshold``: one max|x| per tensor, fused
    per (device, dtype), and one host read per group (a rollback on a GPU must not pay a sync per tensor)."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    out = [False] * len(tensors)

    def judge(i: int, peak: float) -> None:
        out[i] = math.isnan(peak) if nan_only else not peak <= threshold

    with torch.no_grad():
        for i, t in enumerate(tensors):
            v = _values(t)
            if v is None:
                continue
            if v.is_complex():  # rare: by magnitude, one at a time (complex128 cannot overflow)
                judge(i, float(torch.linalg.vector_norm(v.to(torch.complex128), math.inf)))
                continue
            groups.setdefault((v.device, v.dtype), []).append((i, v))
        for (_, dtype), members in groups.items():
            peaks = torch.stack(per_tensor([v for _, v in members], dtype, math.inf)).double().tolist()
            for (i, _), peak in zip(members, peaks, strict=True):
                judge(i, peak)
    return out


def _scan(named: Iterable[tuple[str, torch.Tensor | None]], kind: str, found: BadTensors, *, threshold: float,
          nan_only: bool, limit: int) -> None:
    """Add the offenders among ``named`` to ``found[kind]`` (or count them in ``found["more"]``)."""
    named = list(named)
    try:
        flags: list[bool | None] = list(_offending([t for _, t in named], threshold, nan_only))
    except Exception:  # one unreadable tensor: find it (and the offenders) one at a time
        flags = []
        for _, t in named:
            try:
                flags.append(_offending([t], threshold, nan_only)[0])
            except Exception:  # reported as such; diagnostics must not break the step
                flags.append(None)
    for (name, _), bad in zip(named, flags, strict=True):
        if bad is None:
            if len(found["skipped"]) < limit:
                found["skipped"].append(name)
            continue
        if bad:
            if len(found["params"]) + len(found["buffers"]) < limit:
                found[kind].append(name)
            else:
                found["more"] += 1


def bad_tensors(model: torch.nn.Module, *, threshold: float, grads: bool = False, limit: int = 5) -> BadTensors:
    """Name the tensors of ``model`` that a probe objects to (a host read per dtype group; faults only). Never
    raises.

    Parameters count when they hold NaN/Inf or |x| > ``threshold``, persistent buffers when they hold NaN;
    with ``grads=True`` the parameters' gradients are inspected instead (no buffers). Dtype rules are the
    probes' (integers skipped, complex by magnitude). At most ``limit`` names are listed, parameters first;
    ``more`` counts the offenders left out.
    """
    named = ((n, p.grad if grads else p) for n, p in model.named_parameters())
    return bad_named(named, () if grads else named_persistent_buffers(model), threshold=threshold, limit=limit)


def bad_named(params: Iterable[tuple[str, torch.Tensor | None]], buffers: Iterable[tuple[str, torch.Tensor]], *,
              threshold: float, limit: int = 5) -> BadTensors:
    """:func:`bad_tensors` over (name, tensor) pairs: ``params`` by NaN/Inf and magnitude, ``buffers`` by NaN."""
    found: BadTensors = {"params": [], "buffers": [], "more": 0, "skipped": []}
    _scan(params, "params", found, threshold=threshold, nan_only=False, limit=limit)
    _scan(buffers, "buffers", found, threshold=threshold, nan_only=True, limit=limit)
    return found


def bad_parameters(
    named: Iterable[tuple[str, torch.Tensor | None]], *, threshold: float, limit: int = 5
) -> list[str]:
    """Names of up to ``limit`` of ``named`` holding NaN/Inf or |x| > ``threshold``; never raises.

    Kept for callers that pass (name, tensor) pairs; :func:`bad_tensors` also covers buffers and truncation.
    """
    found: BadTensors = {"params": [], "buffers": [], "more": 0, "skipped": []}
    _scan(named, "params", found, threshold=threshold, nan_only=False, limit=limit)
    return found["params"]
