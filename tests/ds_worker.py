"""One rank of a real DeepSpeed run (CPU, gloo) under the Gradience hook, for tests/test_deepspeed.py.

    torchrun --nproc_per_node 2 tests/ds_worker.py OUT_DIR RUNS     (DS_ACCELERATOR=cpu)

For each ZeRO stage[:dtype] in RUNS (e.g. "0,1,2,3,2:bf16") the rank builds a tiny GPT-2 engine with a client AdamW and a
LambdaLR scheduler, guards it, and: injects a NaN gradient into group rank 0's partition at step 3 and a finite
1e12 gradient into rank 1's at step 5 (every rank must skip, state unchanged), a NaN weight into group rank 1's fp32 master partition after step 8 (every rank
must roll back to the same snapshot, bitwise), trains on to step 16 and records the LR in force and the snapshot
size. One launch runs every stage, so DeepSpeed's start-up cost is paid once. Writes
``OUT_DIR/result_rank<r>.json``; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradience  # noqa: E402
from gradience.integrations.deepspeed import guard  # noqa: E402
from tests.loops import events, gpt2_loss, make_gpt2, newest_snapshot_dir  # noqa: E402

STEPS, NAN_GRAD_AT, HUGE_GRAD_AT, NAN_WEIGHT_AFTER, LR = 16, 3, 5, 8, 1e-3



def run_stage(stage: int, dtype: str, out: Path, rank: int) -> dict:
    """One engine of ZeRO ``stage`` in ``dtype`` ("fp32" or "bf16"), its faults, and what the rank saw."""
    import deepspeed

    model = make_gpt2(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "bf16": {"enabled": dtype == "bf16"},
           "zero_force_ds_cpu_optimizer": False}
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    g = guard(engine, out_dir=str(out), guard_snapshot_interval=4, telemetry_interval=1, spectral_interval=5,
              guard_max_rollbacks=3, collective_timeout_s=60)
    backend = g.backend
    res: dict = {"stage": stage, "losses": [], "lrs": []}
    for step in range(STEPS):
        loss = gpt2_loss(engine, step, seed=rank)
        engine.backward(loss)
        if step in (NAN_GRAD_AT, HUGE_GRAD_AT):
            # NaN on group rank 0, then a finite 1e12 (over guard_violation_threshold) on rank 1: DeepSpeed
            # itself would apply the second, and in bf16 at ZeRO 1/2 the first too.
            before, _ = backend.capture(copy=True)
            if engine.global_rank == (0 if step == NAN_GRAD_AT else 1):
                backend.gate_tensors()[0].view(-1)[0] = float("nan") if step == NAN_GRAD_AT else 1e12
        engine.step()
        if step in (NAN_GRAD_AT, HUGE_GRAD_AT):
            after, _ = backend.capture(copy=True)
            res.setdefault("skip_unchanged", []).append(sorted(before) == sorted(after) and all(
                torch.equal(before[k], after[k]) for k in before))
            res["skip_compared"] = len(before)
            res["skip_optimizer_state"] = sorted(k for k in before if k.startswith("optim."))
        if step == NAN_WEIGHT_AFTER and engine.global_rank == 1:
            with torch.no_grad():
                backend._masters()[0].view(-1)[1] = float("nan")
        rolled = [e for e in events(out, "rollback_success", rank) if e["step"] == step]
        if rolled and "rollback_equal" not in res:
            sid = rolled[0]["to_snapshot"]
            saved = g.controller.store.prepare(sid).tensors
            now, _ = backend.capture(copy=True)
            res["rollback_at"], res["rollback_to"] = step, sid
            res["rollback_equal"] = sorted(saved) == sorted(now) and all(torch.equal(saved[k], now[k]) for k in now)
            res["rollback_compared"] = len(now)
        res["losses"].append(float(loss.detach().float()))
        res["lrs"].append([engine.get_lr()[0], scheduler.get_last_lr()[0]])
    shard = newest_snapshot_dir(out, rank) / f"rank_{engine.global_rank:05d}.safetensors"
    res["snapshot_bytes"] = shard.stat().st_size
    res["skips"] = [(e["step"], e["reason"], e["faulty_global_ranks"]) for e in events(out, "skip_step", rank)]
    res["rollbacks"] = [(e["step"], e["to_snapshot"], e["lr_scale"]) for e in events(out, "rollback_success", rank)]
    res["summary"] = g.finalize()["guard"]
    res["final_loss"] = res["losses"][-1]
    return res


def main() -> int:
    out, runs = Path(sys.argv[1]), [(f"{r}:fp32".split(":")[:2]) for r in sys.argv[2].split(",")]
    rank = int(os.environ["RANK"])
    if os.environ.get("DS_WORKER_STACKS"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["DS_WORKER_STACKS"]), repeat=True)
    result: dict = {"rank": rank, "stages": {}}
    try:
        for stage, dtype in runs:
            result["stages"][f"{stage}:{dtype}"] = run_stage(int(stage), dtype, out / f"zero{stage}_{dtype}", rank)
    except Exception as e:  # reported to the test, which shows it
        import traceback

        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    (out / f"result_rank{rank}.json").write_text(json.dumps(result, default=str))
    gradience.exit_process(1 if "error" in result else 0)
    return 0


if __name__ == "__main__":
    main()
