"""GradienceConfig: the one validated configuration shared by controller, callback and YAML loader."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import ConfigError

SNAPSHOT_TIERS = ("disk", "memory")


@dataclass(frozen=True, kw_only=True)
class GradienceConfig:
    """Every knob of the guard. Unknown or invalid values raise :class:`ConfigError` naming the field."""

    out_dir: str = "./gradience_logs"
    """Directory for telemetry, summary and snapshots (created if missing)."""

    guard_enabled: bool = True
    """Act on faults (skip, snapshot, roll back, halt). False = observe and report only."""

    guard_snapshot_interval: int = 100
    """Take a snapshot every this many steps (on healthy steps only); the initial state is always taken."""

    guard_violation_threshold: float = 1e6
    """A loss, gradient or weight whose absolute value exceeds this is a fault (VIOLATION_THRESHOLD)."""

    guard_max_rollbacks: int = 3
    """Rollbacks allowed in one episode (until a snapshot commits after recovery); then halt."""

    guard_lr_backoff: float = 0.5
    """Each rollback multiplies the learning rate by this factor, for the rest of the run."""

    guard_check_grads: bool = True
    """Check gradients in ``before_optimizer_step`` and skip updates that carry NaN/Inf or violations."""

    guard_max_consecutive_skips: int = 10
    """After this many skipped updates in a row, roll back instead of skipping again."""

    guard_snapshot_keep: int = 2
    """Committed snapshots kept (plus the newest one that never failed, if older)."""

    guard_snapshot_tier: str = "disk"
    """'disk': safetensors shards under out_dir/snapshots (survive a crash); 'memory': CPU copies."""

    guard_snapshot_commit_lag: int = 0
    """0: write and commit a snapshot at its step. N > 0: copy the state at its step, write it in a background
    thread and commit it N steps later unless a fault comes first (for large models, where a synchronous
    write costs many steps; also keeps a state that goes bad within N steps from ever becoming a target).
    With save_fn the write stays on the training thread (it reads live state); only the commit is delayed."""

    guard_max_snapshot_failures: int = 2
    """A snapshot whose restores were followed by a fault this many times is never a target again."""

    fingerprint_interval: int = 0
    """Every this many steps compare a checksum of the parameters across ranks (0 = off)."""

    spectral_enabled: bool = True
    """Compute the spectral probe κ̃ every ``spectral_interval`` steps (reported as null until available)."""

    spectral_interval: int = 50
    """Steps between spectral probes."""

    telemetry_interval: int = 10
    """Write a ``telemetry`` event every this many steps (faults and actions are always written)."""

    redact_max_chars: int = 256
    """Strings longer than this in telemetry and summary are truncated and marked redacted (0 = never)."""

    collective_timeout_s: float = 300.0
    """Seconds a collective may take before a ConsensusTimeout is raised instead of hanging."""

    probe_error_limit: int = 3
    """A check whose probe raises this many times in a row (on any rank) is switched off for the rest of the
    run, on every rank, and reported; a raising probe never rolls back or halts a run."""

    log_all_ranks: bool = False
    """Log collective decisions (skips, rollbacks, halts) on every rank, not only on group rank 0."""

    def __post_init__(self) -> None:
        if isinstance(self.out_dir, os.PathLike):
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _positive_int(self, "guard_snapshot_interval", "guard_max_consecutive_skips", "guard_snapshot_keep",
                      "guard_max_snapshot_failures", "spectral_interval", "telemetry_interval", "probe_error_limit")
        _non_negative_int(self, "guard_max_rollbacks", "fingerprint_interval", "redact_max_chars",
                          "guard_snapshot_commit_lag")
        if not (math.isfinite(self.guard_violation_threshold) and self.guard_violation_threshold > 0):
            raise ConfigError(
                f"guard_violation_threshold must be a finite number > 0, got {self.guard_violation_threshold!r}"
            )
        if not (0.0 < self.guard_lr_backoff <= 1.0):
            raise ConfigError(f"guard_lr_backoff must be in (0, 1], got {self.guard_lr_backoff!r}")
        if self.guard_snapshot_tier not in SNAPSHOT_TIERS:
            raise ConfigError(f"guard_snapshot_tier must be one of {SNAPSHOT_TIERS}, got {self.guard_snapshot_tier!r}")
        if not (math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0):
            raise ConfigError(f"collective_timeout_s must be a finite number > 0, got {self.collective_timeout_s!r}")
        if self.guard_snapshot_commit_lag and self.guard_snapshot_commit_lag >= self.guard_snapshot_interval:
            raise ConfigError(f"guard_snapshot_commit_lag ({self.guard_snapshot_commit_lag}) must be smaller than "
                              f"guard_snapshot_interval ({self.guard_snapshot_interval})")
        if not self.out_dir:
            raise ConfigError("out_dir must be a non-empty path")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GradienceConfig:
        """Build from a mapping; an unknown key raises ConfigError naming it (and the closest valid name)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                import difflib

                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GradienceConfig:
        """Load a gradience YAML file (a flat mapping, optionally under a top-level ``gradience:`` key)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"gradience config not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if isinstance(data, dict) and set(data) == {"gradience"}:
            data = data["gradience"] or {}
        if isinstance(data, dict):
            data = {k: _yaml_float(v) if _FIELD_TYPES.get(k) == "float" else v for k, v in data.items()}
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> GradienceConfig:
        """A copy with ``changes`` applied and validated; unknown names raise ConfigError."""
        return GradienceConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every field."""
        return dataclasses.asdict(self)


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GradienceConfig)}


def _yaml_float(value: Any) -> Any:
    # YAML 1.1 reads "1e6" (no dot, no sign) as a string; accept it as the number users meant.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(name: str, value: Any, annotation: str) -> None:
    expected = {"str": str, "bool": bool, "int": int, "float": (int, float)}[annotation]
    # bool is an int subclass: `guard_max_rollbacks: true` in YAML must not pass as 1.
    if isinstance(value, bool) and annotation != "bool":
        raise ConfigError(f"{name} must be {annotation}, got bool {value!r}")
    if annotation == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{name} must be {annotation}, got {type(value).__name__} {value!r}")


def _positive_int(cfg: GradienceConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 1:
            raise ConfigError(f"{n} must be >= 1, got {getattr(cfg, n)!r}")


def _non_negative_int(cfg: GradienceConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{n} must be >= 0, got {getattr(cfg, n)!r}")
