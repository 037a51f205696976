"""Telemetry: JSONL events per rank and the run summary, with redaction; IO errors never reach training.

This module owns the telemetry files. Rank 0 writes ``telemetry.jsonl``; rank r > 0 writes
``telemetry_rank{r}.jsonl``. Every event carries ``event``, ``rank`` and ``time``. Each line is written
with one unbuffered ``write`` as it is emitted, so a crash leaves a readable file; the summary is written
to a temporary file and renamed, so it is either complete or absent. Every record is also handed to
:class:`gradience.logs.EventLogger`, which decides whether and how it becomes a log line.

IO failures (disk full, file too large, read-only or over-quota filesystem, an ``out_dir`` that cannot be
created) are caught, counted in :attr:`Telemetry.dropped_events` / :attr:`Telemetry.failed_summaries` and
reported once on the ``gradience.telemetry`` logger at ERROR; writing is retried on every later event
(a failed write costs one system call) and its recovery is logged once. Programming errors are not
caught: a value JSON cannot encode raises ``TypeError`` before any IO happens.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from gradience.logs import EventLogger

io_logger = logging.getLogger("gradience.telemetry")

#: Failure episodes (fail ... recover) reported per file kind; a flapping disk must not flood the log.
MAX_IO_REPORTS = 3


def redact(value: Any, max_chars: int) -> Any:
    """Copy of ``value`` where every string longer than ``max_chars`` is cut and marked (0 = keep all)."""
    if isinstance(value, enum.Enum) and isinstance(value.value, str):
        value = value.value  # a plain str: the returned record equals the line as parsed back
    if isinstance(value, str):
        if max_chars and len(value) > max_chars:
            return value[:max_chars] + f"...[redacted {len(value) - max_chars} chars]"
        return value
    if isinstance(value, dict):
        return {str(k): redact(v, max_chars) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, max_chars) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/Infinity; strict parsers reject Python's spelling of them.
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def telemetry_filename(rank: int) -> str:
    """Per-rank telemetry file name (pass the global rank, so process groups sharing a directory differ)."""
    return "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"


class _IOHealth:
    """Failure state of one kind of file: report the first error of an episode and the recovery, once each."""

    def __init__(self, what: str, unit: str, events: EventLogger) -> None:
        self.what, self.unit, self.events = what, unit, events
        self.failing = False
        self.dropped = 0  # writes lost in this episode
        self.episodes = 0

    def failed(self, path: Path, error: BaseException, dropped: int = 1) -> None:
        self.dropped += dropped
        if self.failing:
            return
        self.failing = True
        self.episodes += 1
        if self.episodes <= MAX_IO_REPORTS:
            last = "; further IO errors of this kind are not logged" if self.episodes == MAX_IO_REPORTS else ""
            self.events.local(logging.ERROR, f"could not write {self.what} to {path}: {type(error).__name__}: "
                              f"{error}; training goes on, writes are retried and dropped while they fail{last}",
                              io_logger)

    def ok(self, path: Path) -> None:
        if not self.failing:
            return
        if self.episodes <= MAX_IO_REPORTS:
            unit = self.unit if self.dropped != 1 else self.unit.rstrip("s")
            self.events.local(logging.WARNING, f"{self.what} writing to {path} recovered after "
                              f"{self.dropped} dropped {unit}", io_logger)
        self.failing, self.dropped = False, 0


class Telemetry:
    """Writes events for one rank and, where told to, the run summary. IO errors are reported, not raised.

    Args:
        out_dir: directory of the files (created if missing; if it cannot be, every write is retried later).
        rank: the GLOBAL rank: names the event file and tags every record.
        redact_max_chars: strings longer than this are cut in events and summary (0 = never).
        append: append to an existing event file (resume) instead of starting it anew.
        world_size: ranks in the run; above 1 log lines are rank-prefixed.
        group_rank: this rank in the guard's process group, the numbering of ``faulty_ranks`` (None = ``rank``).
        leader: whether this rank logs collective decisions; None = ``group_rank == 0``.
        log_all_ranks: log collective decisions on every rank too.
        summary_name: file name of the summary inside ``out_dir``.
        summary_writer: whether :meth:`write_summary` writes a file by default; None = ``rank == 0``.
    """

    def __init__(self, out_dir: str | Path, *, rank: int = 0, redact_max_chars: int = 256, append: bool = False,
                 world_size: int = 1, group_rank: int | None = None, leader: bool | None = None,
                 log_all_ranks: bool = False, summary_name: str = "summary.json",
                 summary_writer: bool | None = None, sinks: list[Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        #: Extra destinations of every record (:mod:`gradience.sinks`); a failing sink is dropped and logged.
        self.sinks = list(sinks or [])
        self.rank = rank
        self.redact_max_chars = redact_max_chars
        self.path = self.out_dir / telemetry_filename(rank)
        self.summary_name = summary_name
        self.summary_writer = rank == 0 if summary_writer is None else summary_writer
        group_rank = rank if group_rank is None else group_rank
        #: Turns each emitted record into a log line (or none); see :mod:`gradience.logs`.
        self.event_logger = EventLogger(
            rank=rank, world_size=world_size, group_rank=group_rank,
            leader=group_rank == 0 if leader is None else leader, log_all_ranks=log_all_ranks,
            summary_path=str(self.summary_path) if self.summary_writer else None)
        #: Events not written because of IO errors (the log says when it started and when it recovered).
        self.dropped_events = 0
        #: Summary writes that failed because of IO errors.
        self.failed_summaries = 0
        self._events_io = _IOHealth("telemetry", "events", self.event_logger)
        self._summary_io = _IOHealth("the summary file", "writes", self.event_logger)
        # Re-entrant: a SIGTERM handler (gradience.guardrails) may emit while this thread is inside emit().
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._closed = False
        self._truncate = not append  # until the file is first opened
        error = self._open()
        if error is not None:
            self._events_io.failed(self.path, error, dropped=0)

    @property
    def summary_path(self) -> Path:
        """Where :meth:`write_summary` writes by default."""
        return self.out_dir / self.summary_name

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event line (and log it, see :mod:`gradience.logs`); return the record as written.

        Raises ``TypeError`` for a value JSON cannot encode (a programming error); never for IO.
        """
        record = redact({"event": event, "rank": self.rank, "time": round(time.time(), 3), **fields},
                        self.redact_max_chars)
        data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            if not self._closed:
                self._write(data)
            self.event_logger.handle(record)
            for sink in list(self.sinks):
                try:
                    sink.handle(record)
                except Exception as e:  # an optional sink must never stop training
                    self.sinks.remove(sink)
                    self.event_logger.local(logging.ERROR, f"telemetry sink {type(sink).__name__} failed and is "
                                            f"switched off: {type(e).__name__}: {e}", io_logger)
        return record

    def write_summary(self, summary: dict[str, Any], *, name: str | None = None,
                      force: bool = False) -> dict[str, Any]:
        """Write the summary atomically and return it (redacted), whether or not the write succeeded.

        Writes ``out_dir/(name or summary_name)`` when this rank is the summary writer or ``force`` is
        set (the caller decides who writes, e.g. a survivor when rank 0 died); otherwise only redacts.
        Raises ``TypeError`` for a value JSON cannot encode; never for IO.
        """
        summary = redact(summary, self.redact_max_chars)
        if not (self.summary_writer or force):
            return summary
        text = json.dumps(summary, indent=2, allow_nan=False)  # before any IO: a bad value leaves no file
        path = self.out_dir / (name or self.summary_name)
        # Per-process temporary name: process groups sharing out_dir may write the same summary name.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with self._lock:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                self.failed_summaries += 1
                self._summary_io.failed(path, e)
                return summary
            self._summary_io.ok(path)
        return summary

    def close(self) -> None:
        """Log what is still pending and close the event file (later events are logged, not written)."""
        with self._lock:
            self.event_logger.flush()
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception as e:  # closing is best effort, like the writes
                    self.event_logger.local(logging.ERROR, f"closing telemetry sink {type(sink).__name__} "
                                            f"failed: {e}", io_logger)
            self.sinks = []
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as e:  # e.g. a network filesystem reporting a late write error
                    self._events_io.failed(self.path, e)

    # ------------------------------------------------------------------------------------------ IO
    def _open(self) -> OSError | None:
        """Open the event file; the error when that fails."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if self._truncate else 0)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            return e
        self._truncate = False
        return None

    def _write(self, data: bytes) -> None:
        done = 0
        try:
            if self._fd is None:  # out_dir could not be created or the file opened: retry
                error = self._open()
                if error is not None:
                    raise error
            while done < len(data):
                n = os.write(self._fd, data[done:])
                if n <= 0:
                    raise OSError(f"write returned {n}")
                done += n
        except OSError as e:
            if done:
                self._cut(done)
            self.dropped_events += 1
            self._events_io.failed(self.path, e)
            return
        self._events_io.ok(self.path)

    def _cut(self, partial: int) -> None:
        """Remove the ``partial`` bytes of a line that did not fit, so the file stays valid JSONL."""
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            os.ftruncate(self._fd, end - partial)  # shrinking needs no space, so it works on a full disk
        except OSError:
            pass
