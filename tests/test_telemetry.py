"""Telemetry: redaction, strict JSON lines, per-rank files, atomic rank-0 summary, flush per event."""

from __future__ import annotations

import json
import math

import pytest

from gradience.telemetry import Telemetry, redact, telemetry_filename
from gradience.types import Phase, Reason


def _strict_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity / -Infinity (what other languages' parsers do)."""
    return json.loads(text, parse_constant=_strict_constant)


def read_lines(path) -> list[dict]:
    return [strict_loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ redaction


def test_long_string_cut_and_marked():
    s = "x" * 300
    out = redact(s, 256)
    assert out.startswith("x" * 256)
    assert not out.startswith("x" * 257)
    assert "redacted" in out and "44" in out  # says how much was cut


def test_string_at_limit_kept():
    s = "y" * 256
    assert redact(s, 256) == s
    assert redact("short", 256) == "short"


def test_redaction_nested():
    long = "z" * 1000
    value = {"a": long, "b": [1, long, {"c": (long, "ok")}], "d": {"e": {"f": long}}, "g": 3}
    out = redact(value, 16)
    assert out["a"].startswith("z" * 16) and "redacted" in out["a"] and len(out["a"]) < 100
    assert out["b"][0] == 1
    assert "redacted" in out["b"][1]
    assert "redacted" in out["b"][2]["c"][0] and out["b"][2]["c"][1] == "ok"
    assert "redacted" in out["d"]["e"]["f"]
    assert out["g"] == 3
    assert value["a"] == long  # the input is not modified


def test_redaction_zero_is_off():
    long = "q" * 10_000
    assert redact({"k": [long]}, 0) == {"k": [long]}


def test_nonfinite_floats_become_strings():
    out = redact({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": float("nan")}}, 256)
    assert out == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": {"d": "nan"}}


def test_enums_serialise_as_values():
    out = redact({"reason": Reason.NONFINITE_GRADS, "phase": Phase.GRADS}, 256)
    assert json.dumps(out) == '{"reason": "NONFINITE_GRADS", "phase": "grads"}'


# ------------------------------------------------------------------------------------------------ event files


def test_event_lines_are_strict_json_with_event_rank_time(tmp_path):
    tel = Telemetry(tmp_path, rank=0)
    tel.emit("start", world_size=1)
    tel.emit("telemetry", step=1, train_loss=math.nan, max_abs_weight=math.inf, grads=[-math.inf, 0.5])
    tel.emit("skip_step", step=2, reason=Reason.NONFINITE_GRADS, nested={"x": [math.nan]})
    tel.close()
    lines = read_lines(tmp_path / "telemetry.jsonl")
    assert [rec["event"] for rec in lines] == ["start", "telemetry", "skip_step"]
    for rec in lines:
        assert rec["rank"] == 0
        assert isinstance(rec["time"], (int, float)) and rec["time"] > 1e9
    assert lines[1]["train_loss"] == "nan"
    assert lines[1]["max_abs_weight"] == "inf"
    assert lines[1]["grads"] == ["-inf", 0.5]
    assert lines[2]["reason"] == "NONFINITE_GRADS"
    assert lines[2]["nested"] == {"x": ["nan"]}


def test_emit_returns_the_record_as_written(tmp_path):
    tel = Telemetry(tmp_path, rank=0, redact_max_chars=8)
    rec = tel.emit("probe_error", error="E" * 50, loss=math.nan)
    tel.close()
    assert read_lines(tmp_path / "telemetry.jsonl") == [rec]
    assert "redacted" in rec["error"] and rec["loss"] == "nan"


def test_event_redaction_default_and_configurable(tmp_path):
    long = "s" * 400
    t_default = Telemetry(tmp_path / "a")
    t_default.emit("e", msg=long, nested={"list": [long]})
    t_short = Telemetry(tmp_path / "b", redact_max_chars=10)
    t_short.emit("e", msg=long)
    t_off = Telemetry(tmp_path / "c", redact_max_chars=0)
    t_off.emit("e", msg=long)
    for t in (t_default, t_short, t_off):
        t.close()
    (a,) = read_lines(tmp_path / "a" / "telemetry.jsonl")
    assert a["msg"].startswith("s" * 256) and not a["msg"].startswith("s" * 257) and "redacted" in a["msg"]
    assert "redacted" in a["nested"]["list"][0]
    (b,) = read_lines(tmp_path / "b" / "telemetry.jsonl")
    assert b["msg"].startswith("s" * 10) and not b["msg"].startswith("s" * 11)
    (c,) = read_lines(tmp_path / "c" / "telemetry.jsonl")
    assert c["msg"] == long


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_per_rank_filenames(tmp_path, rank):
    tel = Telemetry(tmp_path, rank=rank)
    tel.emit("start")
    tel.close()
    expected = "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"
    assert telemetry_filename(rank) == expected
    assert [p.name for p in tmp_path.iterdir()] == [expected]
    (rec,) = read_lines(tmp_path / expected)
    assert rec["rank"] == rank


def test_ranks_share_a_directory_without_clobbering(tmp_path):
    tels = [Telemetry(tmp_path, rank=r) for r in range(3)]
    for r, t in enumerate(tels):
        t.emit("hello", who=r)
    for t in tels:
        t.close()
    for r in range(3):
        (rec,) = read_lines(tmp_path / telemetry_filename(r))
        assert rec["who"] == r == rec["rank"]


def test_flush_per_event(tmp_path):
    tel = Telemetry(tmp_path)
    path = tmp_path / "telemetry.jsonl"
    tel.emit("one", step=1)
    assert [r["event"] for r in read_lines(path)] == ["one"]  # visible before close()
    tel.emit("two", step=2)
    assert [r["event"] for r in read_lines(path)] == ["one", "two"]
    tel.close()


def test_events_after_close_are_dropped(tmp_path):
    tel = Telemetry(tmp_path)
    tel.emit("one")
    tel.close()
    tel.close()  # idempotent
    tel.emit("late")
    assert [r["event"] for r in read_lines(tmp_path / "telemetry.jsonl")] == ["one"]


def test_append_vs_overwrite(tmp_path):
    t = Telemetry(tmp_path)
    t.emit("first")
    t.close()
    t = Telemetry(tmp_path, append=True)
    t.emit("second")
    t.close()
    assert [r["event"] for r in read_lines(tmp_path / "telemetry.jsonl")] == ["first", "second"]
    t = Telemetry(tmp_path)
    t.emit("fresh")
    t.close()
    assert [r["event"] for r in read_lines(tmp_path / "telemetry.jsonl")] == ["fresh"]


def test_out_dir_created(tmp_path):
    d = tmp_path / "deep" / "er"
    t = Telemetry(d)
    t.close()
    assert (d / "telemetry.jsonl").is_file()


# ------------------------------------------------------------------------------------------------ summary


def test_summary_written_atomically_by_rank0(tmp_path):
    tel = Telemetry(tmp_path, rank=0, redact_max_chars=20)
    summary = {"final_loss": math.nan, "guard": {"halt_reason": "x" * 100, "lr_scale": 0.25}, "kappa": -math.inf}
    written = tel.write_summary(summary)
    tel.close()
    on_disk = strict_loads((tmp_path / "summary.json").read_text())
    assert on_disk == written
    assert on_disk["final_loss"] == "nan" and on_disk["kappa"] == "-inf"
    assert "redacted" in on_disk["guard"]["halt_reason"]
    assert on_disk["guard"]["lr_scale"] == 0.25
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
    assert summary["final_loss"] != summary["final_loss"]  # caller's dict untouched (still NaN)


def test_summary_rewrite_replaces(tmp_path):
    tel = Telemetry(tmp_path)
    tel.write_summary({"n": 1})
    tel.write_summary({"n": 2})
    tel.close()
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "telemetry.jsonl"]


def test_summary_uses_temp_then_rename(tmp_path, monkeypatch):
    """The final name appears only through os.replace of a complete temporary file."""
    import os

    import gradience.telemetry as tm

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((str(src), str(dst), strict_loads(open(src).read())))
        assert not os.path.exists(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(tm.os, "replace", spy)
    tel = Telemetry(tmp_path)
    tel.write_summary({"ok": True})
    tel.close()
    ((src, dst, content),) = seen
    assert dst == str(tmp_path / "summary.json") and src != dst
    assert content == {"ok": True}


def test_failed_summary_write_keeps_previous(tmp_path):
    tel = Telemetry(tmp_path)
    tel.write_summary({"n": 1})
    with pytest.raises(TypeError):
        tel.write_summary({"n": object()})  # not JSON-serialisable: fails mid-write
    tel.close()
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"n": 1}


@pytest.mark.parametrize("rank", [1, 2])
def test_summary_only_by_rank0(tmp_path, rank):
    tel = Telemetry(tmp_path, rank=rank)
    out = tel.write_summary({"final_loss": math.inf, "msg": "m" * 500})
    tel.close()
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob("summary*"))
    assert out["final_loss"] == "inf" and "redacted" in out["msg"]  # same redacted dict is returned
