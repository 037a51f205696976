"""PyTorch FSDP2 (``fully_shard``) under GradienceController: real sharded training over gloo under torchrun,
2 ranks (FSDP) and 4 ranks on a 2x2 mesh (HSDP), each launch running every check (tests/fsdp_worker.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, rank_results

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, nproc: int, mesh: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "fsdp_worker.py"),
           str(out), mesh]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return rank_results(out, nproc, proc)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mesh", [(2, "2"), (4, "2x2")], ids=["fsdp-2", "hsdp-2x2"])
def test_fully_shard_skips_and_rolls_back_every_rank_bitwise(tmp_path, nproc, mesh):
    ranks = launch(tmp_path, nproc, mesh)
    target = ranks[0]["fsdp"]["rollbacks"][0][1]
    for rank, res in enumerate(ranks):
        s = res["fsdp"]
        assert s["backend"] == "FSDP2Backend"
        # NaN in group rank 0's local gradient shard: every rank skips; shards and moments bitwise unchanged.
        assert s["skips"][0] == [3, "NONFINITE_GRADS", [0]] and s["skip_unchanged"] is True
        assert s["optimizer_keys"] > 0 and s["skip_compared"] > s["optimizer_keys"]
        # NaN in the last rank's local weight shard after step 8: the forward gathers it (NaN grads, skipped)
        # and every rank rolls back at step 9 to the same snapshot, each local shard bitwise equal to it.
        assert s["rollbacks"] == [[9, target, 0.5]], (rank, s["rollbacks"])
        assert s["rollback_at"] == 9 and s["rollback_equal"] is True and s["rollback_compared"] > 0
        assert [x[0] for x in s["skips"]] == [3, 9]
        assert all(math.isfinite(v) for i, v in enumerate(s["losses"]) if i != 9) and math.isfinite(s["losses"][-1])
        assert s["summary"]["integrity_status"] == "RECOVERED"
        assert all(scale == 0.5 for _, _, scale in s["lrs"][9:])  # the backoff, kept while the schedule moves
        # Each rank holds half of every weight (a 2-way shard, also under HSDP's replicas).
        assert 0.45 < s["snapshot_bytes"] / res["ddp_snapshot_bytes"] < 0.55, (s["snapshot_bytes"],
                                                                               res["ddp_snapshot_bytes"])
        assert "plain tensors beside DTensor ones" in res["refused"] and "transformer.wte.weight" in res["refused"]
        # κ̃ from each rank's own shards: in telemetry, the same on every rank (the attention bound, no fallback).
        assert s["spectral"] == ranks[0]["fsdp"]["spectral"] and [x[0] for x in s["spectral"]] == [0, 5, 10, 15]
        assert {x[3] for x in s["spectral"]} == {"attention_logit_bound"} and all(x[1] > 0 for x in s["spectral"])
        # ... and equal to the unsharded value of the same weights: GPT-2's Conv1D (column shards of the logical
        # W_Q, W_K) and Llama's q_proj / k_proj with grouped-query heads (row shards); κ̃, the stable-rank
        # concentration and the hidden-σ definition.
        for sharded, full in ((s["kappa_sharded"], s["kappa_full"]), (s["llama_sharded"], s["llama_full"])):
            assert sharded[3:] == full[3:] == ["attention_logit_bound", 2]
            assert sharded[:3] == pytest.approx(full[:3], rel=1e-5)
