"""The overhead benchmark runs end to end and prints one row per arm (its numbers go into the README); so does the
spectral bench's quick mode."""

import json
import re

import pytest

from gradience.bench.__main__ import main


def test_overhead_bench_prints_every_arm(capsys):
    assert main(["overhead", "--blocks", "1", "--block", "3", "--snapshot-interval", "20"]) == 0
    out = capsys.readouterr().out
    for arm in ("baseline (no guard)", "probes only", "guard, memory snapshots", "guard, disk snapshots",
                "guard, disk, background"):
        assert arm in out
    assert out.count(" %") == 4


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
