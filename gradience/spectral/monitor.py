"""The controller's spectral channel: when to build the probe, measuring κ̃ on probe steps without ever
breaking the step, and reporting each agreed reading (telemetry, risk-level changes, the definition in use).

The measurement is :mod:`gradience.spectral`; the risk level is computed by the pure policy from the *agreed*
κ̃ (it rides in the step's existing all-reduce, so there is no extra collective).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from gradience.config import GradienceConfig
from gradience.errors import ConfigError
from gradience.policy import risk_reading
from gradience.spectral.probe import SpectralProbe
from gradience.telemetry import Telemetry
from gradience.types import GuardState, Verdict

logger = logging.getLogger("gradience")

_DESCRIBE = {
    "attention_logit_bound": "attention-logit bound, max over layers and heads of σ_max(W_Q,h W_K,hᵀ)/√d_h",
    "max_hidden_sigma": "largest σ_max over the hidden weight matrices (no attention Q/K found: embeddings and "
                        "output heads excluded)",
}


class SpectralMonitor:
    """Builds the probe on first use and measures/reports κ̃ for one controller; a probe that raises is
    reported once and switched off on this rank (the others' κ̃ still reaches everyone through the MAX)."""

    def __init__(self, model: torch.nn.Module, config: GradienceConfig, telemetry: Telemetry, *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.config, self.telemetry = model, config, telemetry
        self.probe: SpectralProbe | None = None
        self.definition: str | None = None
        self.where: str | None = None
        #: The newest agreed κ̃ (None before the first probe).
        self.last_kappa: float | None = None
        self._off = False
        explicit = config.spectral_mapping is not None or config.spectral_definition == "attention"
        try:
            self.probe = SpectralProbe(model, mapping=config.spectral_mapping, iters=config.spectral_iters,
                                       definition=config.spectral_definition, reduce=reduce)
        except Exception as e:
            if explicit:  # the user asked for this mapping/definition: say so before training starts
                raise ConfigError(f"spectral_mapping/spectral_definition: {e}") from e
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self._off = True
        logger.error("Gradience: the spectral probe raised (%s: %s); it is off on this rank for the rest of the "
                     "run", type(e).__name__, e)

    def measure(self) -> dict[str, Any]:
        """``{"spectral_kappa", "stable_rank"}`` for the step's report, or ``{}`` when off; never raises."""
        if self._off or self.probe is None:
            return {}
        try:
            reading = self.probe.measure()
        except Exception as e:  # a defect of the guard: it must not cost the run a step
            self._fail(e)
            return {}
        if self.definition is None:
            self.definition = reading.definition
            fallback = reading.definition != "attention_logit_bound"
            self.telemetry.emit("spectral_definition", definition=reading.definition, fallback=fallback,
                                detail=_DESCRIBE.get(reading.definition, reading.definition))
        self.where = reading.where
        kappa = reading.kappa if math.isfinite(reading.kappa) and reading.kappa > 0 else None
        stable = reading.stable_rank if math.isfinite(reading.stable_rank) else None
        return {"spectral_kappa": kappa, "stable_rank": stable}

    def report(self, step: int, tick: int, verdict: Verdict, previous: str | None, state: GuardState) -> None:
        """Telemetry for an agreed probe, and a ``risk_level`` event when the level changed."""
        self.last_kappa = verdict.spectral_kappa
        reading = risk_reading(state, self.config, tick)
        self.telemetry.emit("spectral", step=step, kappa=verdict.spectral_kappa, stable_rank=verdict.stable_rank,
                            definition=self.definition, where=self.where, risk_level=state.risk_level,
                            slope=reading.slope, volatility=reading.volatility, probes=reading.probes)
        if state.risk_level != previous:
            self.telemetry.emit("risk_level", step=step, level=state.risk_level, previous=previous,
                                kappa=verdict.spectral_kappa, slope=reading.slope, volatility=reading.volatility)


def shard_reduce(backend: Any, comm: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A SUM over the ranks holding the shards, for a sharded spectral probe (None when nothing is sharded)."""
    copies = getattr(backend, "spectral_replicas", 0)
    if not copies:
        return None
    if getattr(backend, "mesh_size", None) != comm.world_size:
        logger.warning("Gradience: the model's device mesh is not the guard's group; no spectral probe")
        return None
    return lambda t: comm.all_reduce_sum(t) / copies
