"""End-to-end: ``python -m gradience.demo`` and ``gradience demo`` as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradience import demo
from gradience.errors import EXIT_GUARD_HALTED

pytestmark = pytest.mark.slow

# Short runs: snapshots at 0 and 20, the fault at 30, then enough steps to see training go on.
STEPS, INJECT = ["--steps", "80"], ["--inject-step", "30"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def run_demo(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gradience.demo", "--device", "cpu", "--out-dir", str(out_dir), *STEPS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)


def events(out_dir: Path, name: str, rank: int = 0) -> list[dict]:
    fname = "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"
    lines = (out_dir / fname).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_guarded_weight_nan_rolls_back_and_recovers(tmp_path: Path) -> None:
    r = run_demo(tmp_path, "--guard", "--inject-nan", *INJECT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Rollbacks: 1" in [line.strip() for line in r.stdout.splitlines()]
    assert "Integrity: RECOVERED" in r.stdout
    assert "Injected NaN into transformer.h.0.attn.c_attn.weight at step 30" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["guard"]["integrity_status"] == "RECOVERED"
    assert summary["guard"]["total_rollbacks"] == 1
    assert summary["total_steps"] == 80
    assert isinstance(summary["final_loss"], float) and math.isfinite(summary["final_loss"])
    (rb,) = events(tmp_path, "rollback_success")
    assert rb["step"] == 30 and rb["to_step"] == 20 and rb["reason"] == "NONFINITE_WEIGHTS"
    assert rb["bad"]["params"] == ["transformer.h.0.attn.c_attn.weight"]


def test_unguarded_weight_nan_ends_corrupted(tmp_path: Path) -> None:
    r = run_demo(tmp_path, "--inject-nan", *INJECT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "model CORRUPTED" in r.stdout
    assert "Success: False" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    # JSON has no NaN: telemetry writes the string "nan".
    assert not (isinstance(summary["final_loss"], float) and math.isfinite(summary["final_loss"]))
    assert summary["guard"]["integrity_status"] == "FAULTED"
    assert summary["guard"]["total_rollbacks"] == 0
    assert not (tmp_path / "snapshots").exists()


def test_guarded_grad_nan_skips_the_update(tmp_path: Path) -> None:
    r = run_demo(tmp_path, "--guard", "--inject-grad-nan", *INJECT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Rollbacks: 0" in [line.strip() for line in r.stdout.splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["guard"]["total_skipped_steps"] >= 1
    assert summary["guard"]["total_rollbacks"] == 0
    assert math.isfinite(summary["final_loss"])
    assert [e["step"] for e in events(tmp_path, "skip_step")] == [30]


def test_guard_halts_with_distinct_exit_status(tmp_path: Path) -> None:
    # No rollback budget: the first weight fault must stop the run with EXIT_GUARD_HALTED.
    cfg = tmp_path / "gradience.yaml"
    cfg.write_text("guard_max_rollbacks: 0\nguard_snapshot_interval: 20\n")
    r = run_demo(tmp_path / "out", "--guard", "--inject-nan", *INJECT, "--config", str(cfg))
    assert r.returncode == EXIT_GUARD_HALTED, r.stdout + r.stderr
    assert "Integrity: ABORTED" in r.stdout
    assert "ROLLBACK_BUDGET_EXHAUSTED" in r.stdout


def test_config_guard_enabled_stands_without_guard_flag(tmp_path: Path) -> None:
    # A config that enables the guard is not overridden by a missing --guard.
    cfg = tmp_path / "gradience.yaml"
    cfg.write_text("gradience:\n  guard_enabled: true\n  guard_snapshot_interval: 20\n")
    r = run_demo(tmp_path / "out", "--inject-nan", *INJECT, "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Guard:       ON" in r.stdout and "Integrity: RECOVERED" in r.stdout


GUARD_CASES = [
    # (config text or None, flags, expected guard_enabled)
    (None, [], False),  # the demo's own default: monitor mode
    (None, ["--guard"], True),
    (None, ["--no-guard"], False),
    ("guard_enabled: true\n", [], True),
    ("guard_enabled: false\n", [], False),
    ("guard_enabled: true\n", ["--no-guard"], False),
    ("guard_enabled: false\n", ["--guard"], True),
    ("guard_max_rollbacks: 2\n", [], True),  # a config without the field: the library default
]


@pytest.mark.parametrize(("config", "flags", "expected"), GUARD_CASES)
def test_guard_flags_and_config(tmp_path: Path, config: str | None, flags: list[str], expected: bool) -> None:
    argv = [*flags]
    if config is not None:
        (tmp_path / "g.yaml").write_text(config)
        argv += ["--config", str(tmp_path / "g.yaml")]
    assert demo._config(demo.build_parser().parse_args(argv)).guard_enabled is expected


BAD_INJECTIONS = [
    (["--inject-nan", "--steps", "80", "--inject-step", "80"], "1", "--inject-step"),
    (["--inject-nan", "--steps", "80", "--inject-step", "200"], "1", "--inject-step"),
    (["--inject-grad-nan", "--inject-step", "-1"], "1", "--inject-step"),
    (["--inject-nan", "--steps", "40"], "1", "--inject-step"),  # the default step 50 is past the end
    (["--inject-nan", "--inject-rank", "1"], "1", "--inject-rank"),
    (["--inject-nan", "--inject-rank", "-1"], "1", "--inject-rank"),
    (["--inject-grad-nan", "--inject-rank", "2"], "2", "--inject-rank"),
]


@pytest.mark.parametrize(("argv", "world_size", "flag"), BAD_INJECTIONS)
def test_bad_injection_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                  argv: list[str], world_size: str, flag: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    assert demo.main([*argv, "--device", "cpu", "--out-dir", str(out)]) == 2
    assert f"error: {flag} must be in" in capsys.readouterr().err
    assert not out.exists()  # refused before any training or telemetry


def test_injection_checks_only_apply_when_injecting() -> None:
    args = demo.build_parser().parse_args(["--steps", "10", "--inject-rank", "5"])
    assert demo._check_args(args, world_size=1) is None


def test_bad_inject_rank_exits_2_before_process_group(tmp_path: Path) -> None:
    # WORLD_SIZE=2 with no MASTER_PORT and no peer: reaching init_process_group would fail otherwise or hang.
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "gradience.demo", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
           "--inject-nan", "--inject-rank", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--inject-rank must be in [0, WORLD_SIZE) = [0, 2), got 2" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_console_entry_forwards_demo_help() -> None:
    r = subprocess.run([sys.executable, "-m", "gradience.cli", "demo", "--help"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: gradience demo")
    assert "--inject-nan" in r.stdout and "--snapshot-interval" in r.stdout
    assert "--guard, --no-guard" in r.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_ranks_both_roll_back(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gradience.demo", "--device", "cpu",
           "--out-dir", str(tmp_path), *STEPS, "--guard", "--inject-nan", *INJECT, "--inject-rank", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Rollbacks: 1" in r.stdout and "World size: 2" in r.stdout
    rollbacks = [events(tmp_path, "rollback_success", rank) for rank in (0, 1)]
    for (rb,) in rollbacks:
        assert rb["step"] == 30 and rb["to_step"] == 20 and rb["faulty_ranks"] == [1]
    assert rollbacks[0][0]["lr"] == rollbacks[1][0]["lr"]  # the same backoff on both ranks
    assert rollbacks[1][0]["bad"]["params"] == ["transformer.h.0.attn.c_attn.weight"]
    assert rollbacks[0][0]["bad"] is None
    ends = [events(tmp_path, "summary", rank)[0] for rank in (0, 1)]
    assert ends[0]["weights_fingerprint"] == ends[1]["weights_fingerprint"] is not None  # bitwise-equal replicas
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["guard"]["first_fault_ranks"] == [1]
