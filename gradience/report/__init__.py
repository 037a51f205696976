"""``gradience report``: turn a run's ``out_dir`` into ``report.html`` and ``report.png``.

This package owns the post-hoc report. It reads only the files a run wrote (``telemetry*.jsonl``,
``summary*.json``) and never the controller, so it works on a copy of ``out_dir`` and on a run in progress.
matplotlib and rich are optional (the ``report`` extra) and imported only when a report is drawn.

    from gradience.report import build_report
    result = build_report("gradience_logs")   # writes report.html and report.png there
    result.run.status, result.summary, result.html_path

Modules: :mod:`~gradience.report.load` (parsing), :mod:`~gradience.report.figure` (matplotlib),
:mod:`~gradience.report.html` (the page), :mod:`~gradience.report.terminal` (the CLI's table).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.report.deps import INSTALL_HINT, MissingDependency, require
from gradience.report.load import Event, FaultRow, RankLog, ReportError, Run, load_run

logger = logging.getLogger("gradience.report")

__all__ = ["INSTALL_HINT", "Event", "FaultRow", "MissingDependency", "RankLog", "ReportError", "ReportResult", "Run",
           "build_report", "load_run"]


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote, and the run it read."""

    html_path: Path
    png_path: Path
    run: Run

    @property
    def summary(self) -> dict[str, Any] | None:
        """The run's parsed summary (None while the run has not written one)."""
        return self.run.summary

    @property
    def status(self) -> str:
        """OK, RECOVERED, ABORTED, FAULTED, or IN PROGRESS without a summary."""
        return self.run.status


def _write_atomic(path: Path, data: bytes) -> None:
    # A browser refreshing the page of a live run must never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_report(out_dir: str | Path, *, dest: str | Path | None = None) -> ReportResult:
    """Read the run in ``out_dir`` and write ``report.html`` and ``report.png`` to ``dest`` (default: ``out_dir``).

    Raises :class:`ReportError` when ``out_dir`` holds no run, :class:`MissingDependency` when matplotlib or
    rich is missing, and ``OSError`` when ``dest`` cannot be written.
    """
    require()
    from gradience.report.figure import png_bytes
    from gradience.report.html import render_html

    run = load_run(out_dir)
    target = Path(dest) if dest is not None else run.out_dir
    target.mkdir(parents=True, exist_ok=True)
    png = png_bytes(run)
    html_path, png_path = target / "report.html", target / "report.png"
    _write_atomic(png_path, png)
    _write_atomic(html_path, render_html(run, png, png_name=png_path.name).encode("utf-8"))
    for warning in run.warnings:
        logger.info("%s", warning)
    logger.info("report of %s (%s) written to %s", run.out_dir, run.status, html_path)
    return ReportResult(html_path=html_path, png_path=png_path, run=run)
