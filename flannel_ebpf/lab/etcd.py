"""A real etcd server for tests and the lab: on loopback, or inside a lab namespace.

Only processes this module started are ever signalled, by their PID; the data directory is ours and is
removed on `close()`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from loguru import logger

from .netns import stop_process

ETCD_BINARY = "etcd"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (on loopback; good enough for a test server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    """One etcd member. `netns` runs it inside that namespace (via `ip netns exec`)."""

    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    netns: str | None = None
    data_dir: str = ""
    name: str = "flannel-ebpf-test"
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_data_dir: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.netns is None:
            self.client_port = self.client_port or free_port(self.host)
            self.peer_port = self.peer_port or free_port(self.host)
        else:
            self.client_port = self.client_port or 2379
            self.peer_port = self.peer_port or 2380
        if not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix="flannel-ebpf-etcd-")
            self._own_data_dir = True

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if shutil.which(ETCD_BINARY) is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server; `make setup` installs it)")
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", os.path.join(self.data_dir, "member-data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"{self.name}=http://{self.host}:{self.peer_port}",
            "--initial-cluster-state", "new",
            "--log-level", "error",
        ]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        logger.debug("etcd pid {} serving {}", self.proc.pid, self.endpoint)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = ["etcdctl", "--endpoints", self.endpoint, "endpoint", "health"]
        if self.netns:
            probe = ["ip", "netns", "exec", self.netns, *probe]
        env = {**os.environ, "ETCDCTL_API": "3"}
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            r = subprocess.run(probe, env=env, capture_output=True, timeout=10, check=False)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"etcd did not become healthy within {timeout}s")

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL); its data stays for a later `start()`."""
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None

    def wipe(self) -> None:
        """Forget all data (etcd must be stopped): the next `start()` is an empty cluster."""
        assert self.proc is None, "stop etcd before wiping its data"
        shutil.rmtree(os.path.join(self.data_dir, "member-data"), ignore_errors=True)

    def close(self) -> None:
        self.stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def ctl(self, *args: str, input: str | None = None) -> str:
        """Run etcdctl (v3) against this server; returns stdout. For tests and the demo.
        `input` goes to etcdctl's stdin: `ctl("put", key, input=value)` stores any value, even one that
        starts with `-` and would otherwise be parsed as a flag."""
        cmd = ["etcdctl", "--endpoints", self.endpoint, *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        r = subprocess.run(
            cmd,
            env={**os.environ, "ETCDCTL_API": "3"},
            input=input,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
