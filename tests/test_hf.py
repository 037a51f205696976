"""GradienceCallback on a real transformers Trainer: one process in-process, two gloo ranks through
``accelerate launch`` with the shipped CPU recipe; plus every shipped gradience and accelerate config."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from accelerate.commands.config.config_args import load_config_from_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from gradience import EXIT_GUARD_HALTED, ConfigError, GradienceConfig, GuardHalted  # noqa: E402
from gradience.integrations.hf import GradienceCallback  # noqa: E402
from tests.hf_helpers import (  # noqa: E402
    BASE_LR,
    INJECT_PARAM,
    ROOT,
    GradNaNProbe,
    WeightNaN,
    launch_env,
    linear_lr,
    logged,
    make_trainer,
    train_hf,
)
from tests.loops import events  # noqa: E402

GRADIENCE_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "launch").glob("accelerate_*.yaml"))
SEED_PARAMS = dict(guard_enabled=True, guard_snapshot_interval=7, guard_violation_threshold=1e5,
                   guard_max_rollbacks=2, guard_lr_backoff=0.25, spectral_enabled=False, spectral_interval=20,
                   telemetry_interval=3)


def live_callback(trainer) -> GradienceCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradienceCallback))


def summary_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


# ----------------------------------------------------------------------------------------------- API, configs
def test_headline_import_seed_parameters_and_checkpoint_args(tmp_path):
    import gradience

    assert gradience.GradienceCallback is GradienceCallback
    cb = gradience.GradienceCallback(out_dir=str(tmp_path), **SEED_PARAMS)
    assert {k: getattr(cb.config, k) for k in SEED_PARAMS} == SEED_PARAMS
    assert cb.config.out_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="guard_snapshot_intervall"):
        GradienceCallback(guard_snapshot_intervall=5)
    yaml_cb = GradienceCallback.from_yaml(ROOT / "configs" / "hf_example.yaml", out_dir=str(tmp_path))
    assert yaml_cb.config.guard_snapshot_interval == 10 and yaml_cb.config.out_dir == str(tmp_path)
    # What the Trainer does with ExportableState on resume: type(cb)(**args), then setattr(attributes).
    exported = json.loads(json.dumps(cb.state()))
    assert type(cb)(**exported["args"]).config == cb.config


def test_fsdp1_is_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 1})
    with pytest.raises(ConfigError, match="FSDP2 only"):
        GradienceCallback(out_dir=str(tmp_path)).on_train_begin(args, TrainerState(), TrainerControl())


def test_deepspeed_without_an_engine_around_the_model_is_a_config_error(tmp_path):
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    model = torch.nn.Linear(2, 2)
    args = SimpleNamespace(deepspeed="launch/ds_zero2.json", fsdp="")
    with pytest.raises(ConfigError, match="no DeepSpeedEngine wraps"):
        GradienceCallback(out_dir=str(tmp_path)).on_train_begin(
            args, TrainerState(), TrainerControl(), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "gradience.integrations.hf")
    with pytest.raises(ImportError, match=r"gradience\[hf\]|\.\[hf\]"):
        import gradience.integrations.hf  # noqa: F401


@pytest.mark.parametrize("path", GRADIENCE_CONFIGS, ids=lambda p: p.name)
def test_every_gradience_config_loads_and_rejects_unknown_keys(path, tmp_path):
    cb = GradienceCallback.from_yaml(path)
    assert cb.config == GradienceConfig.from_yaml(path)
    data = yaml.safe_load(path.read_text())
    data["gradience"]["guard_max_rolbacks"] = 2
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="guard_max_rolbacks"):
        GradienceCallback.from_yaml(bad)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_recipe_loads_and_rejects_unknown_keys(path, tmp_path):
    cfg = load_config_from_file(str(path))
    # MULTI_GPU is what makes `accelerate launch` start num_processes ranks (MULTI_CPU starts one).
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.num_processes >= 2 and cfg.num_machines == 1
    assert cfg.use_cpu == ("cpu" in path.name)
    bad = tmp_path / path.name
    bad.write_text(path.read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


def test_world_size_check_fails_loudly(capsys):
    train_hf.check_world_size(2, 2)
    with pytest.raises(SystemExit) as e:
        train_hf.check_world_size(2, 1)
    assert e.value.code == train_hf.EXIT_WRONG_WORLD_SIZE
    assert "expected world size 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- one process
class UsedLR(TrainerCallback):
    """Records the LR each optimizer step actually uses (a torch pre-hook registered after the guard's)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        opt = kwargs["optimizer"]
        opt = getattr(opt, "optimizer", opt)
        opt.register_step_pre_hook(lambda o, a, k: self.lrs.append(float(o.param_groups[0]["lr"])))


@pytest.mark.parametrize("precision,accum", [("fp32", 1), ("bf16", 2)])
def test_weight_nan_one_rollback_lr_backoff_kept_by_scheduler(tmp_path, precision, accum):
    out, total, fault = tmp_path / "g", 30, 14
    cb = GradienceCallback(out_dir=str(out), guard_snapshot_interval=10, telemetry_interval=1)
    used = UsedLR()
    trainer = make_trainer(tmp_path / "o", [WeightNaN({fault}), cb, used], max_steps=total,
                           bf16=precision == "bf16", gradient_accumulation_steps=accum)
    trainer.train()
    assert trainer.accelerator.state.mixed_precision == ("bf16" if precision == "bf16" else "no")
    assert trainer.state.global_step == total
    rb = events(out, "rollback_success")
    assert [(e["step"], e["to_step"], e["reason"]) for e in rb] == [(fault, 10, "NONFINITE_WEIGHTS")]
    assert rb[0]["bad"]["params"] == [INJECT_PARAM]
    s = summary_json(out)["guard"]
    assert (s["total_rollbacks"], s["integrity_status"], s["lr_scale"]) == (1, "RECOVERED", 0.5)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    # The loss the guard saw (forward hook) is the Trainer's own per-step loss, finite to the end.
    seen = {e["step"]: e["train_loss"] for e in events(out, "telemetry")}
    for step, loss in logged(trainer, "loss").items():
        assert seen[step] == pytest.approx(loss, rel=1e-4), step
    assert all(math.isfinite(seen[s]) for s in range(fault + 1, total + 1))
    # The backoff is applied where the optimizer reads the LR: every later update runs at half the schedule,
    # while the scheduler (and so the Trainer's logged learning_rate) keeps the schedule itself.
    assert trainer.lr_scheduler.base_lrs == pytest.approx([BASE_LR] * len(trainer.lr_scheduler.base_lrs))
    assert len(used.lrs) == total
    for step in range(1, total + 1):  # the update of global step `step` runs at linear_lr(step)
        scale = 0.5 if step > fault else 1.0
        assert used.lrs[step - 1] == pytest.approx(linear_lr(step, total) * scale, rel=1e-9, abs=1e-15), step
    for step, lr in logged(trainer, "learning_rate").items():
        assert lr == pytest.approx(linear_lr(step, total), rel=1e-9, abs=1e-15), step
    assert rb[0]["lr"] == pytest.approx(linear_lr(fault + 1, total) * 0.5)
    # The guard's own metrics reach the Trainer's logs (and so TensorBoard / W&B / the console).
    hist = {h["step"]: h for h in trainer.state.log_history if "gradience/lr_scale" in h}
    assert sorted(hist) == sorted(logged(trainer, "loss"))
    assert (hist[fault - 1]["gradience/lr_scale"], hist[fault - 1]["gradience/rollbacks"]) == (1.0, 0)
    assert (hist[total]["gradience/lr_scale"], hist[total]["gradience/rollbacks"]) == (0.5, 1)
    assert hist[total]["gradience/integrity"] == 1  # RECOVERED


def test_nan_gradient_skips_step_and_leaves_optimizer_state(tmp_path):
    out = tmp_path / "g"
    probe = GradNaNProbe(step=8)
    cb = GradienceCallback(out_dir=str(out), guard_snapshot_interval=10)
    trainer = make_trainer(tmp_path / "o", [probe, cb], max_steps=12)  # the probe must gate-inject first
    trainer.train()
    assert probe.unchanged is True and probe.adam_steps_before == 7.0
    skips = events(out, "skip_step")
    assert [(e["step"], e["reason"], e["bad"]["params"]) for e in skips] == [(8, "NONFINITE_GRADS", [INJECT_PARAM])]
    assert events(out, "rollback_success") == []
    s = summary_json(out)["guard"]
    assert (s["total_skipped_steps"], s["total_rollbacks"], s["integrity_status"]) == (1, 0, "RECOVERED")
    opt = trainer.optimizer.optimizer
    assert float(opt.state[trainer.model.get_parameter(INJECT_PARAM)]["step"]) == 11.0  # 12 steps, 1 skipped
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


@pytest.mark.parametrize("on_halt", ["raise", "stop"])
def test_persistent_fault_halts_without_checkpointing_bad_weights(tmp_path, on_halt, caplog):
    out = tmp_path / "g"
    cb = GradienceCallback(out_dir=str(out), guard_snapshot_interval=5, guard_max_rollbacks=2, on_halt=on_halt)
    trainer = make_trainer(tmp_path / "o", [WeightNaN(set(range(12, 40))), cb], max_steps=40, save_steps=14)
    if on_halt == "raise":  # the default: impossible to miss
        with pytest.raises(GuardHalted, match="ROLLBACK_BUDGET_EXHAUSTED") as info:
            trainer.train()
        assert info.value.exit_code == EXIT_GUARD_HALTED
    else:
        trainer.train()
    assert any(r.levelname == "ERROR" and "halted training at step 14" in r.getMessage() for r in caplog.records)
    # Faults at 12 and 13 roll back (budget 2); the fault at 14 halts, a step whose checkpoint is cancelled.
    assert trainer.state.global_step == 14
    assert [e["step"] for e in events(out, "rollback_success")] == [12, 13]
    s = summary_json(out)["guard"]
    assert (s["integrity_status"], s["halt_reason"]) == ("ABORTED", "ROLLBACK_BUDGET_EXHAUSTED")
    assert events(out, "abort")[0]["reason"] == "ROLLBACK_BUDGET_EXHAUSTED"
    assert cb.halted and cb.exit_code == EXIT_GUARD_HALTED
    assert not (tmp_path / "o" / "checkpoint-14").exists()


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    """30 steps, checkpoint every 10, NaN at step 14 -> rollback to 10, LR scale 0.5 from step 15."""
    root = tmp_path_factory.mktemp("run_a")
    cb = GradienceCallback(out_dir=str(root / "g"), guard_snapshot_interval=10)
    trainer = make_trainer(root / "o", [WeightNaN({14}), cb], max_steps=30, save_steps=10)
    trainer.train()
    return {"root": root, "lrs": logged(trainer, "learning_rate"), "losses": logged(trainer, "loss"),
            "base_lrs": list(trainer.lr_scheduler.base_lrs), "state": cb.controller.state,
            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_from_trainer_checkpoint_keeps_guard_state(faulted_run, tmp_path, restore_callbacks):
    ckpt = faulted_run["root"] / "o" / "checkpoint-20"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["GradienceCallback"]
    assert saved["attributes"]["_resume_state"]["guard_state"]["lr_scale"] == 0.5
    out = tmp_path / "g"
    shutil.copytree(faulted_run["root"] / "g", out)  # same out_dir as the interrupted run
    cb = GradienceCallback(out_dir=str(out), guard_snapshot_interval=10)
    trainer = make_trainer(tmp_path / "o", [cb], max_steps=30, save_steps=10,
                           restore_callback_states_from_checkpoint=restore_callbacks)
    trainer.train(resume_from_checkpoint=str(ckpt))
    live = live_callback(trainer)
    # With the flag the Trainer rebuilds the callback from the checkpoint's args: its config, its out_dir.
    assert (live is cb) is not restore_callbacks
    out = Path(live.config.out_dir)
    assert out == (faulted_run["root"] / "g" if restore_callbacks else tmp_path / "g")
    st = live.controller.state
    assert (st.lr_scale, st.total_rollbacks, st.first_fault_step) == (0.5, 1, 14)
    # The scale came back with the guard state and is in force again; the scheduler holds the bare schedule.
    assert live.controller.lr.scale == 0.5
    assert list(trainer.lr_scheduler.base_lrs) == faulted_run["base_lrs"] == pytest.approx([BASE_LR] * 2)
    # log_history comes back from the checkpoint too: look at the steps this run made.
    lrs = {s: v for s, v in logged(trainer, "learning_rate").items() if s > 20}
    assert sorted(lrs) == list(range(21, 31))
    assert all(lrs[s] == faulted_run["lrs"][s] for s in lrs)
    # Same data, same RNG state: the resumed steps retrace the uninterrupted run.
    losses = {s: v for s, v in logged(trainer, "loss").items() if s > 20}
    assert all(losses[s] == pytest.approx(faulted_run["losses"][s], rel=1e-5) for s in losses)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), faulted_run["weights"][n], rtol=1e-5, atol=1e-6)
    evs = events(out)
    assert [e["event"] for e in evs].count("start") >= 2  # telemetry appended, not truncated
    resumed = evs[max(i for i, e in enumerate(evs) if e["event"] == "start"):]
    # The resume point is the first snapshot; no rollback happened after it.
    assert [e["step"] for e in resumed if e["event"] == "snapshot"] == [20, 30]
    assert not any(e["event"] in ("rollback_success", "rollback_failed") for e in resumed)
    s = summary_json(out)
    assert (s["guard"]["lr_scale"], s["guard"]["total_rollbacks"], s["final_step"]) == (0.5, 1, 30)


# ----------------------------------------------------------------------------------------------- launchers
def _launch(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["accelerate", "launch", *args], cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_accelerate_cpu_recipe_two_ranks_roll_back_and_skip_together(tmp_path):
    """One launch: 2 gloo ranks, DDP, gradient accumulation; NaN weight (step 12) and NaN grad (step 18) on
    rank 1 only -> both ranks roll back to the same snapshot, then both skip the same update."""
    g, o = tmp_path / "g", tmp_path / "o"
    r = _launch(tmp_path, "--config_file", "launch/accelerate_multi_cpu.yaml", "launch/train_hf.py",
                "--gradience_config", "configs/hf_example.yaml", "--gradience_out_dir", str(g), "--output_dir", str(o),
                "--expect_world_size", "2", "--max_steps", "30", "--gradient_accumulation_steps", "2",
                "--per_device_train_batch_size", "4", "--inject-nan-step", "12", "--inject-grad-nan-step", "18",
                "--inject-rank", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2" in r.stdout
    keys = ("event", "step", "to_step", "reason", "lr", "faulty_ranks")
    acts = {rank: [{k: e.get(k) for k in keys} for e in events(g, rank=rank)
                   if e["event"] in ("rollback_success", "skip_step", "abort")] for rank in (0, 1)}
    assert acts[0] == acts[1]
    assert [(e["event"], e["step"], e["to_step"], e["reason"], e["faulty_ranks"]) for e in acts[0]] == [
        ("rollback_success", 12, 10, "NONFINITE_WEIGHTS", [1]), ("skip_step", 18, None, "NONFINITE_GRADS", [1])]
    assert acts[0][0]["lr"] > 0
    for rank in (0, 1):
        assert events(g, "start", rank=rank)[0]["world_size"] == 2
        assert [e["step"] for e in events(g, "snapshot", rank=rank)] == [0, 10, 20, 30]
    s = summary_json(g)
    assert s["world_size"] == 2
    assert (s["guard"]["total_rollbacks"], s["guard"]["total_skipped_steps"], s["guard"]["lr_scale"]) == (1, 1, 0.5)
    res = [json.loads((o / f"train_result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [x["world_size"] for x in res] == [2, 2] and [x["exit_code"] for x in res] == [0, 0]
    assert res[0]["weights_sha256"] == res[1]["weights_sha256"]  # replicas still bitwise identical
    assert all(x["weights_finite"] and math.isfinite(x["final_loss"]) for x in res)
    assert res[0]["base_lrs"] == res[1]["base_lrs"] == pytest.approx([3e-3, 3e-3])  # the bare schedule


@pytest.mark.slow
def test_a_halt_ends_every_rank_with_status_3(tmp_path):
    """Each rank process of a halted 2-rank run exits 3, with no traceback of ours; under torchrun the launcher
    reports status 3 (a rank it stops itself while that rank is already exiting shows as -15, SIGTERM)."""
    import re
    import socket

    cfg = tmp_path / "halt.yaml"
    cfg.write_text("gradience:\n  guard_max_rollbacks: 0\n  guard_snapshot_interval: 5\n")

    def args(run):
        return ["launch/train_hf.py", "--gradience_config", str(cfg), "--gradience_out_dir", str(tmp_path / run / "g"),
                "--output_dir", str(tmp_path / run / "o"), "--expect_world_size", "2", "--max_steps", "20",
                "--inject-nan-step", "8", "--inject-rank", "1"]

    with socket.socket() as sock:  # the ranks' own processes, as a launcher would start them
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *args("direct")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**launch_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_PORT": str(port)}) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs[0][-2000:] + outs[1][-2000:]
    for text in outs:
        assert "Traceback" not in text  # no traceback from our side
        assert "halted training at step 8: ROLLBACK_BUDGET_EXHAUSTED" in text or "rank 1" in text
    res = [json.loads((tmp_path / "direct" / "o" / f"train_result_rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["exit_code"] for x in res] == [3, 3] and [x["global_step"] for x in res] == [8, 8]

    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", *args("torchrun")], cwd=ROOT,
                       env=launch_env(), capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    assert "3" in codes and set(codes) <= {"3", "-15"}, codes
    assert "raise GuardHalted" not in text
    assert "halted training at step 8: ROLLBACK_BUDGET_EXHAUSTED" in text  # the guard's ERROR line


@pytest.mark.slow
def test_plain_accelerate_cpu_flag_starts_one_process_and_is_caught(tmp_path):
    r = _launch(tmp_path, "--cpu", "--num_processes", "2", "launch/train_hf.py", "--expect_world_size", "2",
                "--output_dir", str(tmp_path / "o"), "--max_steps", "1")
    assert r.returncode != 0
    assert "expected world size 2, but the Trainer runs 1 process" in r.stderr


def test_under_the_asynchronous_verdict_a_trainer_checkpoint_never_holds_an_unjudged_step(tmp_path):
    """The Trainer saves right after step(); the asynchronous verdict of that step is judged before the save
    (GradienceController.settle), so a weight fault in a save step is rolled back first, not saved."""
    from safetensors.torch import load_file

    cb = GradienceCallback(out_dir=str(tmp_path / "g"), guard_verdict="async", spectral_enabled=False,
                           guard_snapshot_interval=2)
    make_trainer(tmp_path, [WeightNaN({4}), cb], max_steps=8, save_steps=4, save_strategy="steps",
                 optim="adamw_torch_fused").train()
    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert [(e["step"], e["verdict_step"]) for e in events(tmp_path / "g", "rollback_success")] == [(4, 4)]
    assert cb.controller.state.verdict_path == "async"
