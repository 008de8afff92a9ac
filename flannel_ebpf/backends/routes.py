"""What host-gw and vxlan share: a lease becomes a route, and routes are reconciled against the kernel.

Every route flannel-ebpf adds carries `proto 102` (ROUTE_PROTOCOL). That marker is how a restarted agent
or `flannel-ebpf down` finds exactly our routes and nothing else: a reconcile only ever deletes routes of
that protocol, so an operator's static routes and the kernel's connected routes are never touched.

Functions take an open pyroute2 `IPRoute` (single requests) and/or a BulkNetlink (dumps, full syncs),
both bound to the caller's network namespace.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Any

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.backends import netlink_bulk
from flannel_ebpf.backends.base import Backend, BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.backends.netlink_bulk import BulkNetlink, Route
from flannel_ebpf.subnet.lease import Lease

#: rtm_protocol of every route flannel-ebpf installs (`ip route show proto 102`).
ROUTE_PROTOCOL = 102
#: the main routing table, where flanneld puts its routes too
MAIN_TABLE = 254
#: RTNH_F_ONLINK: "the gateway is on this link, do not check it against connected routes"
RTNH_F_ONLINK = 4
#: rtm_type of a route to one of this host's own addresses
RTN_LOCAL = 2
#: a full sync logs the peers it added one per line up to this many, else in one line
ADDED_LOG_LIMIT = 20


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


def list_our_routes(bulk: BulkNetlink) -> tuple[dict[IPv4Network, RouteSpec], list[Route]]:
    """All IPv4 routes of proto 102 in the main table, by destination.

    Returns (routes we understand, proto-102 routes of another shape, e.g. multipath or device-only) so
    that a reconcile can delete the latter too.
    """
    ours: dict[IPv4Network, RouteSpec] = {}
    odd: list[Route] = []
    for route in bulk.routes():
        if route.proto != ROUTE_PROTOCOL or route.table != MAIN_TABLE:
            continue
        if route.gateway is None or route.oif is None or route.dst in ours:
            odd.append(route)
        else:
            ours[route.dst] = RouteSpec(route.dst, route.gateway, route.oif, route.onlink)
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


def reachability_of_many(bulk: BulkNetlink, addresses: Iterable[IPv4Address]) -> dict[IPv4Address, Reachability]:
    """reachability() for many addresses in one batch of lookups (a full sync of thousands of peers)."""
    out: dict[IPv4Address, Reachability] = {}
    for address, found in bulk.lookup(list(dict.fromkeys(addresses))).items():
        if found.error:
            out[address] = Reachability(address, error=f"no route ({errno.errorcode.get(found.error, found.error)})")
        else:
            out[address] = Reachability(address, found.oif, found.gateway, found.local)
    return out


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


def nexthop_id(gateway: IPv4Address) -> int:
    """Our nexthop object for a gateway: its address as a number (unique per gateway, never 0)."""
    return int(gateway)


class RouteTable:
    """Writes our routes, as `<dst> nhid <id>` over a nexthop object `<id> via <gateway> dev <oif>` where
    the kernel has them (5.3+), else as classic `<dst> via <gateway> dev <oif>` routes.

    Why: the kernel keeps one fib_info per distinct nexthop and finds it in a hash that ignores the
    gateway, so N routes with N distinct gateways (one per peer host) cost O(N^2) to insert: 1.3 s for
    10,000 host-gw routes on this machine, against 0.15 s as nexthop objects and routes. A nexthop id
    that another tool already uses (another protocol) is never touched: that peer gets a classic route.
    """

    def __init__(self, bulk: BulkNetlink) -> None:
        self.bulk = bulk
        self.nexthops: bool | None = None  # does the kernel have nexthop objects (None: not asked yet)
        self.foreign_ids: set[int] = set()
        self.our_ids: set[int] = set()

    def refresh(self) -> None:
        """Read which nexthop ids exist, and whose they are."""
        found = self.bulk.nexthops()
        self.nexthops = found is not None
        found = found or {}
        self.foreign_ids = {i for i, proto in found.items() if proto != ROUTE_PROTOCOL}
        self.our_ids = {i for i, proto in found.items() if proto == ROUTE_PROTOCOL}

    def _uses_nexthop(self, spec: RouteSpec) -> bool:
        return bool(self.nexthops) and nexthop_id(spec.gateway) not in self.foreign_ids

    def _requests(self, spec: RouteSpec) -> list[netlink_bulk.Request]:
        if self._uses_nexthop(spec):
            nh = nexthop_id(spec.gateway)
            return [
                netlink_bulk.nexthop_replace(nh, spec.gateway, spec.oif, spec.onlink, ROUTE_PROTOCOL),
                netlink_bulk.route_via_nexthop(spec.dst, nh, ROUTE_PROTOCOL, MAIN_TABLE),
            ]
        return [netlink_bulk.route_replace(spec.dst, spec.gateway, spec.oif, spec.onlink, ROUTE_PROTOCOL, MAIN_TABLE)]

    def replace(self, specs: Sequence[RouteSpec]) -> dict[IPv4Network, int]:
        """Install or overwrite in place (no window without a route) every route; {dst: errno} of the
        ones the kernel refused."""
        if self.nexthops is None:
            self.refresh()
        plans = [self._requests(spec) for spec in specs]
        codes = iter(self.bulk.execute([r for plan in plans for r in plan]))
        failed: dict[IPv4Network, int] = {}
        for spec, plan in zip(specs, plans, strict=True):
            code = next((c for c in [next(codes) for _ in plan] if c), 0)
            if code:
                failed[spec.dst] = code
            elif len(plan) > 1:
                self.our_ids.add(nexthop_id(spec.gateway))
        return failed

    def collect(self, desired: Iterable[RouteSpec], also_keep: Iterable[RouteSpec] = ()) -> int:
        """Delete our nexthop objects that no desired route uses any more (after the routes). How many.
        `also_keep`: routes of other networks (multi-network mode), whose nexthops are not ours to drop
        (two host-gw networks to one peer host share the nexthop of its PublicIP)."""
        keep = {nexthop_id(spec.gateway) for spec in (*desired, *also_keep)}
        unused = sorted(self.our_ids - keep)
        codes = self.bulk.execute([netlink_bulk.nexthop_delete(i) for i in unused])
        self.our_ids -= {i for i, code in zip(unused, codes, strict=True) if code in (0, errno.ENOENT)}
        return len(unused)


def replace_route(table: RouteTable, spec: RouteSpec) -> None:
    """One route (a watch event); raises OSError if the kernel refuses it."""
    code = table.replace([spec]).get(spec.dst)
    if code:
        raise OSError(code, f"kernel refused route {spec.describe()}: {os.strerror(code)}")


def delete_route(ipr: IPRoute, dst: IPv4Network) -> bool:
    """Delete our (proto 102) route to `dst`, if any. Never touches a route of another protocol."""
    try:
        ipr.route("del", dst=str(dst), proto=ROUTE_PROTOCOL, table=MAIN_TABLE)
    except NetlinkError as e:
        if e.code in (errno.ESRCH, errno.ENOENT):
            return False
        raise
    return True


def _delete_odd(ipr: IPRoute, route: Route) -> None:
    try:
        ipr.route("del", dst=str(route.dst), proto=ROUTE_PROTOCOL, table=MAIN_TABLE, priority=route.priority)
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


def in_scope(dst: IPv4Network, scope: IPv4Network | None) -> bool:
    """Whether a route belongs to the network `scope` (None: every proto-102 route is ours, as with one
    network per host). In multi-network mode each network owns only the routes into its own Network."""
    return scope is None or dst.subnet_of(scope)


def reconcile_routes(
    ipr: IPRoute, table: RouteTable, desired: Iterable[RouteSpec], scope: IPv4Network | None = None
) -> ReconcileResult:
    """Make the kernel's proto-102 IPv4 routes (those inside `scope`, when given) exactly `desired`.

    Routes already right are left alone (no flap on an agent restart); wrong ones are replaced in place;
    proto-102 routes nobody wants any more are deleted, and then the nexthop objects nobody uses. A route
    the kernel refuses is reported in `failed` and logged; the others still go in. The dump and the
    additions go in bulk (thousands of peers); deletions are rare and go one by one.
    """
    want = {spec.dst: spec for spec in desired}
    table.refresh()
    have, odd = list_our_routes(table.bulk)
    others = [spec for dst, spec in have.items() if not in_scope(dst, scope)]  # another network's routes
    have = {dst: spec for dst, spec in have.items() if in_scope(dst, scope)}
    odd = [route for route in odd if in_scope(route.dst, scope)]
    result = ReconcileResult()
    for route in odd:
        _delete_odd(ipr, route)
    for dst, spec in have.items():
        if dst not in want and delete_route(ipr, dst):
            result.removed.append(dst)
            logger.info("removed route {}", spec.describe())
    todo = [spec for dst, spec in want.items() if have.get(dst) != spec]
    result.unchanged = len(want) - len(todo)
    failed = table.replace(todo)
    for spec in todo:
        if spec.dst in failed:
            result.failed[spec.dst] = f"kernel refused route {spec.describe()}: {os.strerror(failed[spec.dst])}"
            logger.error("kernel refused route {}: {}", spec.describe(), os.strerror(failed[spec.dst]))
            continue
        (result.replaced if spec.dst in have else result.added).append(spec)
    table.collect((spec for dst, spec in want.items() if dst not in failed), also_keep=others)
    return result


def delete_all_our_routes(ipr: IPRoute, table: RouteTable, scope: IPv4Network | None = None) -> int:
    """Teardown: delete every proto-102 IPv4 route in the main table (inside `scope`, when given), then
    the nexthop objects no remaining route uses. Returns how many routes went."""
    table.refresh()
    have, odd = list_our_routes(table.bulk)
    others = [spec for dst, spec in have.items() if not in_scope(dst, scope)]
    have = {dst: spec for dst, spec in have.items() if in_scope(dst, scope)}
    odd = [route for route in odd if in_scope(route.dst, scope)]
    count = 0
    for dst in have:
        count += delete_route(ipr, dst)
    for route in odd:
        _delete_odd(ipr, route)
        count += 1
    table.collect((), also_keep=others)
    return count


# ---------------------------------------------------------------------------------------------------
# peer bookkeeping shared by the routed backends


class RoutedBackend(Backend):
    """What host-gw and vxlan share: one netlink socket, opened lazily in whatever network namespace the
    agent runs in, and a PeerBook of the leases they were given."""

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        self._ipr: IPRoute | None = None
        self._bulk: BulkNetlink | None = None
        self._routes: RouteTable | None = None
        self.ext: ExternalInterface | None = None
        self.local: LocalNetwork | None = None
        self.book = PeerBook(self.type_name)

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    @property
    def bulk(self) -> BulkNetlink:
        """A second socket for full syncs: thousands of requests at a time (netlink_bulk)."""
        if self._bulk is None:
            self._bulk = BulkNetlink()
        return self._bulk

    def route_scope(self, local: LocalNetwork | None) -> IPv4Network | None:
        """The routes this backend owns: in multi-network mode only those into its own Network (another
        network's routes on this host are not ours to delete); else every proto-102 route, as always."""
        if self.options.network_name and local is not None:
            return local.network
        return None

    @property
    def routes(self) -> RouteTable:
        """Where our routes are written (nexthop objects where the kernel has them)."""
        if self._routes is None:
            self._routes = RouteTable(self.bulk)
        return self._routes

    def sync(self, peers: list[Lease]) -> None:
        self.book.begin_sync()  # the peers it adds are logged in one line at the end
        try:
            self._sync(peers)
        finally:
            self.book.end_sync()

    def _sync(self, peers: list[Lease]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._bulk is not None:
            self._bulk.close()
            self._bulk, self._routes = None, None


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
    #: during a full sync: the peers added, logged as one line at its end (10,000 lines would cost a second)
    _added: list[str] | None = None

    def begin_sync(self) -> None:
        self._added = []

    def end_sync(self) -> None:
        added, self._added = self._added or [], None
        if len(added) <= ADDED_LOG_LIMIT:
            for line in added:
                logger.info("{}: subnet added: {}", self.backend_type, line)
        else:
            logger.info("{}: {} subnets added: {}, ...", self.backend_type, len(added),
                        ", ".join(added[:ADDED_LOG_LIMIT]))  # fmt: skip

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
        if self.refused.pop(lease.subnet, None) is not None or self.skipped.pop(lease.subnet, ""):
            logger.info("{}: peer {} (PublicIP {}) is usable again", self.backend_type, lease.subnet, lease.public_ip)
        if self.programmed.get(lease.subnet) != info:
            if self._added is not None:
                self._added.append(f"{lease.subnet} via {lease.public_ip}")
            else:
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
