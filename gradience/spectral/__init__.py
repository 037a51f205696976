"""Spectral monitoring: κ̃, the spectral scale of a model's weights (see SPECTRAL.md for why this measure).

One job per module:

* :mod:`~gradience.spectral.find` — which weights to probe: attention Q/K pairs by name or a user mapping, and
  the hidden matrices of the fallback (embeddings and readouts left out).
* :mod:`~gradience.spectral.power` — warm-started power iteration on an implicit matrix, and the dtypes it runs in.
* :mod:`~gradience.spectral.sharded` — the same products on sharded weights (DTensor, FSDP2), each rank's block,
  every stage's partial products reduced together.
* :mod:`~gradience.spectral.probe` — :class:`SpectralProbe`: κ̃ and the stable-rank concentration of a model.
* :mod:`~gradience.spectral.monitor` — the controller's side: measuring on probe steps without breaking them,
  reporting each agreed reading.

The risk level read from κ̃'s trend is policy (:mod:`gradience.risk`), not here.
"""

from gradience.spectral.find import QKPair, find_qk, hidden_matrices
from gradience.spectral.power import power_iteration
from gradience.spectral.probe import DEFINITIONS, SpectralProbe, SpectralReading

__all__ = ["DEFINITIONS", "QKPair", "SpectralProbe", "SpectralReading", "find_qk", "hidden_matrices",
           "power_iteration"]
