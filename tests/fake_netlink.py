"""An in-memory kernel for the routed backends' unit tests: implements `netlink.peers.PeerNetlink` with
plain dicts, records every write, and refuses what a test tells it to. No root, no namespace."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from flannel_ebpf.netlink.peers import NUD_PERMANENT, FdbEntry, Neighbour, PeerNetlink
from flannel_ebpf.netlink.routes import Reachability, ReconcileResult, RouteSpec, in_scope

#: a neighbour the kernel learnt itself (not ours: `state & NUD_PERMANENT` is 0)
NUD_REACHABLE = 0x02


@dataclass
class FakeNetlink:
    """The kernel state host-gw and vxlan see: our proto-102 routes, and per device neighbours and FDB."""

    #: the ifindex every peer address is directly connected on unless `reach` says otherwise
    ext_index: int
    routes: dict[IPv4Network, RouteSpec] = field(default_factory=dict)
    neigh: dict[int, dict[IPv4Address, tuple[str, int]]] = field(default_factory=dict)
    fdb_entries: dict[int, dict[str, IPv4Address]] = field(default_factory=dict)
    reach: dict[IPv4Address, Reachability] = field(default_factory=dict)
    links: dict[int, str] = field(default_factory=dict)
    #: destinations whose route the kernel refuses, and neighbour/FDB entries it refuses (by IP or MAC)
    refuse_routes: set[IPv4Network] = field(default_factory=set)
    refuse_entries: set[IPv4Address | str] = field(default_factory=set)
    #: every write, in order: ("route", spec), ("del-route", dst), ("neigh", ifindex, entry), ...
    writes: list[tuple[object, ...]] = field(default_factory=list)
    closed: int = 0

    # --- reads -----------------------------------------------------------------------------------
    def reachability(self, address: IPv4Address) -> Reachability:
        return self.reach.get(address, Reachability(address, oif=self.ext_index))

    def reachability_of_many(self, addresses: Iterable[IPv4Address]) -> dict[IPv4Address, Reachability]:
        return {address: self.reachability(address) for address in addresses}

    def link_name(self, ifindex: int | None) -> str:
        return "?" if ifindex is None else self.links.get(ifindex, f"#{ifindex}")

    def neighbours(self, ifindex: int) -> dict[IPv4Address, tuple[str, int]]:
        return dict(self.neigh.get(ifindex, {}))

    def fdb(self, ifindex: int) -> dict[str, IPv4Address]:
        return dict(self.fdb_entries.get(ifindex, {}))

    # --- routes ----------------------------------------------------------------------------------
    def replace_route(self, spec: RouteSpec) -> None:
        if spec.dst in self.refuse_routes:
            raise OSError(errno.EINVAL, f"kernel refused route {spec.describe()}")
        self.writes.append(("route", spec))
        self.routes[spec.dst] = spec

    def delete_route(self, dst: IPv4Network) -> bool:
        if self.routes.pop(dst, None) is None:
            return False
        self.writes.append(("del-route", dst))
        return True

    def drop_nexthop(self, gateway: IPv4Address) -> None:
        assert all(spec.gateway != gateway for spec in self.routes.values()), "a nexthop still in use"
        self.writes.append(("del-nexthop", gateway))

    def reconcile_routes(self, desired: Iterable[RouteSpec], scope: IPv4Network | None) -> ReconcileResult:
        want = {spec.dst: spec for spec in desired}
        have = {dst: spec for dst, spec in self.routes.items() if in_scope(dst, scope)}
        result = ReconcileResult()
        for dst in have:
            if dst not in want and self.delete_route(dst):
                result.removed.append(dst)
        todo = [spec for dst, spec in want.items() if have.get(dst) != spec]
        result.unchanged = len(want) - len(todo)
        for spec in todo:
            try:
                self.replace_route(spec)
            except OSError as e:
                result.failed[spec.dst] = str(e)
                continue
            (result.replaced if spec.dst in have else result.added).append(spec)
        return result

    def delete_all_routes(self, scope: IPv4Network | None) -> int:
        return sum(self.delete_route(dst) for dst in [d for d in self.routes if in_scope(d, scope)])

    # --- neighbours and FDB ----------------------------------------------------------------------
    def write(self, ifindex: int, entries: Sequence[Neighbour | FdbEntry]) -> list[int]:
        codes = []
        for entry in entries:
            key = entry.ip if isinstance(entry, Neighbour) else entry.mac
            if key in self.refuse_entries:
                codes.append(errno.EINVAL)
                continue
            if isinstance(entry, Neighbour):
                self.replace_neighbour(ifindex, entry)
            else:
                self.replace_fdb(ifindex, entry)
            codes.append(0)
        return codes

    def replace_neighbour(self, ifindex: int, entry: Neighbour) -> None:
        self.writes.append(("neigh", ifindex, entry))
        self.neigh.setdefault(ifindex, {})[entry.ip] = (entry.mac, NUD_PERMANENT)

    def delete_neighbour(self, ifindex: int, ip: IPv4Address) -> None:
        if self.neigh.get(ifindex, {}).pop(ip, None) is not None:
            self.writes.append(("del-neigh", ifindex, ip))

    def replace_fdb(self, ifindex: int, entry: FdbEntry) -> None:
        self.writes.append(("fdb", ifindex, entry))
        self.fdb_entries.setdefault(ifindex, {})[entry.mac] = entry.dst

    def delete_fdb(self, ifindex: int, mac: str) -> None:
        if self.fdb_entries.get(ifindex, {}).pop(mac, None) is not None:
            self.writes.append(("del-fdb", ifindex, mac))

    def close(self) -> None:
        self.closed += 1


def _implements_the_protocol(fake: FakeNetlink) -> PeerNetlink:
    return fake  # mypy checks that the fake has every method of the Protocol, with its signature
