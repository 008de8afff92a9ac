"""A real etcd for tests and the lab: one server on loopback or inside a lab namespace, or a cluster of
members, each in a namespace of its own (`EtcdCluster`).

Only processes this module started are ever signalled, by their PID; the data directories are ours and
are removed on `close()`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from .netns import stop_process

ETCD_BINARY = "etcd"
# a v2 request run inside a namespace (the test process may not reach it): prints etcd's JSON answer
_V2_REQUEST = """
import sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[2], method=sys.argv[1])
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        sys.stdout.write(answer.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode())
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (on loopback; good enough for a test server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdServer:
    """One etcd member. `netns` runs it inside that namespace (via `ip netns exec`)."""

    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    netns: str | None = None
    data_dir: str = ""
    name: str = "flannel-ebpf-test"
    extra_args: list[str] = field(default_factory=list)  # more etcd flags (e.g. --auth-token-ttl)
    #: `name=peer-url,...` of every member of a new cluster (empty: this server alone)
    initial_cluster: str = ""
    cluster_token: str = "etcd-cluster"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
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

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0, wait: bool = True) -> None:
        """Start etcd (with the data it had, if any); `wait`: until it answers a linearizable read (a
        member of a cluster does only once a quorum of members runs)."""
        if self.running:
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
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--log-level", "error",
            *self.extra_args,
        ]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        logger.debug("etcd {} pid {} serving {}", self.name, self.proc.pid, self.endpoint)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
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

    def kill(self) -> None:
        """A crash: SIGKILL, no goodbye to the other members; the data stays for a later `start()`."""
        if self.proc is not None:
            stop_process(self.proc, 10, signal.SIGKILL)
        self.proc = None

    def remove_data(self) -> None:
        """Delete etcd's data (the lab calls it on close, even when it keeps the logs)."""
        shutil.rmtree(os.path.join(self.data_dir, "member-data"), ignore_errors=True)

    def status(self) -> dict[str, int] | None:
        """This member's view: {"member_id", "leader", "revision"}; None if it does not answer."""
        try:
            out = json.loads(self.ctl("endpoint", "status", "-w", "json", "--command-timeout", "2s"))
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
            return None
        st = out[0]["Status"]
        # During an election a member knows no leader: etcd's JSON then omits the field (a zero value).
        return {
            "member_id": st["header"]["member_id"],
            "leader": st.get("leader", 0),
            "revision": st["header"]["revision"],
        }

    def wipe(self) -> None:
        """Forget all data (etcd must be stopped): the next `start()` is an empty cluster."""
        assert self.proc is None, "stop etcd before wiping its data"
        shutil.rmtree(os.path.join(self.data_dir, "member-data"), ignore_errors=True)

    def close(self) -> None:
        self.stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def ctl(self, *args: str, input: str | None = None, endpoints: str = "") -> str:
        """Run etcdctl (v3) against this server; returns stdout. For tests and the demo.
        `input` goes to etcdctl's stdin: `ctl("put", key, input=value)` stores any value, even one that
        starts with `-` and would otherwise be parsed as a flag."""
        cmd = ["etcdctl", "--endpoints", endpoints or self.endpoint, *args]
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

    def v2(self, method: str, key: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One request to etcd's v2 keys API (etcd started with --enable-v2), from inside its namespace;
        returns etcd's JSON answer (an error too: `errorCode`). Parameters go in the query string."""
        url = f"{self.endpoint}/v2/keys{urllib.parse.quote(key)}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        cmd = [sys.executable, "-c", _V2_REQUEST, method, url]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"etcd v2 {method} {key} failed: {r.stderr.strip()[-500:]}")
        answer: dict[str, Any] = json.loads(r.stdout)
        return answer

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class EtcdCluster:
    """A cluster of etcd members, as production runs etcd; each member in a namespace of its own.

    Quacks like one EtcdServer for the lab (`endpoint` lists every member, `ctl`, `start`, `stop`, ...) and
    adds what faults need: the leader, and killing and restarting single members."""

    members: list[EtcdServer]

    @classmethod
    def create(cls, hosts: Sequence[tuple[str, str, str]], data_dir: str, token: str) -> EtcdCluster:
        """`hosts`: (name, address, namespace) of each member; their data under `data_dir/<name>`."""
        initial = ",".join(f"{name}=http://{addr}:2380" for name, addr, _ in hosts)
        return cls(
            [
                EtcdServer(
                    host=addr,
                    netns=netns,
                    data_dir=os.path.join(data_dir, name),
                    name=name,
                    initial_cluster=initial,
                    cluster_token=token,
                )
                for name, addr, netns in hosts
            ]
        )

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """Every member's client URL, comma-separated (as --etcd-endpoints takes them)."""
        return ",".join(self.endpoints)

    @property
    def data_dir(self) -> str:
        return os.path.dirname(self.members[0].data_dir)

    def start(self, timeout: float = 30.0, members: Sequence[int] | None = None) -> None:
        """Start the given members (default: all) together, then wait until each answers."""
        chosen = [self.members[i] for i in (members if members is not None else range(len(self.members)))]
        for m in chosen:
            m.start(wait=False)
        for m in chosen:
            m.wait_ready(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def close(self) -> None:
        for m in self.members:
            m.close()

    def remove_data(self) -> None:
        for m in self.members:
            m.remove_data()

    def wipe(self) -> None:
        for m in self.members:
            m.wipe()

    def _any_running(self) -> EtcdServer:
        return next((m for m in self.members if m.running), self.members[0])

    def ctl(self, *args: str, input: str | None = None) -> str:
        """etcdctl against all members (it picks one that answers), run in a running member's namespace."""
        return self._any_running().ctl(*args, input=input, endpoints=self.endpoint)

    def leader(self) -> int | None:
        """The index of the member the running members agree leads, if they do."""
        ids: dict[int, int] = {}
        leaders = set()
        for i, m in enumerate(self.members):
            if not m.running:
                continue
            st = m.status()
            if st is None:
                return None
            ids[st["member_id"]] = i
            leaders.add(st["leader"])
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def wait_leader(self, timeout: float = 20.0, other_than: int | None = None) -> int:
        """Until the running members agree on a leader (other than `other_than`); returns its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and leader != other_than and self.members[leader].running:
                return leader
            time.sleep(0.1)
        raise TimeoutError(f"etcd members agree on no leader after {timeout}s")

    def answers(self) -> bool:
        """A linearizable read succeeds (a quorum runs and has a leader)."""
        try:
            self.ctl("get", "--command-timeout", "1s", "no-such-key")
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
