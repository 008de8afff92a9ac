"""Our routes in the kernel: a peer becomes a route, and routes are reconciled against the kernel.

Every route flannel-ebpf adds carries `proto 102` (ROUTE_PROTOCOL). That marker is how a restarted agent
or `flannel-ebpf down` finds exactly our routes and nothing else: a reconcile only ever deletes routes of
that protocol, so an operator's static routes and the kernel's connected routes are never touched.

Functions take an open pyroute2 `IPRoute` (single requests) and/or a BulkNetlink (dumps, full syncs),
both bound to the caller's network namespace; the backends reach them through `netlink.peers`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.netlink import bulk as netlink_bulk
from flannel_ebpf.netlink.bulk import BulkNetlink, Route

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
    """One IPv4 route as flannel-ebpf programs it: `<dst> via <gateway> dev <oif> [onlink] proto 102`, with
    `mtu` and `src` where the udp path routes a peer straight to the underlay."""

    dst: IPv4Network
    gateway: IPv4Address
    oif: int
    onlink: bool = False
    mtu: int = 0  # 0: the device's
    prefsrc: IPv4Address | None = None

    def describe(self) -> str:
        extras = f"{' onlink' if self.onlink else ''}{f' mtu {self.mtu}' if self.mtu else ''}"
        return f"{self.dst} via {self.gateway} dev #{self.oif}{extras}{f' src {self.prefsrc}' if self.prefsrc else ''}"


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
            ours[route.dst] = RouteSpec(route.dst, route.gateway, route.oif, route.onlink, route.mtu, route.prefsrc)
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


def not_direct_reason(reach: Reachability, ext_name: str, link_name: Callable[[int | None], str]) -> str:
    """Why `reach.address` cannot be used as a next hop on the external interface, in words. `link_name`:
    a device's name from its index."""
    if reach.error:
        return f"{reach.address} is unreachable from this host: {reach.error}"
    if reach.local:
        return f"{reach.address} is one of this host's own addresses"
    if reach.gateway is not None:
        return (
            f"{reach.address} is not on a network directly connected to {ext_name}: the kernel reaches it "
            f"via the router {reach.gateway} (dev {link_name(reach.oif)}); host-gw needs all hosts on "
            "one L2 segment (use vxlan, or vxlan with DirectRouting, across routers)"
        )
    return f"{reach.address} is reached through {link_name(reach.oif)}, not through the external interface {ext_name}"


# ---------------------------------------------------------------------------------------------------
# writing the kernel


def nexthop_id(gateway: IPv4Address) -> int:
    """Our nexthop object for a gateway: its address as a number (unique per gateway, never 0)."""
    return int(gateway)


class RouteTable:
    """Writes our routes, as `<dst> nhid <id>` over a nexthop object `<id> via <gateway> dev <oif>` where
    the kernel has them (5.3+), else as classic `<dst> via <gateway> dev <oif>` routes.

    Why: the kernel keeps one fib_info per distinct nexthop and finds it in a hash that ignores the
    gateway, so N routes with N distinct gateways (one per peer host) cost O(N^2) to insert; routes over
    nexthop objects are hashed by nexthop id (figures in docs/PERFORMANCE.md). A nexthop id
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
                netlink_bulk.route_via_nexthop(spec.dst, nh, ROUTE_PROTOCOL, MAIN_TABLE, spec.mtu, spec.prefsrc),
            ]
        return [
            netlink_bulk.route_replace(
                spec.dst, spec.gateway, spec.oif, spec.onlink, ROUTE_PROTOCOL, MAIN_TABLE, spec.mtu, spec.prefsrc
            )
        ]

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

    def drop_nexthop(self, gateway: IPv4Address) -> None:
        """Delete our nexthop object of `gateway` now that its route is gone. Only for a gateway no other
        route can use (a vxlan peer's VTEP address is its own): the kernel deletes every route still over
        a nexthop it deletes, so shared gateways wait for collect()."""
        nh = nexthop_id(gateway)
        if nh in self.our_ids and self.bulk.execute([netlink_bulk.nexthop_delete(nh)])[0] in (0, errno.ENOENT):
            self.our_ids.discard(nh)

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
