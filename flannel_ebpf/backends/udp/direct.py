"""Peers routed straight to the underlay (`--udp-encap underlay`, opt-in).

A peer host on one of the underlay's own networks (the kernel reaches its PublicIP without a router, as
host-gw requires) gets the route `<subnet> via <PublicIP> dev <underlay> mtu <underlay MTU - 28> src
<flannel0's address>`, and the tc program flannel_ul_out on the underlay's egress inserts the 28 bytes.
The kernel routes and resolves the next hop once, as for host-gw; the way through flannel0 (a second
transmit, its tc hook, bpf_redirect_neigh's route and neighbour lookups) stays for every other peer and
for destinations no peer leases (ICMP net unreachable), under the Network's route to flannel0.

The route's `mtu` is flannel0's, so the kernel answers frag-needed and TCP picks its MSS as through
flannel0; `src` keeps the host's own packets into the overlay sourced from flannel0's address, as
flanneld's are. FORWARD, POSTROUTING and conntrack see these packets as they see any forwarded packet:
only the output device differs (the underlay, not flannel0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network

from loguru import logger

from flannel_ebpf.backends.udp.device import OVERHEAD
from flannel_ebpf.host.types import LocalNetwork
from flannel_ebpf.netlink.peers import KernelNetlink
from flannel_ebpf.netlink.routes import RouteSpec, list_our_routes, reachability_of_many

ENCAP_MODES = ("underlay", "flannel0")


class DirectRoutes:
    """The direct routes of one udp network: which peers get one, and keeping the kernel's in step."""

    def __init__(self, local: LocalNetwork) -> None:
        self.local = local
        self.netlink = KernelNetlink()
        self.routes: dict[IPv4Network, RouteSpec] = {}  # what the kernel holds, as far as we know

    def spec(self, subnet: IPv4Network, public_ip: IPv4Address) -> RouteSpec:
        ext = self.local.ext
        return RouteSpec(
            dst=subnet,
            gateway=public_ip,
            oif=ext.index,
            mtu=ext.mtu - OVERHEAD,
            prefsrc=self.local.subnet.network_address,
        )

    def _ours(self, spec: RouteSpec) -> bool:
        """A proto-102 route of this network's direct kind: on the underlay, to a subnet of the Network
        (the Network's own route is flannel0's)."""
        network = self.local.network
        return spec.oif == self.local.ext.index and spec.dst.subnet_of(network) and spec.dst != network

    def direct_peers(self, peers: Mapping[IPv4Network, IPv4Address]) -> dict[IPv4Network, RouteSpec]:
        """The routes the peers should have: those the kernel reaches on the underlay, without a router."""
        reach = reachability_of_many(self.netlink.bulk, peers.values())
        index = self.local.ext.index
        return {subnet: self.spec(subnet, ip) for subnet, ip in peers.items() if reach[ip].directly_connected_on(index)}

    def reconcile(self, peers: Mapping[IPv4Network, IPv4Address]) -> None:
        """Make the kernel's direct routes exactly those `peers` should have (a full sync)."""
        want = self.direct_peers(peers)
        table = self.netlink.routes
        table.refresh()
        found = list_our_routes(table.bulk)[0]
        have = {dst: spec for dst, spec in found.items() if self._ours(spec)}
        for dst in have.keys() - want.keys():
            self.netlink.delete_route(dst)
        todo = [spec for dst, spec in want.items() if have.get(dst) != spec]
        failed = table.replace(todo)
        for dst, code in failed.items():
            logger.warning("udp (eBPF): no direct route to {} (it goes through flannel0): errno {}", dst, code)
        self.routes = {dst: spec for dst, spec in want.items() if dst not in failed}
        # nexthop objects no route uses any more (other networks' routes, host-gw's too, keep theirs)
        table.collect(self.routes.values(), also_keep=[spec for spec in found.values() if not self._ours(spec)])
        if todo or have.keys() - want.keys():
            logger.info(
                "udp (eBPF): {} of {} peers routed straight to {}", len(self.routes), len(peers), self.local.ext.name
            )

    def add(self, subnet: IPv4Network, public_ip: IPv4Address) -> None:
        """One peer's route (a watch event), after its fl_peers entry: added, moved, or dropped if the
        peer is no longer directly reachable."""
        want = self.direct_peers({subnet: public_ip}).get(subnet)
        if want is None:
            self.remove(subnet)
            return
        if self.routes.get(subnet) == want:
            return
        try:
            self.netlink.replace_route(want)
        except OSError as e:
            logger.warning("udp (eBPF): no direct route to {} (it goes through flannel0): {}", subnet, e)
            self.remove(subnet)
            return
        self.routes[subnet] = want

    def remove(self, subnet: IPv4Network) -> None:
        """One peer's route, before its fl_peers entry goes (never a packet on the underlay unencapsulated)."""
        if self.routes.pop(subnet, None) is not None:
            self.netlink.delete_route(subnet)

    def remove_all(self) -> int:
        """Every direct route of this network (teardown, or `--udp-encap flannel0` now); how many went."""
        count = _remove_our_routes(self.netlink, self._ours)
        self.routes.clear()
        return count

    def close(self) -> None:
        self.netlink.close()


def remove_direct_routes_on(devices: set[int]) -> int:
    """With no state (`down` after a lost state dir): the direct routes on `devices`, those carrying
    flannel_ul_out. A direct route is proto 102 with an `mtu`, which host-gw's and vxlan's never have."""
    if not devices:
        return 0
    netlink = KernelNetlink()
    try:
        return _remove_our_routes(netlink, lambda spec: spec.oif in devices and bool(spec.mtu))
    finally:
        netlink.close()


def _remove_our_routes(netlink: KernelNetlink, which: Callable[[RouteSpec], bool]) -> int:
    """Delete the proto-102 routes `which` picks, and the nexthop objects only they used; how many went."""
    table = netlink.routes
    table.refresh()
    found = list_our_routes(table.bulk)[0]
    count = sum(netlink.delete_route(dst) for dst, spec in found.items() if which(spec))
    table.collect((), also_keep=[spec for spec in found.values() if not which(spec)])
    return count
