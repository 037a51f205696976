"""The report page: one self-contained HTML file (inline CSS, the figure as a base64 PNG, no script, no URL).

This module owns the page's markup. Every value from the run is escaped, and "://" in text is written as
":&#47;&#47;" so that no URL of any kind appears in the file: it opens offline and loads nothing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from gradience import __version__
from gradience.report.figure import RISK_COLOURS
from gradience.report.load import FaultRow, Run, num

STATUS_COLOURS = {"OK": "#1a7f37", "RECOVERED": "#9a6700", "FAULTED": "#bc4c00", "ABORTED": "#cf222e",
                  "IN PROGRESS": "#57606a", "UNKNOWN": "#57606a"}
MAX_ROWS = 500  # fault / probe-error rows shown; a run that skipped thousands of steps stays a readable page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;
color:#24292f;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.status{font-size:2.4em;font-weight:700;letter-spacing:.03em}.muted{color:#57606a}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f6f8fa}code{font-size:.95em}img{max-width:100%;height:auto}
.warn{color:#9a6700}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value`` with no URL scheme left in it."""
    return html.escape("" if value is None else str(value)).replace("://", ":&#47;&#47;")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "—" if v is None else str(v)


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks) or "—"


def render_html(run: Run, png: bytes | None, *, png_name: str = "report.png") -> str:
    """The page for ``run``; ``png`` is the main figure (embedded as a data URI), None to leave it out."""
    status = run.status
    colour = STATUS_COLOURS.get(status, "#57606a")
    g = run.guard
    halt = g.get("halt_reason") or next((e.get("reason") for e in run.aborts), None)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Gradience report: {esc(run.out_dir.name)} ({esc(status)})</title><style>{_CSS}</style></head><body>",
        '<section id="status">',
        f"<h1>Gradience run report: <code>{esc(run.out_dir.name)}</code></h1>",
        f'<div class="status" style="color:{colour}">{esc(status)}</div>',
        f'<p class="muted">{esc(run.status_note)}</p>',
        f"<p><b>Halt reason:</b> {esc(halt or 'none')}</p>",
    ]
    parts += [f'<p class="warn">{esc(w)}</p>' for w in run.warnings]
    parts += ["</section>", _summary_section(run), _figure_section(run, png, png_name), _fault_section(run),
              _probe_section(run), _spectral_section(run), _config_section(run)]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts.append(f'<p class="muted">Written by <code>gradience report</code> {esc(__version__)} at {stamp} from '
                 f"<code>{esc(run.out_dir)}</code>.</p></body></html>")
    return "\n".join(parts) + "\n"


def _summary_section(run: Run) -> str:
    out = ['<section id="summary"><h2>Summary</h2>']
    s = run.summary
    if s is None:
        steps = f"; last step seen: {run.last_step}" if run.last_step is not None else ""
        out.append(f"<p><b>No summary yet</b> (run in progress, or it stopped before writing one){esc(steps)}.</p>")
    else:
        rows = [(k, _value(v)) for k, v in s.items() if not isinstance(v, dict)]
        for section in ("guard", "spectral"):
            if isinstance(s.get(section), dict):
                rows += [(f"{section}.{k}", _value(v)) for k, v in s[section].items()]
        out.append(f'<p class="muted">From {esc(run.summary_source)}.</p>' + _table(("key", "value"), rows))
    if len(run.rank_summaries) > 1 or (run.rank_summaries and min(run.rank_summaries) != 0):
        out.append("<h3>Per rank</h3>")
        rows = []
        for rank, (source, rs) in run.rank_summaries.items():
            rg = rs.get("guard") if isinstance(rs.get("guard"), dict) else {}
            rows.append((rank, rg.get("integrity_status"), rg.get("halt_reason") or "—", _value(rs.get("final_step")),
                         _value(rs.get("final_loss")), _value(rg.get("total_rollbacks")),
                         _value(rg.get("total_skipped_steps")), _value(rs.get("weights_fingerprint")), source))
        out.append(_table(("rank", "status", "halt reason", "final step", "final loss", "rollbacks", "skips",
                           "weights fingerprint", "from"), rows))
    out.append("</section>")
    return "\n".join(out)


def _figure_section(run: Run, png: bytes | None, png_name: str) -> str:
    out = ['<section id="figure"><h2>Loss, LR and guard actions</h2>']
    if png is None:
        out.append("<p>No figure.</p>")
    else:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<img alt="loss, LR and LR scale over steps, with snapshots, skips and rollbacks marked" '
                   f'src="data:image/png;base64,{data}">')
        out.append(f'<p class="muted">Same figure as <code>{esc(png_name)}</code>. x axis: the step label'
                   + (", with segments where the step count restarted placed one after another" if run.restarts
                      else "") + ". Green triangles: committed snapshots; orange dashed lines: skipped updates; "
                   "red lines and arrows: rollbacks from the fault step to the snapshot's step.</p>")
    out.append("</section>")
    return "\n".join(out)


def _tensors(row: FaultRow) -> str:
    parts = []
    for rank, names in sorted(row.tensors.items()):
        more = f" (+{row.more[rank]} more)" if row.more.get(rank) else ""
        prefix = f"rank {rank}: " if len(row.reported_by) > 1 else ""
        parts.append(f"{esc(prefix)}<code>{'</code>, <code>'.join(esc(n) for n in names)}</code>{esc(more)}")
    for rank, more in row.more.items():
        if rank not in row.tensors:
            parts.append(esc(f"rank {rank}: {more} tensor(s)"))
    return "<br>".join(parts) or "—"


def _fault_section(run: Run) -> str:
    rows = run.faults()
    out = ['<section id="faults"><h2>Faults and guard actions</h2>']
    if not rows:
        out.append("<p>No faults: no skipped update, rollback, halt or monitor-mode fault was logged.</p>")
    else:
        cells = [(esc(r.step if r.step is not None else "—"), esc(r.action), esc(_ranks(r.faulty_ranks)),
                  esc(r.reason), _tensors(r), esc(r.detail or "—"), esc(_ranks(r.reported_by)))
                 for r in rows[:MAX_ROWS]]
        out.append(_table(("step", "action", "faulty rank(s)", "reason", "tensors named", "detail", "reported by rank"),
                          cells, raw=True))
        if len(rows) > MAX_ROWS:
            out.append(f"<p>… and {len(rows) - MAX_ROWS} more rows.</p>")
    notes = run.notes()
    if notes:
        out.append("<ul>" + "".join(
            f"<li>step {esc(e.step)}: {esc(e.name)}: {esc(e.get('detail') or e.get('path') or '')}</li>"
            for e in notes) + "</ul>")
    out.append("</section>")
    return "\n".join(out)


def _probe_section(run: Run) -> str:
    errors = run.probe_errors()
    out = ['<section id="probe-errors"><h2>Probe errors</h2>']
    if not errors:
        out.append("<p>No probe errors.</p>")
    else:
        out.append(_table(("step", "rank", "phase", "error", "consecutive", "check disabled"),
                          [(e.step, e.rank, e.get("phase"), e.get("error"), _value(e.get("consecutive")),
                            "yes" if e.get("disabled") else "no") for e in errors[:MAX_ROWS]]))
    disabled = run.guard.get("disabled_checks")
    if disabled:
        out.append(f"<p><b>Checks disabled at the end of the run:</b> {esc(_value(disabled))}</p>")
    out.append("</section>")
    return "\n".join(out)


def _spectral_section(run: Run) -> str:
    events = run.spectral()
    out = ['<section id="spectral"><h2>Spectral probe (κ̃)</h2>']
    if not events:
        out.append("<p>Spectral probe: no data (no telemetry event carries a κ̃ value).</p>")
    else:
        counts: dict[str, int] = {}
        for e in events:
            counts[str(e.get("risk_level"))] = counts.get(str(e.get("risk_level")), 0) + 1
        last = events[-1]
        k = num(last.get("spectral_kappa"))
        shown = f"{k:.4g}" if k is not None and math.isfinite(k) else last.get("spectral_kappa")
        out.append(f"<p>κ̃ is plotted in the bottom panel of the figure, over bands coloured by risk level. "
                   f"Last value: {esc(shown)} at step {esc(last.step)} ({esc(last.get('risk_level'))}).</p>")
        out.append(_table(("risk level", "telemetry points"),
                          [(f'<span style="color:{RISK_COLOURS.get(lv, "#24292f")}">&#9632;</span> {esc(lv)}', n)
                           for lv, n in counts.items()], raw=True))
    out.append("</section>")
    return "\n".join(out)


def _config_section(run: Run) -> str:
    start = run.start
    config = start.get("config") if isinstance(start.get("config"), dict) else None
    files = [(log.path.name, len(log.events), log.bad_lines) for log in run.ranks.values()]
    out = ['<section id="files"><h2>Files read</h2>',
           _table(("telemetry file", "events", "unreadable lines skipped"), files) if files else
           "<p>No telemetry file.</p>"]
    if config:
        out.append("<details><summary>Configuration (from the start event)</summary>"
                   + _table(("field", "value"), [(k, _value(v)) for k, v in config.items()]) + "</details>")
    out.append("</section>")
    return "\n".join(out)
