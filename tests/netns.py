"""The multi-host test bed (launch/testing/netns_cluster.sh) for tests: N namespaces with sshd."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "launch", "testing", "netns_cluster.sh")


@dataclasses.dataclass(frozen=True)
class Cluster:
    prefix: str
    dir: str
    hosts: list[str]

    @property
    def ssh(self) -> str:
        """The ssh wrapper (connects from the cluster's login namespace)."""
        return os.path.join(self.dir, "ssh")

    @property
    def hosts_file(self) -> str:
        return os.path.join(self.dir, "hosts")

    def namespace(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    def env(self) -> dict[str, str]:
        return dict(os.environ, NETNS_CLUSTER_PREFIX=self.prefix, NETNS_CLUSTER_DIR=self.dir)


def script(*args: str, prefix: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run netns_cluster.sh with the namespaces named PREFIX-*."""
    env = dict(os.environ, NETNS_CLUSTER_PREFIX=prefix, NETNS_CLUSTER_DIR=f"/tmp/{prefix}")
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def unique_prefix(tag: str) -> str:
    """A namespace prefix of this test process (at most 8 characters, as the script requires)."""
    return f"{tag[:2]}{os.getpid() % 1000000}"


@contextlib.contextmanager
def netns_cluster(n: int, *options: str, tag: str = "tb") -> Iterator[Cluster]:
    """`up N OPTIONS` on entry, `down` on exit. Needs root (CI runs as root)."""
    prefix = unique_prefix(tag)
    up = script("up", str(n), *options, prefix=prefix)
    try:
        assert up.returncode == 0, f"netns_cluster.sh up failed ({up.returncode}): {up.stderr}"
        with open(f"/tmp/{prefix}/hosts") as f:
            hosts = f.read().split()
        yield Cluster(prefix, f"/tmp/{prefix}", hosts)
    finally:
        script("down", prefix=prefix)
