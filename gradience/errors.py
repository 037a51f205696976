"""Exception types and process exit statuses that Gradience raises or returns."""

from __future__ import annotations

#: Exit status of a run the guard stopped because faults outlived the rollback budget or no good snapshot
#: was left. Distinct from 1 (an ordinary crash) so schedulers and scripts can tell the two apart.
EXIT_GUARD_HALTED = 3


class GradienceError(RuntimeError):
    """Base class of every error Gradience raises."""


class ConfigError(GradienceError, ValueError):
    """A configuration value is invalid; the message names the field."""


class SnapshotError(GradienceError):
    """A snapshot could not be written, committed, found or verified."""


class CollectiveError(GradienceError):
    """A collective of the guard failed; every later guard call refuses (training must stop on every rank)."""


class ConsensusTimeout(CollectiveError):
    """A collective did not complete within ``collective_timeout_s``: a peer died, stalled or diverged."""


class CollectiveMismatch(CollectiveError):
    """Ranks made different guard calls (another phase, step or call count): they would agree on nonsense."""


class GuardHalted(GradienceError):
    """Training was stopped by the guard; ``reason`` is one of the :class:`~gradience.types.Reason` values."""

    #: The process exit status a halted run should end with (:data:`EXIT_GUARD_HALTED`).
    exit_code = EXIT_GUARD_HALTED

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or f"training halted by Gradience: {reason}")
        self.reason = reason
