"""gradience.risk and gradience.spike: spectral slope/volatility → level tables, burn-in, history rules, and the spike test's tables
plus its properties on synthetic runs (healthy runs never fire, a 20× spike fires exactly once, a drift never).

Everything is pure Python, so these run in seconds without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.risk import SEED_BANDS, RiskBands, RiskLevel, append_history, classify, risk_level, slope_volatility
from gradience.spike import SIGNALS, SignalStats, SpikeRule, SpikeState, SpikeVerdict, _accept, _mean_std, check_spike

BANDS = SEED_BANDS  # the tables below are written in the seed design's numbers
AFTER = 1000  # a tick well past the default burn-in (500)
GAP = 50  # the default spectral interval


def exponential(rate: float, *, start: int = AFTER, probes: int = 8, gap: int = GAP) -> list[tuple[int, float]]:
    """κ̃ = 2·exp(rate·(tick - start)): log κ̃ has slope ``rate`` per step and no volatility."""
    return [(start + i * gap, 2.0 * math.exp(rate * i * gap)) for i in range(probes)]


def zigzag(delta: float, *, rate: float = 0.0, start: int = AFTER, probes: int = 8,
           gap: int = GAP) -> list[tuple[int, float]]:
    """log κ̃ = rate·(tick - start) ± delta, alternating (+ first)."""
    return [(start + i * gap, math.exp(rate * i * gap + (delta if i % 2 == 0 else -delta))) for i in range(probes)]


def zigzag_volatility(delta: float, gap: int = GAP) -> float:
    """Population std of the 7 rates ±2δ/gap (-, +, -, ..., -) of an 8-probe zigzag: r·√48 / 7."""
    return 2 * delta / gap * math.sqrt(48) / 7


# ---------------------------------------------------------------------------------------------------------------
# Spectral: slope and volatility
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-0.01, -0.0001, 0.0, 0.0003, 0.001, 0.003, 0.006, 0.05])
def test_exponential_kappa_gives_its_rate_as_slope_and_no_volatility(rate):
    slope, volatility = slope_volatility(exponential(rate))
    assert slope == pytest.approx(rate, rel=1e-9, abs=1e-15)
    assert volatility == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("delta", [0.01, 0.05, 0.1, 0.5])
def test_zigzag_gives_its_volatility(delta):
    slope, volatility = slope_volatility(zigzag(delta))
    assert volatility == pytest.approx(zigzag_volatility(delta), rel=1e-9)
    # Σ(i - 3.5)·(-1)^i over 0..7 is -4 and Σ(i - 3.5)² is 42: slope = -4δ / (42·gap).
    assert slope == pytest.approx(-4 * delta / (42 * GAP), rel=1e-9)


def test_volatility_is_per_step_so_uneven_probe_gaps_do_not_invent_it():
    ticks = [1000, 1050, 1060, 1200, 1201, 1400, 1450, 1700]
    slope, volatility = slope_volatility([(t, math.exp(0.002 * t)) for t in ticks])
    assert slope == pytest.approx(0.002, rel=1e-9)
    assert volatility == pytest.approx(0.0, abs=1e-9)


def test_the_fit_uses_only_the_newest_window_probes():
    # log κ̃ rises at 0.05/step for 4 probes, then at 0.001/step for 8 more (continuous).
    rates = [0.05] * 3 + [0.001] * 8
    logs = [0.0]
    for rate in rates:
        logs.append(logs[-1] + rate * GAP)
    history = [(AFTER + i * GAP, math.exp(y)) for i, y in enumerate(logs)]
    assert slope_volatility(history, 8)[0] == pytest.approx(0.001, rel=1e-9)
    assert slope_volatility(history, 12)[0] > 0.001


def test_large_ticks_lose_no_precision():
    history = exponential(0.0007, start=10**12)
    assert slope_volatility(history)[0] == pytest.approx(0.0007, rel=1e-9)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_probes_is_no_trend(n):
    history = exponential(0.05, probes=n)
    assert slope_volatility(history) == (0.0, 0.0)
    reading = risk_level(history, BANDS, tick=AFTER + 1000)
    assert (reading.level, reading.probes) == (RiskLevel.STABLE, n)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0, None, "x"])
def test_unusable_kappa_is_skipped_never_raises(bad):
    history = exponential(0.003)
    spoiled = history[:3] + [(history[3][0] + 1, bad)] + history[3:]
    assert slope_volatility(spoiled) == pytest.approx(slope_volatility(history), abs=1e-15)
    assert append_history(history, AFTER + 10_000, bad, 8) == tuple(history)
    assert risk_level([(AFTER, bad)] * 5, BANDS, tick=AFTER).probes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**9), st.floats(allow_nan=True, allow_infinity=True)), max_size=30))
def test_any_history_gives_finite_numbers(history):
    slope, volatility = slope_volatility(history)
    assert math.isfinite(slope) and math.isfinite(volatility) and volatility >= 0
    reading = risk_level(history, BANDS, tick=10**9)
    assert reading.level in RiskLevel


# ---------------------------------------------------------------------------------------------------------------
# Spectral: levels and burn-in
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope, volatility, level", [
    (-1.0, 0.0, RiskLevel.STABLE),
    (0.0, 0.0, RiskLevel.STABLE),
    (0.000499, 0.0, RiskLevel.STABLE),
    (0.0005, 0.0, RiskLevel.LEARNING),
    (0.001999, 0.0, RiskLevel.LEARNING),
    (0.002, 0.0, RiskLevel.WARNING),
    (0.003999, 0.0, RiskLevel.WARNING),
    (0.004, 0.0, RiskLevel.DANGER),
    (1.0, 0.0, RiskLevel.DANGER),
    (0.0, 0.003, RiskLevel.STABLE),  # volatility must exceed the bar
    (0.0, 0.0031, RiskLevel.INSTABILITY),
    (0.01, 0.0031, RiskLevel.INSTABILITY),  # volatility comes before the slope
])
def test_classify_bands(slope, volatility, level):
    assert classify(slope, volatility, BANDS) is level


@pytest.mark.parametrize("history, level", [
    (exponential(-0.002), RiskLevel.STABLE),
    (exponential(0.0002), RiskLevel.STABLE),
    (exponential(0.001), RiskLevel.LEARNING),
    (exponential(0.003), RiskLevel.WARNING),
    (exponential(0.006), RiskLevel.DANGER),
    (zigzag(0.05), RiskLevel.STABLE),  # volatility 0.00198
    (zigzag(0.1), RiskLevel.INSTABILITY),  # volatility 0.00396
    (zigzag(0.02, rate=0.006), RiskLevel.DANGER),  # a trend through mild noise
    (zigzag(0.1, rate=0.006), RiskLevel.INSTABILITY),
])
def test_risk_level_from_constructed_histories(history, level):
    reading = risk_level(history, BANDS, tick=history[-1][0])
    assert reading.level is level
    assert (reading.probes, reading.burn_in) == (8, False)
    assert (reading.slope, reading.volatility) == slope_volatility(history)


@pytest.mark.parametrize("history, level", [
    (exponential(0.0002, start=0), RiskLevel.STABLE),
    (exponential(0.001, start=0), RiskLevel.LEARNING),
    (exponential(0.003, start=0), RiskLevel.LEARNING),
    (exponential(0.05, start=0), RiskLevel.LEARNING),
    (zigzag(0.5, start=0), RiskLevel.LEARNING),
])
def test_burn_in_reports_nothing_above_learning(history, level):
    reading = risk_level(history, BANDS, tick=499)
    assert reading.level is level and reading.burn_in
    assert reading.probes == 8 and reading.slope == slope_volatility(history)[0]


def test_burn_in_probes_stay_out_of_the_fit_after_burn_in():
    steep = exponential(0.05, start=0, probes=10)  # ticks 0..450: the rise at initialization
    calm = [(500 + i * GAP, 1e10 * math.exp(0.0001 * i * GAP)) for i in range(4)]
    assert risk_level(steep + calm[:2], BANDS, tick=550).level is RiskLevel.STABLE  # 2 probes: no fit yet
    assert risk_level(steep + calm[:2], BANDS, tick=550).probes == 2
    reading = risk_level(steep + calm, BANDS, tick=650)
    assert reading.level is RiskLevel.STABLE and reading.probes == 4
    assert reading.slope == pytest.approx(0.0001, rel=1e-9)
    # With burn-in switched off the fit spans the change of rate, which reads as volatility.
    assert risk_level(steep + calm, dataclasses.replace(BANDS, burn_in_steps=0), tick=650).level is RiskLevel.INSTABILITY


def test_burn_in_ends_at_burn_in_steps():
    history = exponential(0.006, start=500)
    assert risk_level(history, BANDS, tick=history[-1][0]).level is RiskLevel.DANGER
    assert risk_level(history, dataclasses.replace(BANDS, burn_in_steps=history[-1][0] + 1), tick=history[-1][0]).burn_in


def test_reading_to_dict_is_json():
    reading = risk_level(exponential(0.003), BANDS, tick=AFTER + 400)
    data = json.loads(json.dumps(reading.to_dict(), allow_nan=False))
    assert data["level"] == "WARNING" and data["probes"] == 8 and data["burn_in"] is False


def test_shipped_bands_are_the_spectral_benchs_fit_and_the_configs_defaults():
    from pathlib import Path

    from gradience.config import GradienceConfig

    fitted = json.loads((Path(__file__).parents[1] / "docs" / "spectral-bench.json").read_text())["bands"]["fitted"]
    default = RiskBands()
    assert default.learning_below == pytest.approx(fitted["new"]["learning_below"], rel=0.02)
    assert default.instability_volatility == pytest.approx(fitted["new"]["instability_volatility"], rel=0.02)
    assert default.warning_below == 2 * default.learning_below
    assert GradienceConfig().risk_bands() == default
    assert (SEED_BANDS.stable_below, SEED_BANDS.learning_below, SEED_BANDS.warning_below,
            SEED_BANDS.instability_volatility) == (0.0005, 0.002, 0.004, 0.003)
    # A slope the seed called WARNING reads LEARNING under the shipped bands.
    assert risk_level(exponential(0.003), default, tick=AFTER + 400).level is RiskLevel.LEARNING


@pytest.mark.parametrize("field, value", [
    ("stable_below", -0.1), ("stable_below", math.nan), ("learning_below", 0.0001), ("warning_below", 0.001),
    ("instability_volatility", 0.0), ("instability_volatility", math.nan), ("window", 2), ("window", 8.0),
    ("burn_in_steps", -1), ("burn_in_steps", True),
])
def test_bands_validate(field, value):
    with pytest.raises(ValueError, match=field):
        RiskBands(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# Spectral: the history
# ---------------------------------------------------------------------------------------------------------------


def test_history_is_bounded_to_the_window():
    history: tuple = ()
    for i in range(100):
        history = append_history(history, i * GAP, 1.0 + i, 8)
    assert len(history) == 8
    assert history == tuple((i * GAP, 1.0 + i) for i in range(92, 100))
    assert all(type(t) is int and type(k) is float for t, k in history)


def test_a_tick_that_does_not_advance_replaces_newer_entries():
    history = append_history(exponential(0.001, probes=5), AFTER + 2 * GAP, 7.0, 8)
    assert history[-1] == (AFTER + 2 * GAP, 7.0)
    assert [t for t, _ in history] == [AFTER, AFTER + GAP, AFTER + 2 * GAP]


def test_history_round_trips_through_json():
    history: tuple = ()
    for i in range(12):
        history = append_history(history, AFTER + i * GAP, math.exp(0.003 * i * GAP) / 3, 8)
    loaded = json.loads(json.dumps(history, allow_nan=False))
    assert tuple(tuple(p) for p in loaded) == history
    assert append_history(loaded, AFTER + 12 * GAP, 5.0, 8) == append_history(history, AFTER + 12 * GAP, 5.0, 8)
    assert risk_level(loaded, BANDS, tick=AFTER + 600) == risk_level(history, BANDS, tick=AFTER + 600)


def test_append_history_validates_window():
    with pytest.raises(ValueError, match="window"):
        append_history((), 0, 1.0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Spike rule: tables
# ---------------------------------------------------------------------------------------------------------------

ZSCORE = SpikeRule(ratio=False)
RATIO = SpikeRule(zscore=False)


def stats(values, *, running_max=None, count=None) -> SignalStats:
    values = tuple(float(v) for v in values)
    return SignalStats(values=values, running_max=max(values) if running_max is None else running_max,
                       count=len(values) if count is None else count)


ALTERNATING = stats([1.0, 3.0] * 32)  # mean 2, sample std √(64/63)
ALT_BAR = 2.0 + 6.0 * math.sqrt(64 / 63)


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("value, fires", [
    (ALT_BAR + 1e-9, True), (ALT_BAR, False), (ALT_BAR - 1e-9, False), (-100.0, False), (1e300, True),
])
def test_zscore_table(signal, value, fires):
    state = SpikeState(**{signal: ALTERNATING})
    new, verdict = check_spike(state, rule=ZSCORE, **{"loss": None, "grad_norm": None, signal: value})
    assert verdict.fired is fires
    if fires:
        assert new is state
        assert (verdict.signal, verdict.kind, verdict.value) == (signal, "zscore", value)
        assert verdict.threshold == pytest.approx(ALT_BAR, rel=1e-12)
        assert verdict.mean == pytest.approx(2.0) and verdict.std == pytest.approx(math.sqrt(64 / 63))
        assert (verdict.samples, verdict.running_max) == (64, 3.0)
    else:
        assert getattr(new, signal).values == ALTERNATING.values + (value,)


@pytest.mark.parametrize("flat, value, fires, bar", [
    (2.0, 2.0 * (1 + 1e-9), False, 2.12),  # rounding noise on a flat series: the 1 % floor holds
    (2.0, 2.11, False, 2.12),
    (2.0, 2.13, True, 2.12),
    (-2.0, -1.87, True, -1.88),  # |mean| sets the floor
    (0.0, 5e-6, False, 6e-6),  # stuck at zero: the absolute floor holds
    (0.0, 7e-6, True, 6e-6),
])
def test_std_floors(flat, value, fires, bar):
    state = SpikeState(loss=stats([flat] * 64, running_max=flat))
    _, verdict = check_spike(state, loss=value, grad_norm=None, rule=ZSCORE)
    assert verdict.fired is fires
    if fires:
        assert verdict.threshold == pytest.approx(bar, rel=1e-12)


def test_without_floors_a_flat_series_fires_on_an_ulp():
    rule = SpikeRule(ratio=False, min_std=0.0, min_rel_std=0.0)
    _, verdict = check_spike(SpikeState(loss=stats([2.0] * 64)), loss=math.nextafter(2.0, 3.0), grad_norm=None,
                             rule=rule)
    assert verdict.fired


@pytest.mark.parametrize("running_max, value, fires", [
    (1.0, 10.0, True), (1.0, 9.999, False), (0.5, 5.0, True), (0.0, 1e9, False), (-3.0, 1e9, False),
])
def test_ratio_table(running_max, value, fires):
    state = SpikeState(grad_norm=stats([min(running_max, 0.1)] * 64, running_max=running_max))
    _, verdict = check_spike(state, loss=None, grad_norm=value, rule=RATIO)
    assert verdict.fired is fires
    if fires:
        assert (verdict.kind, verdict.threshold, verdict.running_max) == ("ratio", 10.0 * running_max, running_max)


def test_nothing_fires_during_warmup_and_warmup_values_are_accepted():
    state = SpikeState(grad_norm=stats([1.0] * 63))
    state, verdict = check_spike(state, loss=None, grad_norm=1e6, rule=SpikeRule())
    assert not verdict.fired
    assert (state.grad_norm.count, state.grad_norm.running_max, state.grad_norm.values[-1]) == (64, 1e6, 1e6)
    _, verdict = check_spike(state, loss=None, grad_norm=1e8, rule=SpikeRule())
    assert verdict.fired


def test_warmup_counts_accepted_values_not_the_window():
    rule = SpikeRule(window=16, warmup=40, ratio=False)
    state = SpikeState()
    for _ in range(39):
        state, _ = check_spike(state, loss=1.0, grad_norm=None, rule=rule)
    assert (len(state.loss.values), state.loss.count) == (16, 39)
    assert not check_spike(state, loss=100.0, grad_norm=None, rule=rule)[1].fired
    state, _ = check_spike(state, loss=1.0, grad_norm=None, rule=rule)
    assert check_spike(state, loss=100.0, grad_norm=None, rule=rule)[1].fired


def test_a_firing_step_enters_no_statistics():
    state = SpikeState(loss=ALTERNATING, grad_norm=ALTERNATING)
    new, verdict = check_spike(state, loss=100.0, grad_norm=2.0, rule=SpikeRule())
    assert verdict.fired and verdict.signal == "loss"
    assert new == state  # grad_norm 2.0 was ordinary, but its step is suspect


def test_loss_is_reported_first_when_both_fire():
    state = SpikeState(loss=ALTERNATING, grad_norm=ALTERNATING)
    _, verdict = check_spike(state, loss=100.0, grad_norm=100.0, rule=SpikeRule())
    assert (verdict.signal, verdict.kind) == ("loss", "zscore")


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_missing_and_nonfinite_values_neither_fire_nor_count(bad):
    state = SpikeState(loss=ALTERNATING, grad_norm=ALTERNATING)
    new, verdict = check_spike(state, loss=bad, grad_norm=2.5, rule=SpikeRule())
    assert not verdict.fired
    assert new.loss == state.loss
    assert new.grad_norm.count == 65 and new.grad_norm.values[-1] == 2.5


def test_a_disabled_signal_is_ignored():
    rule = SpikeRule(on_loss=False)
    state = SpikeState(loss=ALTERNATING, grad_norm=ALTERNATING)
    new, verdict = check_spike(state, loss=1e9, grad_norm=2.0, rule=rule)
    assert not verdict.fired and new.loss == state.loss and new.grad_norm.count == 65


def test_values_are_bounded_by_the_window():
    state = SpikeState()
    for i in range(300):
        state, _ = check_spike(state, loss=1.0 + (i % 7) / 100, grad_norm=0.5, rule=SpikeRule())
    assert (len(state.loss.values), state.loss.count, len(state.grad_norm.values)) == (128, 300, 128)
    assert state.loss.values[-1] == 1.0 + (299 % 7) / 100


def test_spike_state_round_trips_through_json_and_resumes_identically():
    series = healthy_run(3, 400)
    state = SpikeState()
    for loss, grad_norm in series[:300]:
        state, _ = check_spike(state, loss=loss, grad_norm=grad_norm, rule=SpikeRule())
    restored = SpikeState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    assert restored == state
    a, b = state, restored
    for loss, grad_norm in series[300:] + [(50.0, 1.0), (1.0, 1e3)]:
        a, va = check_spike(a, loss=loss, grad_norm=grad_norm, rule=SpikeRule())
        b, vb = check_spike(b, loss=loss, grad_norm=grad_norm, rule=SpikeRule())
        assert (a, va) == (b, vb)
    assert SpikeState.from_dict({}) == SpikeState()
    with pytest.raises(ValueError, match="unknown"):
        SpikeState.from_dict({"loss": {}, "lr": {}})
    with pytest.raises(ValueError, match="unknown"):
        SpikeState.from_dict({"loss": {"mean": 1.0}})


def test_verdict_describes_itself():
    _, verdict = check_spike(SpikeState(grad_norm=ALTERNATING), loss=None, grad_norm=31.0, rule=SpikeRule())
    assert verdict.describe() == "grad_norm 31 > 8.047 (zscore: mean 2, std 1.008, n 64, max 3)"
    state = SpikeState(grad_norm=stats([1.0] * 64, running_max=4.0))
    _, verdict = check_spike(state, loss=None, grad_norm=40.0, rule=RATIO)
    assert verdict.describe().startswith("grad_norm 40 >= 40 (ratio: ")
    assert SpikeVerdict().describe() == "no spike"
    assert json.loads(json.dumps(verdict.to_dict()))["kind"] == "ratio"


@pytest.mark.parametrize("field, value", [
    ("window", 1), ("warmup", -1), ("sigmas", 0.0), ("sigmas", math.inf), ("min_std", -1e-9),
    ("min_rel_std", math.nan), ("factor", 1.0), ("factor", math.inf), ("zscore", 1), ("on_loss", "yes"),
])
def test_rule_validates(field, value):
    with pytest.raises(ValueError, match=field):
        SpikeRule(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# Spike rule: properties on synthetic runs
# ---------------------------------------------------------------------------------------------------------------

STEPS = 2000
SEEDS = range(20)


@functools.cache
def healthy_run(seed: int, steps: int = STEPS) -> list[tuple[float, float]]:
    """(loss, grad norm) of a plausible healthy run.

    Loss: the fast drop from ~10.5 at initialization, then 3·exp(-t/800) + 0.5, with 3 % Gaussian noise.
    Grad norm: 5× at initialization decaying over ~40 steps, a 2× bump peaking at step 200 (LR warm-up), a slow
    rise from 0.5 to 1.0 over the run, and log-normal noise of 8 % (heavier-tailed than Gaussian, as grad norms are).
    """
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        loss = (3.0 * math.exp(-t / 800) + 0.5 + 7.0 * math.exp(-t / 25)) * (1 + 0.03 * rng.gauss(0, 1))
        trend = (0.5 + 0.5 * t / steps) * (1 + 4 * math.exp(-t / 40)) * (1 + (t / 200) * math.exp(1 - t / 200))
        out.append((loss, trend * math.exp(0.08 * rng.gauss(0, 1))))
    return out


def fires(series, rule: SpikeRule | None = None) -> list[tuple[int, SpikeVerdict]]:
    state, rule = SpikeState(), rule or SpikeRule()
    out = []
    for step, (loss, grad_norm) in enumerate(series):
        state, verdict = check_spike(state, loss=loss, grad_norm=grad_norm, rule=rule)
        if verdict.fired:
            out.append((step, verdict))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_runs_never_fire(seed):
    assert fires(healthy_run(seed)) == []


@settings(max_examples=30, deadline=None)
@given(seed=st.sampled_from(SEEDS), at=st.integers(SpikeRule().warmup, STEPS - 1),
       signal=st.sampled_from(SIGNALS))
def test_a_20x_spike_after_warmup_fires_exactly_there(seed, at, signal):
    series = list(healthy_run(seed))
    loss, grad_norm = series[at]
    series[at] = (loss * 20, grad_norm) if signal == "loss" else (loss, grad_norm * 20)
    # Up to 100 steps after the spike: the spike left the statistics untouched, so the rest is the healthy run.
    found = fires(series[: at + 100])
    assert [(step, v.signal) for step, v in found] == [(at, signal)]


def drift(seed: int | None, *, base: float) -> list[tuple[float, float]]:
    """Flat for 400 steps, a linear rise to 2× over 300 steps, flat again for 300 (noise 5 %, or none)."""
    rng = random.Random(seed)
    out = []
    for t in range(1000):
        level = base * (1 + min(max(t - 400, 0), 300) / 300)
        noise = 1.0 if seed is None else 1 + 0.05 * rng.gauss(0, 1)
        out.append((level * noise, level * noise))
    return out


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("base", [0.8, 3.0])
def test_a_gradual_doubling_never_fires(seed, base):
    assert fires(drift(seed, base=base)) == []


def test_without_the_std_floor_a_noise_free_drift_fires_and_keeps_firing():
    # Why the floor exists, and what "a firing value enters no statistics" costs: the flat stretch has std 0, the
    # first step of the rise crosses mean + 6·0, and as no rising value is ever accepted, every later step fires.
    found = fires(drift(None, base=3.0), SpikeRule(min_std=0.0, min_rel_std=0.0))
    assert [step for step, _ in found] == list(range(401, 1000))


def test_spike_rule_reads_only_what_it_is_given():
    series = healthy_run(0, 300)
    assert fires(series) == fires(list(series))
    with_gaps = [(loss if i % 3 else None, grad_norm if i % 5 else math.nan) for i, (loss, grad_norm)
                 in enumerate(series)]
    assert fires(with_gaps) == []
    assert dataclasses.replace(SpikeRule(), on_loss=False, on_grad_norm=False).enabled("loss") is False


def test_the_spike_windows_running_moments_stay_the_exact_two_pass_ones():
    # The window's mean and std are kept up to date one value at a time; over thousands of steps (many slides
    # and exact recomputations, a level shift, a large offset) they must stay the two-pass values.
    rng = random.Random(5)
    rule = SpikeRule(window=32, warmup=0, sigmas=1e9, ratio=False)
    stats = SignalStats()
    for i in range(3000):
        value = (1e4 if i > 1500 else 3.0) + rng.gauss(0, 0.01 if i % 7 else 0.5)
        stats = _accept(stats, value, rule.window)
        n = len(stats.values)
        if n >= 2:
            mean = sum(stats.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in stats.values) / (n - 1))
            got_mean, got_std = _mean_std(stats, SpikeRule(window=32, min_std=0.0, min_rel_std=0.0))
            assert got_mean == pytest.approx(mean, rel=1e-12)
            assert got_std == pytest.approx(std, rel=1e-6, abs=1e-9)


def test_a_lasting_shift_stops_firing_once_logged_spikes_enter_the_window():
    # spike_action 'log' lets the update go ahead: the new level must become the normal, not fire every step
    # (the skip semantics keep firing, which the policy's consecutive-skip limit turns into a rollback).
    rule = SpikeRule()
    g = random.Random(0)
    series = [1.0 + 0.05 * g.random() for _ in range(300)] + [3.0 + 0.05 * g.random() for _ in range(300)]
    fired = {}
    for accept in (True, False):
        state, count = SpikeState(), 0
        for v in series:
            state, verdict = check_spike(state, loss=None, grad_norm=v, rule=rule, accept_fired=accept)
            count += verdict.fired
        fired[accept] = count
    assert 1 <= fired[True] <= 5
    assert fired[False] == 300
