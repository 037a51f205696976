"""Run docker/compose.yaml's services without Docker: the same commands, on this machine.

    python docker/run_local.py --profile cpu          # = docker compose -f docker/compose.yaml --profile cpu up
    python docker/run_local.py --profile two-node     # node0 + node1: two torchrun processes on localhost
    python docker/run_local.py --print node0 node1    # show the commands, run nothing

Each service's ``command`` is read from compose.yaml and interpolated as Compose does for the forms that file
uses (``${VAR:-default}``, ``${VAR}`` and ``$$``, from the environment), then split into words. Exactly three
kinds of word change, because this machine is not the compose network: paths under the ``/logs`` volume move
to ``--logs`` (default ./gradience_logs, the folder the volume maps), the ``--master_addr`` value becomes
127.0.0.1, and the ``--master_port`` value a free local port (one for all services of a run). The image's
environment is mirrored (OMP_NUM_THREADS=1, GLOO_SOCKET_IFNAME=lo unless already set); a service's own
interface settings (GLOO_SOCKET_IFNAME=eth0 for the nodes) name a container's interface and are not applied.

Services start in the order given, from the repository root (the image's working directory), each in its own
process group; their output is prefixed with the service name as ``docker compose up`` does. When one exits
non-zero the others are stopped (``--abort-on-container-failure``), and all are stopped at ``--timeout``.
Exit status: 0 when every service exited 0, else the first failure's status (124 for the timeout).

tests/test_docker.py runs services through this file and checks, with Docker Compose itself, that the
commands read here are the ones Compose resolves.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
LOGS = "/logs"  # the container side of every service's `../gradience_logs:/logs` volume
LOCAL_ADDR = "127.0.0.1"
IMAGE_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
CONTAINER_ONLY_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
EXIT_TIMEOUT = 124
# Compose's interpolation, restricted to what compose.yaml uses; anything else is refused, not guessed.
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<sep>:?-)(?P<default>[^}$]*))?\})")


def load(path: Path = COMPOSE_FILE) -> dict:
    """The compose file as data (YAML merge keys resolved, nothing interpolated)."""
    return yaml.safe_load(path.read_text())


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (when unset), ``$$``."""

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        value = env.get(m["name"])
        if m["sep"] == ":-" and not value:
            return m["default"]
        if m["sep"] == "-" and value is None:
            return m["default"]
        return value or ""

    out = _VAR.sub(one, text)
    if "$" in _VAR.sub("", text):
        raise ValueError(f"unsupported interpolation in {text!r} (run_local.py knows ${{VAR}}, ${{VAR:-x}}, $$)")
    return out


def services(compose: dict | None = None, profile: str | None = None) -> list[str]:
    """Service names in file order; with ``profile``, those that profile turns on ("*": all, as in Compose)."""
    compose = compose if compose is not None else load()
    return [name for name, svc in compose["services"].items()
            if profile in (None, "*") or profile in svc.get("profiles", [])]


def service_argv(name: str, env: Mapping[str, str] | None = None, compose: dict | None = None) -> list[str]:
    """The words of the service's command as Compose resolves them (the container's argv)."""
    compose = compose if compose is not None else load()
    env = os.environ if env is None else env
    command = compose["services"][name]["command"]
    if isinstance(command, str):
        return shlex.split(interpolate(command, env))
    return [interpolate(str(word), env) for word in command]


def localize(argv: list[str], logs: Path, master_port: int) -> list[str]:
    """The same command for this machine: /logs -> ``logs``, master address -> 127.0.0.1, port -> ``master_port``."""
    out: list[str] = []
    for i, word in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev == "--master_addr":
            word = LOCAL_ADDR
        elif prev == "--master_port":
            word = str(master_port)
        elif word == LOGS or word.startswith(LOGS + "/"):
            word = str(logs) + word[len(LOGS):]
        out.append(word)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_ADDR, 0))
        return s.getsockname()[1]


def local_env(base: Mapping[str, str] | None = None, service_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key, value in (service_env or {}).items():
        if key not in CONTAINER_ONLY_ENV:
            env[key] = str(value)
    for key, value in IMAGE_ENV.items():
        env.setdefault(key, value)
    return env


def executable(word: str) -> str:
    """A launcher next to this interpreter (the venv's torchrun / accelerate) first, then PATH."""
    beside = Path(sys.executable).parent / word
    if "/" not in word and beside.exists():
        return str(beside)
    return shutil.which(word) or word


@dataclass
class Result:
    name: str
    argv: list[str]
    returncode: int | None = None
    stopped: bool = False  # still running when another service failed or the timeout came: stopped by us
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _pump(proc: subprocess.Popen, result: Result, echo: bool, width: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        result.lines.append(line)
        if echo:
            sys.stdout.write(f"{result.name:<{width}} | {line}")
            sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.1)


def run(names: list[str], logs: Path, timeout: float = 600.0, echo: bool = True,
        env: Mapping[str, str] | None = None, compose: dict | None = None) -> list[Result]:
    """Start the services together, wait for all (or the first failure, or the timeout); one Result each."""
    compose = compose if compose is not None else load()
    base = os.environ if env is None else env
    port = free_port()
    width = max(map(len, names))
    results: list[Result] = []
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    timed_out = False
    try:
        for name in names:
            argv = localize(service_argv(name, base, compose), logs, port)
            proc = subprocess.Popen([executable(argv[0]), *argv[1:]], cwd=ROOT, start_new_session=True,
                                    env=local_env(base, compose["services"][name].get("environment")),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
            results.append(Result(name, argv))
            procs.append(proc)
            pumps.append(threading.Thread(target=_pump, args=(proc, results[-1], echo, width), daemon=True))
            pumps[-1].start()
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        running = [p.poll() is None for p in procs]
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=10)
    for result, proc, was_running in zip(results, procs, running, strict=True):
        result.returncode, result.stopped, result.timed_out = proc.returncode, was_running, was_running and timed_out
        if result.stopped:
            why = f"the {timeout:.0f} s timeout" if timed_out else "another service failed"
            result.lines.append(f"run_local.py: {result.name} stopped: {why}\n")
    return results


def exit_status(results: list[Result]) -> int:
    """0 when all exited 0; 124 on the timeout; else the first service's own failure (128+N for signal N)."""
    if any(r.timed_out for r in results):
        return EXIT_TIMEOUT
    for r in results:
        if not r.stopped and r.returncode:
            return r.returncode if r.returncode > 0 else 128 - r.returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docker/run_local.py", description=__doc__.split("\n\n")[0])
    p.add_argument("services", nargs="*", help="service names from docker/compose.yaml")
    p.add_argument("--profile", action="append", default=[],
                   help="run every service of this compose profile (cpu, gpu, trainer, two-node); repeatable")
    p.add_argument("--logs", type=Path, default=ROOT / "gradience_logs",
                   help="the folder that stands for the /logs volume (default: ./gradience_logs)")
    p.add_argument("--timeout", type=float, default=1800, help="stop everything after this many seconds")
    p.add_argument("--print", action="store_true", help="print the local commands and exit")
    args = p.parse_args(argv)
    compose = load()
    names = list(dict.fromkeys([*(n for prof in args.profile for n in services(compose, prof)), *args.services]))
    unknown = [n for n in names if n not in compose["services"]]
    if not names or unknown:
        p.error(f"name services or a profile; unknown: {unknown}" if unknown else "name services or a profile")
    if args.print:
        port = free_port()
        for name in names:
            print(f"{name}: {shlex.join(localize(service_argv(name, compose=compose), args.logs, port))}")
        return 0
    results = run(names, args.logs.resolve(), timeout=args.timeout, compose=compose)
    for r in results:
        print(f"run_local.py: {r.name} exited {r.returncode}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
