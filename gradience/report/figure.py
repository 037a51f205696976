"""The report's main figure: loss, LR and LR scale over steps, with the guard's actions marked, and κ̃.

This module owns the drawing (matplotlib, Agg canvas, no pyplot state). Panels share the x axis, the step
position of :mod:`gradience.report.load` (the step label unless the count restarted):

1. training loss of every rank (non-finite values as crosses along the top), with committed snapshots (green
   triangles along the bottom), skipped updates (orange), rollbacks (red line at the fault step and an arrow
   back to the target step), failed rollbacks, halts and monitor-mode faults;
2. LR (left axis) and LR scale (right axis);
3. κ̃ on a log axis over background bands coloured by risk level -- only when some telemetry carries κ̃.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

from gradience.report.deps import require
from gradience.report.load import FaultRow, Run, num

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colours shared with the HTML page.
RISK_COLOURS = {"STABLE": "#2da44e", "LEARNING": "#54aeff", "WARNING": "#d4a72c", "DANGER": "#fb8f44",
                "INSTABILITY": "#cf222e"}
MARK = {"snapshot": "#1a7f37", "skip_step": "#e16f24", "rollback_success": "#cf222e", "rollback_failed": "#8250df",
        "abort": "#24292f", "fault": "#bf3989"}
MAX_LOSS_RANKS = 8  # more ranks than this: rank 0 only, or the plot is a hairball
MAX_LABELS = 12  # arrows with text per panel; more would overlap


def render(run: Run) -> Figure:
    """Draw the main figure of ``run`` (a :class:`matplotlib.figure.Figure` on an Agg canvas)."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    spectral = run.spectral()
    panels = 3 if spectral else 2
    fig = Figure(figsize=(12, 8.4 if spectral else 6.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, height_ratios=[3, 1.4] + ([1.6] if spectral else []))
    ax_loss, ax_lr = axes[0], axes[1]
    fig.suptitle(_title(run), fontsize=13, fontweight="bold")

    handles: list[Any] = []
    handles += _plot_loss(ax_loss, run)
    faults = run.faults()
    handles += _mark_snapshots(ax_loss, run, Line2D)
    handles += _mark_faults(ax_loss, faults, Line2D, labels=True)
    _mark_faults(ax_lr, faults, Line2D, labels=False)
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, alpha=0.3)
    if handles:
        ax_loss.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    else:
        ax_loss.text(0.5, 0.5, "no telemetry yet", transform=ax_loss.transAxes, ha="center", va="center")

    _plot_lr(ax_lr, run)
    if spectral:
        _plot_kappa(axes[2], spectral)
    restarts = run.restarts
    axes[-1].set_xlabel("step" if not restarts else
                        f"step (the step count restarted {restarts}x; segments placed one after another)")
    return fig


def png_bytes(run: Run, dpi: int = 110) -> bytes:
    """The main figure of ``run`` as PNG bytes."""
    fig = render(run)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _title(run: Run) -> str:
    g = run.guard
    parts = [f"Gradience run {run.out_dir.name}: {run.status}"]
    steps = (run.summary or {}).get("total_steps")
    if isinstance(steps, int):
        parts.append(f"{steps} steps")
    elif run.last_step is not None:
        parts.append(f"up to step {run.last_step} (in progress)")
    if g:
        parts.append(f"{_plural(g.get('total_rollbacks', 0), 'rollback')}, "
                     f"{_plural(g.get('total_skipped_steps', 0), 'skipped update')}")
    return "  ·  ".join(parts)


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _plot_loss(ax: Any, run: Run) -> list[Any]:
    handles = []
    ranks = sorted(run.ranks)
    if len(ranks) > MAX_LOSS_RANKS:
        ranks = ranks[:1]
    for i, rank in enumerate(ranks):
        events = run.telemetry(rank)
        xs = [e.x for e in events if e.x is not None]
        ys = [num(e.get("train_loss")) for e in events if e.x is not None]
        if not xs:
            continue
        finite = [y if y is not None and math.isfinite(y) else math.nan for y in ys]
        (line,) = ax.plot(xs, finite, lw=2.0 if i == 0 else 1.2, alpha=1.0 if i == 0 else 0.75, marker=".",
                          ms=4, label=f"loss (rank {rank})", zorder=3)
        handles.append(line)
        bad = [x for x, y in zip(xs, ys, strict=True) if y is not None and not math.isfinite(y)]
        if bad:
            h = ax.scatter(bad, [0.97] * len(bad), transform=ax.get_xaxis_transform(), marker="x", color="#cf222e",
                           s=30, zorder=4, label=f"non-finite loss (rank {rank})", clip_on=False)
            handles.append(h)
    return handles


def _mark_snapshots(ax: Any, run: Run, Line2D: Any) -> list[Any]:
    p = run.primary
    if p is None:
        return []
    committed = [e.x for e in p.of("snapshot") if e.get("committed") and e.x is not None]
    dropped = [e.x for e in p.of("snapshot") if not e.get("committed") and e.x is not None]
    out = []
    trans = ax.get_xaxis_transform()
    if committed:
        out.append(ax.scatter(committed, [0.03] * len(committed), transform=trans, marker="^", s=55,
                              color=MARK["snapshot"], zorder=5, label="committed snapshot", clip_on=False))
    if dropped:
        out.append(ax.scatter(dropped, [0.03] * len(dropped), transform=trans, marker="^", s=55, facecolors="none",
                              edgecolors="#6e7781", zorder=5, label="snapshot not committed", clip_on=False))
    return out


def _mark_faults(ax: Any, faults: list[FaultRow], Line2D: Any, *, labels: bool) -> list[Any]:
    trans = ax.get_xaxis_transform()
    styles = {"skip_step": ("--", 1.4), "rollback_success": ("-", 1.8), "rollback_failed": (":", 1.8),
              "abort": ("-", 2.6), "fault": ("-.", 1.6)}
    by_kind: dict[str, list[float]] = {}
    rollbacks = 0
    for row in faults:
        if row.x is None:
            continue
        by_kind.setdefault(row.event, []).append(row.x)
        colour = MARK[row.event]
        if row.event == "rollback_success" and row.to_x is not None and labels:
            rollbacks += 1
            y = 0.88 - 0.07 * ((rollbacks - 1) % 4)  # stagger neighbouring arrows
            ax.annotate("", xy=(row.to_x, y), xytext=(row.x, y), xycoords=trans, textcoords=trans,
                        arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.8, "shrinkA": 0, "shrinkB": 0},
                        zorder=6)
            if rollbacks <= MAX_LABELS:
                ax.annotate(f"→ step {row.detail.split(',')[0].removeprefix('to step ')}", xy=(row.x, y),
                            xycoords=trans, xytext=(4, 3), textcoords="offset points", color=colour, fontsize=8)
        elif row.event == "abort" and labels:
            ax.annotate(f"halt: {row.reason}", xy=(row.x, 0.5), xycoords=trans, xytext=(4, 0),
                        textcoords="offset points", color=colour, fontsize=9, rotation=90, va="center")
    for kind, xs in by_kind.items():
        # One collection per kind: a run that skipped thousands of steps still draws quickly.
        ls, lw = styles[kind]
        ax.vlines(xs, 0, 1, transform=trans, colors=MARK[kind], linestyles=ls, lw=lw, alpha=0.85, zorder=2)
    if not labels:
        return []
    names = {"skip_step": "skipped update", "rollback_success": "rollback (fault step → target)",
             "rollback_failed": "rollback failed", "abort": "halt", "fault": "fault seen (monitor mode)"}
    return [Line2D([], [], color=MARK[k], ls=styles[k][0], lw=styles[k][1],
                   marker=">" if k == "rollback_success" else None, label=names[k]) for k in names if k in by_kind]


def _plot_lr(ax: Any, run: Run) -> None:
    events = [e for e in run.telemetry() if e.x is not None]
    xs = [e.x for e in events]
    lr = [num(e.get("lr")) for e in events]
    # The scale changes at a rollback (or resume): take those points too, so the drop sits at the fault step.
    p = run.primary
    changes = [e for e in p.events if e.x is not None and (e.name == "telemetry" or (
        e.name in ("rollback_success", "resume") and num(e.get("lr_scale")) is not None))] if p else []
    sx = [e.x for e in changes]
    scale = [num(e.get("lr_scale")) for e in changes]
    h1 = ax.plot(xs, [v if v is not None else math.nan for v in lr], color="#0969da", lw=1.6, label="LR")
    ax.set_ylabel("LR", color="#0969da")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    h2 = ax2.step(sx, [v if v is not None else math.nan for v in scale], where="post", color="#8250df", lw=1.6,
                  ls="--", label="LR scale")
    ax2.set_ylabel("LR scale", color="#8250df")
    top = max([v for v in scale if v is not None and math.isfinite(v)] + [1.0])
    ax2.set_ylim(0, top * 1.08)
    ax.legend(handles=h1 + h2, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=9, frameon=False)


def _plot_kappa(ax: Any, spectral: list[Any]) -> None:
    from matplotlib.patches import Patch

    xs = [e.x for e in spectral]
    ks = [num(e.get("spectral_kappa")) for e in spectral]
    seen: list[str] = []
    for i, e in enumerate(spectral):
        level = str(e.get("risk_level") or "")
        if level not in RISK_COLOURS:
            continue
        right = xs[i + 1] if i + 1 < len(xs) else xs[i] + (xs[i] - xs[i - 1] if i else 1)
        ax.axvspan(xs[i], right, color=RISK_COLOURS[level], alpha=0.18, lw=0)
        if level not in seen:
            seen.append(level)
    positive = all(k is not None and k > 0 for k in ks)
    ax.plot(xs, [k if k is not None and math.isfinite(k) else math.nan for k in ks], color="#24292f", lw=1.6,
            marker=".", label=r"$\tilde{\kappa}$")
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel(r"$\tilde{\kappa}$")
    ax.grid(True, alpha=0.3)
    handles = [Patch(color=RISK_COLOURS[s], alpha=0.4, label=s.lower()) for s in RISK_COLOURS if s in seen]
    ax.legend(handles=handles, title="risk level", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
