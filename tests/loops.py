"""Small models and a plain training loop shared by the guard tests (real models, real optimizers)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from gradience import GradienceController


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))


def mlp_batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :8].sum(1, keepdim=True) - x[:, 8:].prod(1, keepdim=True)).tanh()


def mlp_loss(model: torch.nn.Module, step: int, seed: int = 0) -> torch.Tensor:
    x, y = mlp_batch(step, seed)
    return torch.nn.functional.mse_loss(model(x), y)


def make_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


_TEXT: torch.Tensor | None = None


def _text() -> torch.Tensor:
    global _TEXT
    if _TEXT is None:
        src = os.path.join(os.path.dirname(os.__file__), "textwrap.py")
        _TEXT = torch.tensor(list(open(src, "rb").read()), dtype=torch.long)
    return _TEXT


def gpt2_loss(model: torch.nn.Module, step: int, seed: int = 0) -> torch.Tensor:
    text = _text()
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    starts = torch.randint(0, len(text) - 33, (4,), generator=g)
    ids = torch.stack([text[s : s + 32] for s in starts])
    return model(input_ids=ids, labels=ids).loss


MODELS = {"mlp": (make_mlp, mlp_loss), "gpt2": (make_gpt2, gpt2_loss)}


def warmup_decay(total: int, warmup: int = 10) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def run_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    controller: GradienceController | None,
    *,
    steps: int,
    lr: float = 3e-3,
    on_update: Callable[[int, torch.nn.Module], None] | None = None,
    on_grads: Callable[[int, torch.nn.Module], None] | None = None,
    schedule: Callable[[int], float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    guard_loss: Callable[[int, torch.Tensor], object] | None = None,
) -> dict:
    """Train; ``on_grads`` runs after backward, ``on_update`` after the optimizer step (fault injection).

    ``lrs[i]`` is the LR the i-th update used (schedule(i) x the guard's scale)."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    if controller is not None:
        controller.initialize(model, optimizer=opt, scheduler=sched)
    lrs = used_lrs(opt)
    losses, applied = [], []
    stopped_at = None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, step)
        loss.backward()
        if on_grads:
            on_grads(step, model)
        ok = controller.before_optimizer_step(model, opt) if controller else True
        applied.append(ok)
        opt.step()
        if sched:
            sched.step()
        if on_update:
            on_update(step, model)
        losses.append(float(loss.detach()))
        reported = guard_loss(step, loss) if guard_loss else loss
        if controller is not None and not controller.step(step, reported, model):
            stopped_at = step
            break
    summary = controller.finalize() if controller is not None else None
    return {"optimizer": opt, "scheduler": sched, "lrs": lrs, "losses": losses, "applied": applied,
            "stopped_at": stopped_at, "summary": summary}


def used_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """The first group's LR as each optimizer.step() actually uses it (a pre-hook registered after the
    guard's, so it sees the backoff applied at consumption), one entry per step call."""
    seen: list[float] = []
    def record(o, args, kwargs):
        lr = o.param_groups[0]["lr"]
        seen.append(float(lr) if lr is not None else math.nan)  # Adafactor's relative step has no lr

    opt.register_step_pre_hook(record)
    return seen


def state_copy(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of every model state tensor and optimizer state tensor, in the optimizer's parameter order."""
    out = [t.detach().clone() for t in model.state_dict().values()]
    for p in (p for g in opt.param_groups for p in g["params"]):
        out += [v.detach().clone() for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return out


def bitwise_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two :func:`state_copy` results hold the same tensors, bit for bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def poison(name: str, value: float = float("nan")) -> Callable[[torch.nn.Module], None]:
    def f(model: torch.nn.Module) -> None:
        with torch.no_grad():
            dict(model.named_parameters())[name].view(-1)[0] = value

    return f


def events(out_dir, name: str | None = None, rank: int = 0) -> list[dict]:
    import json
    from pathlib import Path

    from gradience.telemetry import telemetry_filename

    lines = (Path(out_dir) / telemetry_filename(rank)).read_text().splitlines()
    evs = [json.loads(x) for x in lines]
    return [e for e in evs if name is None or e["event"] == name]


def newest_snapshot_dir(out_dir, rank: int = 0):
    """The directory of the newest snapshot committed on disk, by the telemetry of ``rank``: committed at its
    step, or written in the background and marked later."""
    from pathlib import Path

    done = [e for kind in ("snapshot", "snapshot_persisted") for e in events(out_dir, kind, rank)
            if e.get("path") and e.get("committed", True)]
    return Path(max(done, key=lambda e: e["snapshot_id"])["path"])


def wait_persisted(ctl) -> None:
    """Let this rank's background shard write finish (the next step then writes the marker)."""
    pending = ctl.store._persisting
    if pending is not None and pending.thread is not None:
        pending.thread.join(30)
