"""The training side of the spectral bench: the protocol's arms (LR schedules), one training run with κ̃ probed
under two definitions, the loss-event rule, and the alarm rules of both definitions. No printing, no files:
``gradience.bench.spectral`` runs the arms, scores them and reports.

Model and data are the demo's (:func:`gradience.demo.build_model`, a pre-LN byte-level GPT-2 on Python
standard-library sources); the optimizer is AdamW with β2 = 0.95 and no gradient clipping (``SPECTRAL.md``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gradience.risk import RiskBands, RiskLevel, append_history, classify, risk_level
from gradience.spectral import SpectralProbe

ARMS = ("ramp", "constant", "jump", "healthy")
FAILING = ("ramp", "constant", "jump")
ALARM = frozenset((RiskLevel.WARNING, RiskLevel.DANGER, RiskLevel.INSTABILITY))


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """Everything that defines a bench run except the seeds. LRs are the ones found to break (or not break)
    this model on CPU within ``steps``; see ``docs/spectral-bench.md`` for how they were chosen."""

    steps: int  #: optimizer steps per run (failing runs stop at their event)
    interval: int  #: steps between κ̃ probes
    burn_in: int  #: no alarm and no event before this step (max(warmup, 500) in full mode)
    warmup: int = 100  #: linear LR warm-up of the constant and jump arms (the ramps start low by themselves)
    batch: int = 8  #: sequences of 64 bytes per step
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    lr_start: float = 1e-4  #: where the exponential ramps start
    lr_ramp_end: float = 0.3  #: (a) the ramp reaches this at ``steps``: far above the failure LR
    lr_healthy_cap: float = 0.01  #: (d) the same ramp, held at this LR once it gets there
    lr_constant: float = 0.06  #: (b) after warm-up
    lr_jump_base: float = 0.01  #: (c) before the jump; ×10 from ``jump_at`` × steps on
    jump_at: float = 0.5
    event_window: int = 20  #: steps in the loss mean of the event rule
    event_nats: float = 0.3  #: rise of that mean above its running best that counts as a blow-up
    recall_window: int = 1000  #: an alarm counts when it comes at most this many steps before the event

    def lr(self, arm: str, step: int) -> float:
        """The learning rate of ``arm`` at ``step``."""
        ramp = self.lr_start * (self.lr_ramp_end / self.lr_start) ** (step / self.steps)
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if arm == "ramp":
            return ramp
        if arm == "healthy":
            return min(ramp, self.lr_healthy_cap)
        if arm == "constant":
            return self.lr_constant * warm
        if arm == "jump":
            return self.lr_jump_base * warm * (10.0 if step >= self.jump_step else 1.0)
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")

    @property
    def jump_step(self) -> int:
        """The step of the ×10 jump."""
        return int(self.jump_at * self.steps)


@dataclass(kw_only=True)
class Run:
    """One training run: its event, the κ̃ series of both definitions, the loss, and the timings."""

    arm: str
    seed: int
    event: int | None = None  #: first step of the event, None when the run stayed healthy
    event_kind: str | None = None  #: "loss" (mean rose by event_nats) or "nonfinite"
    probe_steps: list[int] = field(default_factory=list)
    kappa_new: list[float] = field(default_factory=list)  #: attention-logit bound (SpectralProbe default)
    kappa_old: list[float] = field(default_factory=list)  #: the original definition, on the first 2-D weight
    stable_rank: list[float] = field(default_factory=list)  #: SpectralProbe's second channel, logged only
    loss: list[float] = field(default_factory=list)  #: per step
    step_s: float = math.nan  #: median wall time of a training step (forward, backward, update)
    probe_new_s: float = math.nan  #: median wall time of one SpectralProbe.measure()
    probe_old_s: float = math.nan  #: median wall time of one original-definition probe


def baseline_kappa(w: torch.Tensor) -> float:
    """The original κ̃: σ_max / σ̂_min with σ̂_min = ‖W‖_F / (10·√min(m, n)), σ_max exact (one small SVD)."""
    w = w.detach().float()
    sigma = torch.linalg.matrix_norm(w, ord=2)
    fro = torch.linalg.matrix_norm(w)
    return float(sigma * 10.0 * math.sqrt(min(w.shape)) / fro)


def first_matrix(model: torch.nn.Module) -> torch.Tensor:
    """The first 2-D parameter in ``parameters()`` order: what the original implementation probed (for GPT-2,
    the token embedding)."""
    return next(p for p in model.parameters() if p.ndim == 2)


def train(protocol: Protocol, arm: str, seed: int, text: torch.Tensor) -> Run:
    """Train one (arm, seed) until ``protocol.steps`` or the event, probing κ̃ every ``protocol.interval``."""
    from gradience.demo import build_model, sample_batch

    torch.manual_seed(seed)  # the same initial weights in every arm of a seed
    model = build_model(protocol.n_embd, protocol.n_layer, protocol.n_head)
    # No weight decay to speak of and no clipping: the protocol wants the instability, not its cure.
    optimizer = torch.optim.AdamW(model.parameters(), lr=protocol.lr(arm, 0), betas=(0.9, 0.95), weight_decay=0.01)
    probe = SpectralProbe(model, iters=2, definition="auto")
    embedding = first_matrix(model)
    gen = torch.Generator()
    run = Run(arm=arm, seed=seed)
    step_times: list[float] = []
    new_times: list[float] = []
    old_times: list[float] = []
    means: list[float] = []
    best = math.inf
    for step in range(protocol.steps):
        for group in optimizer.param_groups:
            group["lr"] = protocol.lr(arm, step)
        # Batches depend on (seed, step) only: the healthy and ramp arms of a seed share their trajectory
        # until the healthy cap, so any difference in alarms comes from the LR, not from the data.
        gen.manual_seed(seed * 1_000_003 + step)
        ids = sample_batch(text, protocol.batch, gen)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        value = loss.item()  # the host sync ends the step's timing
        step_times.append(time.perf_counter() - t0)
        run.loss.append(value)
        if step % protocol.interval == 0:
            t0 = time.perf_counter()
            reading = probe.measure()
            t1 = time.perf_counter()
            old = baseline_kappa(embedding)
            t2 = time.perf_counter()
            if step > 0:  # the first call runs the cold iterations: not what a probe costs in steady state
                new_times.append(t1 - t0)
                old_times.append(t2 - t1)
            run.probe_steps.append(step)
            run.kappa_new.append(reading.kappa)
            run.kappa_old.append(old)
            run.stable_rank.append(reading.stable_rank)
        kind = _event(run.loss, means, best, protocol, step)
        if kind is not None:
            run.event, run.event_kind = step, kind
            break
        if means:
            best = min(best, means[-1])
    run.step_s = statistics.median(step_times)
    run.probe_new_s = statistics.median(new_times) if new_times else math.nan
    run.probe_old_s = statistics.median(old_times) if old_times else math.nan
    return run


def _event(losses: list[float], means: list[float], best: float, protocol: Protocol, step: int) -> str | None:
    """The protocol's event at ``step``: a non-finite loss (any time: the run cannot go on), or after burn-in the
    ``event_window``-step mean loss above its running best (``best``, before this step) by ``event_nats``.
    Appends this step's mean to ``means``."""
    if not math.isfinite(losses[-1]):
        return "nonfinite"
    if len(losses) >= protocol.event_window:
        means.append(math.fsum(losses[-protocol.event_window:]) / protocol.event_window)
        if step >= protocol.burn_in and means[-1] > best + protocol.event_nats:
            return "loss"
    return None


#: One probe's trend: (step, slope, volatility, in burn-in). The numbers do not depend on the band thresholds,
#: only on the window and the burn-in, so a grid of bands is scored from one pass over each run.
Trend = list[tuple[int, float, float, bool]]


def trend_log(steps: Sequence[int], kappas: Sequence[float], bands: RiskBands) -> Trend:
    """The new rule, exactly as the guard runs it: ``risk.risk_level`` on log κ̃ per step, at every probe."""
    history: tuple = ()
    out = []
    for t, k in zip(steps, kappas, strict=True):
        history = append_history(history, t, k, bands.window)
        reading = risk_level(history, bands, tick=t)
        out.append((t, reading.slope, reading.volatility, reading.burn_in))
    return out


def trend_raw(steps: Sequence[int], kappas: Sequence[float], bands: RiskBands) -> Trend:
    """The original rule: OLS slope of *raw* κ̃ per step, volatility = std of the raw κ̃ values of the window,
    with the same window and burn-in treatment as :func:`trend_log` (so that only the definition and the
    statistic differ)."""
    points: list[tuple[int, float]] = []
    out = []
    for t, k in zip(steps, kappas, strict=True):
        if math.isfinite(k):
            points.append((t, k))
        burn = t < bands.burn_in_steps
        window = [p for p in points if burn or p[0] >= bands.burn_in_steps][-bands.window:]
        out.append((t, *_raw_slope_volatility(window), burn))
    return out


def _raw_slope_volatility(points: list[tuple[int, float]]) -> tuple[float, float]:
    if len(points) < 3:
        return 0.0, 0.0
    ts = [float(t) for t, _ in points]
    ks = [k for _, k in points]
    t_mean, k_mean = statistics.fmean(ts), statistics.fmean(ks)
    slope = (math.fsum((t - t_mean) * (k - k_mean) for t, k in zip(ts, ks, strict=True))
             / math.fsum((t - t_mean) ** 2 for t in ts))
    return slope, statistics.pstdev(ks)


def trend(run: Run, definition: str, bands: RiskBands) -> Trend:
    """The trend of ``run`` under ``definition``: "new" (log of the attention-logit bound) or "old"."""
    if definition == "new":
        return trend_log(run.probe_steps, run.kappa_new, bands)
    return trend_raw(run.probe_steps, run.kappa_old, bands)


def alarms(series: Trend, bands: RiskBands) -> list[int]:
    """Probe steps after burn-in whose level under ``bands`` is WARNING or above. ``series`` must come from
    bands with the same window and burn-in (only the thresholds may differ)."""
    return [t for t, slope, vol, burn in series if not burn and classify(slope, vol, bands) in ALARM]
