"""The guard's learning-rate backoff, applied where the LR is consumed: inside ``optimizer.step()``.

After a rollback the guard runs the rest of training at ``scale x`` the LR the loop intends. Scaling the
values the loop and its scheduler keep (``param_group["lr"]``, ``base_lrs``, ...) cannot hold: every writer of
``param_group["lr"]`` undoes it - schedulers that recompute from private copies (``SWALR``, ``GreedyLR``,
``AdafactorSchedule``), loops that set the LR each iteration (nanoGPT), a ``load_fn`` restoring state dicts,
accelerate's scheduler wrapper. So this module owns one mechanism: :class:`LRScale` registers a step pre-hook
that multiplies each group's LR by the scale just before the update reads it, and a post-hook that puts the
schedule's value back. Outside ``step()`` every group holds exactly what the loop/scheduler wrote, so
schedulers (chainable ones included), checkpoints and state dicts never see the scale and cannot compound it.

A loop that owns its LR (``initialize(get_lr=, set_lr=)``) gets :class:`CallbackLR` instead, which moves the
loop's LR by each change of the scale; :func:`apply_scale` is the one rule both follow. It also owns reading
the LR for telemetry (:func:`lr_in_force`, :func:`current_lr`, :meth:`LRScale.effective_lrs`).
"""

from __future__ import annotations

import logging
import numbers
import weakref
from collections.abc import Callable
from typing import Any

import torch

# Re-exported: callers take the unwrapping that LRScale itself uses from here.
from gradience.unwrap import unwrap_optimizer, unwrap_scheduler

logger = logging.getLogger(__name__)

# One open LRScale per optimizer: two would multiply their scales together. Both sides weak: a registry
# must not keep a dropped optimizer (or its LRScale, which the optimizer's hooks already own) alive.
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref[LRScale]] = weakref.WeakKeyDictionary()


def _is_numeric_lr(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _group_has_lr(group: dict[str, Any]) -> bool:
    # Adafactor(relative_step=True) computes its own step size and ignores group["lr"] - which is None, or a
    # float that AdafactorSchedule wrote for logging. Scaling it would report a backoff that does nothing.
    return not group.get("relative_step", False) and _is_numeric_lr(group.get("lr"))


class LRScale:
    """Applies the guard's LR scale inside ``optimizer.step()``.

    A step pre-hook replaces every numeric ``param_group["lr"]`` by ``lr x scale``; a step post-hook puts the
    original object back. The hooks live on the innermost torch optimizer (accelerate's wrappers are seen
    through), so they fire whether the loop steps the wrapper, the inner optimizer, or goes through
    ``GradScaler.step``; they survive ``optimizer.load_state_dict`` (hooks belong to the instance, not to
    its state). With ``scale == 1.0`` the hooks return at once.

    Tensor LRs (capturable / fused optimizers) get a new tensor ``lr * scale`` for the step: the user's tensor
    is never mutated and no host sync happens. Groups without a numeric LR (``None``, Adafactor's
    ``relative_step``) are left alone; :attr:`supported` says whether any group can be scaled.

    If ``step()`` raises after the pre-hook, the post-hook does not run and the scaled values stay in the
    groups until the next ``step()`` (whose pre-hook restores them before scaling again, so the scale never
    compounds) or the next :meth:`set` / :meth:`close`. A chainable scheduler stepped in between (the loop
    caught the exception and went on) would read the scaled value once; nothing in torch's hooks can see
    the exception to prevent that.
    """

    def __init__(self, optimizer: Any) -> None:
        """Attach to ``optimizer`` (a torch optimizer or a wrapper of one) with scale 1.0.

        Raises ``TypeError`` when no torch optimizer is inside ``optimizer``. An open :class:`LRScale` already
        attached to the same optimizer (a previous controller that was never closed) is closed first, with a
        warning: two would multiply their scales, and the newest owner is the one in charge.
        """
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"LRScale needs a torch.optim.Optimizer, got {type(inner).__name__}")
        ref = _ATTACHED.get(inner)
        previous = ref() if ref is not None else None
        if previous is not None:
            logger.warning("Gradience: %r was still attached to this optimizer; closing it (scales must not "
                           "multiply)", previous)
            previous.close()
        self._optimizer = inner
        self._scale = 1.0
        # (group, value the schedule had set, value we put in its place) for each group scaled in this step;
        # None when no step is in flight.
        self._pending: list[tuple[dict[str, Any], Any, Any]] | None = None
        self._pre = inner.register_step_pre_hook(self._before_step)
        self._post = inner.register_step_post_hook(self._after_step)
        self._closed = False
        _ATTACHED[inner] = weakref.ref(self)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The innermost torch optimizer the hooks are registered on."""
        return self._optimizer

    @property
    def scale(self) -> float:
        """The factor applied to every step's LR (1.0: untouched)."""
        return self._scale

    def hold(self) -> None:
        """What a restore must keep across a ``load_fn`` (nothing: the scale is applied inside the step)."""
        return None

    def set(self, scale: float, held: Any = None) -> None:
        """Make every later ``step()`` use ``scale x`` the LR its groups hold (absolute, not cumulative).

        A second backoff is ``set(lr_scale.scale * factor)``. ``scale`` must be finite and > 0. Call it
        between steps (it first puts back values a raising step left scaled). ``held``: unused (see
        :meth:`CallbackLR.set`).
        """
        scale = _check_scale(scale)
        self._check_open()
        self._restore()
        self._scale = scale

    @property
    def supported(self) -> bool:
        """Whether the scale reaches any update: False when no group has a numeric LR that the optimizer uses
        (Adafactor with ``relative_step=True``), where a backoff is impossible."""
        return any(_group_has_lr(g) for g in self._optimizer.param_groups)

    def effective_lrs(self) -> list[float | None]:
        """The LR each group's next update uses: the schedule's value x scale; ``None`` for groups without an
        LR the scale can reach. Reads tensor LRs to the host (telemetry, not the hot path). Changes nothing,
        so it is safe to call from inside a step (another hook) as well as between steps."""
        ours = {id(group): (saved, scaled) for group, saved, scaled in self._pending or ()}
        out: list[float | None] = []
        for group in self._optimizer.param_groups:
            if not _group_has_lr(group):
                out.append(None)
                continue
            value = group["lr"]
            saved, scaled = ours.get(id(group), (None, None))
            out.append(float(saved if value is scaled else value) * self._scale)
        return out

    def close(self) -> None:
        """Remove the hooks and put back any LR still scaled; the optimizer is as if never attached."""
        if self._closed:
            return
        self._restore()
        self._pre.remove()
        self._post.remove()
        self._closed = True
        ref = _ATTACHED.get(self._optimizer)
        if ref is not None and ref() is self:
            del _ATTACHED[self._optimizer]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"scale={self._scale}"
        return f"LRScale({type(self._optimizer).__name__}, {state})"

    # ------------------------------------------------------------------------------------------ hooks
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending is not None:  # the last step raised between pre and post: undo before scaling again
            self._restore()
        scale = self._scale
        if scale == 1.0:
            return
        pending = []
        for group in optimizer.param_groups:
            if not _group_has_lr(group):
                continue
            saved = group["lr"]
            scaled = saved * scale  # a new object (float or tensor): the identity check in _restore needs it
            group["lr"] = scaled
            pending.append((group, saved, scaled))
        self._pending = pending

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending is not None:
            self._restore()

    def _restore(self) -> None:
        pending, self._pending = self._pending, None
        for group, saved, scaled in pending or ():
            # Something that wrote group["lr"] during the step owns the new value; only undo our own write.
            if group.get("lr") is scaled:
                group["lr"] = saved

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LRScale is closed")


class CallbackLR:
    """The guard's LR scale through the loop's own ``get_lr()`` / ``set_lr(lr)`` (``initialize(get_lr=, set_lr=)``).

    The loop owns its LR and its persistence across its scheduler; the guard only moves it by the ratio of the
    new scale to the old one, each time the scale changes (a rollback's backoff, a DANGER reaction), so the
    guard's scale has one home (the guard state) and one rule for both forms of LR access.
    """

    def __init__(self, get_lr: Callable[[], float], set_lr: Callable[[float], None]) -> None:
        self._get, self._set = get_lr, set_lr
        self._scale = 1.0

    @property
    def scale(self) -> float:
        """The scale last applied to the loop's LR (1.0: untouched)."""
        return self._scale

    @property
    def supported(self) -> bool:
        """Always True: the loop's ``set_lr`` takes any LR."""
        return True

    def hold(self) -> float:
        """The loop's LR now, before a ``load_fn`` may put back an older one."""
        return float(self._get())

    def set(self, scale: float, held: float | None = None) -> None:
        """Move the loop's LR from the old scale to ``scale``: ``set_lr(lr x scale / old)``, with ``lr`` the LR
        in force (``held``: the value read before a restore's ``load_fn`` ran)."""
        scale = _check_scale(scale)
        if scale == self._scale and held is None:
            return
        lr = float(self._get()) if held is None else held
        self._set(lr * scale / self._scale)
        self._scale = scale

    def adopt(self, scale: float) -> None:
        """Take ``scale`` as the one the loop's LR already carries (restored from the loop's own checkpoint)."""
        self._scale = _check_scale(scale)

    def effective_lrs(self) -> list[float | None]:
        """The loop's LR (the scale is already in it)."""
        return [float(self._get())]

    def close(self) -> None:
        """Nothing to undo: the loop owns its LR."""


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not (scale > 0.0 and scale != float("inf")):
        raise ValueError(f"LR scale must be finite and > 0, got {scale}")
    return scale


def apply_scale(lr: LRScale | CallbackLR | None, scale: float, *, adopt: bool = False) -> None:
    """Bring the LR in force to the guard's ``scale``. ``adopt``: the scale came with the loop's own checkpoint,
    whose LR (``set_lr`` form) already carries it."""
    if lr is None or lr.scale == scale:
        return
    if adopt and isinstance(lr, CallbackLR):
        lr.adopt(scale)
    else:
        lr.set(scale)


def lr_in_force(lr: LRScale | CallbackLR | None, optimizer: Any) -> float | None:
    """The first LR the next update uses (for telemetry): through the guard's scale when there is one."""
    if lr is not None:
        lrs = [x for x in lr.effective_lrs() if x is not None]
        return lrs[0] if lrs else None
    return current_lr(optimizer) if optimizer is not None else None


def current_lr(optimizer: Any) -> float | None:
    """The first param group's LR as the loop/scheduler set it (the guard's scale not applied; for the LR the
    update uses see :meth:`LRScale.effective_lrs`). ``None`` when that group has no numeric LR."""
    lr = unwrap_optimizer(optimizer).param_groups[0].get("lr")
    return float(lr) if _is_numeric_lr(lr) else None


__all__ = ["CallbackLR", "LRScale", "apply_scale", "current_lr", "lr_in_force", "unwrap_optimizer", "unwrap_scheduler"]
