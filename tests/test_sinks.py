"""The optional TensorBoard sink: real SummaryWriter event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradience import GradienceController  # noqa: E402
from gradience.telemetry import Telemetry  # noqa: E402
from tests.loops import make_mlp, mlp_loss, poison, run_loop  # noqa: E402


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_plain_loop_metrics_reach_tensorboard(tmp_path):
    ctl = GradienceController(out_dir=str(tmp_path), guard_snapshot_interval=5, telemetry_interval=1,
                              tensorboard=True)
    run_loop(make_mlp(), mlp_loss, ctl, steps=12, on_update=lambda s, m: poison("0.weight")(m) if s == 7 else None)
    got = scalars(tmp_path / "tensorboard")
    assert {"gradience/train_loss", "gradience/lr", "gradience/lr_scale", "gradience/rollbacks"} <= set(got)
    assert got["gradience/rollbacks"] == [(7, 1.0)]
    scale = dict(got["gradience/lr_scale"])
    assert scale[6] == 1.0 and scale[11] == 0.5


def test_a_failing_sink_is_switched_off_and_training_goes_on(tmp_path, caplog):
    class Broken:
        def handle(self, record):
            raise OSError("disk gone")

        def close(self):
            pass

    t = Telemetry(tmp_path, sinks=[Broken()])
    t.emit("telemetry", step=1, train_loss=1.0)
    t.emit("telemetry", step=2, train_loss=1.0)
    t.close()
    assert t.sinks == []
    assert sum("switched off" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / "telemetry.jsonl").read_text().splitlines()) == 2
