"""The one small interface every backend implements, and what backends share: the PeerBook of their
leases, and RoutedBackend for host-gw and vxlan.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from loguru import logger
from pyroute2 import IPRoute

from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.peers import KernelNetlink, PeerNetlink
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

#: a full sync logs the peers it added one per line up to this many, else in one line
ADDED_LOG_LIMIT = 20

T = TypeVar("T")


class BackendError(RuntimeError):
    """A backend cannot do what it was asked; the message is meant for the operator."""


class BackendNotReady(BackendError):
    """Raised by `sync()`: this host's own subnet cannot be served right now (e.g. a cloud route table is
    full). The agent stays up but not-ready with this message, and the periodic resync retries."""


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

    def required(self, value: T | None, step: str = "prepare()") -> T:
        """`value`, which `step` sets; an error naming that step when it has not run."""
        if value is None:
            raise BackendError(f"{self.type_name}: {step} was not called")
        return value


class RoutedBackend(Backend):
    """What host-gw and vxlan share: the kernel as a PeerNetlink (rtnetlink sockets opened lazily in
    whatever network namespace the agent runs in; the unit tests put an in-memory kernel there), and a
    PeerBook of the leases they were given."""

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        self.kernel = KernelNetlink()
        #: every peer route, neighbour and FDB entry goes through this
        self.netlink: PeerNetlink = self.kernel
        self.ext: ExternalInterface | None = None
        self.local: LocalNetwork | None = None
        self.book = PeerBook(self.type_name)

    @property
    def ipr(self) -> IPRoute:
        """For the backend's own devices (vxlan's flannel.<VNI>); peers go through `netlink`."""
        return self.kernel.ipr

    def route_scope(self, local: LocalNetwork | None) -> IPv4Network | None:
        """The routes this backend owns: in multi-network mode only those into its own Network (another
        network's routes on this host are not ours to delete); else every proto-102 route."""
        if self.options.network_name and local is not None:
            return local.network
        return None

    def sync(self, peers: list[Lease]) -> None:
        self.book.begin_sync()  # the peers it adds are logged in one line at the end
        try:
            self.book.replace_leases(peers)
            self._sync(peers)
        finally:
            self.book.end_sync()

    def _sync(self, peers: list[Lease]) -> None:
        raise NotImplementedError

    def resync(self) -> None:
        """Periodic re-check: a full reconcile of the known leases against the kernel (retries refused
        peers, drops what no longer applies, restores what someone deleted); quiet when nothing changed."""
        self.sync(list(self.book.leases.values()))

    def _ext(self) -> ExternalInterface:
        return self.required(self.ext)

    def _checked_ext(self, lease: Lease) -> ExternalInterface | None:
        """The external interface, or None when the lease fails the checks every routed backend makes
        (then the book has it as skipped, with why)."""
        ext = self._ext()
        problem = lease_problem(
            lease, self.type_name, self.local.subnet if self.local else None, {ext.address, ext.public_ip}
        )
        if problem:
            self.book.skip(lease, problem)
            return None
        return ext

    def _evaluate_each(self, peers: Iterable[Lease], evaluate: Callable[[Lease], T | None]) -> dict[IPv4Network, T]:
        """What `evaluate` makes of each lease, by subnet; a lease it cannot make anything of is refused,
        never raised: one bad peer costs exactly that peer, never the whole sync."""
        desired: dict[IPv4Network, T] = {}
        for lease in peers:
            try:
                found = evaluate(lease)
            except Exception as e:
                self.book.refuse(lease, f"cannot evaluate its lease: {type(e).__name__}: {e}")
                continue
            if found is not None:
                desired[lease.subnet] = found
        return desired

    def stop(self) -> None:
        self.netlink.close()
        self.kernel.close()


@dataclass
class PeerBook:
    """What a backend knows about its peers, for reconciles and for `status`.

    `leases` holds every lease the agent gave a routed backend (also the ones it could not program), so
    that a periodic re-check can retry refused peers: a peer refused because it sits behind a router is
    programmed as soon as it becomes directly reachable, and vice versa. Each skipped or refused lease is
    logged once (and again when its reason changes), not on every resync, so one bad lease never floods
    the log.
    """

    backend: str  # as logged: "host-gw", "vxlan", "udp (tun)", "udp (eBPF)"
    leases: dict[IPv4Network, Lease] = field(default_factory=dict)
    #: peers programmed in the kernel: subnet -> what `status` shows about them
    programmed: dict[IPv4Network, dict[str, Any]] = field(default_factory=dict)
    #: peers whose lease is fine but that this host cannot serve (e.g. not on our L2 segment)
    refused: dict[IPv4Network, str] = field(default_factory=dict)
    #: leases that are not for this backend or carry invalid data
    skipped: dict[IPv4Network, str] = field(default_factory=dict)
    #: during a full sync: the peers added, logged as one line at its end (10,000 lines would cost a second)
    _added: list[str] | None = None

    def begin_sync(self) -> None:
        self._added = []

    def end_sync(self) -> None:
        added, self._added = self._added or [], None
        if len(added) <= ADDED_LOG_LIMIT:
            for line in added:
                logger.info("{}: subnet added: {}", self.backend, line)
        else:
            logger.info("{}: {} subnets added: {}, ...", self.backend, len(added),
                        ", ".join(added[:ADDED_LOG_LIMIT]))  # fmt: skip

    def refuse(self, lease: Lease, reason: str) -> None:
        """Record a refused peer; log an error the first time (and when the reason changes), not each
        re-check, so a permanently misplaced peer does not flood the log every 10 seconds."""
        self.programmed.pop(lease.subnet, None)
        self.skipped.pop(lease.subnet, None)
        if self.refused.get(lease.subnet) != reason:
            logger.error(
                "{}: not programming peer {} (PublicIP {}): {}",
                self.backend,
                lease.subnet,
                lease.public_ip,
                reason,
            )
        self.refused[lease.subnet] = reason

    def skip(self, lease: Lease, reason: str) -> None:
        self.programmed.pop(lease.subnet, None)
        self.refused.pop(lease.subnet, None)
        if self.skipped.get(lease.subnet) != reason:
            logger.warning(
                "{}: ignoring lease {} (PublicIP {}): {}", self.backend, lease.subnet, lease.public_ip, reason
            )
        self.skipped[lease.subnet] = reason

    def usable(self, lease: Lease) -> None:
        """The lease is neither skipped nor refused (any more)."""
        refused = self.refused.pop(lease.subnet, None)
        skipped = self.skipped.pop(lease.subnet, None)
        if refused is not None or skipped is not None:
            logger.info("{}: peer {} (PublicIP {}) is usable again", self.backend, lease.subnet, lease.public_ip)

    def accept(self, lease: Lease, info: dict[str, Any]) -> None:
        self.usable(lease)
        if self.programmed.get(lease.subnet) != info:
            if self._added is not None:
                self._added.append(f"{lease.subnet} via {lease.public_ip}")
            else:
                logger.info("{}: subnet added: {} via {}", self.backend, lease.subnet, lease.public_ip)
        self.programmed[lease.subnet] = info

    def forget(self, subnet: IPv4Network) -> None:
        """The lease is gone (deleted or expired)."""
        for table in (self.leases, self.programmed, self.refused, self.skipped):
            table.pop(subnet, None)

    def prune(self, present: set[IPv4Network]) -> None:
        """After a full sync: forget the peers whose lease is gone."""
        for subnet in list(self.programmed) + list(self.refused) + list(self.skipped):
            if subnet not in present:
                self.forget(subnet)

    def replace_leases(self, peers: list[Lease]) -> None:
        """A full sync: these are now all the leases; peers absent from them are forgotten."""
        self.leases = {lease.subnet: lease for lease in peers}
        self.prune(set(self.leases))

    def status(self) -> dict[str, Any]:
        def ip_of(subnet: IPv4Network) -> str | None:
            lease = self.leases.get(subnet)
            return str(lease.public_ip) if lease else None

        return {
            "peers": {str(s): info for s, info in sorted(self.programmed.items())},
            "refused": {str(s): {"public_ip": ip_of(s), "reason": r} for s, r in sorted(self.refused.items())},
            "skipped": {str(s): {"public_ip": ip_of(s), "reason": r} for s, r in sorted(self.skipped.items())},
        }


def lease_problem(
    lease: Lease, backend_type: str, local_subnet: IPv4Network | None, own_ips: set[IPv4Address]
) -> str | None:
    """Why a peer lease must not be programmed at all, or None. Checks every routed backend shares."""
    if lease.attrs.backend_type != backend_type:
        return f"its BackendType is {lease.attrs.backend_type!r}, this host runs {backend_type!r}"
    if local_subnet is not None and lease.subnet.overlaps(local_subnet):
        return f"its subnet overlaps this host's own lease {local_subnet}"
    if lease.public_ip in own_ips:
        return f"its PublicIP {lease.public_ip} is this host's own address (a stale lease of this host?)"
    return None
