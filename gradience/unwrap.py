"""Seeing through framework wrappers: the one place that finds the torch optimizer, scheduler and module inside
them, and the parameter names without the prefixes wrappers add.

Frameworks hand the training loop wrappers rather than the objects they wrap: accelerate's
``AcceleratedOptimizer`` (``.optimizer``) and ``AcceleratedScheduler`` (``.scheduler``), Lightning's
``LightningOptimizer`` (``.optimizer``), and wrappers of wrappers. State, hooks and LR handling must act on the
innermost object, or they act on a facade the loop may bypass. Every entry point unwraps here, so a new
wrapper shape is taught once. Recognition is by shape (the attribute and what it holds), so accelerate stays
an optional dependency that is never imported. Models: DDP / DataParallel (``.module``) and torch.compile
(``._orig_mod``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

# A wrapper chain longer than this is a cycle (an object that names itself), not a real stack of wrappers.
_MAX_DEPTH = 16
# What DDP / DataParallel (``module.``) and torch.compile (``_orig_mod.``) put in front of parameter names.
_PREFIXES = ("module.", "_orig_mod.")


def unwrap_optimizer(obj: Any) -> Any:
    """The innermost optimizer inside ``obj``; ``obj`` itself when it wraps nothing (``None`` stays ``None``).

    Follows ``.optimizer`` while it holds something optimizer-shaped (it has ``param_groups``). A plain torch
    optimizer has no ``.optimizer``, so it is returned as is; schedulers must go through
    :func:`unwrap_scheduler` (they also have ``.optimizer``, which is not what they wrap).
    """
    return _innermost(obj, "optimizer", lambda inner: hasattr(inner, "param_groups"))


def unwrap_scheduler(obj: Any) -> Any:
    """The innermost LR scheduler inside ``obj``; ``obj`` itself when it wraps nothing (``None`` stays ``None``).

    Follows ``.scheduler`` while it holds something scheduler-shaped (it has a callable ``step``).
    """
    return _innermost(obj, "scheduler", lambda inner: callable(getattr(inner, "step", None)))


def _innermost(obj: Any, attr: str, looks_right: Any) -> Any:
    for _ in range(_MAX_DEPTH):
        inner = getattr(obj, attr, None)
        if inner is None or inner is obj or not looks_right(inner):
            return obj
        obj = inner
    raise ValueError(f"{type(obj).__name__}: more than {_MAX_DEPTH} nested .{attr} wrappers (a cycle?)")


def strip_name(name: str) -> str:
    """``name`` without the prefixes DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) add."""
    name = name.replace("._orig_mod.", ".")  # a compiled submodule
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (``model`` itself when it is not wrapped)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(_MAX_DEPTH):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = model.module if isinstance(model, wrappers) else None
        if inner is None:
            return model
        model = inner
    raise ValueError(f"more than {_MAX_DEPTH} nested wrappers around {type(model).__name__}")
