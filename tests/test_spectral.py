"""The spectral probe's measurements against explicit SVDs: power iteration, Q/K discovery, the attention-logit
bound, the hidden-σ fallback and the stable-rank channel, on real (tiny) transformers models."""

import math

import pytest
import torch
from torch import nn

from gradience.spectral import SpectralProbe, find_qk, hidden_matrices, power_iteration

CONVERGED = 400  # iterations that bring every tiny model here to its σ_max well within 1e-3


def _planted(m: int, n: int, s: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 (m, n) matrix with singular values ``s`` and its top right singular vector."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T, v[:, 0]


def _sigma(a: torch.Tensor, v: torch.Tensor, iters: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return power_iteration(lambda x: (a @ x.unsqueeze(-1)).squeeze(-1), lambda y: (y.unsqueeze(-2) @ a).squeeze(-2),
                           v, iters, **kw)


# --- power iteration -------------------------------------------------------------------------------------------


def test_power_iteration_underestimates_within_the_theoretical_bound():
    rho = 0.8
    a, v1 = _planted(48, 32, [5.0, 5.0 * rho, 3.0, 2.0, 1.0, 0.5])
    v0 = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos2 = float((v0 @ v1) ** 2 / (v0 @ v0))
    tan2 = (1 - cos2) / cos2
    prev = 0.0
    for k in range(1, 17):
        sigma, v = _sigma(a, v0, k)
        assert sigma.ndim == 0 and v.shape == (32,)
        err = (5.0 - float(sigma)) / 5.0
        # est/σ1 >= (1 + tan²θ0 ρ^(4(k-1)))^(-1/4) >= 1 - tan²θ0 ρ^(4(k-1)) / 4, and est <= σ1.
        assert -1e-12 <= err <= tan2 * rho ** (4 * (k - 1)) / 4 + 1e-12
        assert float(sigma) >= prev - 1e-12  # monotone from a fixed start
        prev = float(sigma)
    assert err < 1e-4


def test_power_iteration_on_random_matrices_matches_svdvals():
    g = torch.Generator().manual_seed(0)
    for m, n in ((40, 30), (17, 64), (64, 64)):
        a = torch.randn(m, n, generator=g)
        exact = float(torch.linalg.svdvals(a.double())[0])
        v0 = torch.randn(n, generator=g)
        for k in (1, 3, 10):
            assert float(_sigma(a, v0, k)[0]) <= exact * (1 + 1e-5)  # never above σ_max (float32 rounding aside)
        assert float(_sigma(a, v0, 3000)[0]) == pytest.approx(exact, rel=1e-4)


def test_warm_start_converges_faster_than_cold():
    for seed in range(3):
        a, _ = _planted(64, 48, [4.0, 3.6, 3.0, 1.0], seed=seed)  # slow: σ2/σ1 = 0.9
        g = torch.Generator().manual_seed(100 + seed)
        _, v = _sigma(a, torch.randn(48, generator=g, dtype=torch.float64), 50)
        b = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)  # one optimizer step later
        exact = float(torch.linalg.svdvals(b)[0])
        warm = (exact - float(_sigma(b, v, 1)[0])) / exact
        cold = (exact - float(_sigma(b, torch.randn(48, generator=g, dtype=torch.float64), 1)[0])) / exact
        assert 0 <= warm < cold / 100


def test_batched_heads_iterate_together():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, 20, generator=g, dtype=torch.float64)
    a[2] *= 7  # batch members do not mix: a scaled one must not move the others
    sigma, v = _sigma(a, torch.randn(5, 20, generator=g, dtype=torch.float64), 2000)
    assert sigma.shape == (5,) and v.shape == (5, 20)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(a)[:, 0], rtol=1e-6, atol=0)


def test_reduce_hook_sums_row_shards_once_per_iteration():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 30, generator=g, dtype=torch.float64)
    shards = a.chunk(4)  # rank r holds rows 10r..10r+9; v is replicated
    calls = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:  # stands in for dist.all_reduce(SUM) over 4 ranks
        calls.append(t.shape)
        return t.sum(0)

    v0 = torch.randn(30, generator=g, dtype=torch.float64)
    for k in (1, 5):
        calls.clear()
        sharded = power_iteration(lambda x: torch.stack([s @ x for s in shards]),
                                  lambda u: torch.stack([ur @ s for ur, s in zip(u, shards, strict=True)]),
                                  v0, k, reduce=all_reduce)
        whole = _sigma(a, v0, k)
        assert calls == [(4, 30)] * k
        torch.testing.assert_close(sharded[0], whole[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(sharded[1], whole[1], rtol=1e-10, atol=1e-12)


def test_degenerate_products_keep_the_vector():
    v0 = torch.randn(6, generator=torch.Generator().manual_seed(0))
    sigma, v = _sigma(torch.zeros(4, 6), v0, 3)
    assert float(sigma) == 0 and torch.allclose(v, v0 / v0.norm())
    sigma, v = _sigma(torch.full((4, 6), float("nan")), v0, 3)
    assert math.isnan(float(sigma)) and torch.isfinite(v).all()
    with pytest.raises(ValueError):
        _sigma(torch.ones(4, 6), v0, 0)


# --- models ----------------------------------------------------------------------------------------------------


def _gpt2(**kw) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, **kw))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=16))


def _bound(q: torch.Tensor, k: torch.Tensor, group: int = 1) -> float:
    """Explicit max over heads of σ_max(W_Q,hᵀ W_K,h)/√d_h; q (H, hd, d_q), k (H_kv, hd, d_k)."""
    q, k = q.double(), k.double()
    return max(float(torch.linalg.svdvals(q[h].T @ k[h // group])[0]) for h in range(q.shape[0])) / q.shape[1] ** 0.5


def _gpt2_explicit(model: nn.Module) -> dict[str, float]:
    out = {}
    for i, block in enumerate(model.transformer.h):
        w, d = block.attn.c_attn.weight.detach(), model.config.n_embd
        h = model.config.n_head
        out[f"transformer.h.{i}.attn"] = _bound(w[:, :d].T.reshape(h, d // h, d), w[:, d:2 * d].T.reshape(h, d // h, d))
    return out


def _llama_explicit(model: nn.Module) -> dict[str, float]:
    c, out = model.config, {}
    hd = c.hidden_size // c.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        q = layer.self_attn.q_proj.weight.detach().reshape(c.num_attention_heads, hd, -1)
        k = layer.self_attn.k_proj.weight.detach().reshape(c.num_key_value_heads, hd, -1)
        out[f"model.layers.{i}.self_attn"] = _bound(q, k, c.num_attention_heads // c.num_key_value_heads)
    return out


def _bert_explicit(model: nn.Module) -> dict[str, float]:
    c, out = model.config, {}
    hd = c.hidden_size // c.num_attention_heads
    for i, layer in enumerate(model.encoder.layer):
        s = layer.attention.self
        out[f"encoder.layer.{i}.attention.self"] = _bound(s.query.weight.detach().reshape(-1, hd, c.hidden_size),
                                                          s.key.weight.detach().reshape(-1, hd, c.hidden_size))
    return out


def _mha_explicit(m: nn.MultiheadAttention) -> float:
    e, h = m.embed_dim, m.num_heads
    if m.in_proj_weight is not None:
        w = m.in_proj_weight.detach()
        return _bound(w[:e].reshape(h, e // h, e), w[e:2 * e].reshape(h, e // h, e))
    return _bound(m.q_proj_weight.detach().reshape(h, e // h, e), m.k_proj_weight.detach().reshape(h, e // h, -1))


def _check(model: nn.Module, explicit: dict[str, float], **kw) -> SpectralProbe:
    probe = SpectralProbe(model, **kw)
    r = probe.measure(iters=CONVERGED)
    assert r.definition == "attention_logit_bound" and not probe.skipped
    assert r.layers.keys() == explicit.keys()
    for name, value in explicit.items():
        assert r.layers[name] == pytest.approx(value, rel=1e-3), name
        assert r.layers[name] <= value * (1 + 1e-5)
    assert r.kappa == max(r.layers.values()) and r.layers[r.where] == r.kappa
    return probe


def test_gpt2_bound_matches_explicit_per_head_svd():
    model = _gpt2()
    _check(model, _gpt2_explicit(model))


def test_gpt2_views_reproduce_the_projections():
    model = _gpt2()
    attn, d = model.transformer.h[1].attn, 32
    pair = find_qk(model)[1]
    assert (pair.name, pair.n_heads, pair.n_kv_heads, pair.head_dim) == ("transformer.h.1.attn", 4, 4, 8)
    x = torch.randn(3, d)
    with torch.no_grad():
        qkv = attn.c_attn(x) - attn.c_attn.bias
    torch.testing.assert_close(torch.einsum("hed,bd->bhe", pair.q(), x).reshape(3, d), qkv[:, :d])
    torch.testing.assert_close(torch.einsum("hed,bd->bhe", pair.k(), x).reshape(3, d), qkv[:, d:2 * d])
    assert pair.q().untyped_storage().data_ptr() == attn.c_attn.weight.untyped_storage().data_ptr()  # a view


def test_llama_grouped_query_attention_pairs_each_query_head_with_its_kv_head():
    model = _llama()
    pairs = find_qk(model)
    assert [(p.n_heads, p.n_kv_heads, p.head_dim) for p in pairs] == [(4, 2, 8)] * 2
    # Query head 2 and kv head 1 (its partner under repeat_kv: h // 2) scaled up: only the right pairing
    # multiplies the two; pairing by h % 2 would put query head 2 with kv head 0.
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight[16:24] *= 10
        attn.k_proj.weight[8:16] *= 10
    explicit = _llama_explicit(model)
    q = attn.q_proj.weight.detach().reshape(4, 8, 32)
    wrong = _bound(q[[0, 2, 1, 3]], attn.k_proj.weight.detach().reshape(2, 8, 32), 2)
    assert explicit["model.layers.0.self_attn"] > 5 * wrong
    _check(model, explicit)


def test_bert_bound_matches_explicit():
    model = _bert()
    _check(model, _bert_explicit(model))


def test_multihead_attention_fused_and_separate_projections():
    torch.manual_seed(0)
    fused = nn.MultiheadAttention(24, 3)
    separate = nn.MultiheadAttention(24, 4, kdim=12, vdim=12)  # q (24, 24), k (24, 12): a rectangular product
    assert separate.in_proj_weight is None
    for m in (fused, separate):
        _check(m, {"": _mha_explicit(m)})
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    _check(enc, {f"layers.{i}.self_attn": _mha_explicit(enc.layers[i].self_attn) for i in range(2)})


class _Block(nn.Module):
    """Custom attention auto-discovery cannot read: raw (in, out) parameters and a fused projection."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.Wq = nn.Parameter(torch.randn(d, d) / d**0.5)  # used as x @ Wq
        self.Wk = nn.Parameter(torch.randn(d, d // 2) / d**0.5)  # 2 kv heads of 8 for 4 query heads
        self.mix = nn.Linear(d, 3 * d)  # rows q | k | v
        self.ff = nn.Linear(d, d)


class _Custom(nn.Module):
    def __init__(self, d: int = 32, n: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))


def test_mapping_for_custom_attention():
    model = _Custom()
    assert find_qk(model) == []
    explicit = {f"blocks.{i}": _bound(b.Wq.detach().T.reshape(4, 8, 32), b.Wk.detach().T.reshape(2, 8, 32), 2)
                for i, b in enumerate(model.blocks)}
    probe = _check(model, explicit, mapping={"q": "blocks.*.Wq", "k": "blocks.*.Wk", "n_heads": 4,
                                             "n_kv_heads": 2, "transposed": True})
    assert [(p.n_heads, p.n_kv_heads, p.head_dim) for p in probe.pairs] == [(4, 2, 8)] * 2
    fused = {f"blocks.{i}.mix": _bound(b.mix.weight.detach()[:32].reshape(4, 8, 32),
                                       b.mix.weight.detach()[32:64].reshape(4, 8, 32)) for i, b in enumerate(model.blocks)}
    _check(model, fused, mapping={"q": r"re:blocks\.\d+\.mix\.weight", "k": r"re:blocks\.\d+\.mix\.weight",
                                  "n_heads": 4, "q_rows": (0, 32), "k_rows": (32, 64)})
    with pytest.raises(ValueError, match="matches 0"):
        SpectralProbe(model, mapping={"q": "nothing.*", "k": "blocks.*.Wk", "n_heads": 4})
    with pytest.raises(ValueError, match="n_kv_heads"):
        SpectralProbe(model, mapping={"q": "blocks.*.Wq", "k": "blocks.*.Wk", "n_heads": 4, "n_kv_heads": 4,
                                      "transposed": True})


class _TimmAttention(nn.Module):
    def __init__(self, d: int, heads: int | None) -> None:
        super().__init__()
        if heads is not None:
            self.num_heads = heads
        self.qkv = nn.Linear(d, 3 * d)


def test_fused_qkv_linear_is_found_and_unknown_head_counts_are_skipped():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": _TimmAttention(32, 4), "b": _TimmAttention(32, None)})
    skipped: list[str] = []
    pairs = find_qk(model, skipped=skipped)
    assert [p.name for p in pairs] == ["a"] and skipped == ["b: cannot tell the number of heads"]
    w = model["a"].qkv.weight.detach()
    probe = SpectralProbe(model)
    assert probe.skipped == skipped
    r = probe.measure(iters=CONVERGED)
    assert r.layers["a"] == pytest.approx(_bound(w[:32].reshape(4, 8, 32), w[32:64].reshape(4, 8, 32)), rel=1e-3)


# --- hidden matrices -------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight  # tied under a name the readout rule does not know
        with torch.no_grad():  # if embeddings or readouts were counted they would win by far
            self.emb.weight.mul_(100)
            self.lm_head.weight.mul_(100)


def test_fallback_is_the_max_hidden_sigma_without_embeddings_or_readouts():
    model = _MLP()
    assert [n for n, _ in hidden_matrices(model)] == ["fc1.weight", "fc2.weight"]
    probe = SpectralProbe(model)
    r = probe.measure(iters=CONVERGED)
    assert r.definition == probe.definition == "max_hidden_sigma"
    exact = {n: float(torch.linalg.svdvals(getattr(model, n).weight.detach().double())[0]) for n in ("fc1", "fc2")}
    assert r.layers == pytest.approx({f"{n}.weight": v for n, v in exact.items()}, rel=1e-4)
    assert r.kappa == pytest.approx(max(exact.values()), rel=1e-4)
    assert r.where == max(r.layers, key=r.layers.get)
    with pytest.raises(ValueError, match="no attention"):
        SpectralProbe(model, definition="attention")
    assert [n for n, _ in SpectralProbe(model, mapping={"exclude": ["fc2.*"]}).hidden] == ["fc1.weight"]


def _concentration(w: torch.Tensor) -> float:
    w = w.double()
    return float(torch.linalg.svdvals(w)[0] * min(w.shape) ** 0.5 / torch.linalg.vector_norm(w))


def test_stable_rank_channel_matches_explicit():
    model = _gpt2()
    names = {n for n, p in model.named_parameters() if p.ndim == 2} - {"transformer.wte.weight", "transformer.wpe.weight"}
    assert {n for n, _ in hidden_matrices(model)} == names  # lm_head is tied to wte: never listed separately
    exact = {n: _concentration(p.detach()) for n, p in model.named_parameters() if n in names}
    r = SpectralProbe(model).measure(iters=CONVERGED)
    assert r.stable_rank == pytest.approx(max(exact.values()), rel=1e-3)
    assert r.stable_rank_where == max(exact, key=exact.get)
    assert math.isnan(SpectralProbe(model, stable_rank=False).measure().stable_rank)
    hs = SpectralProbe(model, definition="hidden_sigma").measure(iters=CONVERGED)
    assert hs.definition == "max_hidden_sigma" and hs.layers.keys() == names


# --- wrappers, dtypes, side effects ----------------------------------------------------------------------------


class _DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_models_report_unwrapped_names():
    model = _gpt2()
    plain = SpectralProbe(model).measure(iters=CONVERGED)
    for wrapped in (_DDPLike(model), torch.compile(model), _DDPLike(_DDPLike(model))):
        probe = SpectralProbe(wrapped)
        assert [p.name for p in probe.pairs] == ["transformer.h.0.attn", "transformer.h.1.attn"]
        assert "transformer.h.0.mlp.c_fc.weight" in {n for n, _ in probe.hidden}
        r = probe.measure(iters=CONVERGED)
        assert r.layers == pytest.approx(plain.layers, rel=1e-5) and r.where == plain.where


def test_bf16_model_is_measured_in_float32_without_touching_it():
    model = _gpt2().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = _check(model, _gpt2_explicit(model))
    assert all(v.dtype == torch.float32 for v in probe._v_attn + probe._v_hidden)
    assert all(torch.equal(p, before[n]) and p.dtype == torch.bfloat16 for n, p in model.named_parameters())


def test_measure_has_no_side_effects_and_needs_no_grad_mode():
    model = _gpt2()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = SpectralProbe(model)
    with torch.no_grad():
        probe.measure()
    probe.measure()  # grad mode on: no graph, no .grad
    assert torch.equal(torch.get_rng_state(), rng)  # start vectors come from a private generator
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_warm_probe_needs_one_iteration():
    model = _gpt2()
    explicit = max(_gpt2_explicit(model).values())
    warm = SpectralProbe(model)
    warm.measure(iters=50)
    with torch.no_grad():  # an optimizer step's worth of change
        for p in model.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    explicit = max(_gpt2_explicit(model).values())
    warm_err = (explicit - warm.measure(iters=1).kappa) / explicit
    cold_err = (explicit - SpectralProbe(model, cold_iters=1).measure(iters=1).kappa) / explicit
    assert -1e-5 < warm_err < cold_err / 10


def test_nan_weight_reads_nan_and_does_not_poison_the_warm_start():
    model = _gpt2()
    probe = SpectralProbe(model)
    good = probe.measure(iters=CONVERGED)
    w = model.transformer.h[1].attn.c_attn.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    bad = probe.measure()
    assert math.isnan(bad.kappa) and bad.where == "transformer.h.1.attn"
    assert math.isnan(bad.stable_rank) and bad.stable_rank_where == "transformer.h.1.attn.c_attn.weight"
    with torch.no_grad():  # a rollback restores the weight
        w.copy_(saved)
    again = probe.measure(iters=1)
    assert again.kappa == pytest.approx(good.kappa, rel=1e-4)


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_meta_and_empty_parameters_are_skipped():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        meta = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4))
    probe = SpectralProbe(meta)
    assert probe.pairs == [] and probe.hidden == [] and len(probe.skipped) == 2
    r = probe.measure()
    assert r.definition == "none" and math.isnan(r.kappa) and r.where == ""
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"), nn.Linear(0, 8))
    assert [n for n, _ in hidden_matrices(mixed)] == ["0.weight"]
    r = SpectralProbe(mixed).measure(iters=CONVERGED)
    assert r.kappa == pytest.approx(float(torch.linalg.svdvals(mixed[0].weight.detach().double())[0]), rel=1e-4)


def test_zero_matrix_has_zero_concentration_not_nan():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight.zero_()
    r = SpectralProbe(model).measure(iters=CONVERGED)
    assert math.isfinite(r.stable_rank) and r.stable_rank_where == "0.weight"
