"""Learning-rate backoff that survives the scheduler.

Schedulers recompute the LR from their own bases every step (``LambdaLR``: ``lr = base_lr * f(step)``),
so scaling ``param_group["lr"]`` alone is undone one step later. We scale every base a scheduler derives
the LR from, recursively through ``SequentialLR``/``ChainedScheduler``, and the param groups' own keys.
"""

from __future__ import annotations

from typing import Any

import torch

# Scheduler attributes holding per-group LR bases or floors (LRScheduler, CyclicLR, ReduceLROnPlateau).
_SCHED_LIST_ATTRS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
# CosineAnnealingLR / WarmRestarts floor: scaled too, so the whole curve scales exactly.
_SCHED_SCALAR_ATTRS = ("eta_min",)
# Param-group keys that schedulers read as bases (OneCycleLR reads max_lr/min_lr/initial_lr).
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_lr(optimizer: torch.optim.Optimizer, scheduler: Any | None, factor: float) -> None:
    """Multiply the effective LR by ``factor`` now and for every later scheduler step."""
    for group in optimizer.param_groups:
        scaled: set[int] = set()
        for key in _GROUP_KEYS:
            value = group.get(key)
            if isinstance(value, torch.Tensor):
                # Tensor LRs (capturable/fused optimizers) are updated in place, once even if aliased.
                if id(value) not in scaled:
                    value.mul_(factor)
                    scaled.add(id(value))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                group[key] = value * factor
    if scheduler is not None:
        _scale_scheduler(scheduler, factor, seen=set())


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for attr in _SCHED_LIST_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(scheduler, attr, [_times(v, factor) for v in values])
    for attr in _SCHED_SCALAR_ATTRS:
        value = getattr(scheduler, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(scheduler, attr, value * factor)
    for child in getattr(scheduler, "_schedulers", []) or []:
        _scale_scheduler(child, factor, seen)


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor  # a new tensor: the list may share it with a param group scaled in place
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """LR of the first param group (what telemetry reports)."""
    lr = optimizer.param_groups[0]["lr"]
    return float(lr)
