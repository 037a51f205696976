"""The overhead benchmark runs end to end, prints one row per arm and writes its JSON (its numbers go into the README);
so does the spectral bench's quick mode."""

import json
import re

import pytest

from gradience.bench.__main__ import main


def test_overhead_bench_prints_every_arm_and_writes_the_documented_json(capsys, tmp_path):
    out_json = tmp_path / "o.json"
    assert main(["overhead", "--blocks", "1", "--block", "10", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for arm in ("interval 50", "interval 100 (default)", "interval 200", "interval 100, spectral off"):
        assert arm in out
    assert "fixed per-step cost" in out and "rollback from the hot tier" in out
    r = json.loads(out_json.read_text())
    assert {"command", "machine", "model", "baseline_step_ms", "arms", "fixed", "rollback", "persist_ms",
            "check_pass_ms"} <= set(r)
    assert set(r["check_pass_ms"]) == {"grads", "weights"} and all(v > 0 for v in r["check_pass_ms"].values())
    assert r["baseline_step_ms"] > 0 and len(r["arms"]) == 4
    for arm in r["arms"].values():
        assert {"step_ms", "in_call_ms", "in_call_pct", "end_to_end_pct", "end_to_end_range_pct"} <= set(arm)
        assert 0 < arm["in_call_ms"] < arm["step_ms"]  # the guard's calls are timed inside the step
    assert 0 < r["fixed"]["in_call_ms"] and set(r["rollback"]) == {"hot", "disk"}
    # The guard's tensor ops per steady-state step, counted (10 on the synchronous path on this revision): ops
    # added to every step show here without timing noise.
    assert 0 < r["fixed"]["ops_per_step"] <= 16 and "tensor ops dispatched" in out
    assert all(x["rollback_ms"] > 0 and x["in_steps"] > 0 for x in r["rollback"].values())
    assert [x["detected_after"] for x in r["rollback"].values()] == [1, 1]  # synchronous: in the same step call
    assert r["persist_ms"]["n"] >= 1 and r["persist_ms"]["median"] > 0  # the initial snapshots were written


def test_the_async_bench_measures_an_asynchronous_rollback(capsys, caplog, tmp_path):
    """Under ``--verdict async`` the rollback row times the call that reads the faulty step's verdict, one step
    after the fault, with the gate on every step (never a fall back to the synchronous verdict)."""
    out_json = tmp_path / "a.json"
    with caplog.at_level("WARNING", logger="gradience"):
        assert main(["overhead", "--blocks", "1", "--block", "10", "--fused", "--verdict", "async",
                     "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["model"]["verdict"] == "async"
    assert [x["detected_after"] for x in r["rollback"].values()] == [2, 2]
    assert "steps after the fault" in capsys.readouterr().out
    assert not [m for m in caplog.messages if "without before_optimizer_step" in m]


def test_unknown_benchmark_is_an_error(capsys):
    assert main(["nope"]) == 2
    assert "available: overhead" in capsys.readouterr().err


@pytest.mark.slow
def test_spectral_bench_quick_prints_every_row(capsys, tmp_path):
    # The CI smoke run: real training (2 seeds x 4 arms, ~1 min on 2 CPU cores). Values are not asserted (they
    # are the bench's findings); the shape of the table is: 2 definitions x 2 band sets on the held-out seed,
    # then the seed bands on every seed, every cell numeric.
    assert main(["spectral", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = re.compile(r"^(new|old): .+?\s(seed|fitted)\s+(\d+/\d+\s+){3}(\d+ %|n/a)\s+(\d+ \[\d+\.\.\d+\]|-)\s+"
                     r"\d+/\d+\s+\d+\.\d+x\s+\d+\.\d+ %$")
    rows = [m.group(1, 2) for m in map(row.match, out.splitlines()) if m]
    assert rows == [
        ("new", "seed"), ("old", "seed"), ("new", "fitted"), ("old", "fitted"), ("new", "seed"), ("old", "seed")]
    assert "machine:" in out and "torch" in out
    data = json.loads((tmp_path / "spectral-bench.json").read_text(encoding="utf-8"))
    assert len(data["runs"]) == 8 and {r["arm"] for r in data["runs"]} == {"ramp", "constant", "jump", "healthy"}
    assert (tmp_path / "spectral-bench.png").stat().st_size > 0
