"""Power iteration, the one numerical routine of the spectral probe: σ_max of an implicit matrix from matrix-vector
products, warm-started, without a host sync; and the dtypes it computes in. No models, no collectives."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The dtype a weight's power iteration runs in (half types upcast; float64 kept wide); other dtypes are not probed.
COMPUTE_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32,
            torch.float64: torch.float64}


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], rmatvec: Callable[[torch.Tensor], torch.Tensor],
                    v: torch.Tensor, iters: int, *,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_max of an implicit matrix A, ``matvec(x) = A x`` and ``rmatvec(y) = Aᵀ y``; no host sync.

    ``v`` has shape (*batch, n): the warm start, one vector per matrix of the batch (the callables act on the
    last dimension and broadcast over the others, e.g. one per attention head). Returns (σ of shape ``batch``,
    0-d when unbatched; the new unit ``v`` to pass next time). σ = √‖AᵀAv‖ for the last input v: never above
    σ_max (up to rounding in the compute dtype), and at least the Rayleigh estimate ‖Av‖. Computation is in ``v``'s dtype. A NaN/Inf/zero product
    returns the (normalised) input ``v`` (σ then reads NaN or 0), so one bad weight does not poison the warm
    start.

    ``reduce`` (a SUM all-reduce when A is sharded) is applied once per iteration, to ``rmatvec(matvec(v))``.
    With A row-sharded (rank r holds rows A_r, v replicated), each rank's local callables give A_rᵀA_r v and
    the sum over ranks is AᵀAv: one reduce per iteration and no weight gathered. ‖A_r v‖² needs no reduce of
    its own: the estimate is taken from the norm of the reduced vector, which every rank then holds.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    start = v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    tiny = torch.finfo(v.dtype).tiny  # a zero product stays zero (σ = 0) instead of turning into 0/0
    norm = None
    for _ in range(iters):
        w = rmatvec(matvec(v))
        if reduce is not None:
            w = reduce(w)
        norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        v = w / norm.clamp_min(tiny)
    return settle(norm, v, start)


def settle(norm: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, the vector to keep) after power iteration ended with ‖AᵀAv‖ = ``norm``: a NaN/Inf/zero product keeps
    the ``start`` vector. Checked once, not per iteration (each op costs microseconds on small matrices): NaN
    propagates, and NaN > 0 is False. Inf weights read NaN rather than Inf: both are non-finite."""
    ok = torch.nan_to_num(norm, nan=0.0, posinf=0.0) > 0
    return norm.squeeze(-1).sqrt(), torch.where(ok, v, start)
