"""One rank of a real multi-process run with a fault scenario, for tests/test_faults.py.

    python tests/fault_worker.py SCENARIO OUT_DIR      (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env)

Each rank trains a DDP MLP over gloo under a GradienceController and writes ``OUT_DIR/result_rank<r>.json``
(what it saw, when it ended) before it exits, unless the scenario kills or stops it first.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.algorithms.join  # noqa: F401 - the join scenario

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradience import CollectiveError, ConfigError, GradienceController  # noqa: E402
from tests.loops import make_mlp, mlp_loss  # noqa: E402


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    result: dict = {"rank": rank, "scenario": scenario, "t_start": time.time()}

    def finish(code: int) -> int:
        result["t_end"] = time.time()
        result["exit"] = code
        (out / f"result_rank{rank}.json").write_text(json.dumps(result, default=str))
        return code

    group = None
    if scenario == "nonmember":
        group = dist.new_group([0])
    elif scenario == "subgroups":  # data-parallel groups {0, 2} and {1, 3} in one out_dir
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        group = groups[rank % 2]
    model = make_mlp(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group) if scenario != "nonmember" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = GradienceController(out_dir=str(out), process_group=group, guard_snapshot_interval=4,
                              collective_timeout_s=float(os.environ.get("GUARD_TIMEOUT", "3")))
    if scenario == "crash_write" and rank == 1:
        _kill_inside_shard_write("snap_00000004")
    try:
        ctl.initialize(model, optimizer=opt, resume="latest" if scenario == "resume" else False)
    except ConfigError as e:
        result["config_error"] = str(e)
        return finish(2)
    if scenario == "resume":
        result.update(resumed_step=ctl.resumed_step, lr_scale=ctl.lr_scale,
                      total_rollbacks=ctl.state.total_rollbacks, guard_state=ctl.state.to_dict(),
                      weights=[p.detach().tolist() for p in model.parameters()])
    steps = int(os.environ.get("STEPS", "12"))
    first = ctl.resumed_step + 1 if ctl.resumed_step is not None else 0
    if scenario == "join":
        try:
            with torch.distributed.algorithms.join.Join([ddp]):
                for step in range(3 + rank):  # uneven inputs: rank 1 has one batch more
                    opt.zero_grad()
                    mlp_loss(ddp, step).backward()
                    ctl.before_optimizer_step(model, opt)
                    opt.step()
        except ConfigError as e:
            result["config_error"] = str(e)
            return finish(2)
        return finish(0)
    try:
        for step in range(first, steps):
            opt.zero_grad()
            loss = mlp_loss(ddp, step * world + rank)
            loss.backward()  # DDP's own all-reduce: the peer stops after it, inside the guard's reach
            if scenario.startswith("freeze") and rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGSTOP)  # what a hung host looks like
            if scenario == "die" and rank == 0 and step == 5:
                os._exit(17)
            if scenario == "crash" and rank == 1 and step == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            if scenario == "sigterm" and step == 5:
                (out / f"ready_rank{rank}").write_text("")
                time.sleep(60)  # the test sends SIGTERM now
            skip_gate = scenario == "mismatch" and rank == 1 and step == 3
            if skip_gate or ctl.before_optimizer_step(model, opt):
                opt.step()
            if scenario.startswith("crash") and rank == 0 and step == 6:
                with torch.no_grad():
                    model[0].weight.view(-1)[0] = float("nan")
            if scenario == "subgroups" and rank in (2, 3) and step == 6:
                with torch.no_grad():
                    model[0].weight.view(-1)[0] = float("nan")
            if not ctl.step(step, loss, model):
                break
            if scenario.startswith("crash"):  # the live guard state after each step, for the resumed run to match
                result.setdefault("live", {})[step] = ctl.state.to_dict()
        result["status"] = "finished"
    except CollectiveError as e:
        result["status"] = type(e).__name__
        result["error"] = str(e)
        result["t_error"] = time.time()
        if scenario == "freeze_catch":
            return finish(4)
        # Let the error end the process the ordinary way (no exit_process): the worst case for a survivor.
        finish(4)
        raise
    result["summary"] = ctl.finalize()
    return finish(0)


def _kill_inside_shard_write(snap_dir: str) -> None:
    """SIGKILL this process half-way through writing its shard of the snapshot in ``snap_dir``."""
    import gradience.shardio as sio

    write = sio.write_planned

    def dying(path, head, raws):
        if path.parent.name == snap_dir:
            with open(path.with_name(path.name + sio.TMP_SUFFIX), "wb") as f:
                f.write(head)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, head, raws)

    sio.write_planned = dying


if __name__ == "__main__":
    code = main()
    from gradience import exit_process

    exit_process(code)
