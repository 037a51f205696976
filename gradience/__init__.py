"""Gradience: training-integrity insurance for PyTorch.

Probe every rank every step, agree on one verdict, act (skip, snapshot, roll back, halt), report.
"""

from gradience.comm import exit_process
from gradience.config import GradienceConfig
from gradience.controller import GradienceController
from gradience.errors import (
    EXIT_GUARD_HALTED,
    CollectiveError,
    CollectiveMismatch,
    ConfigError,
    ConsensusTimeout,
    GradienceError,
    GuardHalted,
    SnapshotError,
)
from gradience.resume import load_snapshot
from gradience.types import Action, Decision, GuardState, Reason, RiskLevel, Verdict

__version__ = "0.1.0"

__all__ = [
    "EXIT_GUARD_HALTED",
    "Action",
    "CollectiveError",
    "CollectiveMismatch",
    "ConfigError",
    "ConsensusTimeout",
    "Decision",
    "GradienceCallback",
    "GradienceConfig",
    "GradienceController",
    "GradienceError",
    "GuardHalted",
    "GuardState",
    "Reason",
    "RiskLevel",
    "SnapshotError",
    "Verdict",
    "__version__",
    "exit_process",
    "load_snapshot",
]


def __getattr__(name: str):
    # The Trainer callback imports transformers; load it only when asked for.
    if name == "GradienceCallback":
        from gradience.integrations.hf import GradienceCallback

        return GradienceCallback
    raise AttributeError(f"module 'gradience' has no attribute {name!r}")
