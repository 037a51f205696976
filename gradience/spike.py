"""The loss / grad-norm spike rule on agreed scalars: when a step's loss or total grad norm is a spike.

A pure function of plain Python floats (no torch, IO or clock), like the spectral risk level in
:mod:`gradience.risk`: every rank calls it with the same agreed numbers in the same order and computes
bit-identical state without a broadcast. A step whose loss or total grad norm lies more than ``sigmas`` standard
deviations above the mean of the last ``window`` accepted values (after a warm-up), or at least ``factor`` × the
running max of accepted values, fires. Learned from OLMo-core's SkipStepOptimizer (6σ over 128 steps, after
max(20, 128 // 2)) and Megatron's ``is_unexpectedly_large`` (≥ 10 × the max of earlier values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gradience.errors import ConfigError
from gradience.risk import finite_float, is_int, is_number

SIGNALS = ("loss", "grad_norm")


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
        if not (is_int(self.window) and self.window >= 2):
            raise ConfigError(f"window must be an int >= 2 (a std needs 2 values), got {self.window!r}")
        if not (is_int(self.warmup) and self.warmup >= 0):
            raise ConfigError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (is_number(self.sigmas) and math.isfinite(self.sigmas) and self.sigmas > 0):
            raise ConfigError(f"sigmas must be a finite number > 0, got {self.sigmas!r}")
        for name in ("min_std", "min_rel_std"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (is_number(self.factor) and math.isfinite(self.factor) and self.factor > 1):
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
        value = finite_float(raw)
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


def _reject_unknown(cls: type, data: dict) -> None:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
