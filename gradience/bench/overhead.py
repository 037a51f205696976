"""Per-step cost of the guard, measured side by side against the same loop without it.

Arms share the model initialisation and the batches, and run in interleaved blocks (baseline, arm, baseline,
arm, ...) so that drift in the machine's speed hits every arm alike. The figure reported per arm is the
median over blocks of (arm step time / neighbouring baseline step time).

    python -m gradience.bench overhead                     # tiny GPT-2, CPU
    python -m gradience.bench overhead --device cuda --n-embd 768 --n-layer 12 --seq 512 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from gradience.config import GradienceConfig
from gradience.controller import GradienceController

ARMS = {
    "probes only": {"guard_snapshot_interval": 10**9},
    "guard, memory snapshots": {"guard_snapshot_tier": "memory"},
    "guard, disk snapshots": {"guard_snapshot_tier": "disk"},
    "guard, disk, background": {"guard_snapshot_tier": "disk", "guard_snapshot_commit_lag": -1},  # see below
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradience.bench overhead", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=50, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per arm")
    p.add_argument("--snapshot-interval", type=int, default=100)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table of per-step times and ratios."""
    args = _parser().parse_args(argv)
    from gradience.demo import build_model, load_corpus

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.n_embd, args.n_layer, args.n_head, args.seq).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = load_corpus()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(text) - args.seq, (args.block, args.batch), generator=gen)
    batches = [torch.stack([text[s : s + args.seq] for s in row.tolist()]).to(device) for row in starts]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def block(guard: GradienceController | None, start: int) -> float:
        sync()
        t0 = time.perf_counter()
        for i, ids in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if guard is None or guard.before_optimizer_step(model, optimizer):
                optimizer.step()
            if guard is not None:
                guard.step(start + i, loss, model)
        sync()
        return (time.perf_counter() - t0) / len(batches)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"gradience overhead bench: GPT-2 {n_params / 1e6:.2f}M params, batch {args.batch}x{args.seq}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.blocks} blocks x {args.block} steps per arm, snapshot interval {args.snapshot_interval}")
    with tempfile.TemporaryDirectory() as tmp:
        guards = {}
        for name, fields in ARMS.items():
            if fields.get("guard_snapshot_commit_lag") == -1:  # commit a tenth of an interval later
                fields = {**fields, "guard_snapshot_commit_lag": max(1, args.snapshot_interval // 10)}
            conf = GradienceConfig(out_dir=f"{tmp}/{len(guards)}", telemetry_interval=args.block,
                                   guard_snapshot_interval=args.snapshot_interval).replace(**fields)
            g = GradienceController(conf)
            g.initialize(model, optimizer=optimizer)
            guards[name] = g
        block(None, 0)  # warm-up: allocator, kernels, optimizer state
        base_times: list[float] = []
        ratios: dict[str, list[float]] = {n: [] for n in guards}
        times: dict[str, list[float]] = {n: [] for n in guards}
        step = 0
        for _ in range(args.blocks):
            for name, g in guards.items():
                before = block(None, 0)
                t = block(g, step)
                after = block(None, 0)
                step += args.block
                base_times += [before, after]
                times[name].append(t)
                ratios[name].append(t / ((before + after) / 2))
        for g in guards.values():
            g.finalize()
    _table(statistics.median(base_times), times, ratios)
    return 0


def _table(base: float, times: dict[str, list[float]], ratios: dict[str, list[float]]) -> None:
    fmt: Callable[[float], str] = lambda s: f"{s * 1e3:8.2f} ms"  # noqa: E731
    print(f"{'arm':<28}{'step':>12}{'overhead (median, min..max)':>34}")
    print(f"{'baseline (no guard)':<28}{fmt(base):>12}")
    for name in times:
        r = [100 * (x - 1) for x in ratios[name]]
        print(f"{name:<28}{fmt(statistics.median(times[name])):>12}"
              f"{statistics.median(r):>+12.1f} %  ({min(r):+.1f} .. {max(r):+.1f})")
