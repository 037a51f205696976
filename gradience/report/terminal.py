"""The report's terminal summary: the key facts of a run as rows, and as a rich table for the CLI to print."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradience.report.deps import require

if TYPE_CHECKING:
    from rich.table import Table

    from gradience.report import ReportResult


def summary_rows(result: ReportResult) -> list[tuple[str, str]]:
    """(label, value) rows: status, steps, rollbacks, skips, LR scale, first fault, halt reason, output files."""
    run = result.run
    s, g = run.summary or {}, run.guard

    def val(v: Any) -> str:
        return "—" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    if isinstance(s.get("total_steps"), int):
        steps = f"{s['total_steps']} (last step {val(s.get('final_step'))})"
    else:
        steps = f"in progress, last step seen {val(run.last_step)}"
    faults = run.faults()
    rollbacks = g.get("total_rollbacks", sum(r.event == "rollback_success" for r in faults))
    skips = g.get("total_skipped_steps", sum(r.event == "skip_step" for r in faults))
    first_step, first_ranks = g.get("first_fault_step"), g.get("first_fault_ranks")
    if first_step is None and faults:
        first_step, first_ranks = faults[0].step, faults[0].faulty_ranks
    first = "—" if first_step is None else f"step {first_step}" + (
        f" on rank(s) {', '.join(map(str, first_ranks))}" if first_ranks else "")
    lr_scale = g.get("lr_scale")
    if lr_scale is None and run.telemetry():
        lr_scale = run.telemetry()[-1].get("lr_scale")
    halt = g.get("halt_reason") or next((e.get("reason") for e in run.aborts), None)
    status = run.status if run.summary is not None else f"{run.status} (no summary yet)"
    return [("Status", status), ("Steps", steps), ("Rollbacks", val(rollbacks)), ("Skipped steps", val(skips)),
            ("LR scale", val(lr_scale)), ("First fault", first), ("Halt reason", val(halt)),
            ("Report", str(result.html_path)), ("Figure", str(result.png_path))]


def summary_table(result: ReportResult) -> Table:
    """:func:`summary_rows` as a :class:`rich.table.Table` (the status coloured)."""
    require("rich")
    from rich.table import Table
    from rich.text import Text

    from gradience.report.html import STATUS_COLOURS

    table = Table(title="Gradience run report", show_header=False, title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("", overflow="fold")
    colour = STATUS_COLOURS.get(result.run.status, "#57606a")
    for label, value in summary_rows(result):
        # Text, not markup: a path or a reason may hold "[...]".
        table.add_row(label, Text(value, style=f"bold {colour}" if label == "Status" else ""))
    return table
