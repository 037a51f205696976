"""GPU check of the landed project (run on a lent device machine): GPT-2 124M, bf16 autocast, fused AdamW.
Measures, in one run: unguarded step time, guard in-call time per step, host syncs inside the guard's calls
(torch.cuda.set_sync_debug_mode), rollback time after an injected NaN. Prints one JSON line last.
Usage on a GPU machine, from the project root (launch/gpu_check.sh runs it with the overhead bench):
  PYTHONPATH=. python launch/gpu_guard_check.py [--steps 60] [--fused 1]"""
import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gradience import GradienceController

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--fused", type=int, default=1)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--small", action="store_true", help="tiny model (a CPU dry run of this script)")
a = ap.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
cuda = dev == "cuda"
if not cuda:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_sync_debug_mode = lambda *a, **k: None
    torch.cuda.get_device_name = lambda *a, **k: "cpu"
torch.manual_seed(0)
cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64) if a.small else GPT2Config()
m = GPT2LMHeadModel(cfg).to(dev)
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=bool(a.fused))
x = torch.randint(0, 50257, (a.batch, a.seq), device=dev)


def fwd_bwd():
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = m(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def timed_steps(n, ctl=None, start=0):
    torch.cuda.synchronize()
    per, in_call, syncs = [], [], 0
    for i in range(n):
        t0 = time.perf_counter()
        loss = fwd_bwd()
        spent = 0.0
        if ctl is not None:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                t1 = time.perf_counter()
                ok = ctl.before_optimizer_step(m, opt)
                spent += time.perf_counter() - t1
                torch.cuda.set_sync_debug_mode("default")
                if ok:
                    opt.step()
                torch.cuda.set_sync_debug_mode("warn")
                t1 = time.perf_counter()
                ctl.step(start + i, loss.detach(), m)
                spent += time.perf_counter() - t1
                torch.cuda.set_sync_debug_mode("default")
            syncs += sum("synchroniz" in str(r.message).lower() for r in w)
        else:
            opt.step()
        torch.cuda.synchronize()
        per.append(time.perf_counter() - t0)
        in_call.append(spent)
    return per, in_call, syncs


timed_steps(5)
base, _, _ = timed_steps(a.steps)
ctl = GradienceController(out_dir=tempfile.mkdtemp())  # seed defaults
ctl.initialize(m, optimizer=opt)
g, calls, syncs = timed_steps(a.steps, ctl, start=0)
# rollback time: NaN into a weight, time the step() that rolls back
with torch.no_grad():
    m.transformer.h[0].attn.c_attn.weight.view(-1)[0] = float("nan")
torch.cuda.synchronize()
t0 = time.perf_counter()
ctl.step(a.steps, torch.tensor(1.0, device=dev), m)
torch.cuda.synchronize()
rb = time.perf_counter() - t0
s = ctl.finalize()
ub, gb = statistics.median(base), statistics.median(g)
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "step_ms": round(ub * 1e3, 2), "guarded_step_ms": round(gb * 1e3, 2),
                  "end_to_end_pct": round(100 * (gb / ub - 1), 2),
                  "in_call_pct": round(100 * statistics.median(calls) / ub, 2),
                  "host_syncs_per_step": round(syncs / a.steps, 2),
                  "rollback_ms": round(rb * 1e3, 1), "rollback_steps": round(rb / ub, 2),
                  "rollbacks": s["guard"]["total_rollbacks"]}))
