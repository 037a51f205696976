"""Gradience: training-integrity insurance for PyTorch.

Probe every rank every step, agree on one verdict, act (skip, snapshot, roll back, halt), report.
"""

from gradience.config import GradienceConfig
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
from gradience.risk import RiskLevel
from gradience.types import Action, Decision, GuardState, Reason, Verdict

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


# Loaded when first asked for: they import torch (and the callback transformers), which tools that only read a
# run's files (``gradience report``) must not pay for.
_LAZY = {
    "GradienceController": "gradience.controller",
    "GradienceCallback": "gradience.integrations.hf",
    "exit_process": "gradience.comm",
    "load_snapshot": "gradience.resume",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradience' has no attribute {name!r}")
