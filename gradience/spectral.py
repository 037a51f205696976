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

import fnmatch
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Getter = Callable[[], torch.Tensor]

DEFINITIONS = ("auto", "attention", "hidden_sigma")
# Iterations for a vector's first call, from random: random vectors are far from the top singular vector.
COLD_ITERS = 8
_COMPUTE = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32,
            torch.float64: torch.float64}
_READOUTS = frozenset(("lm_head", "embed_out", "decoder", "classifier", "score", "output_projection"))
_HEADS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_head")
# Child names of separate query / key projections (Llama/Mistral/OPT, BERT, T5, DistilBERT, diffusers, custom).
_QK_CHILDREN = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("q_lin", "k_lin"), ("wq", "wk"), ("to_q", "to_k"))
# Wrappers that prefix names: DDP / DataParallel ("module.") and torch.compile ("_orig_mod.").
_PREFIXES = ("module.", "_orig_mod.")
_MAX_DEPTH = 16


@dataclass(frozen=True)
class QKPair:
    """One attention layer's query and key weights, as per-head views (no copies)."""

    name: str  #: the attention module's name, wrapper prefixes stripped
    q: Getter  #: -> W_Q as (n_heads, head_dim, d_q), read from the live parameter at each call
    k: Getter  #: -> W_K as (n_kv_heads, head_dim, d_k); query head h reads kv head h // (n_heads // n_kv_heads)
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True, kw_only=True)
class SpectralReading:
    """One :meth:`SpectralProbe.measure`: plain floats, NaN where a weight is NaN (the max keeps NaN)."""

    kappa: float
    stable_rank: float  #: max σ_max·√r/‖W‖_F (NaN when the probe was built with ``stable_rank=False``)
    definition: str  #: "attention_logit_bound", "max_hidden_sigma", or "none" (nothing to probe: kappa is NaN)
    where: str  #: the attention layer (or hidden weight) holding the max of kappa
    stable_rank_where: str = ""
    layers: dict[str, float] = field(default_factory=dict)  #: kappa per attention layer (or per hidden weight)


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
    # Checked once, not per iteration (each op costs microseconds on small matrices): NaN propagates, and
    # NaN > 0 is False. Inf weights read NaN rather than Inf: both are non-finite.
    ok = torch.nan_to_num(norm, nan=0.0, posinf=0.0) > 0
    return norm.squeeze(-1).sqrt(), torch.where(ok, v, start)


def strip_name(name: str) -> str:
    """``name`` without the prefixes DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) add."""
    name = name.replace("._orig_mod.", ".")  # a compiled submodule
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (``model`` itself when it is not wrapped)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(_MAX_DEPTH):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = model.module if isinstance(model, wrappers) else None
        if inner is None:
            return model
        model = inner
    raise ValueError(f"more than {_MAX_DEPTH} nested wrappers around {type(model).__name__}")


def _probeable(t: Any) -> bool:
    """A real, local, non-empty float matrix: meta, empty, integer/float8 and DTensor shards are skipped
    (a DTensor op would run collectives behind our back; sharded weights go through ``reduce``)."""
    return (isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in _COMPUTE and not t.is_meta
            and t.numel() > 0 and not hasattr(t, "device_mesh"))


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first positive int among ``module.<name>`` then ``module.config.<name>``."""
    for obj in (module, getattr(module, "config", None)):
        for n in names:
            val = getattr(obj, n, None) if obj is not None else None
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                return val
    return None


def _heads(owner: nn.Module, q_rows: int, k_rows: int, n_heads: int | None = None) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) from the attention module's attributes or config, checked against the
    weights; the kv head count is read off the key rows, which is how grouped-query attention shows."""
    head_dim = None if n_heads is not None else _int_attr(owner, _HEAD_DIM)
    if head_dim is None:
        n_heads = n_heads or _int_attr(owner, _HEADS)
        if n_heads is None or q_rows % n_heads:
            return None
        head_dim = q_rows // n_heads
    if not k_rows or q_rows % head_dim or k_rows % head_dim:
        return None
    n, n_kv = q_rows // head_dim, k_rows // head_dim
    return (n, n_kv, head_dim) if n % n_kv == 0 else None


def _view(owner: nn.Module, attr: str, rows: tuple[int, int], transposed: bool, head_dim: int) -> Getter:
    """A getter of rows [start, stop) of ``owner.<attr>`` (in (out, in) orientation) as (heads, head_dim, in)."""
    start, stop = rows

    def get() -> torch.Tensor:
        w = getattr(owner, attr).detach()
        return (w.t() if transposed else w)[start:stop].unflatten(0, (-1, head_dim))

    return get


def _pair(name: str, q: tuple[nn.Module, str, tuple[int, int] | None], k: tuple[nn.Module, str, tuple[int, int] | None],
          transposed: bool, owner: nn.Module, skipped: list[str], n_heads: int | None = None) -> QKPair | None:
    """A :class:`QKPair` from (module, attribute, row range or None for all rows) of Q and K, or None (and a
    reason in ``skipped``) when the weights cannot be probed or the heads do not divide them."""
    wq, wk = getattr(q[0], q[1], None), getattr(k[0], k[1], None)
    if not (_probeable(wq) and _probeable(wk)):
        skipped.append(f"{name}: Q/K weights are not local float matrices (meta, empty, sharded or quantized)")
        return None
    dim = 1 if transposed else 0
    q_rows = q[2] or (0, wq.shape[dim])
    k_rows = k[2] or (0, wk.shape[dim])
    heads = _heads(owner, q_rows[1] - q_rows[0], k_rows[1] - k_rows[0], n_heads)
    if heads is None:
        skipped.append(f"{name}: cannot tell the number of heads")
        return None
    n, n_kv, hd = heads
    return QKPair(name, _view(q[0], q[1], q_rows, transposed, hd), _view(k[0], k[1], k_rows, transposed, hd),
                  n, n_kv, hd)


def _has_weight(m: Any) -> bool:
    return isinstance(m, nn.Module) and isinstance(getattr(m, "weight", None), torch.Tensor)


def _is_conv1d(m: Any) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is (in, out), used as ``x @ W``."""
    return _has_weight(m) and type(m).__name__ == "Conv1D"


def _auto(model: nn.Module, skipped: list[str]) -> list[QKPair]:
    pairs = []
    for raw, m in model.named_modules():
        name = strip_name(raw)
        found = None
        if isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            if m.in_proj_weight is not None:  # fused (3E, E): rows q | k | v
                found = _pair(name, (m, "in_proj_weight", (0, e)), (m, "in_proj_weight", (e, 2 * e)), False, m,
                              skipped)
            else:  # kdim != embed_dim: separate q (E, E) and k (E, kdim)
                found = _pair(name, (m, "q_proj_weight", None), (m, "k_proj_weight", None), False, m, skipped)
        elif _is_conv1d(getattr(m, "c_attn", None)):  # GPT-2: (d, 3d) columns q | k | v, or (d, 2d) k | v + q_attn
            c = m.c_attn
            nf = c.weight.shape[1]
            if getattr(m, "is_cross_attention", False) and _is_conv1d(getattr(m, "q_attn", None)):
                found = _pair(name, (m.q_attn, "weight", None), (c, "weight", (0, nf // 2)), True, m, skipped)
            elif nf % 3 == 0:
                d = nf // 3
                found = _pair(name, (c, "weight", (0, d)), (c, "weight", (d, 2 * d)), True, m, skipped)
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv.out_features % 3 == 0:
            d = m.qkv.out_features // 3  # timm ViT: rows q | k | v, each (heads, head_dim)
            found = _pair(name, (m.qkv, "weight", (0, d)), (m.qkv, "weight", (d, 2 * d)), False, m, skipped)
        else:
            for qa, ka in _QK_CHILDREN:
                qm, km = getattr(m, qa, None), getattr(m, ka, None)
                if _has_weight(qm) and _has_weight(km):
                    found = _pair(name, (qm, "weight", None), (km, "weight", None), _is_conv1d(qm), m, skipped)
                    break
        if found is not None:
            pairs.append(found)
    return pairs


def _matches(pattern: str, name: str) -> bool:
    """Mapping patterns: a glob (``fnmatch``, case-sensitive), or with a ``re:`` prefix a full-match regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _mapped(model: nn.Module, mapping: Mapping[str, Any], skipped: list[str]) -> list[QKPair]:
    params = [(strip_name(n), n) for n, _ in model.named_parameters()]
    qs = [(s, n) for s, n in params if _matches(mapping["q"], s)]
    ks = [(s, n) for s, n in params if _matches(mapping["k"], s)]
    if not qs or len(qs) != len(ks):
        raise ValueError(f"mapping: q pattern {mapping['q']!r} matches {len(qs)} weights, k pattern "
                         f"{mapping['k']!r} matches {len(ks)}; they must match the same number (>= 1)")
    if not isinstance(mapping.get("n_heads"), int) or mapping["n_heads"] < 1:
        raise ValueError(f"mapping: 'n_heads' must be a positive int, got {mapping.get('n_heads')!r}")
    n_heads = mapping["n_heads"]
    transposed = bool(mapping.get("transposed", False))
    q_rows, k_rows = mapping.get("q_rows"), mapping.get("k_rows")
    pairs = []
    for (qs_name, qn), (_, kn) in zip(qs, ks, strict=True):
        q_owner, _, q_attr = qn.rpartition(".")
        k_owner, _, k_attr = kn.rpartition(".")
        qm, km = model.get_submodule(q_owner), model.get_submodule(k_owner)
        found = _pair(qs_name.rpartition(".")[0] or qs_name, (qm, q_attr, tuple(q_rows) if q_rows else None),
                      (km, k_attr, tuple(k_rows) if k_rows else None), transposed, qm, skipped, n_heads)
        if found is None:
            raise ValueError(f"mapping: {skipped[-1]}")
        if "n_kv_heads" in mapping and found.n_kv_heads != int(mapping["n_kv_heads"]):
            raise ValueError(f"mapping: {qs_name}: n_kv_heads={mapping['n_kv_heads']} but the key weight has "
                             f"{found.n_kv_heads} heads of dim {found.head_dim}")
        pairs.append(found)
    return pairs


def find_qk(model: nn.Module, mapping: Mapping[str, Any] | None = None,
            skipped: list[str] | None = None) -> list[QKPair]:
    """The query/key weights of every attention layer of ``model`` (DDP/compile wrappers seen through).

    Found by shape: ``nn.MultiheadAttention`` (fused ``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``),
    GPT-2's fused ``c_attn`` Conv1D, timm's fused ``qkv`` Linear (rows q | k | v), and any module with child
    projections named ``q_proj``/``k_proj``, ``query``/``key``, ``q``/``k``, ``q_lin``/``k_lin``, ``wq``/``wk``
    or ``to_q``/``to_k``, heads read from the module or its ``config`` (``num_heads``, ``n_head``,
    ``num_attention_heads``, ``heads``; ``head_dim``, ``attention_head_size``). Fused layouts other than
    q | k | v blocks (GPT-NeoX's per-head interleaved ``query_key_value``) need a mapping.

    ``mapping`` replaces discovery when it has a ``"q"`` key::

        {"q": "layers.*.attn.wq.weight", "k": "layers.*.attn.wk.weight", "n_heads": 8}

    ``q``/``k``: patterns of parameter names (glob, or ``"re:<regex>"``), matched against wrapper-free names;
    the i-th match of ``q`` pairs with the i-th of ``k`` in ``named_parameters`` order. ``n_heads``: query
    heads. Optional: ``n_kv_heads`` (checked; the count is read off the key rows), ``transposed`` (True for
    weights stored (in, out) and used as ``x @ W``), ``q_rows``/``k_rows`` ((start, stop) output rows of a
    fused projection; q and k may then name the same weight). A mapping that matches nothing raises ValueError.
    Layers that cannot be probed are left out, with a reason appended to ``skipped`` when it is given.
    """
    skipped = [] if skipped is None else skipped
    model = _unwrap(model)
    if mapping is not None and "q" in mapping:
        return _mapped(model, mapping, skipped)
    return _auto(model, skipped)


def hidden_matrices(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[tuple[str, Getter]]:
    """(wrapper-free name, getter) of the hidden 2-D weights: embeddings, weights tied to them, readouts and
    names matching a glob of ``exclude`` left out (see the module docstring for the rule)."""
    model = _unwrap(model)
    embeddings = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    emb_ids = {id(w) for w in embeddings}
    emb_ptrs = {w.data_ptr() for w in embeddings if _probeable(w)}
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        if mod_name.rpartition(".")[2] in _READOUTS:
            continue
        for attr, p in mod.named_parameters(recurse=False):
            name = strip_name(f"{mod_name}.{attr}" if mod_name else attr)
            if id(p) in seen or not _probeable(p) or id(p) in emb_ids or p.data_ptr() in emb_ptrs:
                continue
            if any(fnmatch.fnmatchcase(name, g) for g in exclude):
                continue
            seen.add(id(p))
            out.append((name, lambda mod=mod, attr=attr: getattr(mod, attr).detach()))
    return out


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
    """

    def __init__(self, model: nn.Module, *, mapping: Mapping[str, Any] | None = None, iters: int = 2,
                 definition: str = "auto", stable_rank: bool = True, cold_iters: int = COLD_ITERS) -> None:
        if definition not in DEFINITIONS:
            raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
        if iters < 1 or cold_iters < 1:
            raise ValueError(f"iters and cold_iters must be >= 1, got {iters}, {cold_iters}")
        self.iters, self.cold_iters = iters, cold_iters
        self.skipped: list[str] = []
        self.pairs = [] if definition == "hidden_sigma" else find_qk(model, mapping, self.skipped)
        if definition == "attention" and not self.pairs:
            raise ValueError("definition='attention' but no attention Q/K weights were found; pass a mapping")
        exclude = tuple(mapping.get("exclude", ())) if mapping is not None else ()
        self.hidden = hidden_matrices(model, exclude) if stable_rank or not self.pairs else []
        self.stable_rank = stable_rank
        self.definition = ("attention_logit_bound" if self.pairs else "max_hidden_sigma" if self.hidden
                           else "none")
        # A private generator: drawing start vectors must not move the training's global RNG.
        self._gen = torch.Generator().manual_seed(0)
        self._v_attn: list[torch.Tensor | None] = [None] * len(self.pairs)
        self._v_hidden: list[torch.Tensor | None] = [None] * len(self.hidden)

    def _start(self, store: list[torch.Tensor | None], i: int, shape: tuple[int, ...], like: torch.Tensor,
               iters: int) -> tuple[torch.Tensor, int]:
        """The warm vector ``store[i]`` on ``like``'s device and dtype, and the iterations it needs."""
        v = store[i]
        if v is None or v.shape != shape:
            v = torch.randn(shape, generator=self._gen, dtype=torch.float64).to(like.device, like.dtype)
            return v, max(iters, self.cold_iters)
        return v.to(like.device, like.dtype), iters

    @torch.no_grad()
    def measure(self, iters: int | None = None) -> SpectralReading:
        """One reading (``iters`` overrides the constructor's, e.g. more while in WARNING); one host sync."""
        iters = self.iters if iters is None else iters
        if self.definition == "none":
            return SpectralReading(kappa=math.nan, stable_rank=math.nan, definition="none", where="")
        # Device work only here (a few ops per matrix: each costs microseconds); scaling and ratios on the host.
        heads, sigmas, fros, ranks = [], [], [], []
        for i, pair in enumerate(self.pairs):
            q, k = pair.q(), pair.k()
            dt = _COMPUTE[q.dtype]
            # Query head j*G + g reads kv head j (as transformers' repeat_kv): group the query heads by kv head.
            q = q.to(dt).unflatten(0, (pair.n_kv_heads, -1))
            k = k.to(dt)
            v, n = self._start(self._v_attn, i, (q.shape[0], q.shape[1], k.shape[-1]), q, iters)
            sigma, self._v_attn[i] = power_iteration(*_qk_products(q, k), v, n)
            heads.append(sigma.amax())  # amax keeps NaN
        for j, (_, get) in enumerate(self.hidden):
            w = get()
            w = w.to(_COMPUTE[w.dtype])
            v, n = self._start(self._v_hidden, j, (w.shape[1],), w, iters)
            sigma, self._v_hidden[j] = power_iteration(w.__matmul__, w.__rmatmul__, v, n)
            sigmas.append(sigma)
            fros.append(torch.linalg.vector_norm(w))
            ranks.append(min(w.shape))
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
