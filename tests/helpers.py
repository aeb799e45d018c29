"""Shared test helpers: tiny configs and running the real CLI in a subprocess."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

from convmixer_dist.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tf_config(hosts: list[str], index: int) -> str:
    """TF_CONFIG for worker `index` of a cluster of `hosts` ("host:port"), as launch/local.sh writes it."""
    return json.dumps({"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}})


def tiny_config(model_dir: str, **overrides) -> Config:
    """A ConvMixer small enough to train a few steps in about a second on CPU."""
    base = dict(hidden_dim=16, depth=2, kernel_size=3, patch_size=2, image_size=8, num_classes=4,
                dataset="synthetic", synthetic_train_size=256, synthetic_test_size=100,
                global_batch_size=32, train_steps=6, steps_per_loop=3, checkpoint_every_steps=3,
                learning_rate=0.01, model_dir=model_dir, seed=1)
    base.update(overrides)
    return dataclasses.replace(Config(), **base)


def run_cli(module: str, *args: str, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """Run `python -m module args...` from the repository root."""
    full_env = dict(os.environ)
    for key, value in (env or {}).items():  # None removes the variable.
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def free_ports(n: int) -> list[int]:
    """`n` TCP ports on localhost that were free a moment ago (for TF_CONFIG clusters in tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def file_contents(directory) -> dict[str, bytes]:
    """Every file below `directory` (relative path -> bytes): to assert a run was left untouched."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = open(path, "rb").read()
    return found
