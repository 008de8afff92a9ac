"""What host-gw and vxlan share: a lease becomes a route, and routes are reconciled against the kernel.

Every route flannel-ebpf adds carries `proto 102` (ROUTE_PROTOCOL). That marker is how a restarted agent
or `flannel-ebpf down` finds exactly our routes and nothing else: a reconcile only ever deletes routes of
that protocol, so an operator's static routes and the kernel's connected routes are never touched.

All functions take an open pyroute2 `IPRoute`, bound to the caller's network namespace.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Any

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.backends.base import Backend, BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease

#: rtm_protocol of every route flannel-ebpf installs (`ip route show proto 102`).
ROUTE_PROTOCOL = 102
#: the main routing table, where flanneld puts its routes too
MAIN_TABLE = 254
#: RTNH_F_ONLINK: "the gateway is on this link, do not check it against connected routes"
RTNH_F_ONLINK = 4
#: rtm_type of a route to one of this host's own addresses
RTN_LOCAL = 2


@dataclass(frozen=True)
class RouteSpec:
    """One IPv4 route as flannel-ebpf programs it: `<dst> via <gateway> dev <oif> [onlink] proto 102`."""

    dst: IPv4Network
    gateway: IPv4Address
    oif: int
    onlink: bool = False

    def describe(self) -> str:
        return f"{self.dst} via {self.gateway} dev #{self.oif}{' onlink' if self.onlink else ''}"


def host_gw_route(subnet: IPv4Network, public_ip: IPv4Address, ext_index: int) -> RouteSpec:
    """host-gw (and vxlan DirectRouting): the peer host itself is the gateway for its subnet."""
    return RouteSpec(dst=subnet, gateway=public_ip, oif=ext_index)


def vxlan_route(subnet: IPv4Network, vxlan_index: int) -> RouteSpec:
    """vxlan: the gateway is the peer subnet's network address, which lives on the peer's flannel.<VNI>.

    `onlink` because that address is on no connected network of ours (our device holds a /32); the
    permanent neighbour entry then resolves it to the peer's VtepMAC without ARP.
    """
    return RouteSpec(dst=subnet, gateway=subnet.network_address, oif=vxlan_index, onlink=True)


# ---------------------------------------------------------------------------------------------------
# reading the kernel


def _route_from_msg(msg: Any) -> RouteSpec | None:
    dst = msg.get_attr("RTA_DST")
    gateway = msg.get_attr("RTA_GATEWAY")
    oif = msg.get_attr("RTA_OIF")
    if dst is None or gateway is None or oif is None:
        # not a shape we ever install (e.g. a multipath or device-only route): report as unknown
        return None
    return RouteSpec(
        dst=IPv4Network(f"{dst}/{msg['dst_len']}", strict=False),
        gateway=IPv4Address(gateway),
        oif=int(oif),
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
    )


def list_our_routes(ipr: IPRoute) -> tuple[dict[IPv4Network, RouteSpec], list[Any]]:
    """All IPv4 routes of proto 102 in the main table, by destination.

    Returns (routes we understand, raw messages of proto-102 routes of another shape) so that a
    reconcile can delete the latter too.
    """
    ours: dict[IPv4Network, RouteSpec] = {}
    odd: list[Any] = []
    for msg in ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
        if msg["proto"] != ROUTE_PROTOCOL:
            continue
        spec = _route_from_msg(msg)
        if spec is None or spec.dst in ours:
            odd.append(msg)
        else:
            ours[spec.dst] = spec
    return ours, odd


@dataclass(frozen=True)
class Reachability:
    """How the kernel reaches an address (a `ip route get`)."""

    address: IPv4Address
    oif: int | None = None
    gateway: IPv4Address | None = None
    local: bool = False
    error: str | None = None

    def directly_connected_on(self, ifindex: int) -> bool:
        return self.error is None and not self.local and self.gateway is None and self.oif == ifindex


def reachability(ipr: IPRoute, address: IPv4Address) -> Reachability:
    """Ask the kernel's FIB how `address` is reached from this host."""
    try:
        msgs = ipr.route("get", dst=str(address))
    except NetlinkError as e:
        return Reachability(address, error=f"no route ({errno.errorcode.get(e.code, e.code)})")
    if not msgs:
        return Reachability(address, error="no route")
    msg = msgs[0]
    gateway = msg.get_attr("RTA_GATEWAY")
    oif = msg.get_attr("RTA_OIF")
    return Reachability(
        address=address,
        oif=int(oif) if oif is not None else None,
        gateway=IPv4Address(gateway) if gateway else None,
        local=msg["type"] == RTN_LOCAL,
    )


def link_name(ipr: IPRoute, ifindex: int | None) -> str:
    if ifindex is None:
        return "?"
    try:
        links = ipr.get_links(ifindex)
    except NetlinkError:
        return f"#{ifindex}"
    return links[0].get_attr("IFLA_IFNAME") if links else f"#{ifindex}"


def not_direct_reason(ipr: IPRoute, reach: Reachability, ext_name: str) -> str:
    """Why `reach.address` cannot be used as a next hop on the external interface, in words."""
    if reach.error:
        return f"{reach.address} is unreachable from this host: {reach.error}"
    if reach.local:
        return f"{reach.address} is one of this host's own addresses"
    if reach.gateway is not None:
        return (
            f"{reach.address} is not on a network directly connected to {ext_name}: the kernel reaches it "
            f"via the router {reach.gateway} (dev {link_name(ipr, reach.oif)}); host-gw needs all hosts on "
            "one L2 segment (use vxlan, or vxlan with DirectRouting, across routers)"
        )
    return (
        f"{reach.address} is reached through {link_name(ipr, reach.oif)}, not through the external interface {ext_name}"
    )


# ---------------------------------------------------------------------------------------------------
# writing the kernel


def replace_route(ipr: IPRoute, spec: RouteSpec) -> None:
    """Install (or overwrite in place: NLM_F_REPLACE, no window without a route) one route."""
    ipr.route(
        "replace",
        dst=str(spec.dst),
        gateway=str(spec.gateway),
        oif=spec.oif,
        flags=RTNH_F_ONLINK if spec.onlink else 0,
        proto=ROUTE_PROTOCOL,
        table=MAIN_TABLE,
    )


def delete_route(ipr: IPRoute, dst: IPv4Network) -> bool:
    """Delete our (proto 102) route to `dst`, if any. Never touches a route of another protocol."""
    try:
        ipr.route("del", dst=str(dst), proto=ROUTE_PROTOCOL, table=MAIN_TABLE)
    except NetlinkError as e:
        if e.code in (errno.ESRCH, errno.ENOENT):
            return False
        raise
    return True


def _delete_msg(ipr: IPRoute, msg: Any) -> None:
    dst = msg.get_attr("RTA_DST")
    try:
        ipr.route(
            "del",
            dst=f"{dst}/{msg['dst_len']}" if dst else "0.0.0.0/0",
            proto=ROUTE_PROTOCOL,
            table=MAIN_TABLE,
            priority=msg.get_attr("RTA_PRIORITY") or 0,
        )
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT):
            raise


@dataclass
class ReconcileResult:
    added: list[RouteSpec] = field(default_factory=list)
    replaced: list[RouteSpec] = field(default_factory=list)
    removed: list[IPv4Network] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[IPv4Network, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


def reconcile_routes(ipr: IPRoute, desired: Iterable[RouteSpec]) -> ReconcileResult:
    """Make the kernel's proto-102 IPv4 routes exactly `desired`.

    Routes already right are left alone (no flap on an agent restart); wrong ones are replaced in place;
    proto-102 routes nobody wants any more are deleted. A route the kernel refuses is reported in
    `failed` and logged; the others still go in.
    """
    want = {spec.dst: spec for spec in desired}
    have, odd = list_our_routes(ipr)
    result = ReconcileResult()
    for msg in odd:
        _delete_msg(ipr, msg)
    for dst, spec in have.items():
        if dst not in want and delete_route(ipr, dst):
            result.removed.append(dst)
            logger.info("removed route {}", spec.describe())
    for dst, spec in want.items():
        current = have.get(dst)
        if current == spec:
            result.unchanged += 1
            continue
        try:
            replace_route(ipr, spec)
        except NetlinkError as e:
            result.failed[dst] = f"kernel refused route {spec.describe()}: {e}"
            logger.error("kernel refused route {}: {}", spec.describe(), e)
            continue
        (result.replaced if current else result.added).append(spec)
    return result


def delete_all_our_routes(ipr: IPRoute) -> int:
    """Teardown: delete every proto-102 IPv4 route in the main table. Returns how many went."""
    have, odd = list_our_routes(ipr)
    count = 0
    for dst in have:
        count += delete_route(ipr, dst)
    for msg in odd:
        _delete_msg(ipr, msg)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------
# peer bookkeeping shared by the routed backends


class RoutedBackend(Backend):
    """What host-gw and vxlan share: one netlink socket, opened lazily in whatever network namespace the
    agent runs in, and a PeerBook of the leases they were given."""

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        self._ipr: IPRoute | None = None
        self.ext: ExternalInterface | None = None
        self.local: LocalNetwork | None = None
        self.book = PeerBook(self.type_name)

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def stop(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


@dataclass
class PeerBook:
    """What a routed backend knows about its peers, for reconciles and for `status`.

    `leases` holds every lease the agent gave us (also the ones we could not program), so that a
    periodic re-check can retry refused peers: a peer refused because it sits behind a router is
    programmed as soon as it becomes directly reachable, and vice versa.
    """

    backend_type: str
    leases: dict[IPv4Network, Lease] = field(default_factory=dict)
    #: peers programmed in the kernel: subnet -> what `status` shows about them
    programmed: dict[IPv4Network, dict[str, Any]] = field(default_factory=dict)
    #: peers whose lease is fine but that this host cannot serve (e.g. not on our L2 segment)
    refused: dict[IPv4Network, str] = field(default_factory=dict)
    #: leases that are not for this backend or carry invalid data
    skipped: dict[IPv4Network, str] = field(default_factory=dict)

    def refuse(self, lease: Lease, reason: str) -> None:
        """Record a refused peer; log an error the first time (and when the reason changes), not each
        re-check, so a permanently misplaced peer does not flood the log every 10 seconds."""
        self.programmed.pop(lease.subnet, None)
        self.skipped.pop(lease.subnet, None)
        if self.refused.get(lease.subnet) != reason:
            logger.error(
                "{}: not programming peer {} (PublicIP {}): {}",
                self.backend_type,
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
                "{}: ignoring lease {} (PublicIP {}): {}", self.backend_type, lease.subnet, lease.public_ip, reason
            )
        self.skipped[lease.subnet] = reason

    def accept(self, lease: Lease, info: dict[str, Any]) -> None:
        if self.refused.pop(lease.subnet, None) is not None or self.skipped.pop(lease.subnet, None):
            logger.info("{}: peer {} (PublicIP {}) is usable again", self.backend_type, lease.subnet, lease.public_ip)
        if self.programmed.get(lease.subnet) != info:
            logger.info("{}: subnet added: {} via {}", self.backend_type, lease.subnet, lease.public_ip)
        self.programmed[lease.subnet] = info

    def forget(self, subnet: IPv4Network) -> None:
        for table in (self.leases, self.programmed, self.refused, self.skipped):
            table.pop(subnet, None)

    def replace_leases(self, peers: list[Lease]) -> None:
        """A full sync: these are now all the leases; peers absent from them are forgotten."""
        self.leases = {lease.subnet: lease for lease in peers}
        for subnet in list(self.programmed) + list(self.refused) + list(self.skipped):
            if subnet not in self.leases:
                self.forget(subnet)

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


#: rtm_type of an ordinary route to a network
RTN_UNICAST = 1


def overlapping_routes(network: IPv4Network, exclude: IPv4Network | None = None) -> list[str]:
    """The routes of this network namespace's main table that overlap `network`, as `ip route` would
    print them; ours (proto 102, flannel devices), the default route and routes inside `exclude` (the
    host's own lease: its container bridge) are left out."""
    found: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
            dst = msg.get_attr("RTA_DST")
            if msg["proto"] == ROUTE_PROTOCOL or msg["type"] != RTN_UNICAST or dst is None or not msg["dst_len"]:
                continue
            route = IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)
            if not route.overlaps(network) or (exclude is not None and route.subnet_of(exclude)):
                continue
            dev = names.get(msg.get_attr("RTA_OIF"), "?")
            if dev == "flannel0" or dev.startswith("flannel."):
                continue
            gateway = msg.get_attr("RTA_GATEWAY")
            found.append(f"{route}{f' via {gateway}' if gateway else ''} dev {dev}")
    return found
