"""Telemetry: redaction, strict JSON lines, per-rank files, atomic summary, flush per event, and IO errors
(disk full, file too large, uncreatable out_dir) that are reported once and never reach training."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_summary_name_and_writer_configurable(tmp_path):
    tel = Telemetry(tmp_path, rank=2, summary_name="summary_group1.json", summary_writer=True)
    assert tel.summary_path == tmp_path / "summary_group1.json"
    tel.write_summary({"n": 1})
    tel.close()
    assert strict_loads((tmp_path / "summary_group1.json").read_text()) == {"n": 1}
    assert not (tmp_path / "summary.json").exists()
    quiet = Telemetry(tmp_path / "q", rank=0, summary_writer=False)
    quiet.write_summary({"n": 2})
    assert not (tmp_path / "q" / "summary.json").exists()
    quiet.close()


def test_summary_force_and_name_let_a_survivor_write(tmp_path):
    """Rank 0 died: the caller tells a surviving rank to write a summary under its own name."""
    tel = Telemetry(tmp_path, rank=3)
    tel.write_summary({"n": 1})  # not the writer: nothing
    tel.write_summary({"n": 2}, force=True, name="summary_rank3.json")
    tel.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary_rank3.json", "telemetry_rank3.jsonl"]
    assert strict_loads((tmp_path / "summary_rank3.json").read_text()) == {"n": 2}


# ------------------------------------------------------------------------------------------------ IO errors
# Real failing IO only: /dev/full (ENOSPC), RLIMIT_FSIZE (EFBIG) and a path below a regular file. The tests
# run as root, for whom permission bits do not fail, so read-only directories are not used.


def io_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gradience.telemetry" and r.levelno >= logging.ERROR]


def full_disk(tmp_path: Path, name: str = "telemetry.jsonl") -> Path:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).symlink_to("/dev/full")
    return tmp_path


@pytest.mark.parametrize("append", [False, True])
def test_disk_full_is_reported_once_counted_and_never_raised(tmp_path, caplog, append):
    caplog.set_level(logging.DEBUG, logger="gradience")
    tel = Telemetry(full_disk(tmp_path), append=append)
    records = [tel.emit("telemetry", step=i, train_loss=math.nan, msg="m" * 400) for i in range(50)]
    assert tel.dropped_events == 50
    # emit still returns the record as it would have been written (redacted)
    assert records[3]["step"] == 3 and records[3]["train_loss"] == "nan" and "redacted" in records[3]["msg"]
    (err,) = io_errors(caplog)
    msg = err.getMessage()
    assert str(tmp_path / "telemetry.jsonl") in msg and "No space left on device" in msg
    tel.close()
    tel.close()


def test_disk_full_summary_still_written_elsewhere(tmp_path, caplog):
    """The event file is on a full device; the summary (its own file) is still written and returned."""
    tel = Telemetry(full_disk(tmp_path))
    tel.emit("start")
    assert tel.write_summary({"n": 1}) == {"n": 1}
    tel.close()
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"n": 1}
    assert tel.failed_summaries == 0 and tel.dropped_events == 1


def test_uncreatable_out_dir_then_recovery(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="gradience")
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a directory should be")
    out = blocker / "logs"
    tel = Telemetry(out, rank=1, world_size=2)  # must not raise
    (err,) = io_errors(caplog)
    assert str(out / "telemetry_rank1.jsonl") in err.getMessage() and "Not a directory" in err.getMessage()
    assert err.getMessage().startswith("Gradience [rank 1/2]: ")
    for i in range(5):
        tel.emit("telemetry", step=i)
    assert tel.write_summary({"n": 1}, force=True) == {"n": 1}
    assert tel.dropped_events == 5 and tel.failed_summaries == 1
    assert len(io_errors(caplog)) == 2  # one for events, one for the summary; not one per event
    blocker.unlink()  # the obstacle goes away: the next write creates the directory and the file
    tel.emit("telemetry", step=5)
    tel.emit("telemetry", step=6)
    tel.write_summary({"n": 2}, force=True)
    tel.close()
    assert [r["step"] for r in read_lines(out / "telemetry_rank1.jsonl")] == [5, 6]
    assert strict_loads((out / "summary.json").read_text()) == {"n": 2}
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 2
    assert "recovered after 5 dropped events" in recovered[0]
    assert len(io_errors(caplog)) == 2


def test_unwritable_summary_path_returns_the_summary(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="gradience")
    tel = Telemetry(tmp_path)
    tel.write_summary({"n": 1})
    (tmp_path / "blocked.json").mkdir()  # a directory in the way: os.replace cannot put a file there
    (tmp_path / "blocked.json" / "x").write_text("x")
    out = tel.write_summary({"n": 2, "loss": math.nan}, name="blocked.json")
    assert out == {"n": 2, "loss": "nan"}
    assert tel.failed_summaries == 1
    (err,) = io_errors(caplog)
    assert str(tmp_path / "blocked.json") in err.getMessage()
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
    tel.close()
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"n": 1}


def test_flapping_failures_are_reported_a_bounded_number_of_times(tmp_path, caplog):
    from gradience.telemetry import MAX_IO_REPORTS

    caplog.set_level(logging.DEBUG, logger="gradience")
    blocker = tmp_path / "file"
    tel = Telemetry(tmp_path / "ok")
    tel.close()
    for _ in range(MAX_IO_REPORTS + 3):
        blocker.write_text("x")
        tel.write_summary({"n": 1}, name="../file/s.json")
        blocker.unlink()
        blocker.mkdir()
        tel.write_summary({"n": 1}, name="../file/s.json")
        (blocker / "s.json").unlink()
        blocker.rmdir()
    assert tel.failed_summaries == MAX_IO_REPORTS + 3
    assert len(io_errors(caplog)) == MAX_IO_REPORTS
    assert "not logged" in io_errors(caplog)[-1].getMessage()


def test_unjsonable_event_is_a_programming_error(tmp_path):
    tel = Telemetry(tmp_path)
    with pytest.raises(TypeError):
        tel.emit("e", value=object())
    tel.emit("ok")
    tel.close()
    assert [r["event"] for r in read_lines(tmp_path / "telemetry.jsonl")] == ["ok"]


_FSIZE_CHILD = textwrap.dedent("""
    import json, logging, resource, signal, sys
    from gradience.telemetry import Telemetry

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us; ignored, write fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    tel = Telemetry(sys.argv[1])
    for i in range(200):
        tel.emit("telemetry", step=i, pad="p" * 40)
    big = tel.write_summary({"pad": "q" * 200, "rows": list(range(2000))})
    dropped, failed = tel.dropped_events, tel.failed_summaries
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again: writing recovers
    tel.emit("telemetry", step=200)
    tel.write_summary({"n": 2})
    tel.close()
    print(json.dumps({"dropped": dropped, "failed": failed, "returned": len(big["rows"])}))
""")


def test_file_too_large_in_a_subprocess(tmp_path):
    """RLIMIT_FSIZE (EFBIG) in a child process, so the limit cannot leak into pytest."""
    proc = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["dropped"] > 100 and result["failed"] == 1 and result["returned"] == 2000
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR gradience.telemetry")]
    assert len(errors) == 2, proc.stderr  # the events file and the summary, once each
    assert "File too large" in errors[0] and str(tmp_path / "telemetry.jsonl") in errors[0]
    assert "File too large" in errors[1] and str(tmp_path / "summary.json") in errors[1]
    assert f"recovered after {result['dropped']} dropped events" in proc.stderr
    # the line that crossed the limit was cut back: the file stays valid JSONL, and the event after recovery is there
    raw = (tmp_path / "telemetry.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    steps = [r["step"] for r in read_lines(tmp_path / "telemetry.jsonl")]
    assert steps == list(range(200 - result["dropped"])) + [200]
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"n": 2}
    assert not list(tmp_path.glob("*.tmp"))


def test_controller_trains_on_when_the_disk_is_full(tmp_path, caplog):
    """End to end: every telemetry write fails with ENOSPC; the guard still rolls back and training finishes."""
    from gradience import GradienceController
    from tests.loops import make_mlp, mlp_loss, poison, run_loop

    caplog.set_level(logging.WARNING, logger="gradience")
    full_disk(tmp_path)
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5)
    inject = poison("0.weight")
    out = run_loop(make_mlp(0), mlp_loss, ctl, steps=12, on_update=lambda s, m: inject(m) if s == 7 else None)
    assert out["stopped_at"] is None
    assert out["summary"]["guard"]["total_rollbacks"] == 1
    assert ctl.telemetry.dropped_events > 0
    assert len(io_errors(caplog)) == 1
    assert strict_loads((tmp_path / "summary.json").read_text())["guard"]["integrity_status"] == "RECOVERED"
