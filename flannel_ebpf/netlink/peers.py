"""What the routed backends (host-gw, vxlan) ask of the kernel about their peers, behind one small Protocol.

Their decisions (which route, neighbour and FDB entry to add, replace or delete on sync, add_peer and
remove_peer) are written against `PeerNetlink`; `KernelNetlink` carries them out over rtnetlink in the
agent's network namespace, and the unit tests give them an in-memory kernel instead, so those decisions
are tested without root. The vxlan device itself (create, address, MTU) is not behind it: that is set up
once and tested in namespaces.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import flags as NTF
from pyroute2.netlink.rtnl.ndmsg import states as NUD

from flannel_ebpf.netlink import bulk as netlink_bulk
from flannel_ebpf.netlink import routes
from flannel_ebpf.netlink.bulk import AF_BRIDGE, BulkNetlink, format_mac
from flannel_ebpf.netlink.routes import Reachability, ReconcileResult, RouteSpec, RouteTable

#: the neighbour state of the entries vxlan writes (`permanent`: never aged out, never probed)
NUD_PERMANENT: int = NUD["permanent"]


@dataclass(frozen=True)
class Neighbour:
    """`<ip> lladdr <mac> permanent` on a vxlan device: the peer's VTEP address resolved without ARP."""

    ip: IPv4Address
    mac: str


@dataclass(frozen=True)
class FdbEntry:
    """`<mac> dst <ip> self permanent` on a vxlan device: where frames for that VTEP MAC are sent."""

    mac: str
    dst: IPv4Address


class PeerNetlink(Protocol):
    """The kernel, as host-gw and vxlan use it for their peers."""

    def reachability(self, address: IPv4Address) -> Reachability:
        """How the kernel's FIB reaches `address` (`ip route get`)."""
        ...

    def reachability_of_many(self, addresses: Iterable[IPv4Address]) -> dict[IPv4Address, Reachability]:
        """reachability() for many addresses in one batch (a full sync)."""
        ...

    def link_name(self, ifindex: int | None) -> str:
        """A device's name for a message ("?" or "#<index>" when it cannot be told)."""
        ...

    def reconcile_routes(self, desired: Iterable[RouteSpec], scope: IPv4Network | None) -> ReconcileResult:
        """Make our proto-102 routes (inside `scope`, when given) exactly `desired`."""
        ...

    def replace_route(self, spec: RouteSpec) -> None:
        """Install or overwrite one route; OSError if the kernel refuses it."""
        ...

    def delete_route(self, dst: IPv4Network) -> bool:
        """Delete our route to `dst`, if there is one."""
        ...

    def drop_nexthop(self, gateway: IPv4Address) -> None:
        """Delete our nexthop object of `gateway` now that its route is gone; only for a gateway no other
        route can use (a vxlan peer's VTEP address): routes still over a deleted nexthop go with it."""
        ...

    def delete_all_routes(self, scope: IPv4Network | None) -> int:
        """Teardown: delete all our routes (inside `scope`, when given); how many went."""
        ...

    def neighbours(self, ifindex: int) -> dict[IPv4Address, tuple[str, int]]:
        """The IPv4 neighbours of a device: ip -> (mac, NUD state bits)."""
        ...

    def fdb(self, ifindex: int) -> dict[str, IPv4Address]:
        """The FDB entries of a vxlan device that name a remote: mac -> dst."""
        ...

    def write(self, ifindex: int, entries: Sequence[Neighbour | FdbEntry]) -> list[int]:
        """Replace many neighbour and FDB entries in one batch; an errno per entry (0: done)."""
        ...

    def replace_neighbour(self, ifindex: int, entry: Neighbour) -> None: ...

    def delete_neighbour(self, ifindex: int, ip: IPv4Address) -> None:
        """Delete it, if it is there."""
        ...

    def replace_fdb(self, ifindex: int, entry: FdbEntry) -> None: ...

    def delete_fdb(self, ifindex: int, mac: str) -> None:
        """Delete every remote of that MAC, if there is one."""
        ...

    def close(self) -> None: ...


class KernelNetlink:
    """PeerNetlink over rtnetlink: one pyroute2 socket for single requests and a BulkNetlink for dumps
    and full syncs, both opened when first used, in whatever network namespace the agent runs in."""

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None
        self._bulk: BulkNetlink | None = None
        self._routes: RouteTable | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    @property
    def bulk(self) -> BulkNetlink:
        """A second socket for full syncs: thousands of requests at a time (netlink.bulk)."""
        if self._bulk is None:
            self._bulk = BulkNetlink()
        return self._bulk

    @property
    def routes(self) -> RouteTable:
        """Where our routes are written (nexthop objects where the kernel has them)."""
        if self._routes is None:
            self._routes = RouteTable(self.bulk)
        return self._routes

    def reachability(self, address: IPv4Address) -> Reachability:
        return routes.reachability(self.ipr, address)

    def reachability_of_many(self, addresses: Iterable[IPv4Address]) -> dict[IPv4Address, Reachability]:
        return routes.reachability_of_many(self.bulk, addresses)

    def link_name(self, ifindex: int | None) -> str:
        return routes.link_name(self.ipr, ifindex)

    def reconcile_routes(self, desired: Iterable[RouteSpec], scope: IPv4Network | None) -> ReconcileResult:
        return routes.reconcile_routes(self.ipr, self.routes, desired, scope)

    def replace_route(self, spec: RouteSpec) -> None:
        routes.replace_route(self.routes, spec)

    def delete_route(self, dst: IPv4Network) -> bool:
        return routes.delete_route(self.ipr, dst)

    def drop_nexthop(self, gateway: IPv4Address) -> None:
        self.routes.drop_nexthop(gateway)

    def delete_all_routes(self, scope: IPv4Network | None) -> int:
        return routes.delete_all_our_routes(self.ipr, self.routes, scope)

    def neighbours(self, ifindex: int) -> dict[IPv4Address, tuple[str, int]]:
        out: dict[IPv4Address, tuple[str, int]] = {}
        for state, _flags, dst, lladdr in self.bulk.neighbours(ifindex):
            if len(dst) == 4:
                out[IPv4Address(dst)] = (format_mac(lladdr), state)
        return out

    def fdb(self, ifindex: int) -> dict[str, IPv4Address]:
        out: dict[str, IPv4Address] = {}
        for _state, _flags, dst, lladdr in self.bulk.neighbours(ifindex, AF_BRIDGE):
            mac = format_mac(lladdr)
            if len(dst) == 4 and lladdr and mac != "00:00:00:00:00:00":
                out[mac] = IPv4Address(dst)
        return out

    def write(self, ifindex: int, entries: Sequence[Neighbour | FdbEntry]) -> list[int]:
        requests = [
            netlink_bulk.neigh_replace(ifindex, e.ip, e.mac)
            if isinstance(e, Neighbour)
            else netlink_bulk.fdb_replace(ifindex, e.mac, e.dst)
            for e in entries
        ]
        return self.bulk.execute(requests)

    def replace_neighbour(self, ifindex: int, entry: Neighbour) -> None:
        self.ipr.neigh("replace", dst=str(entry.ip), lladdr=entry.mac, ifindex=ifindex, state=NUD_PERMANENT)

    def delete_neighbour(self, ifindex: int, ip: IPv4Address) -> None:
        try:
            self.ipr.neigh("del", dst=str(ip), ifindex=ifindex)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    def replace_fdb(self, ifindex: int, entry: FdbEntry) -> None:
        self.ipr.fdb(
            "replace",
            ifindex=ifindex,
            lladdr=entry.mac,
            dst=str(entry.dst),
            state=NUD_PERMANENT,
            flags=NTF["self"],
        )

    def delete_fdb(self, ifindex: int, mac: str) -> None:
        # without a dst the whole entry (every remote of that MAC) goes
        try:
            self.ipr.fdb("del", ifindex=ifindex, lladdr=mac)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._bulk is not None:
            self._bulk.close()
            self._bulk, self._routes = None, None
