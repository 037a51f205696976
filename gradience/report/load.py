"""Reading a run's ``out_dir``: the telemetry JSONL of every rank and the summaries, as a :class:`Run`.

This module owns the parsed view of a run. It reads files only -- it never imports torch or the controller --
so it works on a copy of ``out_dir`` on another machine and on a run that is still writing: a last line cut
short (a run in progress, or a crash mid-write) is skipped and counted, never an error.

Steps on the x axis. Step labels come from the training loop and may go backwards (a loop that restarts its
count every epoch, or a resumed run). Each rank's events keep their file order, and a "clock" event whose step
is lower than the previous one starts a new segment that is placed right after the last one, so ``Event.x``
always grows with file order while staying equal to the step label in a run whose count never restarts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError

logger = logging.getLogger("gradience.report")

#: Events whose ``step`` is the training step at which they were emitted: they advance the x clock.
CLOCK_EVENTS = frozenset({"telemetry", "skip_step", "rollback_success", "rollback_failed", "fault", "abort",
                          "probe_error", "lr_backoff_unavailable", "resume"})
#: Events shown in the fault table, in display words.
FAULT_EVENTS = {"skip_step": "skipped update", "rollback_success": "rolled back", "rollback_failed": "rollback failed",
                "abort": "halted", "fault": "fault (monitor mode)"}

_TELEMETRY_RE = re.compile(r"^telemetry(?:_rank(\d+))?\.jsonl$")
_SUMMARY_RE = re.compile(r"^summary(?:_rank(\d+))?\.json$")


class ReportError(GradienceError):
    """``out_dir`` is missing or holds no telemetry or summary file: there is no run to report."""


def num(value: Any) -> float | None:
    """A telemetry number as a float: ints and floats as they are, "nan"/"inf"/"-inf" as non-finite floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


@dataclass(frozen=True)
class Event:
    """One telemetry line: its name, the rank whose file held it, where it sits, and its raw fields."""

    name: str
    rank: int
    index: int  # line position among the file's readable events
    step: int | None  # the ``step`` field when it is an int
    x: float | None  # position on the plotted step axis (see the module docstring); None before any clock
    time: float | None
    fields: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """A raw field of the event."""
        return self.fields.get(key, default)


@dataclass
class RankLog:
    """The events of one rank's telemetry file, in file order."""

    rank: int
    path: Path
    events: list[Event]
    bad_lines: int = 0  # unreadable lines, the incomplete last one included
    incomplete_last_line: bool = False  # a run in progress, or a crash mid-write
    restarts: int = 0  # times the step count went backwards

    def of(self, *names: str) -> list[Event]:
        """Events with one of ``names``, in file order."""
        return [e for e in self.events if e.name in names]


@dataclass
class FaultRow:
    """One guard action or fault, merged across the ranks whose files report it."""

    step: int | None
    x: float | None
    event: str  # telemetry event name
    action: str  # display words, see FAULT_EVENTS
    reason: str
    faulty_ranks: list[int]
    reported_by: list[int] = field(default_factory=list)
    tensors: dict[int, list[str]] = field(default_factory=dict)  # rank -> offending tensors it named
    more: dict[int, int] = field(default_factory=dict)  # rank -> tensors left unnamed
    detail: str = ""
    to_x: float | None = None  # rollbacks: the target's position on the step axis


@dataclass
class Run:
    """Everything a run wrote to ``out_dir`` that a report shows; see :func:`load_run`."""

    out_dir: Path
    ranks: dict[int, RankLog]  # global rank -> its telemetry
    summary: dict[str, Any] | None  # the run's summary; None while there is none yet
    summary_source: str | None  # where ``summary`` came from (a file name, or "summary event in <file>")
    rank_summaries: dict[int, tuple[str, dict[str, Any]]]  # global rank -> (source, summary)
    warnings: list[str] = field(default_factory=list)

    @property
    def primary(self) -> RankLog | None:
        """Rank 0's telemetry, else the lowest rank's (rank 0 may have died or its file may be missing)."""
        return self.ranks[min(self.ranks)] if self.ranks else None

    @property
    def start(self) -> dict[str, Any]:
        """Fields of the primary rank's first ``start`` event ({} when there is none)."""
        p = self.primary
        starts = p.of("start") if p else []
        return starts[0].fields if starts else {}

    @property
    def world_size(self) -> int | None:
        """Ranks in the run, from the summary or the start event."""
        ws = (self.summary or {}).get("world_size", self.start.get("world_size"))
        return ws if isinstance(ws, int) else None

    @property
    def in_progress(self) -> bool:
        """No summary yet: the run is still going, or it stopped before writing one."""
        return self.summary is None

    @property
    def guard(self) -> dict[str, Any]:
        """The summary's ``guard`` section ({} without a summary)."""
        g = (self.summary or {}).get("guard")
        return g if isinstance(g, dict) else {}

    @property
    def aborts(self) -> list[Event]:
        """Abort events of every rank (a timeout is seen by each survivor on its own)."""
        return [e for log in self.ranks.values() for e in log.of("abort")]

    @property
    def status(self) -> str:
        """OK, RECOVERED, ABORTED or FAULTED from the summary; without one ABORTED if an abort was logged,
        else IN PROGRESS."""
        if self.summary is not None:
            return str(self.guard.get("integrity_status") or "UNKNOWN")
        return "ABORTED" if self.aborts else "IN PROGRESS"

    @property
    def status_note(self) -> str:
        """One line on where the status comes from."""
        if self.summary is not None:
            return f"from {self.summary_source}"
        if self.aborts:
            return "no summary written; status from the abort event"
        return "no summary yet: the run is in progress, or it stopped before writing one"

    @property
    def last_step(self) -> int | None:
        """The highest step label any clock event reported."""
        steps = [e.step for log in self.ranks.values() for e in log.events
                 if e.name in CLOCK_EVENTS and e.step is not None]
        return max(steps) if steps else None

    @property
    def restarts(self) -> int:
        """Times the primary rank's step count went backwards (0 for most runs)."""
        return self.primary.restarts if self.primary else 0

    def telemetry(self, rank: int | None = None) -> list[Event]:
        """``telemetry`` events of ``rank`` (default: the primary rank)."""
        log = self.ranks.get(rank) if rank is not None else self.primary
        return log.of("telemetry") if log else []

    def faults(self) -> list[FaultRow]:
        """Skips, rollbacks, failed rollbacks, halts and monitor-mode faults, one row per occurrence.

        The same decision is logged by every rank; rows are merged on (event, step, reason, occurrence) and
        list the ranks that reported them, and each rank's named tensors (only a faulty rank names them)."""
        rows: dict[tuple[Any, ...], FaultRow] = {}
        for rank in sorted(self.ranks):
            seen: dict[tuple[Any, ...], int] = {}
            for e in self.ranks[rank].of(*FAULT_EVENTS):
                base = (e.name, e.step, str(e.get("reason")))
                seen[base] = seen.get(base, 0) + 1
                key = (*base, seen[base])
                row = rows.get(key)
                if row is None:
                    row = rows[key] = _fault_row(e, self.ranks[rank])
                row.reported_by.append(rank)
                bad = e.get("bad")
                if isinstance(bad, dict):
                    names = [str(n) for k in ("params", "buffers") for n in (bad.get(k) or [])]
                    if names:
                        row.tensors[rank] = names
                    if isinstance(bad.get("more"), int) and bad["more"] > 0:
                        row.more[rank] = bad["more"]
        return sorted(rows.values(), key=lambda r: (r.x is None, r.x if r.x is not None else 0.0))

    def probe_errors(self) -> list[Event]:
        """``probe_error`` events of every rank, by step position."""
        events = [e for log in self.ranks.values() for e in log.of("probe_error")]
        return sorted(events, key=lambda e: (e.x is None, e.x or 0.0, e.rank))

    def notes(self) -> list[Event]:
        """Events worth a line that are neither faults nor probe errors (``lr_backoff_unavailable``, ``resume``)."""
        p = self.primary
        return p.of("lr_backoff_unavailable", "resume") if p else []

    def spectral(self) -> list[Event]:
        """The primary rank's telemetry events that carry a κ̃ value."""
        return [e for e in self.telemetry() if num(e.get("spectral_kappa")) is not None]


def _fault_row(e: Event, log: RankLog) -> FaultRow:
    faulty = e.get("faulty_global_ranks", e.get("faulty_ranks")) or []
    row = FaultRow(step=e.step, x=e.x, event=e.name, action=FAULT_EVENTS[e.name], reason=str(e.get("reason") or ""),
                   faulty_ranks=[r for r in faulty if isinstance(r, int)])
    if e.name == "rollback_success":
        to_step, scale = e.get("to_step"), e.get("lr_scale")
        row.detail = f"to step {to_step}" + (f", LR scale {scale:g}" if isinstance(scale, (int, float)) else "")
        if e.get("replicas_repaired"):
            row.detail += ", replicas repaired"
        row.to_x = _target_x(e, log)
    elif e.name == "rollback_failed":
        row.detail = f"snapshot of step {e.get('to_step')} unusable" + (
            " (unreadable on this rank)" if e.get("local_ok") is False else "")
    elif e.name == "skip_step" and e.get("grad_norm") is not None:
        row.detail = f"grad norm {_fmt(e.get('grad_norm'))}"
    elif e.name == "abort":
        rollbacks = e.get("total_rollbacks")
        row.detail = "; ".join(s for s in (str(e.get("error") or ""),
                                           f"after {rollbacks} rollback(s)" if rollbacks is not None else "") if s)
    return row


def _target_x(e: Event, log: RankLog) -> float | None:
    """Where a rollback's target step sits on the x axis: in the same segment as the rollback."""
    to_step = e.get("to_step")
    if not isinstance(to_step, int) or e.x is None or e.step is None:
        return None
    return min(e.x, e.x - (e.step - to_step))


def _fmt(value: Any) -> str:
    v = num(value)
    return str(value) if v is None else (f"{v:.4g}" if math.isfinite(v) else str(value))


def read_events(path: Path, rank: int) -> RankLog:
    """Parse one telemetry file; unreadable lines (a truncated last one above all) are skipped and counted."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    # A file written line by line ends with "\n"; anything after the last one is a line still being written.
    incomplete = bool(lines and lines[-1].strip())
    records: list[dict[str, Any]] = []
    bad = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
            if not (incomplete and i == len(lines) - 1):
                logger.warning("%s line %d is not JSON; skipped", path, i + 1)
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
        else:
            bad += 1
    if incomplete and bad == 0:
        incomplete = False  # a complete last record whose newline is not written yet
    log = RankLog(rank=rank, path=path, events=[], bad_lines=bad, incomplete_last_line=incomplete)
    log.events, log.restarts = _place(records, rank)
    return log


def _place(records: Iterable[dict[str, Any]], rank: int) -> tuple[list[Event], int]:
    """Events with their x positions: step + offset, the offset growing whenever the step count goes back."""
    events: list[Event] = []
    offset = 0.0
    last_clock: int | None = None
    last_x: float | None = None
    restarts = 0
    for i, r in enumerate(records):
        name = r["event"]
        step = r.get("step") if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool) else None
        clock = step if name in CLOCK_EVENTS else None
        if name == "snapshot" and isinstance(r.get("committed_at"), int) and r["committed_at"] >= 0:
            clock = r["committed_at"]  # a snapshot is logged when it commits, possibly some steps after its step
        if clock is not None:
            if last_clock is not None and clock < last_clock and last_x is not None:
                offset = last_x + 1 - clock
                restarts += 1
            last_clock = clock
            last_x = max(clock + offset, last_x if last_x is not None else -math.inf)
        x = step + offset if step is not None and name in CLOCK_EVENTS | {"snapshot"} else last_x
        t = r.get("time")
        events.append(Event(name=name, rank=rank, index=i, step=step, x=x,
                            time=float(t) if isinstance(t, (int, float)) else None, fields=r))
    return events, restarts


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.append(f"{path.name} could not be read ({type(e).__name__}); ignored")
        return None
    return data if isinstance(data, dict) else None


def load_run(out_dir: str | Path) -> Run:
    """Read every telemetry and summary file in ``out_dir`` into a :class:`Run`.

    Only files are read; a run in progress (no summary, a half-written last line) loads fine.
    Raises :class:`ReportError` when ``out_dir`` is not a directory or holds neither ``telemetry*.jsonl``
    nor ``summary*.json``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ReportError(f"{out} is not a directory: pass the out_dir of a Gradience run")
    warnings: list[str] = []
    ranks: dict[int, RankLog] = {}
    rank_summaries: dict[int, tuple[str, dict[str, Any]]] = {}
    main_summary: dict[str, Any] | None = None
    for path in sorted(out.iterdir()):
        if m := _TELEMETRY_RE.match(path.name):
            rank = int(m.group(1) or 0)
            try:
                ranks[rank] = read_events(path, rank)
            except OSError as e:
                warnings.append(f"{path.name} could not be read ({e}); ignored")
        elif m := _SUMMARY_RE.match(path.name):
            data = _read_json(path, warnings)
            if data is None:
                continue
            if m.group(1) is None:
                main_summary = data
            else:
                rank_summaries[int(m.group(1))] = (path.name, data)
    if not ranks and main_summary is None and not rank_summaries:
        raise ReportError(f"{out} holds no telemetry*.jsonl or summary*.json: not the out_dir of a Gradience run "
                          "(or the run has not started writing yet)")
    # A rank's summary event stands in for a summary file it did not write (only rank 0 writes one normally).
    for rank, log in ranks.items():
        events = log.of("summary")
        if events and rank not in rank_summaries:
            fields = {k: v for k, v in events[-1].fields.items() if k not in ("event", "rank", "time", "summary_path")}
            rank_summaries[rank] = (f"summary event in {log.path.name}", fields)
        if log.incomplete_last_line:
            warnings.append(f"{log.path.name}: last line incomplete (run in progress, or it stopped mid-write); "
                            "skipped")
        if log.bad_lines > int(log.incomplete_last_line):
            warnings.append(f"{log.path.name}: {log.bad_lines - int(log.incomplete_last_line)} unreadable line(s) "
                            "skipped")
    summary, source = main_summary, "summary.json" if main_summary is not None else None
    if summary is None and rank_summaries:
        rank = min(rank_summaries)
        source, summary = rank_summaries[rank]
    if summary is not None and main_summary is None:
        warnings.append(f"summary.json missing; using the {source}")
    return Run(out_dir=out, ranks=dict(sorted(ranks.items())), summary=summary, summary_source=source,
               rank_summaries=dict(sorted(rank_summaries.items())), warnings=warnings)
