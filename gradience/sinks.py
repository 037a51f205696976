"""Optional telemetry sinks: where the guard's events go besides ``telemetry.jsonl`` and the log.

Today one sink, TensorBoard (``tensorboard: true`` in the config), for plain loops; the Trainer callback
reports its ``gradience/*`` metrics through the Trainer's own integrations instead. A sink is fed the
records ``Telemetry.emit`` writes and must never break training: :class:`Telemetry` guards every call.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("gradience")

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Sink(Protocol):
    """Receives every telemetry record of one rank."""

    def handle(self, record: dict[str, Any]) -> None:
        """Consume one record (as written to telemetry.jsonl)."""
        ...

    def close(self) -> None:
        """Flush and release."""
        ...


class TensorBoardSink:
    """Scalars of the guard under ``gradience/*`` in a TensorBoard log directory.

    ``telemetry`` events give ``train_loss``, ``lr`` (the LR in force, backoff included), ``lr_scale`` and
    ``weight_norm`` at their step; skips, rollbacks and halts are counted at the step they happened; the
    final summary is written as text.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard: true needs the tensorboard package: pip install tensorboard "
                              f"(import failed with: {e})") from e
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._counts = {"skip_step": 0, "rollback_success": 0}

    def handle(self, record: dict[str, Any]) -> None:
        """Turn one record into scalars (or text)."""
        event, step = record.get("event"), record.get("step")
        if not isinstance(step, int):
            step = 0
        if event == "telemetry":
            for key in ("train_loss", "lr", "lr_scale", "weight_norm", "spectral_kappa"):
                value = _number(record.get(key))
                if value is not None:
                    self.writer.add_scalar(f"gradience/{key}", value, step)
        elif event in self._counts:
            self._counts[event] += 1
            name = "skipped_steps" if event == "skip_step" else "rollbacks"
            self.writer.add_scalar(f"gradience/{name}", self._counts[event], step)
            if event == "rollback_success" and _number(record.get("lr_scale")) is not None:
                self.writer.add_scalar("gradience/lr_scale", _number(record["lr_scale"]), step)
        elif event == "abort":
            self.writer.add_text("gradience/halt", f"step {step}: {record.get('reason')} {record.get('error') or ''}",
                                 step)
        elif event == "summary":
            guard = record.get("guard") or {}
            self.writer.add_text("gradience/summary", f"{guard.get('integrity_status')}: "
                                 f"{guard.get('total_rollbacks')} rollback(s), {guard.get('total_skipped_steps')} "
                                 f"skipped update(s), LR scale {guard.get('lr_scale')}", step)
        else:
            return
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return None


def make_sinks(enabled_tensorboard: bool, out_dir: Path, *, leader: bool) -> list[Sink]:
    """The sinks the config asks for, on the rank that reports (the group leader: ranks agree on decisions)."""
    if not (enabled_tensorboard and leader):
        return []
    return [TensorBoardSink(out_dir / "tensorboard")]
