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


def test_console_entry_forwards_demo_help() -> None:
    r = subprocess.run([sys.executable, "-m", "gradience.cli", "demo", "--help"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: gradience demo")
    assert "--inject-nan" in r.stdout and "--snapshot-interval" in r.stdout


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
