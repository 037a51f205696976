"""The spectral risk level on agreed scalars: from a history of κ̃, its slope and volatility, and the level.

Pure functions of plain Python floats (no torch, IO or clock). Every rank calls them with the same agreed numbers in
the same order, so every rank computes bit-identical results without a broadcast. Slope: least-squares slope of
log κ̃ per optimizer step over the last ``window`` probes; volatility: standard deviation of the per-step Δlog κ̃
between consecutive probes; both classified against bands that only make sense on log κ̃ per optimizer step.
The loss / grad-norm spike rule is :mod:`gradience.spike`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gradience.errors import ConfigError


class RiskLevel(str, enum.Enum):
    """Spectral risk level, from the slope and volatility of log κ̃ per optimizer step."""

    STABLE = "STABLE"
    LEARNING = "LEARNING"
    WARNING = "WARNING"
    DANGER = "DANGER"
    INSTABILITY = "INSTABILITY"

#: (tick, κ̃) pairs, oldest first; tick is the guard's optimizer-step clock.
KappaHistory = tuple[tuple[int, float], ...]

DEFAULT_WINDOW = 8
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
            if not (is_number(value) and value >= 0):  # also rejects NaN
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not self.stable_below <= self.learning_below <= self.warning_below:
            raise ConfigError(
                f"stable_below ({self.stable_below}) <= learning_below ({self.learning_below}) <= warning_below "
                f"({self.warning_below}) must hold"
            )
        if not (is_number(self.instability_volatility) and self.instability_volatility > 0):
            raise ConfigError(f"instability_volatility must be a number > 0, got {self.instability_volatility!r}")
        if not (is_int(self.window) and self.window >= 3):
            raise ConfigError(f"window must be an int >= 3 (a slope and a spread need 3 probes), got {self.window!r}")
        if not (is_int(self.burn_in_steps) and self.burn_in_steps >= 0):
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
    if not (is_int(window) and window >= 1):
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
    if not (is_int(window) and window >= 3):
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
        k = finite_float(kappa)
        if k is None or k <= 0.0:
            continue
        t = int(tick)
        while out and out[-1][0] >= t:
            out.pop()
        out.append((t, k))
    return out


def finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None when it is None, not a number, NaN or ±inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: The seed design's bands (STABLE < 0.0005 ≤ LEARNING < 0.002 ≤ WARNING < 0.004 ≤ DANGER; INSTABILITY above a
#: volatility of 0.003): the spectral bench's baseline arm.
SEED_BANDS = RiskBands(stable_below=0.0005, learning_below=0.002, warning_below=0.004, instability_volatility=0.003)
