"""Risk rules on agreed scalars: the spectral risk level from a history of κ̃, and the loss / grad-norm spike test.

Both are pure functions of plain Python floats (no torch, IO or clock). Every rank calls them with the same agreed
numbers in the same order, so every rank computes bit-identical results without a broadcast.

* Spectral risk: least-squares slope of log κ̃ per optimizer step over the last ``window`` probes, and volatility =
  standard deviation of the per-step Δlog κ̃ between consecutive probes, classified against the seed design's
  bands, which only make sense on log κ̃ per optimizer step.
* Spike test: a step whose loss or total grad norm lies more than ``sigmas`` standard deviations above the mean of
  the last ``window`` accepted values (after a warm-up), or at least ``factor`` × the running max of accepted
  values, fires. Learned from OLMo-core's SkipStepOptimizer (6σ over 128 steps, after max(20, 128 // 2)) and
  Megatron's ``is_unexpectedly_large`` (≥ 10 × the max of earlier values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gradience.errors import ConfigError
from gradience.types import RiskLevel

#: (tick, κ̃) pairs, oldest first; tick is the guard's optimizer-step clock.
KappaHistory = tuple[tuple[int, float], ...]

DEFAULT_WINDOW = 8
SIGNALS = ("loss", "grad_norm")
_ABOVE_LEARNING = (RiskLevel.WARNING, RiskLevel.DANGER, RiskLevel.INSTABILITY)


@dataclass(frozen=True, kw_only=True)
class RiskBands:
    """Bands on the slope of log κ̃ per optimizer step (0.007 ≈ κ̃ doubling every ~100 steps).

    The defaults are the bands the spectral bench fitted (``python -m gradience.bench spectral``; see
    docs/spectral-bench.md): WARNING from 0.007, DANGER from twice that, INSTABILITY above a volatility of 0.005.
    The seed design's bands (:data:`SEED_BANDS`) alarm on every healthy run of that bench."""

    stable_below: float = 0.0005
    """Slope below this (negative included) is STABLE."""

    learning_below: float = 0.007
    """Slope in [stable_below, learning_below) is LEARNING."""

    warning_below: float = 0.014
    """Slope in [learning_below, warning_below) is WARNING; at or above it, DANGER."""

    instability_volatility: float = 0.005
    """Volatility (std of Δlog κ̃ per step) above this is INSTABILITY, whatever the slope (inf = never)."""

    window: int = DEFAULT_WINDOW
    """Probes in the fit: at the default interval of 50 steps, 8 probes span 350 steps, under the 450-1280 steps
    by which the slope led loss blow-ups in the pilot."""

    burn_in_steps: int = 500
    """Until this tick nothing above LEARNING is reported, and afterwards probes taken before it are left out of
    the fit (κ̃ rises fast at initialization). Callers pass max(LR warm-up steps, 500)."""

    def __post_init__(self) -> None:
        for name in ("stable_below", "learning_below", "warning_below"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):  # also rejects NaN
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not self.stable_below <= self.learning_below <= self.warning_below:
            raise ConfigError(
                f"stable_below ({self.stable_below}) <= learning_below ({self.learning_below}) <= warning_below "
                f"({self.warning_below}) must hold"
            )
        if not (_is_number(self.instability_volatility) and self.instability_volatility > 0):
            raise ConfigError(f"instability_volatility must be a number > 0, got {self.instability_volatility!r}")
        if not (_is_int(self.window) and self.window >= 3):
            raise ConfigError(f"window must be an int >= 3 (a slope and a spread need 3 probes), got {self.window!r}")
        if not (_is_int(self.burn_in_steps) and self.burn_in_steps >= 0):
            raise ConfigError(f"burn_in_steps must be an int >= 0, got {self.burn_in_steps!r}")



@dataclass(frozen=True, kw_only=True)
class RiskReading:
    """The level and the numbers it came from, for telemetry and log lines."""

    level: RiskLevel
    #: Least-squares slope of log κ̃ per optimizer step (0.0 with fewer than 3 probes).
    slope: float
    #: Standard deviation of Δlog κ̃ per step between consecutive probes (0.0 with fewer than 3 probes).
    volatility: float
    #: Usable probes in the window; fewer than 3 means no fit (slope and volatility 0.0).
    probes: int
    #: True while tick < burn_in_steps: the level is capped at LEARNING.
    burn_in: bool

    def to_dict(self) -> dict:
        """JSON-ready form (the level as its string)."""
        out = dataclasses.asdict(self)
        out["level"] = self.level.value
        return out


def append_history(history: Iterable[Sequence], tick: int, kappa: float | None,
                   window: int = DEFAULT_WINDOW) -> KappaHistory:
    """Return ``history`` plus (tick, κ̃), keeping only the newest ``window`` usable probes.

    A κ̃ that is None, NaN, ±inf or <= 0 is dropped: log κ̃ does not exist for it, and non-finite weights are
    the finite checks' business, not the spectral trend's. A tick that does not advance past the newest entry
    replaces the entries at or after it (the guard's clock is monotonic; this only keeps the fit well posed).
    ``history`` may be the list of lists that JSON gives back; the result is a tuple of (int, float) pairs, so
    it fits in a frozen state and survives a JSON round trip unchanged.

    After a rollback the caller should start a new history: restored weights are another trajectory, and the
    drop of κ̃ back to its old value would read as volatility.
    """
    if not (_is_int(window) and window >= 1):
        raise ConfigError(f"window must be an int >= 1, got {window!r}")
    points = _usable(list(history) + [(tick, kappa)])
    return tuple(points[-window:])


def slope_volatility(history: Iterable[Sequence], window: int = DEFAULT_WINDOW) -> tuple[float, float]:
    """(slope, volatility) of log κ̃ per optimizer step over the newest ``window`` usable probes.

    Slope: ordinary least squares of log κ̃ against tick. Volatility: population standard deviation of
    Δlog κ̃ / Δtick between consecutive probes (the window's own spread, not an estimate of a wider one).
    Unusable probes are skipped as in :func:`append_history`, so a NaN or zero κ̃ never raises. With fewer than
    3 usable probes there is no trend to speak of: (0.0, 0.0), which classifies as STABLE.
    """
    if not (_is_int(window) and window >= 3):
        raise ConfigError(f"window must be an int >= 3, got {window!r}")
    points = _usable(history)[-window:]
    n = len(points)
    if n < 3:
        return 0.0, 0.0
    ticks = [float(t) for t, _ in points]
    logs = [math.log(k) for _, k in points]
    # Centred sums (fsum: exact rounding, so no cancellation on large ticks); log κ̃ is within ±745 and ticks
    # are ints, so nothing here can overflow.
    t_mean = math.fsum(ticks) / n
    y_mean = math.fsum(logs) / n
    sxx = math.fsum((t - t_mean) ** 2 for t in ticks)
    sxy = math.fsum((t - t_mean) * (y - y_mean) for t, y in zip(ticks, logs, strict=True))
    slope = sxy / sxx  # ticks strictly increase, so sxx > 0
    rates = [(logs[i + 1] - logs[i]) / (ticks[i + 1] - ticks[i]) for i in range(n - 1)]
    r_mean = math.fsum(rates) / len(rates)
    volatility = math.sqrt(math.fsum((r - r_mean) ** 2 for r in rates) / len(rates))
    return slope, volatility


def classify(slope: float, volatility: float, bands: RiskBands) -> RiskLevel:
    """Level for a (slope, volatility) pair, burn-in aside: INSTABILITY first, then the slope bands."""
    if volatility > bands.instability_volatility:
        return RiskLevel.INSTABILITY
    if slope < bands.stable_below:
        return RiskLevel.STABLE
    if slope < bands.learning_below:
        return RiskLevel.LEARNING
    if slope < bands.warning_below:
        return RiskLevel.WARNING
    return RiskLevel.DANGER


def risk_level(history: Iterable[Sequence], bands: RiskBands, *, tick: int) -> RiskReading:
    """Spectral risk at ``tick`` (the guard's clock now) from the (tick, κ̃) history.

    During burn-in (tick < burn_in_steps) the fit uses every probe but the level is capped at LEARNING. After it,
    probes taken during burn-in are left out: the fast rise at initialization would otherwise read as DANGER on
    every healthy run for the first ``window`` probes after burn-in ends. The first post-burn-in level therefore
    comes 3 probes after burn_in_steps.
    """
    burn_in = tick < bands.burn_in_steps
    points = _usable(history)
    if not burn_in:
        points = [p for p in points if p[0] >= bands.burn_in_steps]
    points = points[-bands.window:]
    slope, volatility = slope_volatility(points, bands.window)
    level = classify(slope, volatility, bands)
    if burn_in and level in _ABOVE_LEARNING:
        level = RiskLevel.LEARNING
    return RiskReading(level=level, slope=slope, volatility=volatility, probes=len(points), burn_in=burn_in)


def _usable(history: Iterable[Sequence]) -> list[tuple[int, float]]:
    """Usable (tick, κ̃) pairs with strictly increasing ticks; see :func:`append_history` for the rules."""
    out: list[tuple[int, float]] = []
    for tick, kappa in history:
        k = _finite_float(kappa)
        if k is None or k <= 0.0:
            continue
        t = int(tick)
        while out and out[-1][0] >= t:
            out.pop()
        out.append((t, k))
    return out


@dataclass(frozen=True, kw_only=True)
class SpikeRule:
    """When a step's loss or total grad norm counts as a spike. Defaults are meant never to fire on a healthy run."""

    on_loss: bool = True
    """Test the loss."""

    on_grad_norm: bool = True
    """Test the total gradient norm."""

    zscore: bool = True
    """Fire when value > mean + sigmas × std of the last ``window`` accepted values (one-sided: a drop is no fault)."""

    window: int = 128
    """Accepted values in the mean/std (OLMo-core's rolling interval)."""

    sigmas: float = 6.0
    """Standard deviations above the mean (OLMo-core's sigma factor): Gaussian noise passes it ~1 in 10⁹ steps."""

    warmup: int = 64
    """Accepted values needed before either test may fire (OLMo-core: max(20, window // 2)); the early transient
    of a run (fast loss drop, grad-norm bump during LR warm-up) still enters the statistics."""

    min_std: float = 1e-6
    """Absolute floor on the std (signal units): a series stuck at 0 does not fire on rounding noise."""

    min_rel_std: float = 0.01
    """Floor on the std as a fraction of |mean|: a perfectly flat series needs a jump of sigmas × 1 % (6 %) to
    fire, not one ulp. Real minibatch noise is larger, so the floor only matters on near-deterministic series."""

    ratio: bool = True
    """Fire when value >= factor × the running max of accepted values (Megatron's spiky-loss check)."""

    factor: float = 10.0
    """Multiple of the running max (Megatron: 10)."""

    def __post_init__(self) -> None:
        for name in ("on_loss", "on_grad_norm", "zscore", "ratio"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (_is_int(self.window) and self.window >= 2):
            raise ConfigError(f"window must be an int >= 2 (a std needs 2 values), got {self.window!r}")
        if not (_is_int(self.warmup) and self.warmup >= 0):
            raise ConfigError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (_is_number(self.sigmas) and math.isfinite(self.sigmas) and self.sigmas > 0):
            raise ConfigError(f"sigmas must be a finite number > 0, got {self.sigmas!r}")
        for name in ("min_std", "min_rel_std"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (_is_number(self.factor) and math.isfinite(self.factor) and self.factor > 1):
            raise ConfigError(f"factor must be a finite number > 1, got {self.factor!r}")

    def enabled(self, signal: str) -> bool:
        """True when ``signal`` ("loss" or "grad_norm") is tested."""
        return self.on_loss if signal == "loss" else self.on_grad_norm


@dataclass(frozen=True, kw_only=True)
class SignalStats:
    """What the spike test remembers about one signal: only finite values of steps that did not fire."""

    #: The newest ``window`` accepted values, oldest first.
    values: tuple[float, ...] = ()
    #: Largest accepted value ever; None before the first.
    running_max: float | None = None
    #: Accepted values ever: the warm-up clock (it keeps counting once ``values`` is full).
    count: int = 0
    #: Mean and sum of squared deviations of ``values``, kept up to date one value at a time (a sliding
    #: Welford update, recomputed exactly every ``window`` values so rounding cannot drift); derivable from
    #: ``values`` (a state built without them computes them), saved along so a restore continues bit for bit.
    mean: float | None = field(default=None, compare=False, repr=False)
    m2: float | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.values and (self.mean is None or self.m2 is None):
            mean, m2 = _exact_moments(self.values)
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "m2", m2)

    def to_dict(self) -> dict:
        """JSON-ready form; the moments go along (when finite) so a restored state continues bit for bit."""
        out = {"values": list(self.values), "running_max": self.running_max, "count": self.count}
        if self.values and math.isfinite(self.mean) and math.isfinite(self.m2):
            out["moments"] = [self.mean, self.m2]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SignalStats:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        unknown = set(data) - {"values", "running_max", "count", "moments"}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        running_max = data.get("running_max")
        mean, m2 = (float(v) for v in data["moments"]) if "moments" in data else (None, None)
        return cls(values=tuple(float(v) for v in data.get("values", ())), count=int(data.get("count", 0)),
                   running_max=None if running_max is None else float(running_max), mean=mean, m2=m2)


@dataclass(frozen=True, kw_only=True)
class SpikeState:
    """Spike-test memory for both signals; identical on all ranks, saved with the guard state."""

    loss: SignalStats = field(default_factory=SignalStats)
    grad_norm: SignalStats = field(default_factory=SignalStats)

    def to_dict(self) -> dict:
        """JSON-ready form (strict JSON: only finite values are ever stored)."""
        return {name: getattr(self, name).to_dict() for name in SIGNALS}

    @classmethod
    def from_dict(cls, data: dict) -> SpikeState:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        _reject_unknown(cls, data)
        return cls(**{name: SignalStats.from_dict(value) for name, value in data.items()})


@dataclass(frozen=True, kw_only=True)
class SpikeVerdict:
    """Whether a step fired, and the numbers a log line needs to say why."""

    fired: bool = False
    #: "loss" or "grad_norm" (None when nothing fired).
    signal: str | None = None
    #: "zscore" or "ratio".
    kind: str | None = None
    value: float | None = None
    #: The bar the value crossed: mean + sigmas × std (zscore) or factor × running_max (ratio).
    threshold: float | None = None
    #: Mean and floored std of the accepted window (None with fewer than 2 values).
    mean: float | None = None
    std: float | None = None
    running_max: float | None = None
    #: Values in the window behind mean and std.
    samples: int = 0

    def describe(self) -> str:
        """One log-line fragment, e.g. ``grad_norm 31.2 > 4.1 (zscore: mean 1.2, std 0.48, n 128, max 3.9)``."""
        if not self.fired:
            return "no spike"
        op = ">" if self.kind == "zscore" else ">="
        stats = f"mean {_g(self.mean)}, std {_g(self.std)}, n {self.samples}, max {_g(self.running_max)}"
        return f"{self.signal} {_g(self.value)} {op} {_g(self.threshold)} ({self.kind}: {stats})"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


_QUIET = SpikeVerdict()  # frozen: one instance serves every step that does not fire


def check_spike(state: SpikeState, *, loss: float | None, grad_norm: float | None,
                rule: SpikeRule, accept_fired: bool = False) -> tuple[SpikeState, SpikeVerdict]:
    """Test one step's agreed loss and total grad norm; return the updated state and the verdict.

    None (signal not available) and non-finite values (NaN/inf are the finite checks' business) neither fire nor
    enter the statistics. When the step fires, none of its values enter the statistics: a spike must not raise
    its own bar, and the step is suspect as a whole. The consequence: a lasting level shift keeps firing, which
    the policy's consecutive-skip limit turns into a rollback. With ``accept_fired`` (the update went ahead
    anyway: spike_action 'log') a firing step's values do enter the statistics, so a lasting shift becomes the
    new normal instead of firing on every step. Signals are tested in the order loss, grad_norm, and for each
    zscore before ratio; the first test that fires is reported.
    """
    candidates: dict[str, float] = {}
    for name, raw in (("loss", loss), ("grad_norm", grad_norm)):
        value = _finite_float(raw)
        if value is not None and rule.enabled(name):
            candidates[name] = value
    fired = _QUIET
    for name, value in candidates.items():
        verdict = _test(getattr(state, name), value, name, rule)
        if verdict.fired:
            if not accept_fired:
                return state, verdict
            fired = verdict
            break
    updates = {name: _accept(getattr(state, name), value, rule.window) for name, value in candidates.items()}
    return dataclasses.replace(state, **updates), fired


def _test(stats: SignalStats, value: float, signal: str, rule: SpikeRule) -> SpikeVerdict:
    if stats.count < rule.warmup:
        return _QUIET
    mean, std = _mean_std(stats, rule)
    kind = bar = None
    if rule.zscore and mean is not None and std is not None and value > mean + rule.sigmas * std:
        kind, bar = "zscore", mean + rule.sigmas * std  # an overflowed (inf) bar never fires
    # The ratio only means something against a positive max (a loss may be negative).
    elif rule.ratio and stats.running_max is not None and stats.running_max > 0 and \
            value >= rule.factor * stats.running_max:
        kind, bar = "ratio", rule.factor * stats.running_max
    if kind is None:
        return _QUIET  # the common case builds nothing
    return SpikeVerdict(fired=True, kind=kind, threshold=bar, signal=signal, value=value, mean=mean, std=std,
                        running_max=stats.running_max, samples=len(stats.values))


def _mean_std(stats: SignalStats, rule: SpikeRule) -> tuple[float | None, float | None]:
    """Mean and sample std (floored by the rule) of the accepted window; (None, None) with fewer than 2."""
    n = len(stats.values)
    if n < 2:
        return None, None
    std = math.sqrt(max(stats.m2, 0.0) / (n - 1))
    return stats.mean, max(std, rule.min_std, rule.min_rel_std * abs(stats.mean))


def _exact_moments(values: tuple[float, ...]) -> tuple[float, float]:
    """(mean, sum of squared deviations) in two passes, in a fixed order: bit-identical on every rank.
    Plain sums, not fsum: fsum raises on intermediate overflow, while inf here just makes a bar nothing crosses."""
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values)


def _accept(stats: SignalStats, value: float, window: int) -> SignalStats:
    running_max = value if stats.running_max is None else max(stats.running_max, value)
    old, count = stats.values, stats.count + 1
    values = (old + (value,))[-window:]
    if count % window == 0 or not old or not math.isfinite(stats.m2):
        mean, m2 = _exact_moments(values)
    elif len(old) < window:  # the window grows: Welford
        delta = value - stats.mean
        mean = stats.mean + delta / len(values)
        m2 = stats.m2 + delta * (value - mean)
    else:  # the window slides: the oldest value leaves as this one enters
        gone = old[0]
        mean = stats.mean + (value - gone) / window
        m2 = stats.m2 + (value - gone) * (value - mean + gone - stats.mean)
    return SignalStats(values=values, running_max=running_max, count=count, mean=mean, m2=m2)


def _finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None when it is None, not a number, NaN or ±inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reject_unknown(cls: type, data: dict) -> None:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


#: The seed design's bands (STABLE < 0.0005 ≤ LEARNING < 0.002 ≤ WARNING < 0.004 ≤ DANGER; INSTABILITY above a
#: volatility of 0.003): the spectral bench's baseline arm.
SEED_BANDS = RiskBands(stable_below=0.0005, learning_below=0.002, warning_below=0.004, instability_volatility=0.003)
