"""What the guard costs a training step, measured side by side in one run (``python -m gradience.bench overhead``).

Arms share the model, the optimizer and the batches. Guarded blocks alternate with unguarded ones (baseline,
arm, baseline, arm, ...) so drift in the machine's speed hits every arm alike; each arm is reported as

* **in-call**: the time spent inside ``before_optimizer_step`` and ``step`` per step (snapshot steps included),
  as a share of the median unguarded step: what the guard itself costs;
* **end to end**: the median over blocks of (guarded block / the mean of its two neighbouring baseline blocks)
  minus one: what the user sees, noise included.

It also measures one check's norm pass in the training loop (the floor of a synchronous check), the fixed
per-step cost (in-call time on a 2-layer MLP whose own step is tiny), the time of a
rollback from each tier (the hot copy, the disk) against a step, the time of a disk snapshot's background write
(persist, off the training thread), and on CUDA the host
synchronisations per steady-state step (``torch.cuda.set_sync_debug_mode``).

    python -m gradience.bench overhead                  # tiny GPT-2 on CPU, seed defaults
    python -m gradience.bench overhead --quick --json out.json
    python -m gradience.bench overhead --fused --verdict async   # gate on the device, verdict one step later
    python -m gradience.bench overhead --device cuda --n-embd 768 --n-layer 12 --n-head 12 --seq 512 --bf16
    torchrun --nproc_per_node 2 -m gradience.bench overhead --fsdp2   # fully_shard model: each rank its shards
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gradience.config import GradienceConfig
from gradience.controller import GradienceController

# (name, config fields) per arm; seed defaults are interval 100 with spectral on.
ARMS = (
    ("interval 50", {"guard_snapshot_interval": 50}),
    ("interval 100 (default)", {"guard_snapshot_interval": 100}),
    ("interval 200", {"guard_snapshot_interval": 200}),
    ("interval 100, spectral off", {"guard_snapshot_interval": 100, "spectral_enabled": False}),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradience.bench overhead", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (GPU runs)")
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--verdict", choices=("auto", "sync", "async"), default="auto",
                   help="guard_verdict of every arm (async needs --fused; auto is sync on a CPU)")
    p.add_argument("--block", type=int, default=200, help="steps per timed block (a multiple of 200 keeps "
                                                          "every arm's snapshot count exact)")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per arm")
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 blocks of 50 steps, fewer rollbacks")
    p.add_argument("--json", default=None, help="write every measurement to this file")
    p.add_argument("--fsdp2", action="store_true", help="shard the model with fully_shard over all ranks (run "
                                                        "under torchrun; rank 0 prints)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table (and write JSON); 0 on success."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.block, args.blocks = 50, 2
    from gradience.demo import build_model, load_corpus

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.n_embd, args.n_layer, args.n_head, args.seq).to(device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    rank = 0
    if args.fsdp2:
        model, rank = _fully_shard(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused or None)
    text = load_corpus()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(text) - args.seq, (args.block, args.batch), generator=gen)
    batches = [torch.stack([text[s : s + args.seq] for s in row.tolist()]).to(device) for row in starts]

    def train_step(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    result: dict[str, Any] = {"command": "python -m gradience.bench overhead " + " ".join(argv or []),
                              "machine": _machine(device), "model": {
                                  "params": sum(p.numel() for p in model.parameters()), "n_embd": args.n_embd,
                                  "n_layer": args.n_layer, "seq": args.seq, "batch": args.batch,
                                  "dtype": "bf16" if args.bf16 else "fp32", "fused": bool(args.fused),
                                  "verdict": args.verdict,
                                  "fsdp2_ranks": _world() if args.fsdp2 else None}}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(_arms(model, optimizer, batches, train_step, args, device, Path(tmp)))
        result["check_pass_ms"] = None if args.fsdp2 else _check_passes(model, optimizer, batches, train_step, device)
        result["fixed"] = None if args.fsdp2 else _fixed_cost(device, Path(tmp) / "fixed", args.block, args)
        result["rollback"] = _rollbacks(model, optimizer, batches, train_step, device, Path(tmp) / "rb",
                                        2 if args.quick else 5, args.verdict)
        if device.type == "cuda":
            result["host_syncs_per_step"] = _host_syncs(model, optimizer, batches, train_step, Path(tmp) / "sy",
                                                        args.verdict)
    if rank == 0:
        _print(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.fsdp2:
        import gradience

        gradience.exit_process(0)
    return 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _fully_shard(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, int]:
    """Shard every block, then the root, over all ranks (the process group is started here)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, dist.get_rank()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _block(model, optimizer, batches, train_step, guard, start, device) -> tuple[float, float]:
    """(seconds per step, seconds per step inside the guard's calls) for one pass over ``batches``."""
    _sync(device)
    inside = 0.0
    t0 = time.perf_counter()
    for i, ids in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, ids)
        loss.backward()
        if guard is None:
            optimizer.step()
            continue
        a = time.perf_counter()
        guard.before_optimizer_step(model, optimizer, loss=loss)
        inside += time.perf_counter() - a
        optimizer.step()
        a = time.perf_counter()
        guard.step(start + i, loss, model)
        inside += time.perf_counter() - a
    _sync(device)
    n = len(batches)
    return (time.perf_counter() - t0) / n, inside / n


def _arms(model, optimizer, batches, train_step, args, device, tmp: Path) -> dict[str, Any]:
    guards = {}
    for name, fields in ARMS:
        conf = GradienceConfig(out_dir=str(tmp / f"arm{len(guards)}"), telemetry_interval=args.block,
                               guard_verdict=args.verdict, **fields)
        g = GradienceController(conf)
        g.initialize(model, optimizer=optimizer)
        guards[name] = g
    _block(model, optimizer, batches, train_step, None, 0, device)  # warm-up: allocator, kernels, Adam state
    base: list[float] = []
    rows: dict[str, dict[str, list[float]]] = {n: {"step": [], "inside": [], "ratio": []} for n in guards}
    step = 0
    for _ in range(args.blocks):
        for name, g in guards.items():
            before, _ = _block(model, optimizer, batches, train_step, None, 0, device)
            t, inside = _block(model, optimizer, batches, train_step, g, step, device)
            after, _ = _block(model, optimizer, batches, train_step, None, 0, device)
            step += len(batches)
            base += [before, after]
            rows[name]["step"].append(t)
            rows[name]["inside"].append(inside)
            rows[name]["ratio"].append(t / ((before + after) / 2))
    persist = [e for g in guards.values() for e in _persist_times(g)]
    default = guards["interval 100 (default)"].store
    shard = default.shard_path(max(default._records)) if default is not None and default._records else None
    for g in guards.values():
        g.finalize()
    step_s = statistics.median(base)
    arms = {}
    for name, r in rows.items():
        inside = statistics.median(r["inside"])
        arms[name] = {"step_ms": 1e3 * statistics.median(r["step"]), "in_call_ms": 1e3 * inside,
                      "in_call_pct": 100 * inside / step_s,
                      "end_to_end_pct": 100 * (statistics.median(r["ratio"]) - 1),
                      "end_to_end_range_pct": [100 * (min(r["ratio"]) - 1), 100 * (max(r["ratio"]) - 1)]}
    return {"baseline_step_ms": 1e3 * step_s, "blocks": args.blocks, "steps_per_block": len(batches), "arms": arms,
            "snapshot_bytes_per_rank": shard.stat().st_size if shard is not None and shard.exists() else None,
            "persist_ms": {"median": 1e3 * statistics.median(persist), "n": len(persist)} if persist else None}


def _check_passes(model, optimizer, batches, train_step, device) -> dict[str, float]:
    """Median time of one check's norm pass and host read inside the training loop, unguarded: the gradients'
    straight after backward, the weights' straight after the update (the floor of a synchronous check)."""
    from gradience.norms import TotalNorm

    grads_norm, weights_norm = TotalNorm(), TotalNorm()
    weights = [p for p in model.parameters() if p.numel()]
    grads_s, weights_s = [], []
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        train_step(model, ids).backward()
        _sync(device)
        t0 = time.perf_counter()
        float(grads_norm([p.grad for p in weights if p.grad is not None]))
        grads_s.append(time.perf_counter() - t0)
        optimizer.step()
        _sync(device)
        t0 = time.perf_counter()
        float(weights_norm(weights))
        weights_s.append(time.perf_counter() - t0)
    return {"grads": 1e3 * statistics.median(grads_s), "weights": 1e3 * statistics.median(weights_s)}


def _persist_times(g: GradienceController) -> list[float]:
    return list(getattr(g.store, "write_seconds", []) if g.store is not None else [])


def _fixed_cost(device: torch.device, out: Path, steps: int, args: argparse.Namespace) -> dict[str, float]:
    """In-call time per step on a model whose own step is tiny: what every step pays whatever the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=args.fused or None)
    x = torch.randn(8, 16, device=device)
    batches = [x] * steps

    def train_step(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(ids).pow(2).mean()

    g = GradienceController(out_dir=str(out), guard_snapshot_interval=10**6, telemetry_interval=10**6,
                            guard_verdict=args.verdict)
    g.initialize(model, optimizer=opt)
    _block(model, opt, batches, train_step, g, 0, device)  # warm-up
    runs = [_block(model, opt, batches, train_step, g, steps * (i + 1), device) for i in range(3)]
    ops = _ops_per_step(model, opt, x, train_step, g, steps * 4)
    g.finalize()
    return {"step_ms": 1e3 * statistics.median(s for s, _ in runs),
            "in_call_ms": 1e3 * statistics.median(i for _, i in runs), "ops_per_step": ops}


def _ops_per_step(model, optimizer, x, train_step, g, start: int) -> int:
    """Tensor ops the guard's calls dispatch in one steady-state step (each at least one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for i in range(3):
        loss = train_step(model, x)
        loss.backward()
        Count.n = 0
        with Count():
            g.before_optimizer_step(model, optimizer, loss=loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with Count():
            g.step(start + i, loss, model)
        counts.append(Count.n)
    return min(counts)


def _rollbacks(model, optimizer, batches, train_step, device, out: Path, n: int, verdict: str) -> dict[str, Any]:
    """Seconds of the ``step`` call that rolls back (a NaN written into a weight after an update), per tier,
    against a step. The loop goes on as a user's would, so under the asynchronous verdict the rollback is the
    next step's call (``detected_after``: guarded steps from the fault to the rollback, 1 when synchronous)."""
    out_rb: dict[str, Any] = {}
    weight = next(p for p in model.parameters() if p.ndim == 2)
    weight = weight.to_local() if hasattr(weight, "to_local") else weight  # a shard: the fault on every rank
    # hot: the disk tier with its in-memory copy (device memory on a GPU), as by default; disk: no copy, the
    # shard is read and verified.
    for tier, hot in (("hot", "auto"), ("disk", "off")):
        # Every rollback goes back to the same snapshot: it must not be retired as a repeat offender.
        g = GradienceController(out_dir=str(out / tier), guard_snapshot_hot=hot, guard_max_rollbacks=10 * n,
                                guard_max_snapshot_failures=10 * n, guard_snapshot_interval=10**6,
                                guard_lr_backoff=1.0, spectral_enabled=False, guard_verdict=verdict)
        g.initialize(model, optimizer=optimizer)
        times, steps, after = [], [], []
        for i in range(n):
            step_s, _ = _block(model, optimizer, batches[:5], train_step, g, 10 * i, device)
            steps.append(step_s)
            t, k = _rollback_call(model, optimizer, batches[5:8], train_step, g, 10 * i + 5, weight, device)
            times.append(t)
            after.append(k)
        g.finalize()
        step_s = statistics.median(steps)
        out_rb[tier] = {"rollback_ms": 1e3 * statistics.median(times), "step_ms": 1e3 * step_s,
                        "in_steps": statistics.median(times) / step_s, "n": n, "detected_after": max(after)}
    return out_rb


def _rollback_call(model, optimizer, batches, train_step, g, start, weight, device) -> tuple[float, int]:
    """(seconds of the ``step`` call that rolled back, guarded steps it took) after a NaN lands in ``weight``
    between an update and its ``step`` call."""
    rollbacks = g.state.total_rollbacks
    for k, ids in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, ids)
        loss.backward()
        g.before_optimizer_step(model, optimizer, loss=loss)
        optimizer.step()
        if k == 0:
            with torch.no_grad():
                weight.view(-1)[0] = float("nan")
        _sync(device)
        t0 = time.perf_counter()
        g.step(start + k, loss, model)
        _sync(device)
        took = time.perf_counter() - t0
        if g.state.total_rollbacks > rollbacks:
            return took, k + 1
    raise RuntimeError(f"no rollback within {len(batches)} guarded steps of a NaN weight")


def _host_syncs(model, optimizer, batches, train_step, out: Path, verdict: str) -> float:
    """Host synchronisations per steady-state guarded step, counted by CUDA's sync debug mode."""
    g = GradienceController(out_dir=str(out), guard_snapshot_interval=10**6, spectral_enabled=False,
                            guard_verdict=verdict)
    g.initialize(model, optimizer=optimizer)
    _block(model, optimizer, batches[:5], train_step, g, 0, torch.device("cuda"))
    steps = batches[:20]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i, ids in enumerate(steps):
                loss = train_step(model, ids)
                loss.backward()
                g.before_optimizer_step(model, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                g.step(100 + i, loss, model)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    g.finalize()
    # The unguarded part of the step (forward, backward, optimizer) syncs as often with or without the guard;
    # the count here is what the whole step does, reported as is.
    return sum("synchroniz" in str(w.message) for w in caught) / len(steps)


def _machine(device: torch.device) -> str:
    from gradience.bench.spectral import machine

    return machine() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")


def _print(r: dict[str, Any]) -> None:
    m = r["model"]
    print(f"gradience overhead bench: GPT-2 {m['params'] / 1e6:.2f}M params, batch {m['batch']}x{m['seq']}, "
          f"{m['dtype']}{', fused AdamW' if m['fused'] else ''}, verdict {m.get('verdict', 'auto')}; {r['machine']}")
    print(f"{r['blocks']} blocks x {r['steps_per_block']} steps per arm; baseline step {r['baseline_step_ms']:.2f} ms")
    print(f"{'arm':<30}{'step':>10}{'in-call':>12}{'in-call %':>11}{'end to end (median, range)':>34}")
    for name, a in r["arms"].items():
        lo, hi = a["end_to_end_range_pct"]
        print(f"{name:<30}{a['step_ms']:>7.2f} ms{a['in_call_ms']:>9.3f} ms{a['in_call_pct']:>10.2f}%"
              f"{a['end_to_end_pct']:>+14.1f} %  ({lo:+.1f} .. {hi:+.1f})")
    c = r.get("check_pass_ms")
    if c:
        print(f"one check's norm pass in the loop (unguarded): gradients {c['grads']:.3f} ms, weights "
              f"{c['weights']:.3f} ms")
    f = r["fixed"]
    if f is not None:
        print(f"fixed per-step cost (2-layer MLP, step {f['step_ms']:.3f} ms): {f['in_call_ms']:.3f} ms in the "
              f"guard's calls, {f.get('ops_per_step')} tensor ops dispatched")
    if r.get("snapshot_bytes_per_rank"):
        ranks = m.get("fsdp2_ranks")
        print(f"snapshot per rank: {r['snapshot_bytes_per_rank'] / 1e3:.0f} KB"
              + (f" (FSDP2 over {ranks} ranks: its shards)" if ranks else ""))
    for tier, x in r["rollback"].items():
        print(f"rollback from the {tier} tier: {x['rollback_ms']:.2f} ms = {x['in_steps']:.2f} steps"
              + (f" (in the next step's call: {x['detected_after']} guarded steps after the fault, its own included)"
                 if x["detected_after"] > 1 else ""))
    if r.get("persist_ms"):
        print(f"disk snapshot write (persist): {r['persist_ms']['median']:.2f} ms (median of {r['persist_ms']['n']})")
    if "host_syncs_per_step" in r:
        print(f"host syncs per steady-state step (whole step, CUDA sync debug mode): {r['host_syncs_per_step']:.1f}")
