"""Test environment: one thread per process and loopback-only gloo, as on CI's 2-core machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import torch  # noqa: E402

torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_results(out, nproc: int, proc) -> list[dict]:
    """Each rank's ``result_rank<r>.json`` from a finished launch, failing with the launch's stderr when a rank
    wrote none, the launch failed, or a rank reported an error."""
    import json

    results = []
    for r in range(nproc):
        path = out / f"result_rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        results.append(json.loads(path.read_text()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for res in results:
        assert "error" not in res, res["error"]
    return results
