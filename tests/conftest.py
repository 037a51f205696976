"""Test environment: one thread per process and loopback-only gloo, as on CI's 2-core machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import torch  # noqa: E402

torch.set_num_threads(1)
