"""GradienceConfig: defaults, validation naming the field, unknown keys, YAML files under configs/ and their
packaged copies."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

import gradience.config
from gradience import ConfigError, GradienceConfig, GradienceController
from gradience.config import packaged_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FIELDS = [f.name for f in dataclasses.fields(GradienceConfig)]


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_match_the_seed():
    c = GradienceConfig()
    assert c.out_dir == "./gradience_logs"
    assert c.guard_enabled is True
    assert c.guard_snapshot_interval == 100
    assert c.guard_violation_threshold == 1e6
    assert c.guard_max_rollbacks == 3
    assert c.guard_lr_backoff == 0.5
    assert c.spectral_enabled is True
    assert c.spectral_interval == 50
    assert c.telemetry_interval == 10
    assert c.redact_max_chars == 256


def test_config_is_frozen_and_keyword_only():
    c = GradienceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.guard_max_rollbacks = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        GradienceConfig("./x")  # type: ignore[misc]


def test_every_field_has_a_docstring():
    import inspect

    src = inspect.getsource(GradienceConfig)
    for name in FIELDS:
        head, _, tail = src.partition(f"    {name}:")
        assert tail, name
        following = tail.split("\n", 2)[1].strip()
        assert following.startswith('"""'), f"{name} has no docstring"


def test_to_dict_round_trip():
    c = GradienceConfig(guard_snapshot_interval=7, guard_snapshot_tier="memory", out_dir="/tmp/x")
    d = c.to_dict()
    assert set(d) == set(FIELDS)
    assert GradienceConfig.from_dict(d) == c


# ------------------------------------------------------------------------------------------------ bad values

BAD_VALUES = [
    # zero / negative intervals and counts
    ("guard_snapshot_interval", 0),
    ("guard_snapshot_interval", -5),
    ("spectral_interval", 0),
    ("spectral_interval", -1),
    ("telemetry_interval", 0),
    ("telemetry_interval", -10),
    ("guard_max_consecutive_skips", 0),
    ("guard_snapshot_keep", 0),
    ("guard_max_snapshot_failures", 0),
    ("guard_max_rollbacks", -1),
    ("fingerprint_interval", -1),
    ("redact_max_chars", -1),
    # backoff outside (0, 1]
    ("guard_lr_backoff", 0.0),
    ("guard_lr_backoff", 0),
    ("guard_lr_backoff", -0.5),
    ("guard_lr_backoff", 1.5),
    ("guard_lr_backoff", 2),
    ("guard_lr_backoff", math.nan),
    # bool where an int is expected (YAML `true` must not pass as 1)
    ("guard_max_rollbacks", True),
    ("guard_snapshot_interval", True),
    ("telemetry_interval", False),
    ("redact_max_chars", True),
    # bool where a float is expected
    ("guard_lr_backoff", True),
    ("guard_violation_threshold", True),
    # float where an int is expected
    ("guard_snapshot_interval", 1.5),
    ("guard_max_rollbacks", 3.0),
    # string where a number is expected
    ("guard_violation_threshold", "1e6"),
    ("guard_lr_backoff", "0.5"),
    ("guard_snapshot_interval", "100"),
    ("collective_timeout_s", "300"),
    # non-finite / non-positive thresholds and timeouts
    ("guard_violation_threshold", math.nan),
    ("guard_violation_threshold", math.inf),
    ("guard_violation_threshold", 0.0),
    ("guard_violation_threshold", -1.0),
    ("collective_timeout_s", 0.0),
    ("collective_timeout_s", math.nan),
    ("collective_timeout_s", -1),
    # bad tier
    ("guard_snapshot_tier", "ssd"),
    ("guard_snapshot_tier", "DISK"),
    ("guard_snapshot_tier", ""),
    ("guard_snapshot_tier", 1),
    # non-bool where a bool is expected
    ("guard_enabled", 1),
    ("guard_enabled", "yes"),
    ("spectral_enabled", 0),
    ("guard_check_grads", None),
    # out_dir
    ("out_dir", ""),
    ("out_dir", 5),
    ("out_dir", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        GradienceConfig(**{field: value})
    assert isinstance(info.value, ConfigError)
    # the same through every entry point
    with pytest.raises(ConfigError, match=field):
        GradienceConfig.from_dict({field: value})
    with pytest.raises(ConfigError, match=field):
        GradienceConfig().replace(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("guard_max_rollbacks", 0),
        ("fingerprint_interval", 0),
        ("redact_max_chars", 0),
        ("guard_lr_backoff", 1.0),
        ("guard_lr_backoff", 1),
        ("guard_violation_threshold", 10),
        ("guard_snapshot_interval", 1),
        ("guard_snapshot_tier", "memory"),
        ("collective_timeout_s", 5),
    ],
)
def test_boundary_values_accepted(field, value):
    assert getattr(GradienceConfig(**{field: value}), field) == value


def test_path_out_dir_accepted(tmp_path):
    c = GradienceConfig(out_dir=tmp_path / "logs")
    assert c.out_dir == str(tmp_path / "logs")
    assert isinstance(c.out_dir, str)
    assert GradienceConfig.from_dict({"out_dir": tmp_path}).out_dir == str(tmp_path)


# ------------------------------------------------------------------------------------------------ unknown keys


def test_unknown_key_from_dict_names_the_key():
    with pytest.raises(ConfigError, match="guard_max_rollback'") as info:
        GradienceConfig.from_dict({"guard_max_rollback": 2})
    assert "guard_max_rollbacks" in str(info.value)  # the hint names the closest valid field


def test_unknown_keys_from_dict_all_in_one_error():
    with pytest.raises(ConfigError, match="unknown keys") as info:
        GradienceConfig.from_dict({"guard_max_rollback": 2, "telemetry_intervl": 5, "out_dir": "x", "bogus": 1})
    msg = str(info.value)
    assert "'guard_max_rollback' (did you mean 'guard_max_rollbacks'?)" in msg
    assert "'telemetry_intervl' (did you mean 'telemetry_interval'?)" in msg
    assert "'bogus'" in msg and "out_dir" not in msg


def test_unknown_key_replace_names_the_key():
    with pytest.raises(ConfigError, match="bogus"):
        GradienceConfig().replace(bogus=1)


def test_unknown_key_controller_names_the_key():
    with pytest.raises(ConfigError, match="bogus"):
        GradienceController(bogus=1)


def test_controller_kwargs_override_config():
    ctl = GradienceController(GradienceConfig(guard_max_rollbacks=5), guard_snapshot_interval=7)
    assert ctl.config.guard_max_rollbacks == 5
    assert ctl.config.guard_snapshot_interval == 7
    with pytest.raises(ConfigError, match="guard_lr_backoff"):
        GradienceController(guard_lr_backoff=0)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        GradienceConfig.from_dict([1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ YAML


def _yaml_files() -> list[Path]:
    return sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])


def test_configs_dir_has_default():
    files = _yaml_files()
    assert files, f"no YAML configs under {CONFIGS}"
    assert CONFIGS / "default.yaml" in files


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = GradienceConfig.from_yaml(path)
    assert isinstance(cfg, GradienceConfig)


def test_default_yaml_equals_defaults_and_lists_every_field():
    import yaml

    path = CONFIGS / "default.yaml"
    assert GradienceConfig.from_yaml(path) == GradienceConfig()
    data = yaml.safe_load(path.read_text())
    data = data.get("gradience", data)
    assert set(data) == set(FIELDS)
    # each field line is preceded by a comment that explains it
    lines = path.read_text().splitlines()
    for name in FIELDS:
        idx = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[idx - 1].strip().startswith("#"), f"{name} has no comment in default.yaml"


def test_aggressive_yaml():
    cfg = GradienceConfig.from_yaml(CONFIGS / "aggressive.yaml")
    assert cfg.guard_snapshot_tier == "memory"
    assert cfg.guard_snapshot_interval < GradienceConfig().guard_snapshot_interval


def test_from_yaml_flat_and_nested(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("guard_max_rollbacks: 5\nguard_lr_backoff: 0.25\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("gradience:\n  guard_max_rollbacks: 5\n  guard_lr_backoff: 0.25\n")
    a, b = GradienceConfig.from_yaml(flat), GradienceConfig.from_yaml(str(nested))
    assert a == b == GradienceConfig(guard_max_rollbacks=5, guard_lr_backoff=0.25)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("{}\n", "the file is empty"),
        ("gradience:\n", "gradience: section is empty"),
        ("gradience: {}\n", "gradience: section is empty"),
        ("gradience:\ntrainer:\n  lr: 0.1\n", "gradience: section is empty"),
    ],
    ids=["empty", "comment-only", "empty-mapping", "null-section", "empty-section", "null-section-with-others"],
)
def test_from_yaml_empty_is_an_error(tmp_path, text, what):
    # An empty file or section is more likely a wrong file than a wish for all defaults: say so.
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=what) as info:
        GradienceConfig.from_yaml(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("section", ["[1, 2]", "5", "just a string", "true"])
def test_from_yaml_section_not_a_mapping(tmp_path, section):
    p = tmp_path / "bad.yaml"
    p.write_text(f"gradience: {section}\nother: 1\n")
    with pytest.raises(ConfigError, match="gradience: section must be a mapping") as info:
        GradienceConfig.from_yaml(p)
    assert str(p) in str(info.value)


def test_from_yaml_reads_only_the_gradience_section(tmp_path):
    # One file shared with other tools: their sections are ignored, gradience's is validated.
    p = tmp_path / "train.yaml"
    p.write_text("model:\n  name: gpt2\n  layers: 12\n"
                 "gradience:\n  guard_max_rollbacks: 5\n  guard_violation_threshold: 1e6\n"
                 "trainer:\n  lr: 3.0e-4\n  unknown_to_us: true\n")
    cfg = GradienceConfig.from_yaml(p)
    assert cfg == GradienceConfig(guard_max_rollbacks=5, guard_violation_threshold=1e6)
    assert isinstance(cfg.guard_violation_threshold, float)


def test_from_yaml_warns_about_field_names_outside_the_section(tmp_path, caplog):
    # A field indented one level too little is ignored like another tool's key, but not silently.
    p = tmp_path / "train.yaml"
    p.write_text("gradience:\n  guard_max_rollbacks: 5\nguard_snapshot_interval: 7\nmodel: gpt2\n")
    with caplog.at_level("WARNING", logger="gradience"):
        cfg = GradienceConfig.from_yaml(p)
    assert cfg.guard_snapshot_interval == GradienceConfig().guard_snapshot_interval
    assert "guard_snapshot_interval" in caplog.text and "model" not in caplog.text


def test_from_yaml_flat_1e6_float(tmp_path):
    # YAML 1.1 reads 1e6 as a string; float fields accept it as the number meant, flat or nested.
    p = tmp_path / "flat.yaml"
    p.write_text("guard_violation_threshold: 1e6\ncollective_timeout_s: 6e1\n")
    cfg = GradienceConfig.from_yaml(p)
    assert cfg.guard_violation_threshold == 1e6 and cfg.collective_timeout_s == 60.0


def test_from_yaml_unknown_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("gradience:\n  guard_snapshot_intervl: 10\n")
    with pytest.raises(ConfigError, match="guard_snapshot_intervl") as info:
        GradienceConfig.from_yaml(p)
    assert str(p) in str(info.value)


def test_from_yaml_unknown_top_level_next_to_gradience_is_accepted(tmp_path):
    p = tmp_path / "mixed.yaml"
    p.write_text("gradience:\n  guard_max_rollbacks: 2\nextra: 1\n")
    assert GradienceConfig.from_yaml(p) == GradienceConfig(guard_max_rollbacks=2)


def test_from_yaml_flat_unknown_top_level_is_still_an_error(tmp_path):
    p = tmp_path / "flat.yaml"
    p.write_text("guard_max_rollbacks: 2\nextra: 1\n")
    with pytest.raises(ConfigError, match="extra"):
        GradienceConfig.from_yaml(p)


def test_from_yaml_reports_every_unknown_key_at_once(tmp_path):
    p = tmp_path / "typos.yaml"
    p.write_text("gradience:\n  guard_snapshot_intervl: 10\n  guard_max_rollback: 2\n  zzz_nothing_like_it: 1\n"
                 "  guard_lr_backoff: 0.25\n")
    with pytest.raises(ConfigError) as info:
        GradienceConfig.from_yaml(p)
    msg = str(info.value)
    assert "'guard_snapshot_intervl' (did you mean 'guard_snapshot_interval'?)" in msg
    assert "'guard_max_rollback' (did you mean 'guard_max_rollbacks'?)" in msg
    assert "'zzz_nothing_like_it'" in msg and "zzz_nothing_like_it' (did" not in msg
    assert "guard_lr_backoff" not in msg  # a valid key is not reported
    assert str(p) in msg


def test_from_yaml_bad_value_names_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("guard_max_rollbacks: true\n")
    with pytest.raises(ConfigError, match="guard_max_rollbacks"):
        GradienceConfig.from_yaml(p)


def test_from_yaml_bad_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("gradience: [unclosed\n  guard_max_rollbacks: : :\n")
    with pytest.raises(ConfigError, match="YAML") as info:
        GradienceConfig.from_yaml(p)
    assert str(p) in str(info.value)


def test_from_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        GradienceConfig.from_yaml(p)


def test_from_yaml_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        GradienceConfig.from_yaml(p)
    assert "nope.yaml" in str(info.value)
    assert "default" in str(info.value)  # names the packaged configs loadable by bare name


def test_from_yaml_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        GradienceConfig.from_yaml(tmp_path)


# ------------------------------------------------------------------------------------------------ packaged configs

PACKAGED = Path(gradience.config.__file__).resolve().parent / "configs"


def test_packaged_configs_are_copies_of_configs_dir():
    # configs/ is the source of truth; gradience/configs/ ships it as package data. After editing a file in
    # configs/, run: cp configs/*.yaml gradience/configs/
    top = {p.name: p.read_bytes() for p in _yaml_files()}
    packaged = {p.name: p.read_bytes() for p in sorted(PACKAGED.glob("*.y*ml"))}
    assert packaged == top, "gradience/configs/ differs from configs/: cp configs/*.yaml gradience/configs/"
    assert packaged_configs() == sorted(Path(name).stem for name in top)


def test_pyproject_ships_packaged_configs_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())
    assert "configs/*.yaml" in data["tool"]["setuptools"]["package-data"]["gradience"]


@pytest.mark.parametrize("name", ["default", "aggressive", "hf_example"])
def test_bare_name_loads_packaged_config_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert GradienceConfig.from_yaml(name) == GradienceConfig.from_yaml(CONFIGS / f"{name}.yaml")
    assert GradienceConfig.from_yaml(Path(name)) == GradienceConfig.from_yaml(CONFIGS / f"{name}.yaml")


def test_bare_name_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("default").write_text("guard_max_rollbacks: 7\n")
    assert GradienceConfig.from_yaml("default").guard_max_rollbacks == 7


def test_bare_name_unknown_or_with_suffix_is_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("no_such_config", "default.yaml", "configs/default.yaml"):
        with pytest.raises(ConfigError, match="not found"):
            GradienceConfig.from_yaml(name)
