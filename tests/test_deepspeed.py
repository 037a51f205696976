"""DeepSpeed ZeRO 0-3 under the Gradience hook: real engines, 2 gloo ranks under torchrun (CPU accelerator), one
launch for every stage and dtype (tests/ds_worker.py), so DeepSpeed's start-up is paid once.

The first DeepSpeed start on a machine compiles a shared-memory comm op (~2 min on 2 cores); launch/test.sh
keeps it in .cache/torch_extensions so later runs reuse it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")

from gradience.errors import ConfigError  # noqa: E402
from tests.conftest import free_port, rank_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("0", "1", "2", "3", "1:bf16", "3:bf16")


def ds_env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ds")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "ds_worker.py"),
           str(out), ",".join(RUNS)]
    proc = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=600)
    return rank_results(out, 2, proc)


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_zero_stage_skips_and_rolls_back_collectively(ranks, run):
    seen = [res["stages"][run if ":" in run else f"{run}:fp32"] for res in ranks]
    for rank, s in enumerate(seen):
        # A NaN gradient on rank 0 and a finite 1e12 one on rank 1: both ranks skip both, state bitwise unchanged.
        assert s["skips"][:2] == [[3, "NONFINITE_GRADS", [0]], [5, "VIOLATION_THRESHOLD", [1]]], (rank, s["skips"])
        assert s["skip_unchanged"] == [True, True] and s["skip_compared"] > 0
        assert any(k.endswith("exp_avg_sq") for k in s["skip_optimizer_state"])
        # A NaN in rank 1's fp32 master partition after step 8: every rank rolls back at step 9, to one snapshot.
        assert s["rollbacks"] == [[9, seen[0]["rollbacks"][0][1], 0.5]], (rank, s["rollbacks"])
        assert s["rollback_at"] == 9 and s["rollback_equal"] is True and s["rollback_compared"] > 0
        # Nothing leaks past the rollback (ZeRO-3's gathered copies). At ZeRO-0 the NaN weight is in the module
        # itself, so step 9's gradients are NaN too and that update is skipped before the rollback.
        assert [x[0] for x in s["skips"][2:]] == ([9] if run == "0" else []), s["skips"]
        # Every loss is finite but, at ZeRO-0, step 9's (computed with the NaN weight itself).
        assert all(math.isfinite(v) for i, v in enumerate(s["losses"]) if not (run == "0" and i == 9)), s["losses"]
        assert math.isfinite(s["losses"][-1]) and s["summary"]["integrity_status"] == "RECOVERED"
        # The backoff is in engine.get_lr() on every rank and survives the scheduler's later steps.
        for in_force, scheduled in s["lrs"][10:]:
            assert in_force == pytest.approx(0.5 * scheduled, rel=1e-12)
        for in_force, scheduled in s["lrs"][:9]:
            assert in_force == pytest.approx(scheduled, rel=1e-12)


@pytest.mark.slow
def test_zero3_snapshot_per_rank_is_half_of_zero0(ranks):
    for res in ranks:
        zero0, zero3 = res["stages"]["0:fp32"]["snapshot_bytes"], res["stages"]["3:fp32"]["snapshot_bytes"]
        assert 0.45 < zero3 / zero0 < 0.55, (zero0, zero3)


def test_guard_refuses_what_is_not_an_engine(tmp_path):
    import torch

    from gradience.integrations.deepspeed import guard

    with pytest.raises(ConfigError, match="needs a DeepSpeedEngine"):
        guard(torch.nn.Linear(2, 2), out_dir=str(tmp_path))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1"]
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_deepspeed", "--zero_stage", "2",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_trainer_with_deepspeed_zero2_and_the_callback_recovers_on_every_rank(tmp_path, launcher):
    """TrainingArguments(deepspeed=launch/ds_zero2.json) + GradienceCallback, 2 ranks, under torchrun and under
    ``accelerate launch --use_deepspeed``: a NaN written into rank 1's module weights after step 12 -> both ranks
    roll back to the snapshot of step 10 together."""
    g, o = tmp_path / "g", tmp_path / "o"
    port = ["--master_port" if launcher == "torchrun" else "--main_process_port", str(free_port())]
    cmd = [*(TORCHRUN if launcher == "torchrun" else ACCELERATE), *port, "launch/train_hf.py",
           "--deepspeed", "launch/ds_zero2.json", "--use_cpu", "--gradience_config", "configs/hf_example.yaml",
           "--gradience_out_dir", str(g), "--output_dir", str(o), "--expect_world_size", "2", "--max_steps", "30",
           "--per_device_train_batch_size", "4", "--inject-nan-step", "12", "--inject-rank", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    acts = {}
    for rank in (0, 1):
        name = "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"
        evs = [json.loads(x) for x in (g / name).read_text().splitlines()]
        acts[rank] = [(e["event"], e["step"], e.get("to_step"), e.get("reason")) for e in evs
                      if e["event"] in ("rollback_success", "abort", "halt")]
    assert acts[0] == acts[1] == [("rollback_success", 13, 10, "NONFINITE_WEIGHTS")]
    start = json.loads((g / "telemetry.jsonl").read_text().splitlines()[0])
    assert (start["event"], start["world_size"], start["backend"]) == ("start", 2, "DeepSpeedBackend")
    res = [json.loads((o / f"train_result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [x["exit_code"] for x in res] == [0, 0] and res[0]["weights_sha256"] == res[1]["weights_sha256"]
    assert all(x["weights_finite"] and math.isfinite(x["final_loss"]) for x in res)
    assert [x["summary"]["guard"]["integrity_status"] for x in res] == ["RECOVERED", "RECOVERED"]
    assert [x["lr_scale"] for x in res] == [0.5, 0.5]


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_the_guarded_example_loop(tmp_path):
    """launch/train_deepspeed.py under DeepSpeed's own launcher, ZeRO-3: a NaN in rank 1's master partition after
    step 12 -> both ranks roll back at step 13, train on, and exit 0 with a finite loss."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train_deepspeed.py",
           "--deepspeed_config", "launch/ds_zero3.json", "--out_dir", str(tmp_path), "--steps", "24",
           "--inject-nan-step", "12", "--inject-rank", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x[x.index("{"):]) for x in r.stdout.splitlines() if '"zero_stage"' in x]
    assert sorted(x["rank"] for x in lines) == [0, 1]
    for x in lines:
        assert (x["zero_stage"], x["exit_code"], x["finite"]) == (3, 0, True)
        assert (x["guard"]["total_rollbacks"], x["guard"]["lr_scale"]) == (1, 0.5)
