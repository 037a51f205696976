"""The spectral probe's products on sharded weights (FSDP2 ``DTensor`` parameters): each rank multiplies by the
block of a weight it holds and a SUM all-reduce (``reduce``, supplied by the caller) completes each product, so
no weight is ever gathered and every rank ends with the same vectors, hence the same κ̃.

A block is any rectangle of the logical (out, in) matrix — FSDP2's row shards of a Linear weight, GPT-2's
Conv1D shards (rows of the stored (in, out) weight, so columns of the logical one), or the q / k rows of a fused
projection — so the same four products serve all of them. A power iteration costs four reduces in all: two for
A x = W_Qᵀ(W_K x) and two for Aᵀu (the hidden matrices' two products ride in the first two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradience.spectral.power import settle

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalBlock:
    """The rectangle of a logical (rows, cols) matrix this rank holds: ``t`` at (r0, c0)."""

    t: torch.Tensor
    r0: int
    c0: int
    rows: int
    cols: int


def local_block(param: torch.Tensor, rows: tuple[int, int] | None, transposed: bool) -> LocalBlock:
    """This rank's block of ``param`` (a DTensor sharded on dim 0, replicated on other mesh dims) in (out, in)
    orientation, restricted to logical rows ``rows`` (a fused projection's q or k part)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local().detach()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if transposed:  # stored (in, out), used as x @ W: the logical matrix is its transpose
        t, r0, c0, n_rows, n_cols = local.t(), offset[1], offset[0], param.shape[1], param.shape[0]
    else:
        t, r0, c0, n_rows, n_cols = local, offset[0], offset[1], param.shape[0], param.shape[1]
    start, stop = rows if rows is not None else (0, n_rows)
    lo, hi = max(start, r0), min(stop, r0 + t.shape[0])
    t = t[lo - r0:hi - r0] if hi > lo else t[:0]
    return LocalBlock(t, max(lo, start) - start, c0, stop - start, n_cols)


def _rows(b: LocalBlock, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(b.r0, b.r0 + b.t.shape[0], device=b.t.device)
    return r // head_dim, r % head_dim


def qk_stages(q: LocalBlock, k: LocalBlock, n_heads: int, n_kv: int, head_dim: int,
              dtype: torch.dtype) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """AᵀA v for A_h = W_Q,hᵀ W_K,kv(h), all query heads at once (vectors (n_kv, group, d_model)), as four partial
    products; each takes the *reduced* output of the one before: W_K v, W_Qᵀ(.), W_Q(.), W_Kᵀ(.)."""
    group = n_heads // n_kv
    tq, tk = q.t.to(dtype), k.t.to(dtype)
    hq, iq = _rows(q, head_dim)  # query head and in-head row of each local Q row
    kk, ik = _rows(k, head_dim)  # kv head and in-head row of each local K row
    qc, kc = slice(q.c0, q.c0 + tq.shape[1]), slice(k.c0, k.c0 + tk.shape[1])

    def k_x(x: torch.Tensor) -> torch.Tensor:
        z = x.new_zeros(n_kv, group, head_dim)
        z[kk, :, ik] = torch.einsum("rc,rgc->rg", tk, x[kk][:, :, kc])
        return z

    def qt_z(z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(n_heads, head_dim)
        out = z.new_zeros(n_heads, q.cols)
        out[:, qc].index_add_(0, hq, tq * z[hq, iq].unsqueeze(-1))
        return out.reshape(n_kv, group, q.cols)

    def q_u(u: torch.Tensor) -> torch.Tensor:
        flat = u.reshape(n_heads, -1)
        z = u.new_zeros(n_heads, head_dim)
        z[hq, iq] = (tq * flat[hq][:, qc]).sum(-1)
        return z

    def kt_z(z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(n_kv, group, head_dim)
        out = z.new_zeros(n_kv, group, k.cols)
        out[:, :, kc].index_add_(0, kk, tk.unsqueeze(1) * z[kk, :, ik].unsqueeze(-1))
        return out

    return [k_x, qt_z, q_u, kt_z]


def matrix_stages(b: LocalBlock, dtype: torch.dtype) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]],
                                                               torch.Tensor]:
    """WᵀW v of a sharded hidden matrix as two partial products (W v, then Wᵀ of the reduced result), and this
    rank's share of ‖W‖_F² (to be reduced)."""
    t = b.t.to(dtype)
    rs, cs = slice(b.r0, b.r0 + t.shape[0]), slice(b.c0, b.c0 + t.shape[1])

    def w_x(x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(b.rows)
        y[rs] = t @ x[cs]
        return y

    def wt_y(y: torch.Tensor) -> torch.Tensor:
        x = y.new_zeros(b.cols)
        x[cs] = t.T @ y[rs]
        return x

    return [w_x, wt_y], torch.linalg.vector_norm(t).square()


def reduce_many(parts: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
    """Every tensor of ``parts`` summed over the ranks, in one reduce (flattened, in the widest dtype)."""
    if not parts:
        return []
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else parts[0].dtype
    out = reduce(torch.cat([p.reshape(-1).to(dtype) for p in parts]))
    return [o.view(p.shape).to(p.dtype) for o, p in zip(out.split([p.numel() for p in parts]), parts, strict=True)]


def lockstep(ops: list[tuple[list[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]], iters: int,
             reduce: Reduce) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gradience.spectral.power_iteration` for many sharded operators at once: stage s of every operator
    shares one reduce, so an iteration costs as many reduces as the deepest operator has stages (4 with
    attention), whatever the number of layers. Returns (σ, new unit v) per operator, as power_iteration does."""
    starts = [v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) for _, v in ops]
    vs, norms = list(starts), [None] * len(ops)
    depth = max(len(stages) for stages, _ in ops)
    for _ in range(iters):
        cur = list(vs)
        for s in range(depth):
            live = [i for i, (stages, _) in enumerate(ops) if s < len(stages)]
            done = reduce_many([ops[i][0][s](cur[i]) for i in live], reduce)
            for i, w in zip(live, done, strict=True):
                cur[i] = w
        for i, w in enumerate(cur):
            norms[i] = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
            vs[i] = w / norms[i].clamp_min(torch.finfo(w.dtype).tiny)
    return [settle(norm, v, start) for start, v, norm in zip(starts, vs, norms, strict=True)]
