"""``gradience report``: real demo runs reported end to end, a run in progress, synthetic edge cases, a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report extra is not installed: pip install -e '.[report]'")
pytest.importorskip("rich", reason="the report extra is not installed: pip install -e '.[report]'")

from gradience.report import MissingDependency, ReportError, build_report, load_run  # noqa: E402

# Snapshots at 0 and 20, the fault at 30: the rollback goes back to step 20.
DEMO = ["--device", "cpu", "--steps", "80", "--inject-step", "30"]
CHROMIUM = Path("/usr/bin/chromium")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def _demo(out_dir: Path, *args: str, ranks: int = 1) -> None:
    if ranks == 1:
        cmd = [sys.executable, "-m", "gradience.demo"]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "gradience.demo"]
    r = subprocess.run([*cmd, *DEMO, "--out-dir", str(out_dir), *args], capture_output=True, text=True, env=_env(),
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr


def _report(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradience", "report", str(out_dir), *extra], capture_output=True,
                          text=True, env=_env(), timeout=120)


def _row(stdout: str, label: str) -> str:
    """The value cell of a row of the terminal table."""
    m = re.search(rf"{re.escape(label)}\W+(.*?)\s*\W?\s*$", stdout, re.MULTILINE)
    assert m, stdout
    return m.group(1)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("nan_run")
    _demo(out, "--guard", "--inject-nan")
    return out, _report(out)


@pytest.fixture(scope="module")
def grad_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("grad_run")
    _demo(out, "--guard", "--inject-grad-nan")
    return out, _report(out)


def _assert_offline(page: str) -> None:
    for bad in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert bad not in page.lower(), bad
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert imgs
    for img in imgs:
        assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', img), img[:120]


def test_html_has_every_section_and_loads_nothing(nan_run) -> None:
    out, r = nan_run
    assert r.returncode == 0, r.stdout + r.stderr
    page = (out / "report.html").read_text(encoding="utf-8")
    _assert_offline(page)
    for section in ("status", "summary", "figure", "faults", "probe-errors", "spectral", "files"):
        assert f'<section id="{section}">' in page, section
    assert "RECOVERED" in page and "NONFINITE_WEIGHTS" in page
    assert "transformer.h.0.attn.c_attn.weight" in page
    assert "to step 20" in page
    # The demo's guard probes κ̃: its values reach the report (the figure's κ̃ panel and this section).
    assert "Last value:" in page and "Spectral probe: no data" not in page
    assert "No probe errors." in page


def test_png_is_a_readable_figure(nan_run) -> None:
    out, _ = nan_run
    data = (out / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "report.png")
    height, width = img.shape[:2]
    assert 900 <= width <= 2500 and 500 <= height <= 2000, img.shape


def test_terminal_table_says_recovered_with_one_rollback(nan_run) -> None:
    out, r = nan_run
    assert "RECOVERED" in _row(r.stdout, "Status")
    assert _row(r.stdout, "Rollbacks") == "1"
    assert _row(r.stdout, "Skipped steps") == "0"
    assert _row(r.stdout, "LR scale") == "0.5"
    assert _row(r.stdout, "First fault") == "step 30 on rank(s) 0"
    assert str(out / "report.html") in r.stdout and str(out / "report.png") in r.stdout
    assert "\x1b[" not in r.stdout  # not a terminal: no colour codes


def test_load_run_api(nan_run) -> None:
    out, _ = nan_run
    run = load_run(out)
    assert list(run.ranks) == [0] and run.summary_source == "summary.json"
    assert run.status == "RECOVERED" and not run.in_progress and run.restarts == 0
    (row,) = run.faults()
    assert (row.event, row.step, row.x, row.to_x, row.faulty_ranks) == ("rollback_success", 30, 30, 20, [0])
    assert row.tensors == {0: ["transformer.h.0.attn.c_attn.weight"]}
    result = build_report(out, dest=out / "again")
    assert result.status == "RECOVERED" and result.summary["guard"]["total_rollbacks"] == 1
    assert result.html_path.exists() and result.png_path.exists()


def test_grad_nan_run_shows_the_skip(grad_run) -> None:
    out, r = grad_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert _row(r.stdout, "Skipped steps") == "1" and _row(r.stdout, "Rollbacks") == "0"
    page = (out / "report.html").read_text(encoding="utf-8")
    _assert_offline(page)
    assert "skipped update" in page and "NONFINITE_GRADS" in page
    (row,) = load_run(out).faults()
    assert (row.event, row.step) == ("skip_step", 30)


def test_truncated_copy_without_summary_still_reports(nan_run, tmp_path: Path) -> None:
    src, _ = nan_run
    data = (src / "telemetry.jsonl").read_bytes()
    cut = len(data) // 2
    while data[cut - 1:cut] == b"\n":  # cut inside a line, not between two
        cut += 7
    (tmp_path / "telemetry.jsonl").write_bytes(data[:cut])  # a copy: no summary.json, no snapshots
    r = _report(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IN PROGRESS (no summary yet)" in _row(r.stdout, "Status")
    assert "in progress, last step seen" in _row(r.stdout, "Steps")
    assert "last line incomplete" in r.stdout
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    _assert_offline(page)
    assert "IN PROGRESS" in page and "No summary yet" in page
    run = load_run(tmp_path)
    assert run.in_progress and run.ranks[0].incomplete_last_line and run.ranks[0].bad_lines == 1


def test_missing_or_empty_out_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no telemetry" in capsys.readouterr().err
    with pytest.raises(ReportError):
        load_run(tmp_path)


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MissingDependency, match=r"pip install -e '\.\[report\]'.*unrelated"):
        build_report(tmp_path)


def _write(path: Path, events: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"rank": 0, "time": 1.0, **e}) + "\n" for e in events) + tail)


def test_step_count_restarts_and_kappa_bands(tmp_path: Path) -> None:
    # A loop that restarts its step count each epoch, with κ̃ data, a non-finite loss and a junk line.
    events = [{"event": "start", "world_size": 1, "config": {}}]
    for epoch in range(2):
        for step in range(0, 40, 10):
            events.append({"event": "telemetry", "step": step, "train_loss": "nan" if (epoch, step) == (1, 30) else
                           3.0 - step / 100, "lr": 1e-3, "lr_scale": 1.0, "weight_norm": 1.0,
                           "spectral_kappa": 10.0 + step, "risk_level": "WARNING" if step == 20 else "STABLE"})
    events.insert(3, {"event": "skip_step", "step": 15, "reason": "NONFINITE_GRADS", "faulty_ranks": [0],
                      "bad": {"params": ["w"], "buffers": [], "more": 2, "skipped": []}})
    events.append({"event": "probe_error", "step": 30, "phase": "grads", "error": "RuntimeError: boom",
                   "consecutive": 1, "disabled": False})
    _write(tmp_path / "telemetry.jsonl", events[:5], "not json\n")
    with open(tmp_path / "telemetry.jsonl", "a") as f:
        f.write("".join(json.dumps({"rank": 0, "time": 1.0, **e}) + "\n" for e in events[5:]))
    run = load_run(tmp_path)
    xs = [e.x for e in run.telemetry()]
    assert xs == sorted(xs) and len(set(xs)) == len(xs) and run.restarts == 1
    assert run.ranks[0].bad_lines == 1 and not run.ranks[0].incomplete_last_line
    (skip,) = run.faults()
    assert skip.tensors == {0: ["w"]} and skip.more == {0: 2}
    assert len(run.spectral()) == 8
    result = build_report(tmp_path)
    page = result.html_path.read_text(encoding="utf-8")
    _assert_offline(page)
    assert "no data" not in page and "WARNING" in page and "RuntimeError: boom" in page and "(+2 more)" in page
    assert "1 unreadable line(s) skipped" in page

    from gradience.report.figure import render

    fig = render(run)
    assert len(fig.axes) == 4  # loss, LR, κ̃, and the LR scale's twin axis
    assert "restarted 1x" in fig.axes[2].get_xlabel()


def test_rank_summaries_without_summary_json(tmp_path: Path) -> None:
    # Rank 0 died: no summary.json, a survivor's summary_rank1.json says ABORTED.
    _write(tmp_path / "telemetry_rank1.jsonl", [
        {"event": "start", "world_size": 2, "config": {}},
        {"event": "abort", "step": 7, "reason": "CONSENSUS_TIMEOUT", "error": "peer died"}])
    (tmp_path / "summary_rank1.json").write_text(json.dumps(
        {"total_steps": 8, "final_step": 7, "world_size": 2, "global_rank": 1,
         "guard": {"integrity_status": "ABORTED", "halt_reason": "CONSENSUS_TIMEOUT", "total_rollbacks": 0}}))
    run = load_run(tmp_path)
    assert run.status == "ABORTED" and run.summary_source == "summary_rank1.json"
    assert "summary.json missing" in " ".join(run.warnings)
    page = build_report(tmp_path).html_path.read_text(encoding="utf-8")
    assert "CONSENSUS_TIMEOUT" in page and "peer died" in page


@pytest.mark.slow
def test_two_rank_run_names_the_faulty_rank(tmp_path: Path) -> None:
    _demo(tmp_path, "--guard", "--inject-nan", "--inject-rank", "1", ranks=2)
    r = _report(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _row(r.stdout, "First fault") == "step 30 on rank(s) 1"
    run = load_run(tmp_path)
    assert sorted(run.ranks) == [0, 1] and sorted(run.rank_summaries) == [0, 1]
    (row,) = run.faults()
    assert row.faulty_ranks == [1] and row.reported_by == [0, 1]
    assert row.tensors == {1: ["transformer.h.0.attn.c_attn.weight"]}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    _assert_offline(page)
    faults = page.split('<section id="faults">')[1].split("</section>")[0]
    assert "<td>1</td>" in faults and "rank 1: <code>transformer.h.0.attn.c_attn.weight</code>" in faults
    assert "telemetry_rank1.jsonl" in page


def test_chromium_renders_the_page_without_errors(nan_run, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    out, _ = nan_run
    shot = tmp_path / "shot.png"
    r = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                        "--v=0", f"--screenshot={shot}", "--window-size=1200,1600",
                        (out / "report.html").resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert not errors, errors
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_reading_a_run_does_not_import_torch():
    """The report only reads files: it must start fast and work where torch is not installed."""
    import subprocess
    import sys

    code = "import sys, gradience.report, gradience.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
