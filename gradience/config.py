"""GradienceConfig: the one validated configuration shared by controller, callback and YAML loader."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import ConfigError
from gradience.risk import RiskBands
from gradience.spike import SpikeRule

SNAPSHOT_TIERS = ("disk", "memory")
#: guard_snapshot_hot values: "auto" (device memory within the budget, else host), "host", "off" (no copy).
SNAPSHOT_HOT = ("auto", "host", "off")
SPECTRAL_DEFINITIONS = ("auto", "attention", "hidden_sigma")
SPIKE_ACTIONS = ("off", "log", "skip", "rollback")
logger = logging.getLogger(__name__)


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
    """'disk': safetensors shards under out_dir/snapshots (survive a crash); 'memory': in-memory copies only
    (where guard_snapshot_hot places them)."""

    guard_snapshot_hot: str = "auto"
    """The hot tier: an in-memory copy of the newest snapshot, so a rollback reads no file. 'auto': device
    memory while the copies fit guard_snapshot_hot_budget, else host memory (pinned under CUDA; the log says
    when it falls back); 'host': host memory; 'off': none. With a hot tier a disk snapshot is a target from
    its copy at once, and its shard is written from the copy in a background thread and committed on disk
    (marker) once every rank's write finished: the persist never blocks a step. 'off' on the disk tier: the
    shard is written on the training thread (unless guard_snapshot_commit_lag > 0) and restores read files.
    The memory tier is the hot tier alone ('off' is refused there)."""

    guard_snapshot_hot_budget: float = 0.25
    """Share of the accelerator's memory that hot copies may hold ('auto'); beyond it they go to host memory."""

    guard_snapshot_commit_lag: int = 0
    """0: a snapshot becomes a rollback target at its step. N > 0: only N healthy steps later, unless a fault
    comes first (a state that goes bad within N steps never becomes a target). Without a hot tier, N > 0 also
    moves the disk write to a background thread (a copy is taken at the step); with save_fn the write stays on
    the training thread (it reads live state) and only the commit is delayed."""

    guard_max_snapshot_failures: int = 2
    """A snapshot whose restores were followed by a fault this many times is never a target again."""

    fingerprint_interval: int = 0
    """Every this many steps compare a checksum of the parameters across ranks (0 = off)."""

    guard_verdict: str = "auto"
    """'sync': the host reads every check in its own step (exact same-step detection; two host syncs and, with
    several ranks, two all-reduces per step). 'async': the gradient gate is decided on the device (the fused
    optimizer's found_inf), no host sync; each verdict is read one step later, when the device has long
    finished it, and fed to the same policy: weight faults are acted on one step late (that step discarded;
    the gate keeps the optimizer state clean meanwhile), skips are reported one step late (tensors named by the
    gate's per-tensor norms) and a snapshot commits once its own step was judged; with several ranks the flags
    travel in two device all-reduces per step, enqueued on the stream. 'auto': async on accelerators when the
    run allows it, sync on CPUs. Runs that cannot go async (an optimizer without found_inf, DeepSpeed/FSDP2
    state, spike_action='skip', fingerprints) stay sync, and the log says why; steps a GradScaler steps, steps
    whose parameters have no optimizer state yet and steps without before_optimizer_step are synchronous."""

    spectral_enabled: bool = True
    """Compute the spectral probe κ̃ every ``spectral_interval`` steps and the risk level from its trend."""

    spectral_interval: int = 50
    """Steps between spectral probes."""

    spectral_definition: str = "auto"
    """κ̃: 'attention' (max over layers and heads of σ_max(W_Q,h W_K,hᵀ)/√d_h), 'hidden_sigma' (largest σ_max of
    the hidden weight matrices), or 'auto' (attention when Q/K projections are found, else hidden_sigma)."""

    spectral_mapping: dict | None = None
    """Where the attention Q/K weights are, for models the discovery does not know: ``{"q": "<glob>", "k":
    "<glob>", "n_heads": N}`` plus optional ``n_kv_heads``, ``transposed``, ``q_rows``, ``k_rows`` and
    ``exclude`` (globs of matrices the hidden-σ fallback skips). See gradience.spectral.find_qk; checked against
    the model at initialize."""

    spectral_iters: int = 2
    """Warm-started power iterations per matrix and probe (the first probe runs 8)."""

    risk_window: int = 8
    """Spectral probes in the least-squares fit of the slope (and the volatility) of log κ̃ per step."""

    risk_burn_in_steps: int = 500
    """Steps during which no risk level above LEARNING is reported (spectral quantities rise fast at init)."""

    risk_learning_slope: float = 0.0005
    """Slope of log κ̃ per step from which the level is LEARNING (below: STABLE)."""

    risk_warning_slope: float = 0.007
    """Slope of log κ̃ per step from which the level is WARNING (fitted by the spectral bench; the seed's 0.002
    alarmed on every healthy run there)."""

    risk_danger_slope: float = 0.014
    """Slope of log κ̃ per step from which the level is DANGER (0.014 doubles κ̃ in about 50 steps)."""

    risk_instability_volatility: float = 0.005
    """Volatility (std of Δlog κ̃ per step) above which the level is INSTABILITY (fitted by the spectral bench)."""

    risk_reactions: bool = False
    """React to the spectral risk level: WARNING → a snapshot and a probe every step for risk_burst_steps;
    DANGER → a snapshot and one LR backoff per episode; INSTABILITY → a rollback (a halt once the budget is
    spent). Off by default: the bands are fitted on one small model (docs/spectral-bench.md); levels are always
    reported and logged."""

    risk_burst_steps: int = 50
    """Steps of every-step probing after a WARNING reaction."""

    spike_action: str = "log"
    """What a finite loss / grad-norm spike at the gradient gate does: 'off', 'log' (report only), 'skip' (drop
    the update; repeated skips roll back) or 'rollback'. Pass the loss to before_optimizer_step to test it."""

    spike_sigmas: float = 6.0
    """A spike is a value more than this many standard deviations above the mean of the last spike_window steps
    (OLMo-core's rule), after a warm-up of spike_window / 2 accepted steps."""

    spike_window: int = 128
    """Steps in the spike rule's running statistics."""

    spike_ratio: float = 10.0
    """A grad norm or loss at least this many times the running maximum is a spike too (Megatron's rule; 0 = off)."""

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

    tensorboard: bool = False
    """Also write the guard's metrics as TensorBoard scalars under out_dir/tensorboard (group rank 0; needs the
    tensorboard package). For plain loops: the Trainer callback reports through the Trainer's integrations."""

    def __post_init__(self) -> None:
        if isinstance(self.out_dir, os.PathLike):
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _positive_int(self, "guard_snapshot_interval", "guard_max_consecutive_skips", "guard_snapshot_keep",
                      "guard_max_snapshot_failures", "spectral_interval", "telemetry_interval", "probe_error_limit",
                      "spectral_iters", "risk_burst_steps")
        _non_negative_int(self, "guard_max_rollbacks", "fingerprint_interval", "redact_max_chars",
                          "guard_snapshot_commit_lag")
        if not (math.isfinite(self.guard_violation_threshold) and self.guard_violation_threshold > 0):
            raise ConfigError(
                f"guard_violation_threshold must be a finite number > 0, got {self.guard_violation_threshold!r}"
            )
        if not (0.0 < self.guard_lr_backoff <= 1.0):
            raise ConfigError(f"guard_lr_backoff must be in (0, 1], got {self.guard_lr_backoff!r}")
        if self.guard_verdict not in ("auto", "sync", "async"):
            raise ConfigError(f"guard_verdict must be 'auto', 'sync' or 'async', got {self.guard_verdict!r}")
        if self.guard_snapshot_tier not in SNAPSHOT_TIERS:
            raise ConfigError(f"guard_snapshot_tier must be one of {SNAPSHOT_TIERS}, got {self.guard_snapshot_tier!r}")
        if self.guard_snapshot_hot not in SNAPSHOT_HOT:
            raise ConfigError(f"guard_snapshot_hot must be one of {SNAPSHOT_HOT}, got {self.guard_snapshot_hot!r}")
        if self.guard_snapshot_tier == "memory" and self.guard_snapshot_hot == "off":
            raise ConfigError("guard_snapshot_tier='memory' keeps snapshots in the hot tier only: guard_snapshot_hot "
                              "cannot be 'off' (use 'auto' or 'host')")
        if not (0.0 <= self.guard_snapshot_hot_budget <= 1.0):
            raise ConfigError(f"guard_snapshot_hot_budget must be in [0, 1], got {self.guard_snapshot_hot_budget!r}")
        if not (math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0):
            raise ConfigError(f"collective_timeout_s must be a finite number > 0, got {self.collective_timeout_s!r}")
        if self.guard_snapshot_commit_lag and self.guard_snapshot_commit_lag >= self.guard_snapshot_interval:
            raise ConfigError(f"guard_snapshot_commit_lag ({self.guard_snapshot_commit_lag}) must be smaller than "
                              f"guard_snapshot_interval ({self.guard_snapshot_interval})")
        if not self.out_dir:
            raise ConfigError("out_dir must be a non-empty path")
        if self.spectral_definition not in SPECTRAL_DEFINITIONS:
            raise ConfigError(f"spectral_definition must be one of {SPECTRAL_DEFINITIONS}, got "
                              f"{self.spectral_definition!r}")
        _check_mapping(self.spectral_mapping)
        self.risk_bands()  # validates the risk_* fields, naming the one that is wrong
        if self.spike_action not in SPIKE_ACTIONS:
            raise ConfigError(f"spike_action must be one of {SPIKE_ACTIONS}, got {self.spike_action!r}")
        self.spike_rule()

    def spike_rule(self) -> SpikeRule:
        """The spike rule these fields describe (built once: the policy asks every step)."""
        rule = self.__dict__.get("_spike_rule")
        if rule is None:
            rule = self._build_spike_rule()
            object.__setattr__(self, "_spike_rule", rule)  # frozen: a cache, not a field
        return rule

    def _build_spike_rule(self) -> SpikeRule:
        try:
            return SpikeRule(window=self.spike_window, sigmas=self.spike_sigmas,
                             warmup=max(20, self.spike_window // 2), ratio=self.spike_ratio > 0,
                             factor=self.spike_ratio if self.spike_ratio > 0 else 10.0)
        except ValueError as e:
            raise ConfigError(f"spike_*: {e}") from None

    def risk_bands(self) -> RiskBands:
        """The risk-level bands these fields describe."""
        names = {"stable_below": "risk_learning_slope", "learning_below": "risk_warning_slope",
                 "warning_below": "risk_danger_slope", "instability_volatility": "risk_instability_volatility",
                 "window": "risk_window", "burn_in_steps": "risk_burn_in_steps"}
        try:
            return RiskBands(**{k: getattr(self, v) for k, v in names.items()})
        except ValueError as e:
            msg = str(e)
            for k, v in names.items():
                msg = msg.replace(k, v)
            raise ConfigError(msg) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GradienceConfig:
        """Build from a mapping; unknown keys raise one ConfigError naming them all (each with the closest valid
        name, when there is one)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
        _reject_unknown(data, source)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GradienceConfig:
        """Load a gradience YAML file, or a config shipped with the package by bare name (``"default"``,
        ``"aggressive"``, ``"hf_example"``; see :func:`packaged_configs`).

        A file with a top-level ``gradience:`` key is read from that section only (other sections, e.g. a
        trainer's, are ignored); a file without one is a flat mapping of field names. An empty file or empty
        section raises ConfigError: it more likely means a wrong file than "all defaults".
        """
        import yaml

        path = _resolve(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            known = ", ".join(packaged_configs())
            raise ConfigError(f"gradience config not found: {path} (configs shipped with gradience, "
                              f"loadable by bare name: {known})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, a binary file
            raise ConfigError(f"{path}: cannot read the gradience config: {e}") from None
        source, what = str(path), "the file"
        if isinstance(data, dict) and SECTION in data:
            _warn_stray_fields(data, source)
            data, source, what = data[SECTION], f"{path} [{SECTION}]", f"the {SECTION}: section"
            if data is not None and not isinstance(data, dict):
                raise ConfigError(f"{source}: {what} must be a mapping of field names to values, "
                                  f"got {type(data).__name__}")
        if data is None or data == {}:
            raise ConfigError(f"{source}: {what} is empty; set at least one field (the packaged config 'default' "
                              f"lists them all) or load no file to get the defaults")
        if isinstance(data, dict):
            data = {k: _yaml_float(v) if _FIELD_TYPES.get(k) == "float" else v for k, v in data.items()}
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> GradienceConfig:
        """A copy with ``changes`` applied and validated; unknown names raise ConfigError."""
        return GradienceConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every field."""
        return dataclasses.asdict(self)


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GradienceConfig)}
SECTION = "gradience"
"""Top-level key of a YAML file that holds the gradience fields next to other tools' sections."""
PACKAGED_DIR = Path(__file__).resolve().parent / "configs"
"""Copies of the repository's ``configs/*.yaml``, installed with the package (package data)."""


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package, loadable as ``GradienceConfig.from_yaml(name)``."""
    return sorted(p.stem for p in PACKAGED_DIR.glob("*.yaml"))


def _resolve(path: str | Path) -> Path:
    # An existing file always wins; only a bare name with no directory and no suffix ("default") that is not
    # a file here falls back to the packaged copy, so the shipped configs work from any working directory.
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) != 1:
        return p
    packaged = PACKAGED_DIR / f"{p.name}.yaml"
    return packaged if packaged.is_file() else p


def _reject_unknown(data: dict[Any, Any], source: str) -> None:
    import difflib

    unknown = []
    for key in data:
        if key not in _FIELD_TYPES:
            close = difflib.get_close_matches(str(key), list(_FIELD_TYPES), n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        # All at once: a user fixing a hand-written file should not have to rerun once per typo.
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def _warn_stray_fields(data: dict[Any, Any], source: str) -> None:
    # Next to a gradience: section, a top-level field name is ignored like any other tool's key. It may well
    # be another tool's (out_dir is common), so it is not an error; but it may also be a field indented one
    # level too little, which would otherwise be dropped without a word.
    stray = sorted(str(k) for k in data if k in _FIELD_TYPES)
    if stray:
        logger.warning("%s: top-level key(s) %s ignored: only the %s: section is read (indent them under it if "
                       "they were meant for gradience)", source, ", ".join(stray), SECTION)


def _yaml_float(value: Any) -> Any:
    # YAML 1.1 reads "1e6" (no dot, no sign) as a string; accept it as the number users meant.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_MAPPING_KEYS = {"q": str, "k": str, "n_heads": int, "n_kv_heads": int, "transposed": bool, "q_rows": list,
                 "k_rows": list, "exclude": list}


def _check_mapping(mapping: dict | None) -> None:
    if mapping is None:
        return
    unknown = sorted(set(mapping) - set(_MAPPING_KEYS))
    if unknown:
        raise ConfigError(f"spectral_mapping: unknown keys {unknown}; valid: {sorted(_MAPPING_KEYS)}")
    if "q" in mapping or "k" in mapping:
        missing = [k for k in ("q", "k", "n_heads") if k not in mapping]
        if missing:
            raise ConfigError(f"spectral_mapping: a Q/K mapping needs {missing} too")
    for key, value in mapping.items():
        want = _MAPPING_KEYS[key]
        ok = isinstance(value, (list, tuple)) if want is list else isinstance(value, want)
        if isinstance(value, bool) and want is not bool:
            ok = False
        if not ok:
            raise ConfigError(f"spectral_mapping[{key!r}] must be {want.__name__}, got {type(value).__name__} "
                              f"{value!r}")
    for key in ("n_heads", "n_kv_heads"):
        if key in mapping and mapping[key] < 1:
            raise ConfigError(f"spectral_mapping[{key!r}] must be >= 1, got {mapping[key]!r}")
    for key in ("q_rows", "k_rows"):
        rows = mapping.get(key)
        if rows is not None and not (len(rows) == 2 and all(isinstance(r, int) and not isinstance(r, bool)
                                                            for r in rows) and 0 <= rows[0] < rows[1]):
            raise ConfigError(f"spectral_mapping[{key!r}] must be [start, stop) output rows, got {rows!r}")


def _check_type(name: str, value: Any, annotation: str) -> None:
    if annotation == "dict | None":
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping or null, got {type(value).__name__} {value!r}")
        return
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
