"""Telemetry: JSONL events per rank and the run summary (rank 0), with redaction of long strings.

Rank 0 writes ``telemetry.jsonl``; rank r > 0 writes ``telemetry_rank{r}.jsonl``. Every event carries
``event``, ``rank`` and ``time``. Each line is flushed as it is written, so a crash leaves a readable file;
``summary.json`` is written to a temporary file and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO


def redact(value: Any, max_chars: int) -> Any:
    """Copy of ``value`` where every string longer than ``max_chars`` is cut and marked (0 = keep all)."""
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
    if hasattr(value, "value") and isinstance(value.value, str):  # str enums
        return value.value
    return value


def telemetry_filename(rank: int) -> str:
    """Per-rank telemetry file name."""
    return "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"


class Telemetry:
    """Writes events for one rank. Cheap to call; IO happens only for events actually emitted."""

    def __init__(self, out_dir: str | Path, *, rank: int = 0, redact_max_chars: int = 256,
                 append: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.redact_max_chars = redact_max_chars
        self.path = self.out_dir / telemetry_filename(rank)
        self._fh: TextIO | None = open(self.path, "a" if append else "w", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event line and return the record as written."""
        record = redact({"event": event, "rank": self.rank, "time": round(time.time(), 3), **fields},
                        self.redact_max_chars)
        if self._fh is not None:
            self._fh.write(json.dumps(record, allow_nan=False) + "\n")
            self._fh.flush()
        return record

    def write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` atomically (rank 0 only) and return what was written."""
        summary = redact(summary, self.redact_max_chars)
        if self.rank == 0:
            path = self.out_dir / "summary.json"
            tmp = path.with_name("summary.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return summary

    def close(self) -> None:
        """Close the event file (further events are dropped)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
