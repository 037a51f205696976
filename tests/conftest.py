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
