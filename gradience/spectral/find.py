"""Finding what the spectral probe measures in a model: the query/key weights of every attention layer
(:func:`find_qk`, by module shape or a user mapping) and the hidden matrices of the fallback
(:func:`hidden_matrices`), each as a getter read at every probe — a view of a local weight, or this rank's
:class:`~gradience.spectral.sharded.LocalBlock` of a DTensor one. Names are wrapper-free (DDP, torch.compile).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradience.spectral.power import COMPUTE_DTYPE
from gradience.spectral.sharded import local_block
from gradience.unwrap import strip_name, unwrap_model

Getter = Callable[[], Any]

_READOUTS = frozenset(("lm_head", "embed_out", "decoder", "classifier", "score", "output_projection"))
_HEADS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_head")
# Child names of separate query / key projections (Llama/Mistral/OPT, BERT, T5, DistilBERT, diffusers, custom).
_QK_CHILDREN = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("q_lin", "k_lin"), ("wq", "wk"), ("to_q", "to_k"))
# Wrappers that prefix names: DDP / DataParallel ("module.") and torch.compile ("_orig_mod.").
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
    sharded: bool = False  #: the weights are DTensor shards: the getters return LocalBlocks


def _probeable(t: Any) -> bool:
    """A real, non-empty float matrix: meta, empty and integer/float8 weights are skipped. A DTensor counts by
    its global shape (every rank must find the same matrices); its local block is what the probe reads."""
    return (isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in COMPUTE_DTYPE and not t.is_meta
            and t.numel() > 0)


def _sharded(t: Any) -> bool:
    return hasattr(t, "device_mesh")


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
        w = getattr(owner, attr)
        if _sharded(w):  # never index a DTensor: that would gather it
            return local_block(w, rows, transposed)
        w = w.detach()
        return (w.t() if transposed else w)[start:stop].unflatten(0, (-1, head_dim))

    return get


def _pair(name: str, q: tuple[nn.Module, str, tuple[int, int] | None], k: tuple[nn.Module, str, tuple[int, int] | None],
          transposed: bool, owner: nn.Module, skipped: list[str], n_heads: int | None = None) -> QKPair | None:
    """A :class:`QKPair` from (module, attribute, row range or None for all rows) of Q and K, or None (and a
    reason in ``skipped``) when the weights cannot be probed or the heads do not divide them."""
    wq, wk = getattr(q[0], q[1], None), getattr(k[0], k[1], None)
    if not (_probeable(wq) and _probeable(wk)):
        skipped.append(f"{name}: Q/K weights are not float matrices (meta, empty or quantized)")
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
                  n, n_kv, hd, _sharded(wq) or _sharded(wk))


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
    model = unwrap_model(model)
    if mapping is not None and "q" in mapping:
        return _mapped(model, mapping, skipped)
    return _auto(model, skipped)


def hidden_matrices(model: nn.Module, exclude: tuple[str, ...] = (), *,
                    sharded: bool = True) -> list[tuple[str, Getter]]:
    """(wrapper-free name, getter) of the hidden 2-D weights: embeddings, weights tied to them, readouts and
    names matching a glob of ``exclude`` left out (see the module docstring for the rule); DTensor weights
    only with ``sharded``."""
    model = unwrap_model(model)
    embeddings = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    emb_ids = {id(w) for w in embeddings}
    emb_ptrs = {w.data_ptr() for w in embeddings if _probeable(w) and not _sharded(w)}
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        if mod_name.rpartition(".")[2] in _READOUTS:
            continue
        for attr, p in mod.named_parameters(recurse=False):
            name = strip_name(f"{mod_name}.{attr}" if mod_name else attr)
            if id(p) in seen or not _probeable(p) or id(p) in emb_ids or (not _sharded(p) and p.data_ptr() in emb_ptrs):
                continue
            if any(fnmatch.fnmatchcase(name, g) for g in exclude) or (_sharded(p) and not sharded):
                continue
            seen.add(id(p))
            out.append((name, lambda mod=mod, attr=attr: _matrix(getattr(mod, attr))))
    return out


def _matrix(w: torch.Tensor) -> Any:
    if _sharded(w):
        return local_block(w, None, False)
    return w.detach()

