"""Measuring κ̃, the spectral scale of a model's weights, by warm-started power iteration. This module owns the
measurement only: no slopes, bands or burn-in (that is policy), no collectives of its own, no config object.

Two quantities, following ``SPECTRAL.md`` (why these and not σ_max/σ_min):

* κ̃. With attention: the attention-logit bound, max over layers and heads of σ_max(W_Q,hᵀ W_K,h)/√d_h
  ("attention_logit_bound"; W_Q,h is query head h's (d_h, d_model) block, so q·k = xᵀ W_Q,hᵀ W_K,h y). With
  no attention found: the largest σ_max over hidden matrices ("max_hidden_sigma"). The bound uses the standard
  1/√d_h whatever scaling the module applies, and ignores projection biases and rotary embeddings (RoPE rotates
  q and k, so for Llama-style models it is the scale of the logits, not a strict bound on them).
* Stable-rank concentration: max over hidden matrices of σ_max·√r/‖W‖_F with r = min(m, n), i.e.
  √(r / stable rank): 1 for a flat spectrum, √r for rank one.

Hidden matrices are the 2-D float weights other than embeddings and readouts, which saturate in every run: a
weight is left out when it belongs to an ``nn.Embedding``/``nn.EmbeddingBag``, is tied to one (same parameter
or same storage), sits in a module whose own name is a readout name (``lm_head``, ``embed_out``, ``decoder``,
``classifier``, ``score``, ``output_projection``), or matches a glob of ``mapping["exclude"]``. The rule is by
name, not by size: in the small models this project trains, the vocabulary (256) equals hidden widths.

σ_max comes from power iteration on AᵀA, warm-started from the previous call's vector (as
``torch.nn.utils.spectral_norm`` keeps ``_u``), so 1-2 iterations per call suffice in steady state. The estimate
√‖AᵀAv‖ (unit v) never exceeds σ_max (up to rounding): errors delay warnings rather than invent them. The iteration runs in
float32 (float64 for float64 weights); bf16/fp16 weights are upcast one matrix at a time. A whole
:meth:`SpectralProbe.measure` ends in one host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradience.spectral.find import find_qk, hidden_matrices
from gradience.spectral.power import COMPUTE_DTYPE, power_iteration
from gradience.spectral.sharded import lockstep, matrix_stages, qk_stages, reduce_many

Getter = Callable[[], torch.Tensor]

DEFINITIONS = ("auto", "attention", "hidden_sigma")
# Iterations for a vector's first call, from random: random vectors are far from the top singular vector.
COLD_ITERS = 8


@dataclass(frozen=True, kw_only=True)
class SpectralReading:
    """One :meth:`SpectralProbe.measure`: plain floats, NaN where a weight is NaN (the max keeps NaN)."""

    kappa: float
    stable_rank: float  #: max σ_max·√r/‖W‖_F (NaN when the probe was built with ``stable_rank=False``)
    definition: str  #: "attention_logit_bound", "max_hidden_sigma", or "none" (nothing to probe: kappa is NaN)
    where: str  #: the attention layer (or hidden weight) holding the max of kappa
    stable_rank_where: str = ""
    layers: dict[str, float] = field(default_factory=dict)  #: kappa per attention layer (or per hidden weight)


def _qk_products(q: torch.Tensor, k: torch.Tensor) -> tuple[Getter, Getter]:
    """matvec / rmatvec of A = W_Q,hᵀ W_K,h for all heads at once, q: (kv, group, hd, d_q), k: (kv, hd, d_k),
    vectors (kv, group, d). Forming A would cost hd·d_q·d_k flops and d_q·d_k memory per head (d_model² each);
    an iteration through these products costs 4·hd·d per head, and a key head serves its whole group at once."""
    kt = k.mT

    def matvec(x: torch.Tensor) -> torch.Tensor:  # A x = W_Qᵀ (W_K x)
        return (torch.matmul(x, kt).unsqueeze(-2) @ q).squeeze(-2)

    def rmatvec(u: torch.Tensor) -> torch.Tensor:  # Aᵀ u = W_Kᵀ (W_Q u)
        return torch.matmul((q @ u.unsqueeze(-1)).squeeze(-1), k)

    return matvec, rmatvec


class SpectralProbe:
    """κ̃ and the stable-rank concentration of one model, with a warm-start vector per matrix / head group.

    Discovery runs once, here: ``definition="auto"`` uses the attention bound when :func:`find_qk` finds
    attention and the hidden-σ fallback otherwise; ``"attention"`` raises ValueError without attention;
    ``"hidden_sigma"`` always uses the fallback. ``mapping`` goes to :func:`find_qk`; its optional
    ``"exclude"`` (globs of parameter names) also leaves weights out of the hidden matrices. ``iters``:
    iterations per :meth:`measure`; a vector's first call runs at least ``cold_iters``. With
    ``stable_rank=False`` the stable-rank channel is not computed (reads NaN): with attention found, most of the
    cost goes, since the hidden matrices are then not iterated at all.
    Layers that could not be probed are listed, with the reason, in :attr:`skipped`.

    Sharded (DTensor) weights need ``reduce``, a SUM all-reduce over the ranks holding the shards (every rank
    calls :meth:`measure` together); each rank then multiplies by its own block only and all ranks read the same
    κ̃ (:mod:`gradience.spectral.sharded`). Without ``reduce`` they are skipped.
    """

    def __init__(self, model: nn.Module, *, mapping: Mapping[str, Any] | None = None, iters: int = 2,
                 definition: str = "auto", stable_rank: bool = True, cold_iters: int = COLD_ITERS,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if definition not in DEFINITIONS:
            raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
        if iters < 1 or cold_iters < 1:
            raise ValueError(f"iters and cold_iters must be >= 1, got {iters}, {cold_iters}")
        self.iters, self.cold_iters = iters, cold_iters
        self.skipped: list[str] = []
        self.reduce = reduce
        self.pairs = [] if definition == "hidden_sigma" else find_qk(model, mapping, self.skipped)
        if reduce is None:
            self.skipped += [f"{p.name}: sharded weights and no reduce" for p in self.pairs if p.sharded]
            self.pairs = [p for p in self.pairs if not p.sharded]
        if definition == "attention" and not self.pairs:
            raise ValueError("definition='attention' but no attention Q/K weights were found; pass a mapping")
        exclude = tuple(mapping.get("exclude", ())) if mapping is not None else ()
        self.hidden = (hidden_matrices(model, exclude, sharded=reduce is not None) if stable_rank or not self.pairs
                       else [])
        self.stable_rank = stable_rank
        self.definition = ("attention_logit_bound" if self.pairs else "max_hidden_sigma" if self.hidden
                           else "none")
        # A private generator: drawing start vectors must not move the training's global RNG.
        self._gen = torch.Generator().manual_seed(0)
        self._v_attn: list[torch.Tensor | None] = [None] * len(self.pairs)
        self._v_hidden: list[torch.Tensor | None] = [None] * len(self.hidden)

    def _start(self, store: list[torch.Tensor | None], i: int, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype, iters: int) -> tuple[torch.Tensor, int]:
        """The warm vector ``store[i]`` on ``device`` in ``dtype``, and the iterations it needs."""
        v = store[i]
        if v is None or v.shape != shape:
            v = torch.randn(shape, generator=self._gen, dtype=torch.float64).to(device, dtype)
            return v, max(iters, self.cold_iters)
        return v.to(device, dtype), iters

    @torch.no_grad()
    def measure(self, iters: int | None = None) -> SpectralReading:
        """One reading (``iters`` overrides the constructor's, e.g. more while in WARNING); one host sync."""
        iters = self.iters if iters is None else iters
        if self.definition == "none":
            return SpectralReading(kappa=math.nan, stable_rank=math.nan, definition="none", where="")
        # Device work only here (a few ops per matrix: each costs microseconds); scaling and ratios on the host.
        heads, sigmas, fros, ranks = [], [], [], []
        sharded: list[tuple[str, int, Any, Any]] = []  # (kind, index, block(s), pair) run in lockstep below
        for i, pair in enumerate(self.pairs):
            q, k = pair.q(), pair.k()
            if pair.sharded:
                sharded.append(("attn", i, (q, k), pair))
                heads.append(None)
                continue
            dt = COMPUTE_DTYPE[q.dtype]
            # Query head j*G + g reads kv head j (as transformers' repeat_kv): group the query heads by kv head.
            q = q.to(dt).unflatten(0, (pair.n_kv_heads, -1))
            k = k.to(dt)
            v, n = self._start(self._v_attn, i, (q.shape[0], q.shape[1], k.shape[-1]), q.device, q.dtype, iters)
            sigma, self._v_attn[i] = power_iteration(*_qk_products(q, k), v, n)
            heads.append(sigma.amax())  # amax keeps NaN
        for j, (_, get) in enumerate(self.hidden):
            w = get()
            if not isinstance(w, torch.Tensor):  # a sharded block
                sharded.append(("hidden", j, w, None))
                sigmas.append(None)
                fros.append(None)
                ranks.append(min(w.rows, w.cols))
                continue
            w = w.to(COMPUTE_DTYPE[w.dtype])
            v, n = self._start(self._v_hidden, j, (w.shape[1],), w.device, w.dtype, iters)
            sigma, self._v_hidden[j] = power_iteration(w.__matmul__, w.__rmatmul__, v, n)
            sigmas.append(sigma)
            fros.append(torch.linalg.vector_norm(w))
            ranks.append(min(w.shape))
        if sharded:
            self._sharded(sharded, iters, heads, sigmas, fros)
        values = _host(heads + sigmas + fros)
        head_values, sigma_values, fro_values = (values[:len(heads)], values[len(heads):len(heads) + len(sigmas)],
                                                 values[len(heads) + len(sigmas):])
        if self.pairs:
            names = [p.name for p in self.pairs]
            kappas = [x / math.sqrt(p.head_dim) for x, p in zip(head_values, self.pairs, strict=True)]
        else:
            names, kappas = [n for n, _ in self.hidden], sigma_values
        # A zero matrix (zero-initialised projections) has no spectrum to concentrate: 0, not 0/0 = NaN.
        concs = [0.0 if f == 0 else s * math.sqrt(r) / f
                 for s, f, r in zip(sigma_values, fro_values, ranks, strict=True)] if self.stable_rank else []
        kappa, where = _max(names, kappas)
        conc, conc_where = _max([n for n, _ in self.hidden], concs)
        return SpectralReading(kappa=kappa, stable_rank=conc, definition=self.definition, where=where,
                               stable_rank_where=conc_where, layers=dict(zip(names, kappas, strict=True)))


    def _sharded(self, jobs: list[tuple[str, int, Any, Any]], iters: int, heads: list, sigmas: list,
                 fros: list) -> None:
        """The sharded operators' power iterations in lockstep (one reduce per stage for all of them); fills the
        placeholders of ``heads``, ``sigmas`` and ``fros``."""
        ops, frob, n = [], [], iters
        for kind, i, blocks, pair in jobs:
            if kind == "attn":
                q, k = blocks
                dt = COMPUTE_DTYPE[q.t.dtype]
                shape = (pair.n_kv_heads, pair.n_heads // pair.n_kv_heads, k.cols)
                v, m = self._start(self._v_attn, i, shape, q.t.device, dt, iters)
                ops.append((qk_stages(q, k, pair.n_heads, pair.n_kv_heads, pair.head_dim, dt), v))
            else:
                dt = COMPUTE_DTYPE[blocks.t.dtype]
                stages, fro_sq = matrix_stages(blocks, dt)
                v, m = self._start(self._v_hidden, i, (blocks.cols,), blocks.t.device, dt, iters)
                ops.append((stages, v))
                frob.append(fro_sq.reshape(1))
            n = max(n, m)  # vectors started together run the same count (the first probe: cold for all)
        fro_values = iter(reduce_many(frob, self.reduce))
        for (kind, i, _, _), (sigma, v) in zip(jobs, lockstep(ops, n, self.reduce), strict=True):
            if kind == "attn":
                self._v_attn[i] = v
                heads[i] = sigma.amax()
            else:
                self._v_hidden[i] = v
                sigmas[i] = sigma
                fros[i] = next(fro_values).sqrt().reshape(())


def _host(values: list[torch.Tensor]) -> list[float]:
    """0-d tensors, possibly on several devices, as floats in one host sync (gathered on an accelerator when
    any is there: copying each to the CPU would sync once per tensor). float32 unless a value is float64:
    ``.to`` is then free for all the others."""
    if not values:
        return []
    device = next((t.device for t in values if t.device.type != "cpu"), values[0].device)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in values) and device.type != "mps" else torch.float32
    return torch.stack([t.to(device, dtype) for t in values]).tolist()


def _max(names: list[str], values: list[float]) -> tuple[float, str]:
    """The largest value and its name; a NaN wins (a NaN weight is the strongest signal there is)."""
    if not values:
        return math.nan, ""
    i = next((i for i, x in enumerate(values) if math.isnan(x)), None)
    if i is None:
        i = max(range(len(values)), key=values.__getitem__)
    return values[i], names[i]
