"""Log lines for telemetry events: the one place that turns an event record into a message.

:class:`~gradience.telemetry.Telemetry` hands every record it emits to an :class:`EventLogger`, so the
controller emits each event once and never formats a message itself. This module owns:

* the wording and level of each event's line, on the ``gradience`` logger (never ``print``);
* the rank prefix (``Gradience [rank 1/2]: ...`` when the world size is above 1);
* who logs what: a collective decision (every rank takes the same one) is logged by the group leader
  only, unless ``log_all_ranks``; a local observation (a probe raising here, this rank's bad tensors,
  this rank's snapshot or IO error) is logged by the rank that saw it;
* rate limiting of ``skip_step`` lines (a fault that persists must not flood the log);
* :func:`enable`, the opt-in handler for scripts that configure no logging themselves.

Formatting is tolerant: any field may be missing, None or of the wrong type, and :meth:`EventLogger.handle`
never raises -- a log line is never worth a training step.
"""

from __future__ import annotations

import enum
import logging
import math
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any, TextIO

from gradience.errors import EXIT_GUARD_HALTED

LOGGER_NAME = "gradience"
logger = logging.getLogger(LOGGER_NAME)

#: ``skip_step`` events logged one line each at the start of a burst of skips.
SKIP_BURST = 3
#: Skips beyond the burst are counted and summarised in one line every this many ...
SKIP_SUMMARY_EVERY = 100
#: ... or when a non-routine event comes; a skip this many steps after the previous one starts a new burst,
#: so sporadic skips across a long run are each still reported.
SKIP_QUIET_STEPS = 100
#: Names of tensors, ranks etc. shown in one line before "(+N more)".
LIST_LIMIT = 3

_ENABLED_MARK = "_gradience_enable"


def enable(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Print Gradience's log lines (``level`` and above) to ``stream`` (default stderr); idempotent.

    The library configures no handler. Without any logging configuration Python still prints WARNING
    and above (its last-resort handler), so faults are seen, but the INFO lines (start, summary, resume)
    are not: a script that wants them and sets up no logging of its own calls ``gradience.logs.enable()``.
    Calling it again changes the level (and stream) of the same handler instead of adding another one.
    """
    handler = next((h for h in logger.handlers if getattr(h, _ENABLED_MARK, False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        setattr(handler, _ENABLED_MARK, True)
        handler.setFormatter(logging.Formatter("%(message)s"))  # lines carry their own "Gradience" prefix
        logger.addHandler(handler)
    elif stream is not None and isinstance(handler, logging.StreamHandler):
        handler.setStream(stream)
    handler.setLevel(level)
    logger.setLevel(level)
    return handler


def prefix(rank: int, world_size: int) -> str:
    """``"Gradience: "`` for one process, ``"Gradience [rank 1/2]: "`` otherwise."""
    return f"Gradience [rank {rank}/{world_size}]: " if world_size > 1 else "Gradience: "


# ------------------------------------------------------------------------------------------------ pieces
def _t(x: Any) -> str:
    """Any field as short text: enums by value, nan/inf spelled out, floats to 4 significant digits."""
    if x is None:
        return "?"
    if isinstance(x, enum.Enum):  # str enums format as "Reason.X" on Python 3.11+
        x = x.value
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        s = f"{x:.4g}"
        if "e" in s:  # 1.5e-05 -> 1.5e-5
            mantissa, exp = s.split("e")
            s = f"{mantissa}e{int(exp)}"
        return s
    return str(x)  # ints; strings (telemetry records already spell non-finite floats "nan"/"inf")


def _listed(items: Any, more: int = 0, limit: int = LIST_LIMIT) -> str:
    """``"a, b, c (+N more)"``; ``more`` counts items the caller already left out."""
    if items is None:
        items = []
    elif isinstance(items, (str, int, float)) or not hasattr(items, "__iter__"):
        items = [items]
    items = [_t(i) for i in items]
    extra = len(items) - limit if len(items) > limit else 0
    text = ", ".join(items[:limit])
    extra += more if isinstance(more, int) and more > 0 else 0
    return f"{text} (+{extra} more)" if extra else text


def _plural(n: Any, word: str) -> str:
    return f"{_t(n)} {word}" + ("" if n == 1 else "s")


def _on_ranks(ranks: Any) -> str:
    """``" on rank 1"``, ``" on ranks 0, 1"`` or ``""`` when unknown."""
    if ranks is None or ranks == [] or ranks == ():
        return ""
    if isinstance(ranks, (list, tuple)) and len(ranks) > 1:
        return f" on ranks {_listed(ranks, limit=8)}"
    return f" on rank {_listed(ranks)}"


def _bad_names(record: Mapping[str, Any]) -> tuple[list[str], int]:
    """This rank's offending tensors: ``bad={"params", "buffers", "more"}`` or the older list fields."""
    bad = record.get("bad")
    if bad is None:
        bad = record.get("local_bad_grads") or record.get("local_bad_params") or record.get("local_bad")
    if isinstance(bad, Mapping):
        params = bad.get("params") or []
        buffers = bad.get("buffers") or []
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        buffers = list(buffers) if isinstance(buffers, (list, tuple)) else [buffers]
        more = bad.get("more")
        return [str(p) for p in params] + [f"{b} (buffer)" for b in buffers], more if isinstance(more, int) else 0
    if isinstance(bad, (list, tuple)):
        return [str(b) for b in bad], 0
    return ([str(bad)] if bad else []), 0


def _in_bad(names: list[str], more: int) -> str:
    return f" in {_listed(names, more)}" if names else ""


def _evidence(lg: EventLogger, record: Mapping[str, Any], names: list[str]) -> bool:
    """Whether this rank reports its offending tensors although it is not the leader.

    Under data parallelism a NaN gradient reaches every replica through the all-reduce, so every rank holds
    the same evidence: only the first faulty rank reports it (the leader's own line carries the leader's).
    """
    if not names:
        return False
    ranks = record.get("faulty_ranks")
    if isinstance(ranks, (list, tuple)) and ranks and all(isinstance(x, int) for x in ranks):
        return lg.group_rank == min(ranks)
    return True  # faulty ranks unknown: a duplicate line beats a lost one


def _at(step: Any) -> str:
    return f" at step {_t(step)}" if step is not None else ""


# ------------------------------------------------------------------------------------------------ logger
class EventLogger:
    """Turns one rank's telemetry records into log lines (see the module docstring for the rules).

    Args:
        rank: this process's rank (as shown in the prefix).
        group_rank: this process's rank in the guard's process group, the numbering of ``faulty_ranks``
            (None = ``rank``).
        world_size: number of ranks; above 1 every line is rank-prefixed.
        leader: whether this rank logs collective decisions (group rank 0).
        log_all_ranks: log collective decisions on every rank, not just the leader.
        summary_path: where this rank writes the summary, named in ``abort``/``summary`` lines when the
            record does not say.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, leader: bool = True, log_all_ranks: bool = False,
                 summary_path: str | None = None, group_rank: int | None = None,
                 log: logging.Logger | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.group_rank = rank if group_rank is None else group_rank
        self.leader, self.log_all_ranks = leader, log_all_ranks
        self.summary_path = summary_path
        self.logger = log or logger
        self.prefix = prefix(rank, world_size)
        self._burst = 0  # skips logged individually in the current burst
        self._last_skip_step: Any = None
        self._pending = 0  # skips counted but not yet logged
        self._pending_first: Any = None
        self._pending_last: Any = None
        self._pending_reasons: Counter[str] = Counter()

    # ---------------------------------------------------------------------------------------- public
    def handle(self, record: Mapping[str, Any]) -> None:
        """Log ``record`` (a telemetry event) if this rank should; never raises."""
        try:
            self._handle(record)
        except Exception:  # a malformed record must not break the step that emitted it
            try:
                self.logger.debug("%scould not format an event", self.prefix, exc_info=True)
            except Exception:
                pass

    def flush(self) -> None:
        """Log the summary of skips not yet reported (call before closing); never raises."""
        try:
            if self._pending:
                reasons = ", ".join(f"{r} x{n}" for r, n in self._pending_reasons.most_common())
                self._log(logging.WARNING, f"skipped {_plural(self._pending, 'more update')} since step "
                          f"{_t(self._pending_first)} (last at step {_t(self._pending_last)}; {reasons})")
        except Exception:
            pass
        self._pending, self._pending_first, self._pending_last = 0, None, None
        self._pending_reasons = Counter()

    def local(self, level: int, message: str, log: logging.Logger | None = None) -> None:
        """Log a local observation (always, on this rank), rank-prefixed; never raises."""
        try:
            (log or self.logger).log(level, "%s%s", self.prefix, message)
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------- dispatch
    def _log(self, level: int, message: str) -> None:
        self.logger.log(level, "%s%s", self.prefix, message)

    def _handle(self, record: Mapping[str, Any]) -> None:
        event = record.get("event")
        if event != "skip_step" and not _routine(record):
            self.flush()  # keep the log in order: the skips came before this event
            self._burst = 0  # the situation changed: the next skips are news again
        formatter = _FORMATTERS.get(event) if isinstance(event, str) else None
        if formatter is None:
            if not self.logger.isEnabledFor(logging.DEBUG):
                return
            self._log(logging.DEBUG, f"event {event}: " + ", ".join(
                f"{k}={v}" for k, v in record.items() if k not in ("event", "rank", "time")))
            return
        out = formatter(self, record)
        if out is None:
            return
        level, message, local = out
        if not (local or self.leader or self.log_all_ranks):
            return
        if event == "skip_step":
            self._skip(record, level, message)
        else:
            self._log(level, message)

    def _skip(self, record: Mapping[str, Any], level: int, message: str) -> None:
        step = record.get("step")
        last = self._last_skip_step
        if isinstance(step, int) and isinstance(last, int) and step - last >= SKIP_QUIET_STEPS:
            self.flush()
            self._burst = 0
        self._last_skip_step = step
        if self._burst < SKIP_BURST:
            self._burst += 1
            if self._burst == SKIP_BURST:
                message += f"; further skips are summarised every {SKIP_SUMMARY_EVERY}"
            self._log(level, message)
            return
        if not self._pending:
            self._pending_first = step
        self._pending += 1
        self._pending_last = step
        self._pending_reasons[_t(record.get("reason"))] += 1
        if self._pending >= SKIP_SUMMARY_EVERY:
            self.flush()


def _routine(record: Mapping[str, Any]) -> bool:
    """Heartbeat events that neither end a burst of skips nor flush its summary."""
    return record.get("event") == "telemetry" or (record.get("event") == "snapshot" and bool(record.get("committed")))


# ------------------------------------------------------------------------------------------------ events
# Each formatter returns (level, message, local) -- ``local``: this rank saw something the leader did not,
# so it logs even when it is not the leader -- or None for nothing to log.
_Out = tuple[int, str, bool] | None


def _skip_step(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    names, more = _bad_names(r)
    norm = f" (grad norm {_t(r.get('grad_norm'))})" if r.get("grad_norm") is not None else ""
    detail = f" [{_t(r.get('detail'))}]" if r.get("detail") else ""
    msg = (f"skipped the update of step {_t(r.get('step'))}: {_t(r.get('reason'))}{_on_ranks(r.get('faulty_ranks'))}"
           f"{norm}{_in_bad(names, more)}{detail}")
    return logging.WARNING, msg, _evidence(lg, r, names)


def _rollback_success(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    names, more = _bad_names(r)
    lr = f" (lr {_t(r.get('lr'))})" if r.get("lr") is not None else ""
    src = f" (read from {_t(r['restored_from'])})" if r.get("restored_from") else ""
    judged = r.get("verdict_step")
    late = (f" for a fault of step {_t(judged)}, discarding step {_t(r.get('step'))}"
            if judged is not None and judged != r.get("step") else "")
    msg = (f"rolled back{_at(r.get('step'))} to the snapshot of step {_t(r.get('to_step'))}{src}{late} "
           f"({_t(r.get('reason'))}{_on_ranks(r.get('faulty_ranks'))}{_in_bad(names, more)}); "
           f"LR scale now {_t(r.get('lr_scale'))}{lr}; rollback {_t(r.get('total_rollbacks'))}")
    return logging.WARNING, msg, _evidence(lg, r, names)


def _rollback_failed(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    local_ok = r.get("local_ok")
    where = " (unreadable on this rank)" if local_ok is False else ""
    msg = (f"could not roll back{_at(r.get('step'))} to the snapshot of step {_t(r.get('to_step'))}: "
           f"{_t(r.get('reason'))}{where}; trying an older snapshot if one is left")
    return logging.WARNING, msg, local_ok is False


def _abort(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    reason, error = r.get("reason"), r.get("error")
    rollbacks = r.get("total_rollbacks")
    after = f" after {_plural(rollbacks, 'rollback')}" if rollbacks is not None else ""
    detail = f" ({_t(error)})" if error else ""
    where = r.get("summary_path") or lg.summary_path
    see = f"; see {_t(where)}" if where else ""
    msg = (f"halted training{_at(r.get('step'))}: {_t(reason)}{after}{_on_ranks(r.get('faulty_ranks'))}{detail}; "
           f"exit status {EXIT_GUARD_HALTED}{see}")
    # A timeout is seen by each surviving rank on its own (the leader may be the rank that died); a restore
    # error names this rank's failure. Both are local; a policy halt is a collective decision.
    local = reason == "CONSENSUS_TIMEOUT" or bool(r.get("local_error")) or (
        isinstance(error, str) and error.startswith("on this rank"))
    return logging.ERROR, msg, local


def _fault(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    msg = (f"monitor mode: {_t(r.get('reason'))}{_at(r.get('step'))}{_on_ranks(r.get('faulty_ranks'))} "
           f"— guard disabled, nothing was done")
    return logging.WARNING, msg, False


def _probe_error(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    phase = r.get("phase")
    what = f"the {_t(phase)} probe" if phase else "a probe"
    msg = f"{what} raised{_at(r.get('step'))}: {_t(r.get('error'))}"
    if r.get("disabled"):
        return logging.ERROR, msg + "; this check is disabled for the rest of the run", True
    return logging.WARNING, msg, True


def _snapshot(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    step, error = r.get("step"), r.get("local_error")
    if r.get("committed") and r.get("in_memory"):
        return logging.DEBUG, (f"snapshot of step {_t(step)} committed in memory (a rollback target now; its shard "
                               "is being written in the background)"), False
    if r.get("committed"):
        return logging.DEBUG, f"snapshot of step {_t(step)} committed ({_t(r.get('tier'))}, {_t(r.get('path'))})", False
    if r.get("abandoned_at") is not None and r.get("fault") is False:
        # The asynchronous verdict copies a step before it is judged; its verdict kept it from being a snapshot.
        return logging.DEBUG, (f"dropped the copy of step {_t(step)} taken ahead of its verdict: that step is not "
                               "a snapshot (its update was skipped, or no reaction called for one)"), False
    if r.get("abandoned_at") is not None or (isinstance(error, str) and error.startswith("abandoned")):
        # Dropping an in-flight snapshot because a fault came first is the guard working, not a problem.
        return logging.INFO, f"dropped the pending snapshot of step {_t(step)}: a fault came before its commit", False
    why = f": {_t(error)}" if error else " (failed on another rank)"
    return logging.WARNING, f"snapshot of step {_t(step)} was not committed{why}", bool(error)


def _persist(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    step = _t(r.get("step"))
    if r.get("event") == "snapshot_persisted":
        return logging.DEBUG, f"snapshot of step {step} written to disk ({_t(r.get('path'))})", False
    error = r.get("local_error")
    return (logging.WARNING, f"snapshot of step {step} could not be written to disk: {_t(error)}; it stays a "
            "rollback target while its in-memory copy is held", bool(error) and error != "another rank failed")


def _lr_backoff_unavailable(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    detail = f": {_t(r.get('detail'))}" if r.get("detail") else ""
    return logging.WARNING, f"LR backoff unavailable{_at(r.get('step'))}{detail}; rollbacks keep the LR", False


def _resume(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    if r.get("step") is None and r.get("detail"):
        return logging.INFO, f"resume: {_t(r.get('detail'))}", False
    path = f" ({_t(r.get('path'))})" if r.get("path") else ""
    scale = f"; LR scale {_t(r.get('lr_scale'))}" if r.get("lr_scale") is not None else ""
    return logging.INFO, f"resumed at step {_t(r.get('step'))}{path}{scale}", False


def _start(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    config = r.get("config") if isinstance(r.get("config"), Mapping) else {}
    guard = config.get("guard_enabled")
    mode = "guard on" if guard else ("monitor mode (guard off)" if guard is not None else "started")
    out = f", out_dir {_t(config.get('out_dir'))}" if config.get("out_dir") else ""
    ws = r.get("world_size")
    ranks = f", {_plural(ws, 'rank')}" if isinstance(ws, int) and ws > 1 else ""
    return logging.INFO, f"{mode}{out}{ranks}", False


def _summary(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    s = r.get("summary") if isinstance(r.get("summary"), Mapping) else r
    g = s.get("guard") if isinstance(s.get("guard"), Mapping) else s
    status = g.get("integrity_status")
    halt = f" ({_t(g.get('halt_reason'))})" if g.get("halt_reason") else ""
    where = r.get("summary_path") or s.get("summary_path") or lg.summary_path
    msg = (f"{_t(status)}{halt}, {_plural(g.get('total_rollbacks'), 'rollback')}, "
           f"{_plural(g.get('total_skipped_steps'), 'skipped update')}, LR scale {_t(g.get('lr_scale'))}"
           + (f" — {_t(where)}" if where else ""))
    # ABORTED (halted) and FAULTED (faults left unhandled in monitor mode) need attention; OK/RECOVERED do not.
    level = logging.WARNING if _t(status) in ("ABORTED", "FAULTED") else logging.INFO
    return level, msg, False


def _telemetry(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    if not lg.logger.isEnabledFor(logging.DEBUG):
        return None
    return (logging.DEBUG, f"step {_t(r.get('step'))}: loss {_t(r.get('train_loss'))}, lr {_t(r.get('lr'))}, "
            f"LR scale {_t(r.get('lr_scale'))}, weight norm {_t(r.get('weight_norm'))}", True)


def _spike(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    return (logging.WARNING, f"spike{_at(r.get('step'))}: {_t(r.get('detail'))} (spike_action: log; the update "
            "went ahead)", False)


def _risk_reaction(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    return logging.WARNING, f"{_t(r.get('detail'))}{_at(r.get('step'))} (κ̃ {_t(r.get('kappa'))})", False


def _spectral_definition(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    level = logging.WARNING if r.get("fallback") else logging.INFO
    return level, f"spectral probe κ̃ = {_t(r.get('detail'))}", False


def _risk_level(lg: EventLogger, r: Mapping[str, Any]) -> _Out:
    level = _t(r.get("level"))
    loud = level in ("WARNING", "DANGER", "INSTABILITY")
    return (logging.WARNING if loud else logging.INFO,
            f"spectral risk {_t(r.get('previous'))} -> {level}{_at(r.get('step'))}: κ̃ {_t(r.get('kappa'))}, "
            f"slope {_t(r.get('slope'))}/step, volatility {_t(r.get('volatility'))}", False)


_FORMATTERS = {
    "risk_reaction": _risk_reaction,
    "spike": _spike,
    "spectral_definition": _spectral_definition,
    "risk_level": _risk_level,
    "skip_step": _skip_step,
    "rollback_success": _rollback_success,
    "rollback_failed": _rollback_failed,
    "abort": _abort,
    "fault": _fault,
    "probe_error": _probe_error,
    "snapshot": _snapshot,
    "snapshot_persisted": _persist,
    "snapshot_persist_failed": _persist,
    "lr_backoff_unavailable": _lr_backoff_unavailable,
    "resume": _resume,
    "start": _start,
    "summary": _summary,
    "telemetry": _telemetry,
}
