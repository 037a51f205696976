"""Example: a Hugging Face ``Trainer`` run guarded by Gradience, one process or many under ``accelerate launch``.

This script owns the example's model (a tiny GPT-2 built from ``GPT2Config``: no download), its data (the
bytes of a few Python standard-library files, token id = byte value), the fault-injection flags and the
world-size check. Every guard action comes from :class:`gradience.GradienceCallback`.

Usage (from the repository root)::

    python launch/train_hf.py --gradience_config configs/hf_example.yaml
    python launch/train_hf.py --gradience_config configs/hf_example.yaml --inject-nan-step 25     # 1 rollback
    python launch/train_hf.py --gradience_config configs/hf_example.yaml --save_steps 20 --resume  # continue

    # 2 gloo ranks on CPU; ACCELERATE_USE_CPU=true is needed (see launch/accelerate_multi_cpu.yaml):
    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate_multi_cpu.yaml \\
        launch/train_hf.py --gradience_config configs/hf_example.yaml --expect_world_size 2 \\
        --inject-nan-step 25 --inject-rank 1

    # GPUs (one process per GPU):
    accelerate launch --config_file launch/accelerate_multi_gpu.yaml --num_processes 8 \\
        launch/train_hf.py --gradience_config configs/hf_example.yaml --expect_world_size 8

Each rank writes ``<output_dir>/train_result_rank<r>.json`` (world size, final step, LR, LR scale, a SHA-256
of the final weights, guard summary), so replicas can be compared after a run.

Exit status: 0 when training finished (a run the guard recovered included); 2 when the run got a different
number of processes than ``--expect_world_size`` (``accelerate launch --cpu --num_processes 2`` starts
only one); 3 (``EXIT_GUARD_HALTED``) when the guard stopped training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

EXIT_WRONG_WORLD_SIZE = 2
INJECT_PARAM = "transformer.h.0.attn.c_attn.weight"
# Named files, not a directory listing: the same text, so the same losses, on every machine with this Python.
CORPUS_FILES = ("textwrap.py", "functools.py", "argparse.py", "dataclasses.py", "string.py")


def build_parser() -> argparse.ArgumentParser:
    """Command line; each flag is accepted with dashes or underscores."""
    p = argparse.ArgumentParser(prog="launch/train_hf.py", description=__doc__.split("\n\n")[0])

    def add(name: str, **kw: Any) -> None:
        body = name[2:]
        alt = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
        p.add_argument(*dict.fromkeys([name, alt]), **kw)

    add("--gradience_config", default=None, help="gradience YAML config (default: GradienceConfig defaults)")
    add("--gradience_out_dir", default=None, help="override the config's out_dir (telemetry, summary, snapshots)")
    add("--output_dir", default="./hf_out", help="Trainer output_dir (checkpoints, train_result_rank*.json)")
    add("--max_steps", type=int, default=100, help="optimizer steps (default: 100)")
    add("--per_device_train_batch_size", type=int, default=8, help="sequences per micro-batch and rank")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--learning_rate", type=float, default=3e-3, help="peak learning rate (linear warmup and decay)")
    add("--warmup_steps", type=int, default=10, help="linear warmup steps")
    add("--seq_len", type=int, default=64, help="bytes per sequence")
    add("--seed", type=int, default=0, help="model init and data order seed")
    add("--bf16", action="store_true", help="bf16 mixed precision (CPU autocast on CPU)")
    add("--use_cpu", action="store_true",
        help="train on CPU (default when no GPU is visible or ACCELERATE_USE_CPU=true)")
    add("--save_steps", type=int, default=0, help="Trainer checkpoint every N steps (0: none)")
    add("--logging_steps", type=int, default=10, help="Trainer log every N steps")
    add("--resume", nargs="?", const="latest", default=None,
        help="resume from a checkpoint directory, or (no value) from the newest one in --output_dir")
    add("--deepspeed", default=None,
        help="DeepSpeed config JSON (launch/ds_zero{1,2,3}.json); on CPU run under torchrun with DS_ACCELERATOR=cpu")
    add("--fsdp2", action="store_true", help="shard the model with FSDP2 (fully_shard per GPT2Block)")
    add("--inject-nan-step", type=int, default=None,
        help=f"write NaN into {INJECT_PARAM}[0] right after the optimizer update of this step")
    add("--inject-grad-nan-step", type=int, default=None,
        help=f"write NaN into the gradient of {INJECT_PARAM}[0] before the update of this step")
    add("--inject-rank", type=int, default=0, help="rank that injects (default: 0)")
    add("--expect_world_size", type=int, default=None,
        help="fail (exit 2) unless the Trainer runs this many processes (default: $WORLD_SIZE, else 1)")
    return p


class ByteText(torch.utils.data.Dataset):
    """Non-overlapping ``seq_len``-byte windows of standard-library source (input_ids = labels)."""

    def __init__(self, seq_len: int) -> None:
        stdlib = Path(os.__file__).parent
        data = b"".join((stdlib / f).read_bytes() for f in CORPUS_FILES if (stdlib / f).is_file())
        if len(data) < 64 * seq_len:  # a trimmed-down Python install: take whatever source is there
            data += b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:20])
        self.ids = torch.tensor(list(data), dtype=torch.long)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.ids) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": x, "labels": x.clone()}


def make_model(seq_len: int = 64, seed: int = 0) -> torch.nn.Module:
    """A ~100k-parameter GPT-2 over a 256-token byte vocabulary, built from its config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_injector(weight_step: int | None, grad_step: int | None, rank: int, this_rank: int) -> Any:
    """A TrainerCallback that corrupts ``INJECT_PARAM`` on ``rank`` (fault injection keyed by (rank, step)).

    Weight NaN: in ``on_optimizer_step`` (after the update, before any ``on_step_end``). Gradient NaN: in
    ``on_pre_optimizer_step``, so this callback must come before GradienceCallback in the list.
    """
    from transformers import TrainerCallback

    def poison(t: torch.Tensor) -> None:
        with torch.no_grad():
            t.view(-1)[0] = float("nan")

    class FaultInjector(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if this_rank == rank and grad_step == state.global_step + 1:
                grad = model.get_parameter(INJECT_PARAM).grad
                if grad is not None:
                    poison(grad)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if this_rank == rank and weight_step == state.global_step + 1:
                poison(model.get_parameter(INJECT_PARAM))

    return FaultInjector()


def check_world_size(expected: int, actual: int) -> None:
    """Exit with status 2 and say why when the run did not get the processes it asked for."""
    if expected == actual:
        return
    print(f"train_hf.py: expected world size {expected}, but the Trainer runs {actual} process(es). "
          "Plain `accelerate launch --cpu --num_processes N` starts ONE process; on CPU use "
          "`ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate_multi_cpu.yaml ...` "
          "(or torchrun). Under a multi-process launcher without a GPU, pass --use_cpu or set "
          "ACCELERATE_USE_CPU=true.", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_WRONG_WORLD_SIZE)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal only for bitwise-equal replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Train, write this rank's result file and return the exit status."""
    a = build_parser().parse_args(argv)
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from gradience import GradienceCallback, GradienceConfig, GuardHalted

    config = GradienceConfig.from_yaml(a.gradience_config) if a.gradience_config else GradienceConfig()
    if a.gradience_out_dir:
        config = config.replace(out_dir=a.gradience_out_dir)
    use_cpu = (a.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
               or not torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=a.per_device_train_batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps, learning_rate=a.learning_rate,
        warmup_steps=a.warmup_steps, lr_scheduler_type="linear", logging_steps=a.logging_steps,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, seed=a.seed,
        bf16=a.bf16, use_cpu=use_cpu, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        deepspeed=a.deepspeed,
        fsdp="full_shard" if a.fsdp2 else "",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]} if a.fsdp2 else None,
    )
    if a.fsdp2 and use_cpu:
        # accelerate (1.15) applies an FSDP plugin only to GPU-family multi-process runs: on CPU the Trainer would
        # silently train unsharded DDP.
        print("train_hf.py: --fsdp2 needs GPUs (accelerate does not shard on CPU); on CPU guard a fully_shard "
              "loop directly (README, FSDP2)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_WRONG_WORLD_SIZE)
    expected = a.expect_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(expected, args.world_size)
    rank = args.process_index

    callback = GradienceCallback(config)  # on_halt="raise": a guard halt ends train() with GuardHalted
    injector = make_injector(a.inject_nan_step, a.inject_grad_nan_step, a.inject_rank, rank)
    model = make_model(a.seq_len, a.seed)
    trainer = Trainer(model=model, args=args, train_dataset=ByteText(a.seq_len), callbacks=[injector, callback])
    resume = a.resume
    if resume == "latest":
        resume = get_last_checkpoint(a.output_dir) if os.path.isdir(a.output_dir) else None
        if resume is None:
            print(f"train_hf.py: --resume: no checkpoint in {a.output_dir}; starting fresh", file=sys.stderr)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except GuardHalted as e:
        # Every rank halts in the same step; the guard already logged the reason (ERROR) and wrote the summary.
        print(f"train_hf.py: rank {rank}: {e}", file=sys.stderr, flush=True)

    # With restore_callback_states_from_checkpoint the Trainer may have replaced the callback object.
    live = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradienceCallback))
    ctl = live.controller
    result = {
        "rank": rank, "world_size": args.world_size, "global_step": trainer.state.global_step,
        "resumed_from": resume, "exit_code": live.exit_code, "lr": trainer.optimizer.param_groups[0]["lr"],
        "base_lrs": list(getattr(trainer.lr_scheduler, "base_lrs", [])), "lr_scale": ctl.state.lr_scale,
        "final_loss": ctl.last_loss, "weights_sha256": weights_sha256(model),
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "summary": live.summary,
    }
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_result_rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    if rank == 0:
        g = (live.summary or {}).get("guard", {})
        print(f"train_hf.py: world size {args.world_size}, step {trainer.state.global_step}, "
              f"final loss {ctl.last_loss}, integrity {g.get('integrity_status')}, "
              f"rollbacks {g.get('total_rollbacks')}, skipped {g.get('total_skipped_steps')}, "
              f"LR scale {ctl.state.lr_scale}, exit {live.exit_code}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The robust end of a distributed process (gloo can abort in interpreter teardown otherwise).
        from gradience import exit_process

        exit_process(live.exit_code)
    return live.exit_code


if __name__ == "__main__":
    sys.exit(main())
