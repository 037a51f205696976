"""Local health checks of one rank: NaN/Inf and magnitude of loss, gradients, weights and persistent buffers,
a replica fingerprint, and the slow per-tensor diagnostics that name the offenders. No collectives.

Each check is one fused pass over the tensors and one host sync, because a per-tensor ``isfinite().item()``
loop costs tens of percent of a GPU step. The fused pass computes per-tensor L2 norms (the kernel gradient
clipping uses; on CPU 7x faster than the inf-norm). NaN and Inf propagate through them, and max|x| <= ||x||_2,
so a norm within the threshold proves there is no violation. Only when a norm exceeds the threshold (or
overflows) is the exact max|x| computed.

Every dtype a model can hold is handled by one rule (:func:`_values`, :func:`_group_norms`):

* float32/float16/bfloat16: the fused kernel accumulates in float32 (``dtype=`` upcasts, no copies);
  float64 stays float64 (the kernel refuses to narrow it, and a float64 weight may legitimately exceed the
  float32 range); float8 has no norm kernel and is upcast to float32 one tensor at a time.
* complex: checked through :func:`torch.view_as_real` (a NaN/Inf component is a NaN/Inf number and
  ``|z|^2 = re^2 + im^2``, so the L2 screen is unchanged); the threshold applies to the magnitude ``|z|``.
* integer, bool, quantized and packed float4 tensors are skipped: they have no NaN/Inf encoding, and
  integer weights are quantization codes whose magnitude is not the magnitude of the weight they encode.

Norms are grouped by (device, dtype): an all-float32 (or all-bf16) model is one kernel call per device.
Host values are float64, so the threshold comparison never sees a narrowing artefact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TypedDict

import torch

from gradience.types import Phase, ProbeReport

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32}
# 2**52: fingerprints must survive a float64 round trip through the all-reduce exactly.
_FP_MOD = 1 << 52
# Dtypes the fused kernel reads directly: float64 in float64, the others accumulated in float32.
_DIRECT = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_STRIDED = torch.strided
# Floating dtypes without NaN/Inf encodings and no elementwise kernels (E2M1: |x| <= 6 by construction).
_UNCHECKABLE = frozenset(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n))


class BadTensors(TypedDict):
    """Offending tensors of one model, by name (see :func:`bad_tensors`)."""

    params: list[str]
    buffers: list[str]
    #: Offenders beyond ``limit`` that were not listed (0 when the lists are complete).
    more: int
    #: Tensors that could not be inspected (an exotic device or subclass); never counted as offenders.
    skipped: list[str]


def _values(t: torch.Tensor | None) -> torch.Tensor | None:
    """The dense values of ``t`` that can hold NaN, or None when there are none (integer, bool, empty)."""
    if t is None:
        return None
    if t.layout is torch.sparse_coo:
        t = t.coalesce()._values()  # coalesced: duplicate indices add up to the real element
    elif t.layout is not torch.strided:
        t = t.values()  # compressed sparse layouts hold no duplicates
    dt = t.dtype
    if not (dt.is_floating_point or dt.is_complex) or dt in _UNCHECKABLE or not t.numel():
        return None
    return t


@torch.no_grad()
def _group_norms(tensors: Iterable[torch.Tensor | None], ord: float) -> list[torch.Tensor]:
    """Per-tensor ``ord``-norms, one 1-d tensor per (device, dtype) group; no host sync.

    Tensors that cannot hold NaN are left out. Norms are float32 for 32-bit and narrower floats and float64
    for float64/complex128; for complex tensors they are the norms of the (re, im) components.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        dt = t.dtype
        if dt not in _DIRECT or t.layout is not _STRIDED:  # rare: sparse, complex, float8, integer, ...
            t = _values(t)
            if t is None:
                continue
            if t.is_complex():
                t = torch.view_as_real(t)
            dt = t.dtype
        key = (t.device, dt)
        group = groups.get(key)
        if group is None:
            group = groups[key] = []
        group.append(t)
    out = []
    for (_, dtype), group in groups.items():
        if dtype is torch.float64:
            norms = torch._foreach_norm(group, ord)
        elif dtype in _DIRECT:
            norms = torch._foreach_norm(group, ord, dtype=torch.float32)
        else:  # float8: no norm kernel. One upcast copy at a time keeps peak memory at one tensor.
            norms = [torch.linalg.vector_norm(t.float(), ord) for t in group]
        out.append(torch.stack(norms))
    return out


def _largest_norm(tensors: Sequence[torch.Tensor], ord: float) -> torch.Tensor:
    """Largest per-tensor ``ord``-norm as a 0-d float64 tensor (0 when nothing can hold NaN); no host sync."""
    parts = [norms.max() for norms in _group_norms(tensors, ord)]
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    first = parts[0].device
    # max() propagates NaN, which is exactly the signal we want to keep.
    parts = [p.to(first, torch.float64) for p in parts]
    return torch.stack(parts).max() if len(parts) > 1 else parts[0]


def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max |x| over all real components (NaN if any is NaN) as a 0-d float64 tensor; no host sync.

    Exact for every floating dtype: a maximum of absolute values cannot overflow the dtype it is taken in.
    For complex tensors this is the largest component, not the largest magnitude (see :func:`screen`).
    """
    return _largest_norm(tensors, math.inf)


def norm_max(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest per-tensor L2 norm (NaN if an element is NaN, inf if one is inf or the norm overflowed its
    accumulation dtype) as a 0-d float64 tensor; no host sync."""
    return _largest_norm(tensors, 2.0)


@torch.no_grad()
def screen(tensors: Sequence[torch.Tensor], norm: float, threshold: float) -> tuple[bool, bool]:
    """(non-finite, violation) from a :func:`norm_max` value, computing the exact max|x| only if needed.

    A NaN norm is always a NaN element; an infinite one may be an overflow of finite elements, so it falls
    through to the exact pass like any norm above the threshold.
    """
    if math.isnan(norm):
        return True, False
    if norm <= threshold:
        return False, False
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


def probe_grad_tensors(grads: Sequence[torch.Tensor], *, step: int, threshold: float,
                       loss: torch.Tensor | float | None = None) -> ProbeReport:
    """:func:`probe_grads` over gradient tensors themselves (a sharded backend's partitions). ``loss`` (for the
    spike rule: its mean) is read back in the same host sync as the norm."""
    norm = norm_max(grads)
    stats = _loss_stats(loss, norm.device) if loss is not None else None
    if stats is not None:
        value, mean = torch.stack([norm, stats[0]]).tolist()
    else:
        value, mean = float(norm), None
    nonfinite, violation = screen(grads, value, threshold)
    return ProbeReport(
        phase=Phase.GRADS,
        step=step,
        nonfinite_grads=nonfinite,
        violation_grads=violation,
        grad_norm=value,
        loss=mean,
    )


def _loss_stats(loss: torch.Tensor | float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, max |element|) of the loss as 0-d float64 tensors on ``device``; None for an empty loss.

    Every element is checked (a per-sample loss may hold one NaN); float64 never narrows; complex counts
    by magnitude; integers are finite by construction.
    """
    if not isinstance(loss, torch.Tensor):
        v = torch.tensor(float(loss), dtype=torch.float64, device=device)
        return v, v.abs()
    t = loss.detach()
    if t.numel() == 1 and t.is_floating_point():  # the common case, in two ops
        v = t.reshape(()).to(device, torch.float64)
        return v, v.abs()
    if t.is_complex():
        t = t.to(torch.complex128).abs()
    t = t.to(device, torch.float64).reshape(-1)
    if not t.numel():
        return None
    return t.mean(), t.abs().max()


def probe_step(
    loss: torch.Tensor | float | None,
    model: torch.nn.Module | None,
    *,
    tensors: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    step: int,
    threshold: float,
    update_skipped: bool = False,
    with_fingerprint: bool = False,
) -> ProbeReport:
    """Check loss, parameters and persistent buffers after the optimizer step, with one host sync for all
    of them (and the fingerprint) unless a parameter norm exceeds ``threshold``.

    Parameters: NaN/Inf and magnitude. Buffers: NaN only (a -inf attention mask or a large running variance
    is legitimate). ``tensors`` = (weights, buffers) replaces the model's (a sharded backend's partitions).
    """
    params, buffers = tensors if tensors is not None else (parameters(model), persistent_buffers(model))
    device = params[0].device if params else (buffers[0].device if buffers else torch.device("cpu"))
    stats = _loss_stats(loss, device) if loss is not None else None
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = [*(stats or (zero, zero)), norm_max(params).to(device), norm_max(buffers).to(device)]
    if with_fingerprint:
        packed.append(fingerprint_tensor(params).to(device, torch.float64))  # < 2**52: exact in float64
    host = torch.stack(packed).tolist()
    loss_mean, loss_max, wv, bv = host[:4]
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
        loss=loss_mean if stats is not None else None,
        fingerprint=float(int(host[4])) if with_fingerprint else None,
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


def _offends(t: torch.Tensor | None, threshold: float, nan_only: bool) -> bool:
    """Whether one tensor holds NaN (``nan_only``) or NaN/Inf/|x| > threshold; two host syncs at most."""
    v = _values(t)
    if v is None:
        return False
    norm = float(norm_max([v]))
    if nan_only:
        return math.isnan(norm)
    return any(screen([v], norm, threshold))


def _scan(named: Iterable[tuple[str, torch.Tensor | None]], kind: str, found: BadTensors, *, threshold: float,
          nan_only: bool, limit: int) -> None:
    """Add the offenders among ``named`` to ``found[kind]`` (or count them in ``found["more"]``)."""
    for name, t in named:
        try:
            bad = _offends(t, threshold, nan_only)
        except Exception:  # a tensor we cannot read is reported as such; diagnostics must not break the step
            if len(found["skipped"]) < limit:
                found["skipped"].append(name)
            continue
        if bad:
            if len(found["params"]) + len(found["buffers"]) < limit:
                found[kind].append(name)
            else:
                found["more"] += 1


def bad_tensors(model: torch.nn.Module, *, threshold: float, grads: bool = False, limit: int = 5) -> BadTensors:
    """Name the tensors of ``model`` that a probe objects to (slow: one or two host syncs per tensor; faults
    only). Never raises.

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
