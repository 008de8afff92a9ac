"""The running agent's state file, `<state-dir>/state.json`: read by `status`, `health` and `down`.

The agent rewrites it atomically on every change and every few seconds (a heartbeat), so that the other
commands, which run as separate processes, see the lease, the peers and what the backend made.

The state dir is also the agent's single-instance lock (`<state-dir>/agent.lock`, flock): `up` holds it
for its whole life, `down` while it removes things, so that two agents never program one host and `down`
never pulls the data path from under a running agent. The kernel drops the lock when its holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_ebpf.host.files import atomic_write
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork

STATE_FILE = "state.json"
LOCK_FILE = "agent.lock"
#: at most this many refused leases are listed one by one in the state (all are counted)
REFUSED_SHOWN = 100
#: how often a ready agent rewrites its state (flannel_ebpf.network.HEARTBEAT_SECONDS; a test checks both)
AGENT_HEARTBEAT_SECONDS = 5.0


@dataclass
class AgentState:
    pid: int = 0
    pid_start: int = 0  # the agent's start time (clock ticks since boot, /proc/<pid>/stat): PID reuse guard
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id when the agent wrote the state
    phase: str = "starting"  # starting | waiting-config | acquiring | ready | conflict | stopped | failed
    reason: str = ""  # why not ready
    updated: float = 0.0
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_prefix: str = ""
    subnet_file: str = ""
    ip_masq: bool = False
    network: str = ""
    subnet: str = ""
    mtu: int = 0
    iface: dict[str, Any] = field(default_factory=dict)
    backend_type: str = ""
    backend_config: dict[str, Any] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)
    lease: dict[str, Any] = field(default_factory=dict)  # expiration, lease_id, mod_revision
    last_revision: int = 0
    relists: int = 0
    last_listing_seconds: float = 0.0  # how long the last listing of all leases in etcd took
    peers: list[dict[str, Any]] = field(default_factory=list)
    #: leases under subnets/ refused as peers: how many by reason, and the first REFUSED_SHOWN of them
    peers_refused: dict[str, int] = field(default_factory=dict)
    refused_peers: list[dict[str, Any]] = field(default_factory=list)
    backend_status: dict[str, Any] = field(default_factory=dict)
    loop_stall_max_ms: float = 0.0  # the longest the agent's event loop was ever blocked
    loop_stalls: int = 0  # how often it was blocked for more than 100 ms
    network_name: str = ""  # multi-network mode (--networks): which network this state is of
    remote: str = ""  # client mode (--remote): the lease server (etcd_* then say nothing)

    def local_network(self) -> LocalNetwork | None:
        """The LocalNetwork the agent ran with, for `down` (None if it never got a lease)."""
        if not (self.network and self.subnet and self.iface):
            return None
        ext = ExternalInterface(
            name=self.iface["name"],
            index=self.iface["index"],
            address=IPv4Address(self.iface["address"]),
            public_ip=IPv4Address(self.iface["public_ip"]),
            mtu=self.iface["mtu"],
        )
        return LocalNetwork(IPv4Network(self.network), IPv4Network(self.subnet), ext, self.mtu)

    def options(self) -> BackendOptions:
        known = BackendOptions.__dataclass_fields__
        return BackendOptions(**{k: v for k, v in self.backend_options.items() if k in known})


def path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def snapshot(state: AgentState) -> dict[str, Any]:
    """What save() writes, taken now: a shallow copy (the agent replaces, never mutates, the lists and
    dicts it holds), so that it can be serialised in another thread while the agent goes on."""
    state.updated = time.time()
    if state.pid == os.getpid() and not state.pid_start:  # the agent itself: who it is, once
        state.pid_start = process_start_time(state.pid) or 0
        state.boot_id = boot_id()
    return {f.name: getattr(state, f.name) for f in fields(state)}


def write_snapshot(state_dir: str, snap: dict[str, Any]) -> None:
    """Write a snapshot. With 10,000 peers the JSON is megabytes: made compact, and piece by piece by
    json's Python encoder, which lets other threads run between pieces (its C encoder makes the whole
    text in one call that holds the GIL for 100 ms, stalling the agent's event loop that long)."""
    encoder = json.JSONEncoder(separators=(",", ":"), default=str)
    atomic_write(path(state_dir), "".join(encoder.iterencode(snap)) + "\n", mode=0o644)


def save(state_dir: str, state: AgentState) -> None:
    write_snapshot(state_dir, snapshot(state))


def load(state_dir: str) -> AgentState | None:
    try:
        with open(path(state_dir)) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in raw.items() if k in AgentState.__dataclass_fields__}
    return AgentState(**known)


def process_start_time(pid: int) -> int | None:
    """When a process started (field 22 of /proc/<pid>/stat, clock ticks since boot); None if there is
    no such process. A PID that is reused gets another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def agent_gone(state: AgentState) -> str | None:
    """Why the agent that wrote `state` is not running (None while it runs): its PID is gone, is a
    zombie, or belongs to another process by now (another start time or another boot)."""
    pid = state.pid
    if pid <= 0:
        return "no agent PID recorded"
    if not state.pid_start:  # written by an agent that did not record its start time
        return None if pid_alive(pid) else f"agent (pid {pid}) is not running"
    if state.boot_id and state.boot_id != boot_id():
        return f"agent (pid {pid}) ran before this host rebooted"
    started = process_start_time(pid)
    if started is None:
        return f"agent (pid {pid}) is not running"
    if started != state.pid_start:
        return f"agent (pid {pid}) is not running: that PID belongs to another process now"
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return f"agent (pid {pid}) has exited"
    except (OSError, IndexError):
        return f"agent (pid {pid}) is not running"
    return None


def heartbeat_limit(resync_interval: float) -> float:
    """How old a ready agent's state may be before `health` calls the agent stuck: a few heartbeats, or
    a few resync intervals when those are longer (a heartbeat waits for a resync in progress)."""
    return 3 * max(AGENT_HEARTBEAT_SECONDS, resync_interval)


class AlreadyRunning(RuntimeError):
    """Another flannel-ebpf process holds the state dir's lock."""

    def __init__(self, lock_path: str, pid: int | None, command: str) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "pid unknown"
        what = "an agent" if command in ("up", "") else f"`flannel-ebpf {command}`"
        super().__init__(f"{what} ({who}) already runs with this --state-dir (it holds {lock_path}); stop it first")


class InstanceLock:
    """`<state-dir>/agent.lock`, flock'ed for as long as this object is open (the kernel releases it
    when the process dies, so a crash never leaves a stale lock). The file holds `<pid> <command>` of
    the holder, for the message the next one prints. The file itself stays: unlinking a lock file races
    with the next locker."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: str, command: str = "up") -> InstanceLock:
        os.makedirs(state_dir, exist_ok=True)
        lock_path = os.path.join(state_dir, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 128, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = int(holder[0]) if holder and holder[0].isdigit() else None
            raise AlreadyRunning(lock_path, pid, holder[1] if len(holder) > 1 else "") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        return cls(fd, lock_path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only fd on the open file drops the flock
            self.fd = -1

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether the agent that wrote the state still runs: the PID lives and is a flannel-ebpf process
    (after a reboot or a crash the PID may belong to something else by now)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"flannel" not in f.read():
                return False
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ext_to_dict(ext: ExternalInterface) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, IPv4Address) else v for k, v in asdict(ext).items()}
