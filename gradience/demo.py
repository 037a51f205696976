"""The end-to-end demo: train a tiny GPT-2, corrupt it on purpose, watch the guard recover.

This module owns the demo training loop, its fault injection and its printed report; it owns no guard
logic (everything goes through :class:`~gradience.controller.GradienceController`).

Usage::

    python -m gradience.demo --guard --inject-nan          # NaN in a weight at step 50 -> 1 rollback, healthy end
    python -m gradience.demo --inject-nan                  # same fault, no guard -> loss NaN, exit status 1
    python -m gradience.demo --config aggressive --inject-nan   # the config's guard_enabled (true) decides
    python -m gradience.demo --guard --inject-grad-nan     # NaN gradient -> the update is skipped
    gradience demo --guard --inject-nan --steps 80 --inject-step 30 --out-dir /tmp/run
    torchrun --standalone --nproc_per_node 2 -m gradience.demo --guard --inject-nan --inject-rank 1

The model is ``GPT2LMHeadModel`` built from a small ``GPT2Config`` (no download), trained on the bytes of a
few Python standard-library source files (token id = byte value), with AdamW and a linear warmup/decay
``LambdaLR``. Whether the guard acts: ``--guard`` turns it on, ``--no-guard`` off; with neither, the
``--config`` file's ``guard_enabled`` stands, and without ``--config`` the demo runs in monitor mode. In
monitor mode (``guard_enabled=False``) the controller still runs, so telemetry and ``summary.json`` are
written either way and a corrupted run is reported as FAULTED.

Exit status: 0 when the run ends healthy (a guarded run that recovered included), 1 when it ends with a
non-finite loss, :data:`~gradience.errors.EXIT_GUARD_HALTED` (3) when the guard stopped training, 2 for a
bad command line or config (checked before training, and under torchrun before any process group starts):
an ``--inject-step`` outside ``[0, --steps)`` or an ``--inject-rank`` outside ``[0, WORLD_SIZE)`` when a
fault is to be injected, for instance.
Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains a DDP replica on its own sample of the text and
rank 0 prints the report.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from gradience.comm import exit_process
from gradience.config import GradienceConfig
from gradience.controller import GradienceController
from gradience.errors import EXIT_GUARD_HALTED, ConfigError

INJECT_PARAM = "transformer.h.0.attn.c_attn.weight"
SEQ_LEN = 64
# Named files rather than a directory listing: the same text (and so the same losses) on every
# machine with the same Python; the glob below is only a fallback for trimmed-down installs.
CORPUS_FILES = ("textwrap.py", "functools.py", "argparse.py", "dataclasses.py", "json/decoder.py", "string.py")
EXIT_OK, EXIT_CORRUPTED = 0, 1


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The demo's command line (shared with ``gradience demo``)."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m gradience.demo",
        description="Train a tiny GPT-2 on CPU or GPU, optionally inject a fault, and report what the guard did.",
    )
    # None when neither flag is given: the config file's guard_enabled then stands (see _config).
    p.add_argument("--guard", action=argparse.BooleanOptionalAction, default=None,
                   help="--guard: let Gradience act (skip, snapshot, roll back, halt); --no-guard: only monitor "
                        "and report. With neither: the --config file's guard_enabled, else monitor only")
    p.add_argument("--inject-nan", action="store_true",
                   help=f"set {INJECT_PARAM}[0] to NaN right after the optimizer update at --inject-step")
    p.add_argument("--inject-grad-nan", action="store_true",
                   help=f"set the gradient of {INJECT_PARAM}[0] to NaN before the update at --inject-step")
    p.add_argument("--inject-step", type=int, default=50,
                   help="step of the injected fault, 0 <= N < --steps (default: 50)")
    p.add_argument("--inject-rank", type=int, default=0,
                   help="rank that injects, 0 <= R < WORLD_SIZE (under torchrun; default: 0)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    p.add_argument("--batch-size", type=int, default=8,
                   help=f"sequences of {SEQ_LEN} bytes per step and rank (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out-dir", default=None,
                   help="telemetry, summary and snapshots (default: the config's out_dir, else ./gradience_logs)")
    p.add_argument("--snapshot-interval", type=int, default=None,
                   help="guard_snapshot_interval (default: 20, or the config's value with --config)")
    p.add_argument("--config", default=None,
                   help="gradience YAML config: a path, or the name of a config shipped with gradience "
                        "(default, aggressive, hf_example); --guard/--no-guard, --out-dir and --snapshot-interval "
                        "override it when given")
    return p


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run the demo; returns the process exit status."""
    args = build_parser(prog).parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    problem = _check_args(args, world_size)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        config = _config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("transformers") is None:  # pragma: no cover - depends on the install
        print("error: the demo needs transformers: pip install 'gradience[hf]'", file=sys.stderr)
        return 2

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, local_rank if world_size > 1 else None)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=config.collective_timeout_s))
    if world_size == 1:
        return _run(args, config, rank, world_size, device)
    try:
        code = _run(args, config, rank, world_size, device)
    except BaseException:  # noqa: BLE001 - reported here: exit_process() below skips the default report
        traceback.print_exc()
        code = 1
    # A distributed process ends here, through the one exit path that cannot abort in gloo's teardown.
    exit_process(code)
    return code  # pragma: no cover - exit_process does not return


def build_model(n_embd: int = 64, n_layer: int = 2, n_head: int = 2, seq_len: int = SEQ_LEN) -> torch.nn.Module:
    """The demo's byte-level GPT-2, built from a config (no download), initialised from torch's global RNG."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # Dropout off: with a fixed seed the losses, and so the report, are reproducible run to run. GPT-2's
    # bos/eos ids (50256) lie outside a byte vocabulary. transformers infers the loss from the class name
    # and warns on every forward when "GPT2LMHeadModel" matches none; name it.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
                                       n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=None, eos_token_id=None))
    model.loss_type = "ForCausalLM"
    return model


def _run(args: argparse.Namespace, config: GradienceConfig, rank: int, world_size: int, device: torch.device) -> int:
    say = _printer(rank == 0)
    text = load_corpus()
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model().to(device)
    module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(args.steps))
    controller = GradienceController(config)
    # The unwrapped module: snapshots and telemetry then name parameters as the model does, without "module.".
    controller.initialize(module, optimizer=optimizer, scheduler=scheduler)

    n_params = sum(p.numel() for p in module.parameters())
    inject = " and ".join(k for k, on in (("weight NaN", args.inject_nan), ("gradient NaN", args.inject_grad_nan)) if on)
    say("=" * 64)
    say("Gradience demo: tiny GPT-2 on Python stdlib bytes")
    say(f"  Model:       GPT-2, {n_params / 1e3:.1f}K parameters (2 layers, 64 dim, 256-byte vocab)")
    say(f"  Data:        {len(text) / 1e3:.0f} KB of text, batch {args.batch_size} x {SEQ_LEN} per rank")
    say(f"  Steps:       {args.steps}, AdamW lr {args.lr:g}, linear warmup/decay")
    say(f"  Device:      {device}  World size: {world_size}")
    say(f"  Guard:       {'ON' if config.guard_enabled else 'OFF (monitor only)'}, "
        f"snapshot every {config.guard_snapshot_interval} steps")
    if inject:
        say(f"  Injection:   {inject} into {INJECT_PARAM} at step {args.inject_step} (rank {args.inject_rank})")
    say(f"  Output:      {config.out_dir}")
    say("=" * 64)

    gen = torch.Generator()
    params = list(module.parameters())
    named = dict(module.named_parameters())
    loss_value = float("nan")
    stopped = False
    t0 = time.perf_counter()
    bar = _progress(range(args.steps), enabled=rank == 0)
    for step in bar:
        injecting = bool(inject) and step == args.inject_step and rank == args.inject_rank
        optimizer.zero_grad(set_to_none=True)
        # Per-step seeding: the batch of a step does not depend on what happened before (e.g. a rollback).
        gen.manual_seed(args.seed * 1_000_003 + rank * 7_919 + step)
        ids = sample_batch(text, args.batch_size, gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if injecting and args.inject_grad_nan:
            with torch.no_grad():
                named[INJECT_PARAM].grad.view(-1)[0] = float("nan")
            _announce(bar, f"[inject] NaN gradient on {INJECT_PARAM} at step {step} (rank {rank})")
        # The gate drops the gradients of a rejected update, so the unconditional step below is a no-op then.
        controller.before_optimizer_step(module, optimizer, loss=loss)  # the loss: for the spike rule
        optimizer.step()
        scheduler.step()
        if injecting and args.inject_nan:
            with torch.no_grad():
                named[INJECT_PARAM].view(-1)[0] = float("nan")
            _announce(bar, f"[inject] Injected NaN into {INJECT_PARAM} at step {step} (rank {rank})")
        loss_value = loss.item()
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if not controller.step(step, loss.detach(), module):
            stopped = True
            break
    if hasattr(bar, "close"):
        bar.close()
    summary = controller.finalize()
    duration = time.perf_counter() - t0
    final_loss = _mean_over_ranks(loss_value, world_size, device)

    if controller.halted:
        code = EXIT_GUARD_HALTED
    elif not math.isfinite(final_loss):
        code = EXIT_CORRUPTED
    else:
        code = EXIT_OK
    guard = summary["guard"]
    say("")
    say("=" * 64)
    say("Results")
    say(f"  Duration: {duration:.1f}s")
    say(f"  Success: {code == EXIT_OK}")
    over = f" (mean over {world_size} ranks)" if world_size > 1 else ""
    if controller.halted:
        # The loss of the faulty step was computed before the fault; the weights were not restored.
        say(f"  Final loss: {final_loss:.4f}{over} (before the fault; training stopped, weights not restored)")
    elif math.isfinite(final_loss):
        say(f"  Final loss: {final_loss:.4f}{over}")
    else:
        say(f"  Final loss: {final_loss}{over} -- model CORRUPTED")
    say(f"  Steps run: {summary['total_steps']} of {args.steps}" + (" (stopped by the guard)" if stopped else ""))
    say("Gradience")
    say(f"  Guard: {'enabled' if guard['enabled'] else 'disabled (monitor only)'}")
    say(f"  Integrity: {guard['integrity_status']}")
    say(f"  Rollbacks: {guard['total_rollbacks']}")
    say(f"  Skipped steps: {guard['total_skipped_steps']}")
    if rank == 0:
        recoveries = _recoveries(controller.telemetry.path)
        say(f"  Recoveries: {'; '.join(recoveries) if recoveries else 'none'}")
    if guard["first_fault_step"] is not None:
        say(f"  First fault: step {guard['first_fault_step']} on rank(s) {guard['first_fault_ranks']}")
    if guard["halt_reason"]:
        say(f"  Halted: {guard['halt_reason']} (exit status {EXIT_GUARD_HALTED})")
    say(f"  LR scale: {guard['lr_scale']:g}")
    spectral = summary.get("spectral") or {}
    if spectral.get("final_kappa") is not None:
        say(f"  Spectral κ̃: {spectral['final_kappa']:.4g} ({spectral.get('definition')}), "
            f"risk {spectral.get('final_risk_level')}")
    say(f"  Telemetry: {Path(config.out_dir) / 'telemetry.jsonl'}  Summary: {Path(config.out_dir) / 'summary.json'}")
    say("=" * 64)
    return code


def _check_args(args: argparse.Namespace, world_size: int) -> str | None:
    # Checked before training and before init_process_group: a fault that never fires would make the demo
    # report a healthy run that proves nothing, and under torchrun a bad rank would otherwise surface only
    # after every rank has joined the group.
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if not (args.inject_nan or args.inject_grad_nan):
        return None  # --inject-step/--inject-rank are unused without an injection
    if not 0 <= args.inject_step < args.steps:
        return (f"--inject-step must be in [0, --steps) = [0, {args.steps}), got {args.inject_step}: "
                f"the fault would never be injected")
    if not 0 <= args.inject_rank < world_size:
        return (f"--inject-rank must be in [0, WORLD_SIZE) = [0, {world_size}), got {args.inject_rank}: "
                f"no rank would inject the fault")
    return None


def _config(args: argparse.Namespace) -> GradienceConfig:
    base = GradienceConfig.from_yaml(args.config) if args.config else GradienceConfig()
    changes: dict[str, Any] = {}
    if args.guard is not None:
        changes["guard_enabled"] = args.guard
    elif not args.config:
        # The demo's own default: monitor mode, so `--inject-nan` alone shows what an unguarded run does.
        changes["guard_enabled"] = False
    if args.out_dir is not None:
        changes["out_dir"] = args.out_dir
    elif not args.config:
        changes["out_dir"] = "./gradience_logs"
    if args.snapshot_interval is not None:
        changes["guard_snapshot_interval"] = args.snapshot_interval
    elif not args.config:
        # The library default (100) would leave only the initial snapshot in a 150-step demo.
        changes["guard_snapshot_interval"] = 20
    return base.replace(**changes)


def _device(requested: str | None, local_rank: int | None) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and local_rank is not None and device.index is None:
        # One GPU per torchrun rank.
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def load_corpus() -> torch.Tensor:
    """Bytes of a fixed handful of standard-library sources, as token ids 0..255 (1-D long tensor)."""
    root = Path(os.path.dirname(os.__file__))
    files = [root / f for f in CORPUS_FILES if (root / f).is_file()]
    if not files:
        files = sorted(root.glob("*.py"))[:6]
    data = b"".join(f.read_bytes() for f in files)
    if len(data) <= SEQ_LEN + 1:
        raise RuntimeError(f"not enough standard-library text under {root} for the demo")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def sample_batch(text: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of SEQ_LEN tokens."""
    starts = torch.randint(0, len(text) - SEQ_LEN, (batch_size,), generator=gen)
    return torch.stack([text[s : s + SEQ_LEN] for s in starts.tolist()])


def warmup_decay(total: int, warmup_frac: float = 0.1, floor: float = 0.1) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over ``warmup_frac`` of the steps, then linear decay to ``floor``."""
    warmup = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(floor, 1.0 - (1.0 - floor) * (step - warmup) / max(1, total - warmup))

    return f


def _mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return value
    import torch.distributed as dist

    # Every rank must reach the same verdict (and exit status); a NaN on any rank makes the mean NaN.
    t = torch.tensor([value], dtype=torch.float64, device=device)
    idle = sys.getrefcount(t)
    dist.all_reduce(t)
    # This is the run's last collective. A gloo worker thread drops its reference to ``t`` only after wait()
    # has returned, and that takes the GIL; if the interpreter is already finalizing by then, the worker is
    # killed inside a C++ destructor and the process aborts ("terminate called without an active
    # exception", SIGABRT, about 1 torchrun run in 10 here; see pytorch/pytorch#190489; CPython 3.14 parks
    # such threads instead). While the worker holds ``t`` its refcount is raised: sleep, GIL released.
    # A barrier does not help: its work holds the previous works, so they are freed later, on a worker.
    # Only measured with gloo (CPU); NCCL's watchdog thread keeps works by its own rules.
    deadline = time.monotonic() + (5.0 if device.type == "cpu" else 0.0)
    while sys.getrefcount(t) > idle and time.monotonic() < deadline:
        time.sleep(0.001)
    return float(t.item()) / world_size


def _recoveries(telemetry_path: Path) -> list[str]:
    out = []
    try:
        lines = telemetry_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        ev = json.loads(line)
        if ev["event"] == "rollback_success":
            out.append(f"step {ev['step']} {ev['reason']} -> rolled back to step {ev['to_step']}, "
                       f"lr x{ev['lr_scale']:g}")
        elif ev["event"] == "skip_step":
            out.append(f"step {ev['step']} {ev['reason']} -> update skipped")
    return out


def _printer(enabled: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            print(msg, flush=True)

    return say


def _progress(steps: range, *, enabled: bool) -> Iterable[int]:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the hf extra; the demo runs without a bar
        return steps
    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI, tests).
    return tqdm(steps, desc="training", unit="step", disable=None if enabled else True, dynamic_ncols=True)


def _announce(bar: Any, msg: str) -> None:
    # The injecting rank may not be rank 0, so it prints its own line; tqdm.write keeps the bar intact.
    if hasattr(bar, "write"):
        bar.write(msg)
        sys.stdout.flush()
    else:
        print(msg, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
