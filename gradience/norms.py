"""Norm passes over many tensors with no host sync: the cost floor of every per-step check.

Two reductions live here:

* :class:`TotalNorm`: the L2 norm of all the tensors together (the norm ``clip_grad_norm_`` reports). NaN and
  Inf propagate through it and max|x| <= ||x||_2, so a total within a threshold proves that no element
  exceeds it (:func:`gradience.probe.screen` takes the exact path otherwise).
* :func:`max_abs`: the exact max|x|, per tensor, for the rare step whose total exceeds the threshold.

Dtype rules (:func:`values`): float32/float16/bfloat16 accumulate in float32; float64 stays float64 (it may
legitimately exceed the float32 range); float8 has no norm kernel and is upcast one tensor at a time; complex
is read through :func:`torch.view_as_real`; integer, bool, quantized and packed float4 tensors hold no NaN and
are skipped. Tensors are grouped by (device, dtype).

How a group is reduced depends on where the time goes. On accelerators ``_foreach_norm`` is one fused launch
per group. On a CPU it is a loop of per-tensor kernels, each with a fixed cost whatever its size, which for a
model of many small tensors is most of the pass; there a group whose tensors average at most
:data:`FLAT_AVG_NUMEL` elements is copied into one preallocated buffer (one ``_chunk_cat`` call) and reduced
by one dot product. On the 2-core CI machine (28 float32 tensors, timed side by side) the copy won up to about
16 K elements per tensor and lost beyond; the bound sits below that crossover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

# Dtypes the fused kernel reads directly: float64 in float64, the others accumulated in float32.
_DIRECT = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_STRIDED = torch.strided
# Floating dtypes without NaN/Inf encodings and no elementwise kernels (E2M1: |x| <= 6 by construction).
_UNCHECKABLE = frozenset(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n))
#: CPU groups whose tensors average at most this many elements are reduced through one flat copy.
FLAT_AVG_NUMEL = 8192
#: ... and only while the copy stays this small (elements): the buffer is kept between steps.
FLAT_MAX_NUMEL = 1 << 24
_CHUNK_CAT = getattr(torch, "_chunk_cat", None)


def values(t: torch.Tensor | None) -> torch.Tensor | None:
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


def _groups(tensors: Iterable[torch.Tensor | None]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Checkable tensors by (device, dtype), complex ones as their real view."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        dt = t.dtype
        if dt not in _DIRECT or t.layout is not _STRIDED:  # rare: sparse, complex, float8, integer, ...
            t = values(t)
            if t is None:
                continue
            if t.is_complex():
                t = torch.view_as_real(t)
            dt = t.dtype
        group = groups.get((t.device, dt))
        if group is None:
            group = groups[(t.device, dt)] = []
        group.append(t)
    return groups


def per_tensor(group: list[torch.Tensor], dtype: torch.dtype, ord: float) -> list[torch.Tensor]:
    """The ``ord``-norm of each tensor of ``group`` (all of ``dtype``, one device) as 0-d tensors, fused where
    the dtype allows; float32 is accumulated for 16-bit dtypes."""
    if dtype is torch.float64 or dtype is torch.float32:
        return list(torch._foreach_norm(group, ord))  # no dtype=: the upcast path is a third slower on CPU
    if dtype in _DIRECT:
        return list(torch._foreach_norm(group, ord, dtype=torch.float32))
    # float8: no norm kernel. One upcast copy at a time keeps peak memory at one tensor.
    return [torch.linalg.vector_norm(t.float(), ord) for t in group]


@torch.no_grad()
def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max |x| over all real components (NaN if any is NaN) as a 0-d float64 tensor; no host sync.

    Exact for every floating dtype: a maximum of absolute values cannot overflow the dtype it is taken in.
    For complex tensors this is the largest component, not the largest magnitude (see
    :func:`gradience.probe.screen`).
    """
    parts = [torch.stack(per_tensor(g, dtype, math.inf)).max().to(torch.float64)
             for (_, dtype), g in _groups(tensors).items()]
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    first = parts[0].device
    # max() propagates NaN, which is exactly the signal we want to keep.
    return torch.stack([p.to(first) for p in parts]).max() if len(parts) > 1 else parts[0]


class TotalNorm:
    """The total L2 norm of a tensor list, remembering how to compute it for the next call.

    Call one instance with the same kind of list every step (a model's weights, its gradients). The plan
    (groups, flat buffers) is rebuilt when the tensors' shapes change, or when a reduction fails (a tensor
    changed device or dtype in place); the tensors themselves are read afresh on every call.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        #: (flat copy?, device, dtype, flat buffer) per group.
        self._plan: list[tuple[bool, torch.device, torch.dtype, torch.Tensor | None]] = []
        #: The list passed in is exactly the plan's one group (every tensor a strided float of one dtype and
        #: device): later calls with the same shapes skip the grouping walk. A tensor that changed dtype or
        #: device since makes the reduction raise, and the plan is rebuilt.
        self._direct = False
        self._sparse = False
        #: The last call's per-tensor L2 norms (one stacked tensor on the device, aligned with the list passed
        #: in) when that list was one fused group; None otherwise (a flat copy or several groups).
        self.per_tensor: torch.Tensor | None = None

    @torch.no_grad()
    def squares(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Squared L2 norm per (device, dtype) group, as 0-d tensors on the group's device; no host sync.

        A square overflows (to inf) where the norm in float32 would: callers treat inf as "check exactly".
        """
        key = tuple(map(torch.Tensor.size, tensors))
        if key == self._key:
            try:
                return self._squares(tensors)
            except (RuntimeError, KeyError):
                pass  # a tensor moved or changed dtype under the plan: plan again
        self._build(tensors, key)
        return self._squares(tensors)

    def __call__(self, tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
        """The total L2 norm as a 0-d float64 tensor on ``device`` (default: the first group's; 0 when nothing
        can hold NaN); no host sync."""
        parts = self.squares(tensors)
        if not parts:
            return torch.zeros((), dtype=torch.float64, device=device)
        device = device or parts[0].device
        if len(parts) == 1:
            return parts[0].to(device, torch.float64).sqrt()
        return torch.stack([p.to(device, torch.float64) for p in parts]).sum().sqrt()

    def _squares(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.per_tensor = None
        if self._direct:  # one group, the list itself: no per-tensor grouping walk
            flat, _, dtype, buf = self._plan[0]
            if flat:
                return [_flat_square(tensors, dtype, buf)]
            norms = self.per_tensor = _foreach_norms(list(tensors), dtype)
            return [torch.dot(norms, norms)]
        groups = _groups(tensors)
        if len(groups) != len(self._plan):
            raise KeyError("the tensors' (device, dtype) groups changed")
        if self._sparse and any(flat and sum(t.numel() for t in groups[(device, dtype)]) != buf.size(1)
                                for flat, device, dtype, buf in self._plan):
            raise KeyError("a sparse tensor's stored values changed size")  # its dense size() did not
        return [_flat_square(groups[(device, dtype)], dtype, buf) if flat
                else _foreach_square(groups[(device, dtype)], dtype) for flat, device, dtype, buf in self._plan]

    def _build(self, tensors: Sequence[torch.Tensor], key: tuple) -> None:
        self._key, self._plan = None, []
        self._sparse = any(t.layout is not _STRIDED for t in tensors)
        groups = _groups(tensors)
        for (device, dtype), group in groups.items():
            numel = sum(t.numel() for t in group)
            flat = (device.type == "cpu" and dtype in _DIRECT and numel <= FLAT_MAX_NUMEL
                    and numel <= FLAT_AVG_NUMEL * len(group) and all(t.dim() for t in group)
                    and (_CHUNK_CAT is not None or all(t.is_contiguous() for t in group)))
            buf = torch.empty(1, numel, dtype=dtype, device=device) if flat else None
            self._plan.append((flat, device, dtype, buf))
        only = next(iter(groups.values()), [])
        self._direct = (len(self._plan) == 1 and len(only) == len(tensors)
                        and all(a is b for a, b in zip(only, tensors, strict=True)))
        self._key = key


def _flat_square(group: Sequence[torch.Tensor], dtype: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    """One copy into ``buf`` and one reduction: the CPU path for many small tensors."""
    if _CHUNK_CAT is not None:
        _CHUNK_CAT(group, 0, 1, out=buf)
    else:
        torch.cat([t.reshape(-1) for t in group], out=buf.view(-1))
    b = buf.view(-1)
    if dtype is torch.float32 or dtype is torch.float64:
        return torch.dot(b, b)
    return torch.linalg.vector_norm(b, dtype=torch.float32).square()


def _foreach_norms(group: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(per_tensor(group, dtype, 2.0))


def _foreach_square(group: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    norms = _foreach_norms(group, dtype)
    return torch.dot(norms, norms)
