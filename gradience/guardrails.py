"""Defences of the guard against its surroundings: a GradScaler the loop did not pass, a launcher's SIGTERM,
and DDP's ``join()``. Each keeps the guard from breaking a healthy run, from hanging, or from leaving no report
behind. (Probes that raise are counted by the policy: ``policy.on_probe_errors``.)
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import weakref
from typing import Any

import torch

from gradience.errors import ConfigError

logger = logging.getLogger("gradience")


def detect_scaler() -> tuple[Any | None, str | None]:
    """The one enabled, in-use ``torch.amp.GradScaler`` in this process, and a note when that is ambiguous.

    A loop that scales its loss but does not pass ``scaler=`` to the gate would otherwise have its scaled
    gradients checked against the threshold, and its dropped gradients would make ``scaler.step`` fail with
    "No inf checks were recorded". Searched once per controller (a walk of the GC's objects).
    """
    # type(), not isinstance(): isinstance reads __class__, which wakes deprecation proxies among the objects.
    found = [o for o in gc.get_objects()
             if issubclass(type(o), torch.amp.GradScaler) and o.is_enabled() and getattr(o, "_scale", None) is not None]
    if len(found) == 1:
        return found[0], "using the GradScaler found in this process (pass scaler= to before_optimizer_step)"
    if len(found) > 1:
        return None, (f"{len(found)} GradScalers are in use in this process: pass scaler= to "
                      "before_optimizer_step, or gradients are checked while still scaled")
    return None, None


class ScalerSearch:
    """:func:`detect_scaler`, run once per controller (a walk of the GC's objects), its note logged once."""

    def __init__(self) -> None:
        self._done = False
        self._scaler: Any | None = None

    def find(self) -> Any | None:
        """The GradScaler the loop did not pass, if exactly one is in use."""
        if not self._done:
            self._done = True
            self._scaler, note = detect_scaler()
            if note:
                logger.warning("Gradience: %s", note)
        return self._scaler


def unscale(scaler: Any | None, optimizer: torch.optim.Optimizer | None) -> bool:
    """Unscale the gradients once (as clipping would) and say whether the scaler found inf/NaN."""
    if scaler is None or optimizer is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    return bool(sum(v.item() for v in state["found_inf_per_device"].values()))


_controllers: weakref.WeakSet = weakref.WeakSet()
_installed = False


def install_sigterm(controller: Any) -> None:
    """On SIGTERM, let every live controller write its ABORTED summary, then die as the signal intends.

    torchrun sends SIGTERM to the surviving ranks when one fails; without this they leave no report. The
    previous handler (a user's, or the default) is chained, so nothing else changes. Only from the main
    thread, where Python allows signal handlers.
    """
    global _installed
    _controllers.add(controller)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return

    def handler(signum: int, frame: Any) -> None:
        for c in list(_controllers):
            try:
                c.terminated("SIGTERM")
            except Exception as e:  # the report must not stop the process from ending
                logger.debug("Gradience: SIGTERM report failed: %s", e)
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
        _installed = True
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        pass


_join_depth = 0
_join_watched = False


def watch_join() -> None:
    """Count the ``torch.distributed.algorithms.Join`` contexts this process is inside (patched once).

    Under ``join()`` (uneven inputs) a rank that ran out of batches shadows DDP's collectives, not the
    guard's: the guard's next all-reduce would wait for a peer that never comes. There is no public way to
    ask whether a join context is active, so its ``__enter__``/``__exit__`` are wrapped to keep a count.
    """
    global _join_watched
    if _join_watched:
        return
    try:
        from torch.distributed.algorithms.join import Join
    except ImportError:  # torch built without distributed
        return
    enter, exit_ = Join.__enter__, Join.__exit__

    def __enter__(self: Any) -> Any:
        global _join_depth
        _join_depth += 1
        return enter(self)

    def __exit__(self: Any, *exc: Any) -> Any:
        global _join_depth
        _join_depth -= 1
        return exit_(self, *exc)

    Join.__enter__, Join.__exit__ = __enter__, __exit__
    _join_watched = True


def refuse_inside_join() -> None:
    """Raise ConfigError (before any collective, so no rank waits) when called inside a ``Join`` context."""
    if _join_depth > 0:
        raise ConfigError("Gradience does not support DDP join() (uneven inputs): a rank that ran out of batches "
                          "would leave the others waiting in the guard's all-reduce. Give every rank the same "
                          "number of steps (e.g. DistributedSampler(drop_last=True)) and call the guard outside "
                          "join()")
