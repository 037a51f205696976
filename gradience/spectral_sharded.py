"""The spectral probe's products on sharded weights (FSDP2 ``DTensor`` parameters): each rank multiplies by the
block of a weight it holds and a SUM all-reduce (``reduce``, supplied by the caller) completes each product, so
no weight is ever gathered and every rank ends with the same vectors, hence the same κ̃.

A block is any rectangle of the logical (out, in) matrix — FSDP2's row shards of a Linear weight, GPT-2's
Conv1D shards (rows of the stored (in, out) weight, so columns of the logical one), or the q / k rows of a fused
projection — so the same four products serve all of them. Each power iteration costs two reduces for
A x = W_Qᵀ(W_K x) and two for Aᵀu (vectors of heads × d_model or heads × head_dim elements), and one per
product for a hidden matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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


def qk_products(q: LocalBlock, k: LocalBlock, n_heads: int, n_kv: int, head_dim: int, reduce: Reduce,
                dtype: torch.dtype) -> tuple[Callable, Callable]:
    """matvec / rmatvec of A_h = W_Q,hᵀ W_K,kv(h) for all query heads, on vectors (n_kv, group, d_model)."""
    group = n_heads // n_kv
    tq, tk = q.t.to(dtype), k.t.to(dtype)
    hq, iq = _rows(q, head_dim)  # query head and in-head row of each local Q row
    kk, ik = _rows(k, head_dim)  # kv head and in-head row of each local K row
    qc, kc = slice(q.c0, q.c0 + tq.shape[1]), slice(k.c0, k.c0 + tk.shape[1])

    def matvec(x: torch.Tensor) -> torch.Tensor:  # W_Qᵀ (W_K x)
        z = x.new_zeros(n_kv, group, head_dim)
        z[kk, :, ik] = torch.einsum("rc,rgc->rg", tk, x[kk][:, :, kc])
        z = reduce(z).reshape(n_heads, head_dim)
        out = x.new_zeros(n_heads, q.cols)
        out[:, qc].index_add_(0, hq, tq * z[hq, iq].unsqueeze(-1))
        return reduce(out).reshape(n_kv, group, q.cols)

    def rmatvec(u: torch.Tensor) -> torch.Tensor:  # W_Kᵀ (W_Q u)
        flat = u.reshape(n_heads, -1)
        z = u.new_zeros(n_heads, head_dim)
        z[hq, iq] = (tq * flat[hq][:, qc]).sum(-1)
        z = reduce(z).reshape(n_kv, group, head_dim)
        out = u.new_zeros(n_kv, group, k.cols)
        out[:, :, kc].index_add_(0, kk, tk.unsqueeze(1) * z[kk, :, ik].unsqueeze(-1))
        return reduce(out)

    return matvec, rmatvec


def matrix_products(b: LocalBlock, reduce: Reduce, dtype: torch.dtype) -> tuple[Callable, Callable, torch.Tensor]:
    """matvec / rmatvec of a sharded hidden matrix W, and ‖W‖_F (one reduce)."""
    t = b.t.to(dtype)
    rs, cs = slice(b.r0, b.r0 + t.shape[0]), slice(b.c0, b.c0 + t.shape[1])

    def matvec(x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(b.rows)
        y[rs] = t @ x[cs]
        return reduce(y)

    def rmatvec(y: torch.Tensor) -> torch.Tensor:
        x = y.new_zeros(b.cols)
        x[cs] = t.T @ y[rs]
        return reduce(x)

    fro = reduce(torch.linalg.vector_norm(t).square().reshape(1)).sqrt().reshape(())
    return matvec, rmatvec, fro
