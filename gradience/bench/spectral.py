"""Does κ̃ lead loss blow-ups? The evaluation of ``SPECTRAL.md``, measured on a small byte-level GPT on CPU.

This module owns the bench's command line, the scoring (recall, lead time, healthy-run alarms, probe overhead),
the fit of the WARNING bands on some seeds and their test on the others, and the report (table, JSON, plot).
The arms and the training loop are in :mod:`gradience.bench.spectral_arms`.

    python -m gradience.bench spectral --quick                 # about a minute: 2 seeds, short runs, real numbers
    python -m gradience.bench spectral --out docs              # full: JSON and PNG of every run under docs/

Two definitions of κ̃ are probed on the same runs: the new one (``SpectralProbe``'s attention-logit bound,
classified by ``risk.risk_level`` on log κ̃) and the original baseline (σ_max/σ̂_min of the first 2-D weight,
classified on raw κ̃ with volatility = std of the raw values). Each is scored with the seed design's bands and
with bands fitted on the first seeds; every score in the table is on the held-out seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

from gradience.bench.spectral_arms import ARMS, FAILING, Protocol, Run, Trend, alarms, train, trend
from gradience.risk import SEED_BANDS, RiskBands

DEFINITIONS = {"new": "new: log attn-logit bound", "old": "old: raw κ̃ of wte"}
# Fit grid, log-spaced and wide enough for both statistics: the new one is a slope of log κ̃ per step (~1e-3),
# the old one a slope of raw κ̃ (κ̃ ~ 10..100) per step and a std of raw κ̃ values (~1..10). Twenty points per
# decade for slopes, ten for volatilities: the 1-2-5 grid (steps of 2-2.5x) of the first full run jumped over
# the narrow gap between healthy and ramp-to-failure log-slopes (at most ~0.006 vs at least ~0.0076).
SLOPES = tuple(10.0 ** (k / 20) for k in range(-80, 1))
VOLATILITIES = tuple(10.0 ** (k / 10) for k in range(-30, 11)) + (math.inf,)
Scored = Sequence[tuple[Run, Trend]]  # runs with their trend under one definition
PLOT_COLORS = {"ramp": "tab:red", "constant": "tab:orange", "jump": "tab:purple", "healthy": "tab:green"}
MAX_POINTS = 100  # per series in the JSON


def protocol_for(quick: bool, steps: int | None = None) -> Protocol:
    """The full protocol, or the quick one (short runs, burn-in 150, probes every 10 steps: a smoke run whose
    LRs are raised so that the failing arms still fail within its few hundred steps)."""
    if quick:
        p = Protocol(steps=400, interval=10, burn_in=150, warmup=50, lr_ramp_end=1.0, lr_healthy_cap=0.01,
                     lr_constant=0.1, lr_jump_base=0.01, jump_at=0.6)
    else:
        warmup = 100
        p = Protocol(steps=2000, interval=25, burn_in=max(warmup, 500), warmup=warmup)
    return p if steps is None else dataclasses.replace(p, steps=steps)


def seed_bands(protocol: Protocol) -> RiskBands:
    """The seed design's bands (:data:`gradience.risk.SEED_BANDS`) with the protocol's burn-in."""
    return dataclasses.replace(SEED_BANDS, burn_in_steps=protocol.burn_in)


def banded(base: RiskBands, warning: float, volatility: float) -> RiskBands:
    """``base`` with WARNING from slope ``warning`` on and INSTABILITY above ``volatility`` (the other bands
    moved only as far as their ordering needs: WARNING and above are all alarms)."""
    return dataclasses.replace(base, stable_below=min(base.stable_below, warning), learning_below=warning,
                               warning_below=max(base.warning_below, warning), instability_volatility=volatility)


@dataclasses.dataclass(frozen=True)
class Score:
    """One definition × band set on a set of runs."""

    hits: dict[str, int]  #: per failing arm: runs with an alarm in the recall window
    events: dict[str, int]  #: per failing arm: runs with an event after burn-in
    runs: dict[str, int]  #: per arm: runs
    leads: list[int]  #: event step - first alarm step in the window, per hit
    healthy_alarmed: int  #: healthy runs with any alarm after burn-in

    @property
    def recall(self) -> float:
        """Hits over events, all failing arms together (NaN with no event)."""
        n = sum(self.events.values())
        return sum(self.hits.values()) / n if n else math.nan

    @property
    def false_alarms(self) -> float:
        """Share of healthy runs that ever alarm (NaN with no healthy run)."""
        n = self.runs.get("healthy", 0)
        return self.healthy_alarmed / n if n else math.nan


def score(runs: Scored, bands: RiskBands, window: int) -> Score:
    """Recall (an alarm at most ``window`` steps before the event, and before it), lead times and healthy alarms."""
    hits = dict.fromkeys(FAILING, 0)
    events = dict.fromkeys(FAILING, 0)
    counts = dict.fromkeys(ARMS, 0)
    leads, healthy_alarmed = [], 0
    for run, series in runs:
        counts[run.arm] += 1
        steps = alarms(series, bands)
        if run.arm == "healthy":
            healthy_alarmed += bool(steps)
        elif run.event is not None and run.event >= bands.burn_in_steps:
            events[run.arm] += 1
            early = [a for a in steps if run.event - window <= a < run.event]
            if early:
                hits[run.arm] += 1
                leads.append(run.event - early[0])
    return Score(hits, events, counts, leads, healthy_alarmed)


def fit(runs: Scored, base: RiskBands, window: int) -> tuple[RiskBands, float]:
    """The grid point (WARNING slope, INSTABILITY volatility) that maximises recall - healthy-alarm share on
    ``runs``, and that objective. Among the optimal points, the most interior one (see :func:`_interior`), so
    that the choice sits inside the optimal region rather than on the edge of what the fit runs happened to do."""
    objective: dict[tuple[int, int], float] = {}
    for i, w in enumerate(SLOPES):
        for j, v in enumerate(VOLATILITIES):
            s = score(runs, banded(base, w, v), window)
            objective[i, j] = ((0.0 if math.isnan(s.recall) else s.recall)
                               - (0.0 if math.isnan(s.false_alarms) else s.false_alarms))
    best = max(objective.values())
    i, j = _interior({p for p, o in objective.items() if o == best})
    return banded(base, SLOPES[i], VOLATILITIES[j]), best


def _interior(region: set[tuple[int, int]]) -> tuple[int, int]:
    """The grid point of ``region`` farthest from its border: largest (min, then sum) over the four axis
    directions of the steps that stay inside; an open grid edge counts as infinitely far (beyond the last
    slope nothing alarms on slope, beyond the last volatility INSTABILITY is off). Ties: the middle one."""
    shape = (len(SLOPES), len(VOLATILITIES))

    def reach(p: tuple[int, int], d: tuple[int, int]) -> float:
        n = 0
        while True:
            q = (p[0] + d[0] * (n + 1), p[1] + d[1] * (n + 1))
            if not (0 <= q[0] < shape[0] and 0 <= q[1] < shape[1]):
                return math.inf
            if q not in region:
                return n
            n += 1

    def depth(p: tuple[int, int]) -> tuple[float, float]:
        r = [reach(p, d) for d in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        return min(r), sum(r)

    depths = {p: depth(p) for p in region}
    deepest = max(depths.values())
    ties = sorted(p for p, d in depths.items() if d == deepest)
    return ties[len(ties) // 2]


def overhead(runs: Scored, definition: str) -> float:
    """Median over runs of (probe time / training-step time), both measured in the same run."""
    attr = "probe_new_s" if definition == "new" else "probe_old_s"
    ratios = [getattr(r, attr) / r.step_s for r, _ in runs if math.isfinite(getattr(r, attr)) and r.step_s > 0]
    return statistics.median(ratios) if ratios else math.nan


def machine() -> str:
    """Platform, processor and torch build, for the report."""
    cpu = platform.processor() or platform.machine()
    return (f"{platform.platform()}, {cpu}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradience.bench spectral", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds x 400 steps, burn-in 150 (CI smoke run)")
    p.add_argument("--out", default=None,
                   help="folder for spectral-bench.json and spectral-bench.png (full mode: default "
                        "./spectral-bench; quick mode: written only when given)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 5, quick: 2)")
    p.add_argument("--fit-seeds", type=int, default=None, help="seeds the bands are fitted on (default: half)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 2000, quick: 400)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every arm × seed, print the table, and in full mode (or with --out) write the JSON and the plot."""
    args = _parser().parse_args(argv)
    from gradience.demo import load_corpus

    protocol = protocol_for(args.quick, args.steps)
    n_seeds = args.seeds or (2 if args.quick else 5)
    n_fit = args.fit_seeds if args.fit_seeds is not None else max(1, n_seeds // 2)
    if not 1 <= n_fit < n_seeds:
        print(f"error: need 1 <= --fit-seeds < --seeds, got {n_fit} and {n_seeds}", file=sys.stderr)
        return 2
    if protocol.steps <= protocol.burn_in + 3 * protocol.interval:
        print(f"error: --steps must exceed the burn-in ({protocol.burn_in}) by 3 probes", file=sys.stderr)
        return 2
    text = load_corpus()
    mode = "quick" if args.quick else "full"
    print(f"gradience spectral bench ({mode}): GPT-2 {protocol.n_layer} layers, {protocol.n_embd} dim, "
          f"{protocol.n_head} heads, byte-level, batch {protocol.batch}x64, AdamW b2=0.95, no clipping")
    print(f"  {protocol.steps} steps, probe every {protocol.interval}, burn-in {protocol.burn_in}"
          f"{' (quick: shortened from max(warmup, 500))' if args.quick else ' = max(warmup, 500)'}, "
          f"seeds 0..{n_seeds - 1} (bands fitted on 0..{n_fit - 1}, scored on {n_fit}..{n_seeds - 1})")
    print(f"  LR: ramp {protocol.lr_start:g} -> {protocol.lr_ramp_end:g} exponential | constant "
          f"{protocol.lr_constant:g} | jump {protocol.lr_jump_base:g} x10 at step {protocol.jump_step} | healthy: "
          f"ramp capped at {protocol.lr_healthy_cap:g}")
    print(f"  machine: {machine()}")
    t0 = time.perf_counter()
    runs = []
    for seed in range(n_seeds):
        for arm in ARMS:
            t1 = time.perf_counter()
            run = train(protocol, arm, seed, text)
            runs.append(run)
            what = f"event at step {run.event} ({run.event_kind})" if run.event is not None else "no event"
            print(f"  {arm:<9} seed {seed}: {what}, {len(run.loss)} steps, {time.perf_counter() - t1:.0f} s",
                  flush=True)
    base = seed_bands(protocol)
    scored = {d: [(r, trend(r, d, base)) for r in runs] for d in DEFINITIONS}
    fit_runs = {d: [(r, t) for r, t in pairs if r.seed < n_fit] for d, pairs in scored.items()}
    test_runs = {d: [(r, t) for r, t in pairs if r.seed >= n_fit] for d, pairs in scored.items()}
    band_sets: dict[str, dict[str, RiskBands]] = {"seed": {d: base for d in DEFINITIONS}, "fitted": {}}
    print()
    _evidence(scored, protocol)
    for d in DEFINITIONS:
        bands, objective = fit(fit_runs[d], base, protocol.recall_window)
        band_sets["fitted"][d] = bands
        print(f"fitted on seeds 0..{n_fit - 1}, {DEFINITIONS[d]}: WARNING at slope >= {bands.learning_below:g}, "
              f"INSTABILITY at volatility > {bands.instability_volatility:g} (recall - healthy alarms = "
              f"{objective:+.2f})")
    rows = _table(test_runs, band_sets, protocol)
    print("\nseed bands on every seed (no fit involved):")
    rows_all = _table(scored, {"seed": band_sets["seed"]}, protocol)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    if args.out is not None or not args.quick:
        out = Path(args.out or "spectral-bench")
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "spectral-bench.json", scored, band_sets, protocol, rows, rows_all, argv, n_fit)
        _plot(out / "spectral-bench.png", runs, protocol)
        print(f"wrote {out / 'spectral-bench.json'} and {out / 'spectral-bench.png'}")
    return 0


def _table(runs: dict[str, Scored], band_sets: dict[str, dict[str, RiskBands]], protocol: Protocol) -> list[dict]:
    """Print one row per definition × band set and return the rows (for the JSON)."""
    header = (f"{'definition':<26}{'bands':<8}{'ramp':>6}{'const':>6}{'jump':>6}{'recall':>8}  "
              f"{'lead median [range]':<22}{'healthy alarms':>15}{'probe/step':>12}{'overhead':>10}")
    print(header)
    rows = []
    for name, sets in band_sets.items():
        for d, label in DEFINITIONS.items():
            s = score(runs[d], sets[d], protocol.recall_window)
            ratio = overhead(runs[d], d)
            lead = (f"{statistics.median(s.leads):.0f} [{min(s.leads)}..{max(s.leads)}]" if s.leads else "-")
            cells = [f"{s.hits[a]}/{s.events[a]}" for a in FAILING]
            recall = f"{100 * s.recall:.0f} %" if not math.isnan(s.recall) else "n/a"
            healthy = f"{s.healthy_alarmed}/{s.runs['healthy']}"
            print(f"{_pad(label, 26)}{name:<8}{cells[0]:>6}{cells[1]:>6}{cells[2]:>6}{recall:>8}  {lead:<22}"
                  f"{healthy:>15}{ratio:>11.3f}x{100 * ratio / protocol.interval:>8.2f} %")
            rows.append({"definition": d, "bands": name, "hits": s.hits, "events": s.events, "recall": s.recall,
                         "leads": s.leads, "healthy_alarmed": s.healthy_alarmed, "healthy_runs": s.runs["healthy"],
                         "probe_per_step": ratio, "overhead_pct": 100 * ratio / protocol.interval})
    print(f"(cells: runs with an alarm <= {protocol.recall_window} steps before the event / runs with an event "
          f"after burn-in; overhead = probe/step / interval {protocol.interval})")
    return rows


def _evidence(scored: dict[str, Scored], protocol: Protocol) -> None:
    """Print, per definition and arm, the range over runs of each run's largest slope and volatility: after
    burn-in for healthy runs, in the ``recall_window`` steps before the event for failing ones. This is what
    any choice of bands has to separate."""
    print(f"trend maxima per run, every seed (failing arms: the {protocol.recall_window} steps before the event; "
          f"healthy: after burn-in), min..max over runs:")
    print(f"{'definition':<26}{'arm':<10}{'runs':>5}{'max slope':>22}{'max volatility':>22}")
    for d, label in DEFINITIONS.items():
        for arm in ARMS:
            slopes, vols = [], []
            for run, series in scored[d]:
                if run.arm != arm or (arm != "healthy" and (run.event is None or run.event < protocol.burn_in)):
                    continue
                lo = protocol.burn_in if arm == "healthy" else run.event - protocol.recall_window
                hi = math.inf if arm == "healthy" else run.event
                window = [(s, v) for t, s, v, burn in series if not burn and lo <= t < hi]
                if window:
                    slopes.append(max(s for s, _ in window))
                    vols.append(max(v for _, v in window))
            span = (lambda xs: f"{min(xs):.3g}..{max(xs):.3g}" if xs else "-")  # noqa: E731
            print(f"{_pad(label, 26)}{arm:<10}{len(slopes):>5}{span(slopes):>22}{span(vols):>22}")
    print()


def _pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` columns; combining marks (the tilde of κ̃) take no column."""
    return text + " " * max(0, width - sum(not unicodedata.combining(c) for c in text))


def _spans(steps: list[int], interval: int) -> list[list[int]]:
    """Alarm probe steps as [first, last] spans of consecutive probes (the JSON stays small)."""
    spans: list[list[int]] = []
    for t in steps:
        if spans and t - spans[-1][1] <= interval:
            spans[-1][1] = t
        else:
            spans.append([t, t])
    return spans


def _write_json(path: Path, scored: dict[str, Scored], band_sets: dict, protocol: Protocol, rows: list, rows_all: list,
                argv: list[str] | None, n_fit: int) -> None:
    def sig(xs: list[float]) -> list[float | None]:
        return [float(f"{x:.4g}") if math.isfinite(x) else None for x in xs]

    out_runs = []
    for i, (r, _) in enumerate(scored["new"]):
        k = max(1, math.ceil(len(r.probe_steps) / MAX_POINTS))  # downsampled; alarms are computed on all probes
        chunk = max(1, math.ceil(len(r.loss) / MAX_POINTS))
        loss = [statistics.fmean(r.loss[j:j + chunk]) for j in range(0, len(r.loss), chunk)]
        out_runs.append({
            "arm": r.arm, "seed": r.seed, "held_out": r.seed >= n_fit, "event": r.event, "event_kind": r.event_kind,
            "steps_run": len(r.loss),
            "alarm_spans": {d: {name: _spans(alarms(scored[d][i][1], sets[d]), protocol.interval)
                                for name, sets in band_sets.items()} for d in DEFINITIONS},
            "probe_steps": r.probe_steps[::k], "kappa_new": sig(r.kappa_new[::k]), "kappa_old": sig(r.kappa_old[::k]),
            "stable_rank": sig(r.stable_rank[::k]), "loss_every": chunk, "loss_mean": sig(loss),
            "step_ms": r.step_s * 1e3, "probe_new_ms": r.probe_new_s * 1e3, "probe_old_ms": r.probe_old_s * 1e3})
    bands = {name: {d: dataclasses.asdict(b) for d, b in sets.items()} for name, sets in band_sets.items()}
    doc = {"command": "python -m gradience.bench spectral " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "protocol": dataclasses.asdict(protocol), "fit_seeds": list(range(n_fit)),
           "bands": bands, "table_held_out": rows, "table_seed_bands_all_seeds": rows_all, "runs": out_runs}
    path.write_text(_dumps(_strict(doc)), encoding="utf-8")


def _dumps(doc: dict) -> str:
    """Strict JSON, indented, with one line per run: small, and a rerun diffs run by run."""
    head = json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1, allow_nan=False)
    runs = ",\n  ".join(json.dumps(r, separators=(",", ":"), allow_nan=False) for r in doc["runs"])
    return f'{head[:-2]},\n "runs": [\n  {runs}\n ]\n}}\n'


def _strict(obj: object) -> object:
    """``obj`` with every non-finite float as None: strict JSON (an infinite band means "never")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _plot(path: Path, runs: list[Run], protocol: Protocol) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    panels = (("kappa_new", "new κ̃: attention-logit bound (log)", True),
              ("kappa_old", "old κ̃: σmax/σ̂min of wte (≤ 10·√64 = 80)", False))
    for ax, (attr, title, log) in zip(axes, panels, strict=False):
        for r in runs:
            ys = getattr(r, attr)
            ax.plot(r.probe_steps, ys, color=PLOT_COLORS[r.arm], alpha=0.7, lw=1)
            if r.event is not None:
                ax.plot(r.probe_steps[-1], ys[-1], "x", color=PLOT_COLORS[r.arm], ms=9, mew=2)
        ax.set_yscale("log" if log else "linear")
        ax.set_ylabel(title)
    ax = axes[2]
    chunk = max(1, protocol.interval)
    for r in runs:
        xs = list(range(0, len(r.loss), chunk))
        ys = [statistics.fmean(r.loss[i:i + chunk]) for i in xs]
        ax.plot(xs, ys, color=PLOT_COLORS[r.arm], alpha=0.7, lw=1)
        if r.event is not None:
            ax.plot(r.event, ys[-1], "x", color=PLOT_COLORS[r.arm], ms=9, mew=2)
    ax.set_ylim(1.0, 4.0)
    ax.set_ylabel(f"loss ({chunk}-step mean)")
    ax.set_xlabel("step")
    for ax in axes:
        ax.axvline(protocol.burn_in, color="grey", ls=":", lw=1)
    handles = [plt.Line2D([], [], color=c, label=a) for a, c in PLOT_COLORS.items()]
    handles.append(plt.Line2D([], [], color="k", marker="x", ls="", label="event"))
    axes[0].legend(handles=handles, loc="upper left")
    axes[0].set_title("κ̃ vs loss blow-ups (x = event; dotted = end of burn-in)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
