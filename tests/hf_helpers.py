"""Builders and fault-injecting callbacks for the Trainer tests (tests/test_hf.py).

The model and data come from the shipped example, launch/train_hf.py, so the tests exercise the same pieces
that ``accelerate launch`` runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
BASE_LR, WARMUP, SEQ = 3e-3, 5, 32


def load_train_hf() -> Any:
    """launch/train_hf.py as a module (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_hf", ROOT / "launch" / "train_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_hf = load_train_hf()
INJECT_PARAM = train_hf.INJECT_PARAM


def make_trainer(out: Path, callbacks: list, *, max_steps: int = 30, **overrides: Any) -> Trainer:
    """A CPU Trainer over the example's tiny GPT-2 and byte data; every optimizer step is logged."""
    kw = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=BASE_LR,
              warmup_steps=WARMUP, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", seed=0,
              use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    kw.update(overrides)
    if kw.get("save_steps"):
        kw["save_strategy"] = "steps"
    return Trainer(model=train_hf.make_model(SEQ, seed=0), args=TrainingArguments(**kw),
                   train_dataset=train_hf.ByteText(SEQ), callbacks=callbacks)


def linear_lr(step: int, total: int, base: float = BASE_LR, warmup: int = WARMUP) -> float:
    """LR the Trainer logs at ``global_step == step``: the linear schedule after ``step - 1`` scheduler steps."""
    s = step - 1
    return base * (s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup)))


def logged(trainer: Trainer, key: str) -> dict[int, float]:
    """{global_step: value} from the Trainer's per-step logs."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def poison(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.view(-1)[0] = float("nan")


class WeightNaN(TrainerCallback):
    """NaN into INJECT_PARAM right after the optimizer update of each step in ``steps``.

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before any callback's ``on_step_end``, so the
    guard's weight check of the same step sees the fault whatever the callback order.
    """

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            poison(model.get_parameter(INJECT_PARAM))


class GradNaNProbe(TrainerCallback):
    """At ``step``: record parameters and AdamW state, put a NaN in one gradient, and after the update
    record whether anything changed. Must precede GradienceCallback (on_pre_optimizer_step order)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: tuple | None = None
        self.unchanged: bool | None = None
        self.adam_steps_before: float | None = None

    def _capture(self, model, optimizer) -> tuple:
        inner = getattr(optimizer, "optimizer", optimizer)
        params = [p.detach().clone() for p in model.parameters()]
        state = [{k: v.clone() for k, v in inner.state[p].items()} for p in model.parameters()]
        return params, state

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = self._capture(model, optimizer)
            self.adam_steps_before = float(self.before[1][0]["step"])
            poison(model.get_parameter(INJECT_PARAM).grad)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            params, opt_state = self._capture(model, optimizer)
            same_p = all(torch.equal(a, b) for a, b in zip(self.before[0], params, strict=True))
            same_s = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                         for a, b in zip(self.before[1], opt_state, strict=True))
            self.unchanged = same_p and same_s


def launch_env() -> dict[str, str]:
    """Environment for launched ranks: one thread each, loopback gloo, CPU."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", ACCELERATE_USE_CPU="true",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env
