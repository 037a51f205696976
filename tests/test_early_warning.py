"""κ̃ and the risk level through the controller: measured on probe steps, agreed across ranks, reported in
telemetry, summary and the log; healthy runs of several architectures stay below WARNING after burn-in."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from gradience import GradienceController, policy
from gradience.config import GradienceConfig
from gradience.risk import RiskLevel
from gradience.types import GuardState, Phase, Verdict
from tests.loops import events, gpt2_loss, make_gpt2, make_mlp, mlp_loss, run_loop
from tests.threaded import free_groups, make_groups, run_ranks


def test_kappa_reaches_telemetry_summary_and_log(tmp_path, caplog):
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=5, telemetry_interval=5)
    with caplog.at_level(logging.INFO, logger="gradience"):
        out = run_loop(make_gpt2(), gpt2_loss, ctl, steps=21)
    spec = events(tmp_path, "spectral")
    assert [e["step"] for e in spec] == [0, 5, 10, 15, 20]
    assert all(e["kappa"] > 0 and e["definition"] == "attention_logit_bound" for e in spec)
    tele = {e["step"]: e for e in events(tmp_path, "telemetry")}
    assert tele[20]["spectral_kappa"] == spec[-1]["kappa"] and tele[20]["risk_level"] == spec[-1]["risk_level"]
    s = out["summary"]["spectral"]
    assert (s["final_kappa"], s["final_risk_level"], s["definition"]) == (
        spec[-1]["kappa"], spec[-1]["risk_level"], "attention_logit_bound")
    assert sum("spectral probe κ̃ = attention-logit bound" in r.getMessage() for r in caplog.records) == 1


def test_a_model_without_attention_falls_back_and_says_so_once(tmp_path, caplog):
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=4)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        run_loop(make_mlp(), mlp_loss, ctl, steps=13)
    assert {e["definition"] for e in events(tmp_path, "spectral")} == {"max_hidden_sigma"}
    said = [r for r in caplog.records if "largest σ_max over the hidden weight matrices" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_spectral_off_means_no_probe_and_nulls(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), spectral_enabled=False)
    out = run_loop(make_mlp(), mlp_loss, ctl, steps=6)
    assert events(tmp_path, "spectral") == [] and out["summary"]["spectral"]["final_kappa"] is None


def test_kappa_and_risk_are_identical_on_every_rank(tmp_path):
    groups = make_groups(2)
    models = [make_gpt2(0) for _ in groups]

    def rank_fn(rank, group):
        from gradience.comm import TorchComm

        ctl = GradienceController(out_dir=str(tmp_path), comm=TorchComm(group, timeout_s=30), spectral_interval=3,
                                  risk_burn_in_steps=0)
        # Different batches per rank (as under data parallelism without DDP): the replicas drift apart, and the
        # agreed κ̃ is still one number for everyone (the MAX of the ranks' values).
        return run_loop(models[rank], lambda m, s: gpt2_loss(m, s, seed=rank), ctl, steps=16)

    try:
        run_ranks(groups, rank_fn)
    finally:
        free_groups(groups)
    per_rank = [[(e["step"], e["kappa"], e["risk_level"]) for e in events(tmp_path, "spectral", rank=r)]
                for r in range(2)]
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 6


def test_a_rollback_restarts_the_kappa_history():
    config = GradienceConfig(risk_burn_in_steps=0)
    state = GuardState(committed_sids=(0,), kappa_history=((0, 1.0), (5, 1.1), (10, 1.2)))
    state, decision = policy.decide(state, Verdict(phase=Phase.STEP, step=12, nonfinite_weights=True), config)
    assert decision.action.value == "rollback"
    assert policy.on_restored(state, decision.target_sid, config).kappa_history == ()


def test_risk_level_rises_with_a_growing_kappa():
    config = GradienceConfig(risk_burn_in_steps=0, guard_snapshot_interval=1000)
    state = GuardState()
    levels = []
    for tick in range(0, 400, 50):
        kappa = math.exp(0.02 * tick)  # slope 0.02/step: DANGER (from 0.014)
        state, _ = policy.decide(state, Verdict(phase=Phase.STEP, step=tick, tick=tick, spectral_kappa=kappa), config)
        levels.append(state.risk_level)
    assert levels[:2] == ["STABLE", "STABLE"] and levels[-1] == RiskLevel.DANGER.value


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert", "mlp"])
def test_healthy_runs_stay_below_warning_after_burn_in(tmp_path, arch):
    """The default burn-in (500 steps) matters: with 100, tiny GPT-2 and BERT read DANGER / INSTABILITY between
    steps 100 and 300 of a healthy run, while κ̃ still rises fast from its initialization."""
    if arch == "gpt2":
        model, loss_fn = make_gpt2(0), gpt2_loss
    elif arch == "bert":
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        model = transformers.BertForMaskedLM(cfg)

        def loss_fn(m, step):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 256, (4, 32), generator=g)
            return m(input_ids=ids, labels=ids).loss
    else:
        model, loss_fn = make_mlp(0), mlp_loss
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=25, guard_snapshot_interval=1000)
    run_loop(model, loss_fn, ctl, steps=1000, lr=1e-3)
    after = [e["risk_level"] for e in events(tmp_path, "spectral") if e["step"] >= 500]
    assert after and all(level in ("STABLE", "LEARNING") for level in after), after


def grow_attention(step, model):
    """Scale every GPT-2 layer's fused Q/K/V weight by 1 % (κ̃ grows as its square)."""
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(1.01)


def test_a_growing_attention_scale_raises_the_risk_level_in_telemetry_and_log(tmp_path, caplog):
    """Q and K weights grown 1 % per step: κ̃ ∝ scale², a slope of 2·ln(1.01) ≈ 0.02 per step, far into DANGER."""

    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=5, risk_burn_in_steps=0,
                              guard_snapshot_interval=1000)
    with caplog.at_level(logging.INFO, logger="gradience"):
        run_loop(make_gpt2(), gpt2_loss, ctl, steps=41, lr=1e-4, on_update=grow_attention)
    changes = [(e["previous"], e["level"]) for e in events(tmp_path, "risk_level")]
    assert changes[-1][1] == "DANGER", changes
    slope = events(tmp_path, "spectral")[-1]["slope"]
    assert slope == pytest.approx(2 * math.log(1.01), rel=0.25)
    assert any(r.levelno == logging.WARNING and "-> DANGER" in r.getMessage() for r in caplog.records)


def _probe(state, tick, kappa, config):
    """A probe step's decision, with a rollback's restore reported back as the executor does."""
    state, d = policy.decide(state, Verdict(phase=Phase.STEP, step=tick, tick=tick, spectral_kappa=kappa), config)
    if d.action.value == "rollback":
        state = policy.on_restored(state, d.target_sid, config)
    return state, d


def test_reactions_warning_bursts_danger_backs_off_once_instability_rolls_back():
    # The seed design's bands, so that the slopes below read as the level each part needs.
    config = GradienceConfig(risk_burn_in_steps=0, risk_reactions=True, guard_snapshot_interval=1000,
                             risk_burst_steps=30, risk_warning_slope=0.002, risk_danger_slope=0.004,
                             risk_instability_volatility=0.003)
    # WARNING: slope 0.003/step.
    state, decisions = GuardState(committed_sids=(0,)), []
    for tick in range(0, 200, 10):
        state, d = _probe(state, tick, math.exp(0.003 * tick), config)
        decisions.append(d)
    assert state.risk_level == "WARNING" and decisions[-1].action.value == "snapshot"
    assert state.burst_until == 190 + 30 and policy.spectral_due(201, config, state)
    assert not policy.spectral_due(221, config, state) and state.lr_scale == 1.0
    # DANGER (slope 0.006): one backoff for the whole episode, however many probes read DANGER.
    state = GuardState(committed_sids=(0,))
    for tick in range(0, 300, 10):
        state, d = _probe(state, tick, math.exp(0.006 * tick), config)
    assert state.risk_level == "DANGER" and state.lr_scale == 0.5 and state.risk_backoff_done
    for tick in range(300, 500, 10):  # flat again: the episode ends, a later DANGER may back off again
        state, d = _probe(state, tick, math.exp(0.006 * 290), config)
    assert state.risk_level == "STABLE" and not state.risk_backoff_done and state.lr_scale == 0.5
    # INSTABILITY (volatile κ̃): a rollback, with its budget and LR backoff.
    state = GuardState(committed_sids=(0,))
    for i, tick in enumerate(range(0, 100, 10)):
        state, d = _probe(state, tick, math.exp(0.2 * (i % 2)), config)
        if d.action.value == "rollback":
            break
    assert (d.action.value, d.reason.value) == ("rollback", "SPECTRAL_INSTABILITY") and state.total_rollbacks == 1
    # Reactions off (the default): levels are reported, nothing is done.
    quiet = config.replace(risk_reactions=False)
    state = GuardState(committed_sids=(0,))
    for tick in range(0, 300, 10):
        state, d = _probe(state, tick, math.exp(0.006 * tick), quiet)
    assert state.risk_level == "DANGER" and state.lr_scale == 1.0 and d.action.value == "continue"


def test_a_danger_reaction_backs_the_lr_off_in_a_real_loop(tmp_path, caplog):
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=5, risk_burn_in_steps=0,
                              guard_snapshot_interval=1000, risk_reactions=True)
    with caplog.at_level(logging.WARNING, logger="gradience"):
        out = run_loop(make_gpt2(), gpt2_loss, ctl, steps=41, lr=1e-4, on_update=grow_attention)
    reactions = events(tmp_path, "risk_reaction")
    assert any("DANGER: snapshot and LR backoff" in e["detail"] for e in reactions)
    assert out["summary"]["guard"]["lr_scale"] == 0.5 and out["summary"]["guard"]["total_rollbacks"] == 0
    first = next(e["step"] for e in reactions if "LR backoff" in e["detail"])
    assert all(lr == pytest.approx(1e-4 * 0.5) for lr in out["lrs"][first + 1:])  # in force from the next update
    assert any("spectral DANGER" in r.getMessage() for r in caplog.records)


class _RawAttention(torch.nn.Module):
    """Attention whose Q/K are raw (in, out) parameters used as ``x @ W``: discovery cannot read it."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(32, d)
        self.Wq = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.Wk = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.out = torch.nn.Linear(d, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, t, d = x.shape
        q = (x @ self.Wq).view(b, t, self.heads, -1).transpose(1, 2)
        k = (x @ self.Wk).view(b, t, self.heads, -1).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.out(att @ x.unsqueeze(1))


def _raw_loss(model, step):
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(step))
    return torch.nn.functional.cross_entropy(model(ids).mean(1).reshape(-1, 32), ids.reshape(-1))


def test_a_configured_qk_mapping_is_what_the_guard_measures(tmp_path):
    from gradience.spectral import SpectralProbe

    torch.manual_seed(0)
    model = _RawAttention()
    mapping = {"q": "Wq", "k": "Wk", "n_heads": 2, "transposed": True}
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=5, spectral_mapping=mapping)
    run_loop(model, _raw_loss, ctl, steps=11)
    spec = events(tmp_path, "spectral")
    assert {e["definition"] for e in spec} == {"attention_logit_bound"}
    exact = SpectralProbe(model, mapping=mapping, iters=50).measure().kappa  # the final weights, converged
    assert spec[-1]["kappa"] == pytest.approx(exact, rel=0.05)
    # Without the mapping the same model falls back to the hidden-σ definition.
    ctl = GradienceController(out_dir=str(tmp_path / "auto"), spectral_interval=5)
    run_loop(_RawAttention(), _raw_loss, ctl, steps=6)
    assert {e["definition"] for e in events(tmp_path / "auto", "spectral")} == {"max_hidden_sigma"}


@pytest.mark.parametrize("mapping, match", [
    ({"q": "Wq", "k": "Wk"}, r"needs \['n_heads'\]"),
    ({"q": "Wq", "k": "Wk", "n_heads": 2, "heads": 2}, "unknown keys"),
    ({"q": "Wq", "k": "Wk", "n_heads": "2"}, "n_heads"),
    ({"q": "Wq", "k": "Wk", "n_heads": 2, "q_rows": [4, 2]}, "q_rows"),
    ("Wq", "mapping or null"),
])
def test_a_malformed_mapping_is_a_config_error(mapping, match):
    from gradience.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        GradienceConfig(spectral_mapping=mapping)


def test_a_mapping_that_does_not_fit_the_model_fails_at_initialize(tmp_path):
    from gradience.errors import ConfigError

    ctl = GradienceController(out_dir=str(tmp_path), spectral_mapping={"q": "blocks.*.q", "k": "Wk", "n_heads": 2})
    model = _RawAttention()
    with pytest.raises(ConfigError, match="matches 0"):
        ctl.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    # The failed initialize let go of out_dir: a corrected controller starts there.
    ok = GradienceController(out_dir=str(tmp_path), spectral_mapping={"q": "Wq", "k": "Wk", "n_heads": 2,
                                                                      "transposed": True})
    ok.initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    ok.finalize()


def test_a_danger_reaction_reaches_the_loops_lr_through_set_lr(tmp_path):
    """With ``get_lr``/``set_lr`` the guard's scale has the same one home: a DANGER backoff moves the loop's LR."""
    model = make_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr = {"value": 1e-4}
    ctl = GradienceController(out_dir=str(tmp_path), spectral_interval=5, risk_burn_in_steps=0,
                              guard_snapshot_interval=1000, risk_reactions=True)
    ctl.initialize(model, save_fn=lambda p: torch.save(model.state_dict(), p),
                   load_fn=lambda p: model.load_state_dict(torch.load(p)),
                   get_lr=lambda: lr["value"], set_lr=lambda v: lr.__setitem__("value", v))
    used = []
    for step in range(41):
        for group in opt.param_groups:  # the loop owns its LR (nanoGPT style)
            group["lr"] = lr["value"]
        used.append(lr["value"])
        opt.zero_grad()
        loss = gpt2_loss(model, step)
        loss.backward()
        ctl.before_optimizer_step(model, opt, loss=loss)
        opt.step()
        grow_attention(step, model)
        assert ctl.step(step, loss, model)
    summary = ctl.finalize()
    first = next(e["step"] for e in events(tmp_path, "risk_reaction") if "LR backoff" in e["detail"])
    assert summary["guard"]["lr_scale"] == 0.5 and summary["guard"]["total_rollbacks"] == 0
    assert used[first] == pytest.approx(1e-4) and all(v == pytest.approx(0.5e-4) for v in used[first + 1:])
