"""One rank of a real FSDP2 run (``fully_shard`` over gloo on CPU) under GradienceController, for
tests/test_fsdp.py.

    torchrun --nproc_per_node N tests/fsdp_worker.py OUT_DIR MESH       (MESH: "2" = FSDP, "2x2" = HSDP)

The rank shards a tiny GPT-2 (every block, then the root), then: a NaN in group rank 0's local gradient shard at
step 3 (every rank must skip, shards and optimizer state unchanged), a NaN in the last rank's local weight shard
after step 8 (every rank must roll back to the same snapshot, bitwise), trains to step 16; it also measures the
same model's per-rank snapshot under DDP and checks that a half-sharded model is refused by name. Writes
``OUT_DIR/result_rank<r>.json``; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradience  # noqa: E402
from gradience import ConfigError, GradienceController  # noqa: E402
from tests.loops import events, gpt2_loss, make_gpt2, newest_snapshot_dir  # noqa: E402

STEPS, NAN_GRAD_AT, NAN_WEIGHT_AFTER = 16, 3, 8



def shard(model: torch.nn.Module, mesh_shape: tuple[int, ...], blocks: str = "h") -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for block in getattr(getattr(model, "transformer", None) or model.model, blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def newest_shard_bytes(out: Path, rank: int) -> int:
    return (newest_snapshot_dir(out, rank) / f"rank_{rank:05d}.safetensors").stat().st_size


def run_fsdp(out: Path, rank: int, world: int, mesh_shape: tuple[int, ...]) -> dict:
    model = shard(make_gpt2(0), mesh_shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    ctl = GradienceController(out_dir=str(out), guard_snapshot_interval=4, telemetry_interval=1,
                              collective_timeout_s=60, spectral_interval=5)
    ctl.initialize(model, optimizer=opt, scheduler=sched)
    backend = ctl.backend
    res: dict = {"backend": type(backend).__name__, "losses": [], "lrs": []}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = gpt2_loss(model, step, seed=rank)
        loss.backward()
        if step == NAN_GRAD_AT:
            before, _ = backend.capture(copy=True)
            if rank == 0:
                backend.gate_tensors()[0].view(-1)[0] = float("nan")
        ctl.before_optimizer_step(model, opt, loss=loss)
        opt.step()
        sched.step()
        if step == NAN_GRAD_AT:
            after, _ = backend.capture(copy=True)
            res["skip_unchanged"] = sorted(before) == sorted(after) and all(
                torch.equal(before[k], after[k]) for k in before)
            res["skip_compared"] = len(before)
            res["optimizer_keys"] = sum(k.startswith("optim.") for k in before)
        ctl.step(step, loss)
        if step == NAN_WEIGHT_AFTER and rank == world - 1:
            with torch.no_grad():
                backend.check_tensors()[0][2].view(-1)[0] = float("nan")
        rolled = [e for e in events(out, "rollback_success", rank) if e["step"] == step]
        if rolled and "rollback_equal" not in res:
            saved = ctl.store.prepare(rolled[0]["to_snapshot"]).tensors
            now, _ = backend.capture(copy=True)
            res["rollback_at"] = step
            res["rollback_equal"] = sorted(saved) == sorted(now) and all(torch.equal(saved[k], now[k]) for k in now)
            res["rollback_compared"] = len(now)
        res["losses"].append(float(loss.detach()))
        res["lrs"].append([opt.param_groups[0]["lr"], sched.get_last_lr()[0], ctl.lr_scale])
    res["snapshot_bytes"] = newest_shard_bytes(out, rank)
    res["local_numel"] = sum(t.numel() for t in backend.check_tensors()[0])
    res["skips"] = [(e["step"], e["reason"], e["faulty_global_ranks"]) for e in events(out, "skip_step", rank)]
    res["rollbacks"] = [(e["step"], e["to_snapshot"], e["lr_scale"]) for e in events(out, "rollback_success", rank)]
    res["spectral"] = [(e["step"], e["kappa"], e["stable_rank"], e["definition"]) for e in events(out, "spectral", rank)]
    res["summary"] = ctl.finalize()["guard"]
    res["kappa_sharded"], res["kappa_full"] = sharded_vs_full(model, make_gpt2, mesh_shape)
    # Llama-style separate q_proj / k_proj Linear weights (row shards) with grouped-query attention.
    res["llama_sharded"], res["llama_full"] = sharded_vs_full(shard(make_llama(), mesh_shape, "layers"), make_llama,
                                                              mesh_shape)
    return res


def make_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def sharded_vs_full(model: torch.nn.Module, build, mesh_shape: tuple[int, ...]) -> tuple[list[float], list[float]]:
    """(κ̃, stable-rank concentration, κ̃ of the hidden-σ definition) of the sharded model, each rank multiplying
    by its own shards, and of an unsharded copy of the same weights (gathered here, for the test only)."""
    from gradience.spectral import SpectralProbe

    copies = mesh_shape[0] if len(mesh_shape) > 1 else 1

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / copies

    full = build()
    with torch.no_grad():
        for p, q in zip(model.parameters(), full.parameters(), strict=True):
            q.copy_(p.full_tensor())
    out = []
    for m, r in ((model, reduce), (full, None)):
        a = SpectralProbe(m, iters=60, reduce=r).measure()
        h = SpectralProbe(m, iters=60, reduce=r, definition="hidden_sigma").measure()
        out.append([a.kappa, a.stable_rank, h.kappa, a.definition, len(a.layers)])
    return out[0], out[1]


def run_ddp(out: Path) -> int:
    model = torch.nn.parallel.DistributedDataParallel(make_gpt2(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = GradienceController(out_dir=str(out), guard_snapshot_interval=2, collective_timeout_s=60)
    ctl.initialize(model, optimizer=opt)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = gpt2_loss(model, step)
        loss.backward()
        ctl.before_optimizer_step(model, opt)
        opt.step()
        ctl.step(step, loss)
    ctl.finalize()
    return newest_shard_bytes(out, dist.get_rank())


def refused_half_sharded(out: Path, mesh_shape: tuple[int, ...]) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_gpt2(0)
    fully_shard(model.transformer.h[0], mesh=init_device_mesh("cpu", mesh_shape))  # the rest stays plain
    try:
        GradienceController(out_dir=str(out)).initialize(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    except ConfigError as e:
        return str(e)
    return ""


def main() -> None:
    out, mesh_shape = Path(sys.argv[1]), tuple(int(x) for x in sys.argv[2].split("x"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"rank": rank}
    try:
        result["fsdp"] = run_fsdp(out / "fsdp", rank, world, mesh_shape)
        result["ddp_snapshot_bytes"] = run_ddp(out / "ddp")
        result["refused"] = refused_half_sharded(out / "refused", (world,))
    except Exception as e:  # reported to the test, which shows it
        import traceback

        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    (out / f"result_rank{rank}.json").write_text(json.dumps(result, default=str))
    gradience.exit_process(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
