"""The running agent's state file, `<state-dir>/state.json`: read by `status`, `health` and `down`.

The agent rewrites it atomically on every change and every few seconds (a heartbeat), so that the other
commands, which run as separate processes, see the lease, the peers and what the backend made.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_ebpf.backends.base import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.subnet_file import atomic_write

STATE_FILE = "state.json"


@dataclass
class AgentState:
    pid: int = 0
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
    peers: list[dict[str, Any]] = field(default_factory=list)
    backend_status: dict[str, Any] = field(default_factory=dict)

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


def save(state_dir: str, state: AgentState) -> None:
    state.updated = time.time()
    atomic_write(path(state_dir), json.dumps(asdict(state), indent=1, default=str) + "\n", mode=0o644)


def load(state_dir: str) -> AgentState | None:
    try:
        with open(path(state_dir)) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in raw.items() if k in AgentState.__dataclass_fields__}
    return AgentState(**known)


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
