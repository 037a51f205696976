"""Local health checks of one rank: NaN/Inf and magnitude of loss, gradients and weights, and a replica
fingerprint. No collectives. Each check is one fused pass over the tensors and one host sync, because a
per-tensor ``isfinite().item()`` loop costs tens of percent of a GPU step.

The fused pass computes per-tensor L2 norms (the kernel gradient clipping uses; on CPU 7x faster than the
inf-norm). NaN and Inf propagate through them, and max|x| <= ||x||_2, so a norm within the threshold proves
there is no violation. Only when a norm exceeds the threshold (or overflows) is the exact max|x| computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from gradience.types import Phase, ProbeReport

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# 2**52: fingerprints must survive a float64 round trip through the all-reduce exactly.
_FP_MOD = 1 << 52


@torch.no_grad()
def _largest_norm(tensors: Sequence[torch.Tensor], ord: float) -> torch.Tensor:
    """Largest per-tensor ``ord``-norm as a 0-d float32 tensor on the first tensor's device; no host sync."""
    if not tensors:
        return torch.zeros(())
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    first = tensors[0].device
    # dtype= makes the fused kernel emit float32 norms for every input dtype: no per-tensor casts.
    parts = [torch.stack(torch._foreach_norm(g, ord, dtype=torch.float32)).max().to(first)
             for g in by_device.values()]
    # max() propagates NaN, which is exactly the signal we want to keep.
    return torch.stack(parts).max() if len(parts) > 1 else parts[0]


def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max |x| over all tensors (NaN if any element is NaN); no host sync."""
    return _largest_norm(tensors, math.inf)


def norm_max(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest per-tensor L2 norm (NaN/Inf if any element is); no host sync."""
    return _largest_norm(tensors, 2.0)


def screen(tensors: Sequence[torch.Tensor], norm: float, threshold: float) -> tuple[bool, bool]:
    """(non-finite, violation) from a :func:`norm_max` value, computing the exact max|x| only if needed."""
    if math.isnan(norm):
        return True, False
    if norm <= threshold:
        return False, False
    exact = float(max_abs(tensors))  # a norm over the threshold (or overflowed) need not mean an element is
    return (not math.isfinite(exact)), math.isfinite(exact) and exact > threshold


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Non-empty parameters (as the live tensors: probes run under no_grad and never write)."""
    return [p for p in model.parameters() if p.numel()]


def persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers that a snapshot saves (BatchNorm running stats, ...).

    Non-persistent buffers (rotary caches, masks) are left out: a rollback could not restore them.
    """
    out = []
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip and b.is_floating_point() and b.numel():
                out.append(b)
    return out


def grad_tensors(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradients that exist; a sparse gradient contributes its stored values."""
    out = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g._values()
        if g.numel():
            out.append(g)
    return out


def probe_grads(params: Iterable[torch.nn.Parameter], *, step: int, threshold: float) -> ProbeReport:
    """Check gradients before the optimizer step."""
    grads = grad_tensors(params)
    value = float(norm_max(grads)) if grads else 0.0
    nonfinite, violation = screen(grads, value, threshold)
    return ProbeReport(
        phase=Phase.GRADS,
        step=step,
        nonfinite_grads=nonfinite,
        violation_grads=violation,
        grad_norm=_finite_or_inf(value),
    )


def probe_step(
    loss: torch.Tensor | float | None,
    model: torch.nn.Module,
    *,
    step: int,
    threshold: float,
    update_skipped: bool = False,
    with_fingerprint: bool = False,
) -> ProbeReport:
    """Check loss and weights after the optimizer step, with one host sync for both."""
    params = parameters(model)
    buffers = persistent_buffers(model)
    device = params[0].device if params else torch.device("cpu")
    # Parameters: NaN/Inf and magnitude. Buffers: NaN only (a -inf attention mask or a large running
    # variance is legitimate).
    wmax = norm_max(params).to(device) if params else torch.zeros((), device=device)
    bmax = norm_max(buffers).to(device) if buffers else torch.zeros((), device=device)
    if isinstance(loss, torch.Tensor):
        loss_t = loss.detach().float().reshape(-1)[:1].to(device).reshape(())
    else:
        loss_t = torch.tensor(float(loss) if loss is not None else 0.0, device=device)
    packed = [loss_t, wmax, bmax]
    if with_fingerprint:
        packed.append(fingerprint_tensor(params).to(device).double())
    host = torch.stack([t.double() for t in packed]).tolist()
    lossv, wv = abs(host[0]), host[1]
    nonfinite, violation = screen(params, wv, threshold)
    return ProbeReport(
        phase=Phase.STEP,
        step=step,
        nonfinite_loss=not math.isfinite(lossv),
        violation_loss=math.isfinite(lossv) and lossv > threshold,
        nonfinite_weights=nonfinite or math.isnan(host[2]),
        violation_weights=violation,
        update_skipped=update_skipped,
        weight_norm=_finite_or_inf(wv),
        loss=host[0] if loss is not None else None,
        fingerprint=float(int(host[3]) % _FP_MOD) if with_fingerprint else None,
    )


def fingerprint_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Order-independent integer checksum of the bit patterns of ``tensors`` (0-d int64, no host sync).

    Integer sums are associative, so identical replicas give identical fingerprints on any hardware and
    thread count, while a single flipped bit changes the value.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    device = tensors[0].device
    sums = []
    for i, t in enumerate(tensors):
        bits = t.detach().contiguous().view(_INT_VIEW[t.element_size()]).to(device)
        sums.append(bits.sum(dtype=torch.int64) * (2 * i + 1))
    return torch.stack(sums).sum() % _FP_MOD


def bad_parameters(
    named: Iterable[tuple[str, torch.Tensor]], *, threshold: float, limit: int = 5
) -> list[str]:
    """Names of up to ``limit`` tensors holding NaN/Inf or values beyond ``threshold`` (slow; faults only)."""
    out = []
    for name, t in named:
        try:
            if t is None or not t.is_floating_point() or not t.numel():
                continue
            m = float(max_abs([t._values() if t.is_sparse else t]))
        except Exception:  # diagnostics must never break the step that reports them
            continue
        if not math.isfinite(m) or m > threshold:
            out.append(name)
            if len(out) >= limit:
                break
    return out


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf
