"""A plain DeepSpeed training loop guarded by Gradience (ZeRO 0-3), with fault injection.

    # CPU (gloo), 2 ranks: torchrun or the deepspeed launcher
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 launch/train_deepspeed.py \
        --deepspeed_config launch/ds_zero3.json --inject-nan-step 12 --inject-rank 1
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_deepspeed.py --deepspeed_config launch/ds_zero2.json
    # GPUs: the same without DS_ACCELERATOR

The configs' "auto" values (shared with the Trainer path, launch/train_hf.py --deepspeed) are filled from the
flags here. Exit status: 0, or 3 when the guard halted the run. Each rank prints one JSON line with its result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_hf import ByteText, make_model  # noqa: E402  (the same tiny GPT-2 and byte corpus)

import gradience  # noqa: E402
from gradience.integrations.deepspeed import guard  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", default="launch/ds_zero2.json", help="DeepSpeed config JSON")
    p.add_argument("--gradience_config", default=None, help="gradience YAML (default: defaults)")
    p.add_argument("--out_dir", default="./gradience_logs/deepspeed", help="the guard's out_dir")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch and rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--inject-nan-step", type=int, default=None,
                   help="write NaN into this rank's fp32 master partition after this step's update")
    p.add_argument("--inject-rank", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    a = p.parse_args()

    import deepspeed

    cfg = json.loads(Path(a.deepspeed_config).read_text())
    autos = {"train_micro_batch_size_per_gpu": a.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    cfg = {k: autos.get(k, v) if v == "auto" else v for k, v in cfg.items()}
    if isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") == "auto":
        cfg["bf16"]["enabled"] = False
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)  # a client optimizer: no fused_adam build on CPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)

    g = guard(engine, a.gradience_config, out_dir=a.out_dir)  # <- the Gradience line

    data = ByteText(64)
    rank, world = engine.global_rank, engine.world_size
    code, loss = 0, None
    try:
        for step in range(a.steps):
            idx = [(step * world * a.batch + rank * a.batch + i) % len(data) for i in range(a.batch)]
            ids = torch.stack([data[i]["input_ids"] for i in idx]).to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            if step == a.inject_nan_step and rank == a.inject_rank:
                with torch.no_grad():
                    g.backend._masters()[0].view(-1)[0] = float("nan")
    except gradience.GuardHalted as e:
        print(f"train_deepspeed.py: rank {rank}: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    summary = g.finalize()
    line = json.dumps({"rank": rank, "world_size": world, "zero_stage": g.backend.stage, "exit_code": code,
                       "final_loss": float(loss) if loss is not None else None,
                       "finite": loss is not None and math.isfinite(float(loss)), "lr": engine.get_lr()[0],
                       "guard": summary["guard"]})
    # One write with its newline: DeepSpeed's launcher runs ranks under `python -u` on a shared pipe, where
    # print() issues the text and the newline as two writes and another rank's line can land in between.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    gradience.exit_process(code)
    return code


if __name__ == "__main__":
    main()
