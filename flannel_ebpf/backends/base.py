"""The one small interface every backend implements.

The agent drives a backend in this order:
    backend = make_backend(config, options)
    attrs = backend.prepare(ext)           # create devices that the lease must describe (vxlan's VtepMAC)
    lease = <acquire a lease with attrs>
    backend.start(local)                    # program own subnet, attach programs, adopt pinned state
    backend.sync(peers)                     # full reconcile against the kernel (start, relist)
    backend.add_peer(lease) / remove_peer(lease)   # each watch event
    backend.stop()                          # the agent exits: leave the data path up (traffic keeps flowing)
    backend.teardown(local)                 # `flannel-ebpf down`: remove every device, route, program, pin

Backends know nothing of etcd; they get leases. Methods are synchronous (netlink, bpf(2)); the agent calls
them from one data-plane task so that they never run concurrently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from loguru import logger

from flannel_ebpf.subnet.lease import Lease, LeaseAttrs


@dataclass
class SkippedLeases:
    """Leases a backend cannot use, with why: each is logged once (and again when its reason changes),
    not on every resync, so one bad lease never floods the log."""

    backend: str  # as logged: "udp (tun)", "udp (eBPF)"
    reasons: dict[IPv4Network, str] = field(default_factory=dict)

    def skip(self, lease: Lease, why: str) -> None:
        if self.reasons.get(lease.subnet) != why:
            logger.warning("{}: ignoring lease {} (PublicIP {}): {}", self.backend, lease.subnet, lease.public_ip, why)
        self.reasons[lease.subnet] = why

    def usable(self, lease: Lease) -> None:
        if self.reasons.pop(lease.subnet, None) is not None:
            logger.info("{}: lease {} is usable again", self.backend, lease.subnet)

    def forget(self, subnet: IPv4Network) -> None:
        """The lease is gone (deleted or expired)."""
        self.reasons.pop(subnet, None)

    def prune(self, present: set[IPv4Network]) -> None:
        """After a full sync: forget leases that are gone."""
        self.reasons = {subnet: why for subnet, why in self.reasons.items() if subnet in present}


class BackendError(RuntimeError):
    """A backend cannot do what it was asked; the message is meant for the operator."""


class BackendNotReady(BackendError):
    """Raised by `sync()`: this host's own subnet cannot be served right now (e.g. a cloud route table is
    full). The agent stays up but not-ready with this message, and the periodic resync retries."""


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay interface chosen with --iface/--iface-regex/--public-ip."""

    name: str
    index: int
    address: IPv4Address  # the interface's own address (what the udp sender binds to)
    public_ip: IPv4Address  # what other hosts use to reach us (--public-ip, else `address`)
    mtu: int


@dataclass(frozen=True)
class LocalNetwork:
    """What a backend needs to know about this host once it holds a lease."""

    network: IPv4Network  # the whole overlay (config's Network)
    subnet: IPv4Network  # this host's lease
    ext: ExternalInterface
    mtu: int  # the overlay MTU written to subnet.env (ext.mtu minus the backend's overhead)


@dataclass(frozen=True)
class BackendOptions:
    """Agent options a backend may use (from flags; not from etcd)."""

    state_dir: str = "/run/flannel-ebpf"  # per-agent files (the TUN path's pid, etc.)
    bpf_pin_dir: str = "/sys/fs/bpf/flannel-ebpf"  # where the eBPF udp path pins its maps
    udp_datapath: str = "ebpf"  # "ebpf" | "tun": which udp implementation
    udp_decap: str = "auto"  # "auto" | "xdp" | "tc": where the eBPF udp path decapsulates
    udp_delivery: str = "port"  # "port" | "bridge" | "peer": how decapsulated packets reach containers
    udp_allow_foreign_source: bool = False  # eBPF decap accepts any inner source from a member (flanneld's way)
    xdp_mode: str = "auto"  # "auto" | "native" | "generic"
    loader: str = "auto"  # "auto" (elf when precompiled objects are present, else bcc) | "elf" | "bcc"
    xdp_replace_foreign: bool = False  # replace another tool's XDP program on the underlay (else refuse)
    #: the agent's --state-dir, where attaching records the clsact qdiscs it creates ("": not recorded)
    clsact_record_dir: str = ""
    network_name: str = ""  # multi-network mode (--networks): the network this backend serves; "" classic


class Backend(ABC):
    """One data path. Subclasses: alloc, host-gw, vxlan, udp (eBPF), udp (TUN)."""

    #: the `Backend.Type` this class implements
    type_name: str = ""
    #: whether status() reads the kernel (pinned maps, attached programs) and so works in a fresh process,
    #: e.g. `flannel-ebpf status` while the agent is down; otherwise status shows the agent's last snapshot
    status_from_kernel: bool = False

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        self.backend_config = backend_config
        self.options = options

    @abstractmethod
    def overhead(self) -> int:
        """Bytes of encapsulation per packet: overlay MTU = underlay MTU - overhead."""

    @abstractmethod
    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        """Make whatever the lease must describe; return the attributes to publish."""

    @abstractmethod
    def start(self, local: LocalNetwork) -> None:
        """Program this host's side of the overlay. Must adopt state left by a previous agent."""

    @abstractmethod
    def sync(self, peers: list[Lease]) -> None:
        """Make the kernel hold exactly these peers (all leases but our own): add, replace, remove."""

    @abstractmethod
    def add_peer(self, lease: Lease) -> None:
        """A peer's lease appeared or changed. Invalid leases are logged and skipped, never raised."""

    @abstractmethod
    def remove_peer(self, lease: Lease) -> None:
        """A peer's lease was deleted or expired."""

    def stop(self) -> None:  # noqa: B027 - most backends have nothing to do here
        """The agent is exiting: release userspace resources, leave the kernel data path in place."""

    @abstractmethod
    def teardown(self, local: LocalNetwork | None) -> None:
        """Remove everything this backend ever made on this host.

        Runs in `flannel-ebpf down`, a fresh process: `local` is what the last agent recorded in its state
        file, or None when there is none (then remove what can be found by name).
        """

    def status(self) -> dict[str, Any]:
        """What `flannel-ebpf status` shows for this backend."""
        return {"type": self.type_name}
