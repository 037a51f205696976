"""The overhead benchmark runs end to end and prints one row per arm (its numbers go into the README)."""

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
