"""vxlan's peer decisions against an in-memory kernel (tests/fake_netlink.py): which routes, neighbours and
FDB entries a sync and the watch events add, replace and delete. No root; the device itself and the real
kernel are tested in namespaces (test_backends_netns.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from flannel_ebpf.backends.vxlan import VxlanBackend
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.peers import NUD_PERMANENT, FdbEntry, Neighbour
from flannel_ebpf.netlink.routes import Reachability, RouteSpec
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from tests.fake_netlink import NUD_REACHABLE, FakeNetlink

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.1.1"), IPv4Address("192.168.1.1"), 1500)
LOCAL = LocalNetwork(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), EXT, 1450)
VXLAN = 7  # flannel.1's ifindex


def lease(subnet: str, ip: str, mac: str, vni: object = 1) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": vni, "VtepMAC": mac}))


def encap_route(subnet: str) -> RouteSpec:
    net = IPv4Network(subnet)
    return RouteSpec(net, net.network_address, VXLAN, onlink=True)


def started(config: dict[str, object] | None = None) -> tuple[VxlanBackend, FakeNetlink]:
    """A backend as after prepare() and start() (the device is the namespace tests' business)."""
    backend = VxlanBackend({"Type": "vxlan", **(config or {})}, BackendOptions())
    kernel = FakeNetlink(ext_index=EXT.index)
    backend.netlink = kernel
    backend.ext, backend.local, backend.ifindex = EXT, LOCAL, VXLAN
    return backend, kernel


def test_sync_programs_neighbour_fdb_and_onlink_route_per_peer() -> None:
    backend, kernel = started()
    backend.sync([lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02")])
    assert kernel.neigh[VXLAN] == {IPv4Address("10.5.2.0"): ("02:00:00:00:00:02", NUD_PERMANENT)}
    assert kernel.fdb_entries[VXLAN] == {"02:00:00:00:00:02": IPv4Address("192.168.1.2")}
    assert kernel.routes == {IPv4Network("10.5.2.0/24"): encap_route("10.5.2.0/24")}
    # entries first, the route last: a route never points at an unresolved next hop
    assert [w[0] for w in kernel.writes] == ["neigh", "fdb", "route"]


def test_sync_deletes_our_stale_entries_keeps_learnt_neighbours_and_rewrites_nothing_that_is_right() -> None:
    backend, kernel = started()
    kernel.neigh[VXLAN] = {
        IPv4Address("10.5.2.0"): ("02:00:00:00:00:02", NUD_PERMANENT),  # right
        IPv4Address("10.5.9.0"): ("02:00:00:00:00:09", NUD_PERMANENT),  # a peer that is gone
        IPv4Address("10.5.8.7"): ("02:00:00:00:00:87", NUD_REACHABLE),  # learnt by the kernel, not ours
    }
    kernel.fdb_entries[VXLAN] = {
        "02:00:00:00:00:02": IPv4Address("192.168.1.2"),
        "02:00:00:00:00:09": IPv4Address("192.168.1.9"),
    }
    kernel.routes = {IPv4Network("10.5.2.0/24"): encap_route("10.5.2.0/24")}
    backend.sync([lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02")])
    assert kernel.writes == [("del-neigh", VXLAN, IPv4Address("10.5.9.0")), ("del-fdb", VXLAN, "02:00:00:00:00:09")]
    assert IPv4Address("10.5.8.7") in kernel.neigh[VXLAN]


def test_two_hosts_claiming_one_vtep_mac_the_second_is_refused_and_the_first_keeps_its_entries() -> None:
    backend, kernel = started()
    mac = "02:00:00:00:00:aa"
    backend.sync([lease("10.5.3.0/24", "192.168.1.3", mac), lease("10.5.2.0/24", "192.168.1.2", mac)])
    assert kernel.fdb_entries[VXLAN] == {mac: IPv4Address("192.168.1.2")}  # the lower subnet wins
    assert set(kernel.routes) == {IPv4Network("10.5.2.0/24")}
    assert "already used by peer 10.5.2.0/24" in backend.book.refused[IPv4Network("10.5.3.0/24")]


def test_a_new_vtep_mac_replaces_the_entries_and_drops_the_old_fdb_entry() -> None:
    backend, kernel = started()
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02"))
    kernel.writes.clear()
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:22"))  # the peer's device was remade
    assert kernel.writes == [
        ("neigh", VXLAN, Neighbour(IPv4Address("10.5.2.0"), "02:00:00:00:00:22")),
        ("fdb", VXLAN, FdbEntry("02:00:00:00:00:22", IPv4Address("192.168.1.2"))),
        ("route", encap_route("10.5.2.0/24")),
        ("del-fdb", VXLAN, "02:00:00:00:00:02"),
    ]
    kernel.writes.clear()
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:22"))  # the same lease again
    assert kernel.writes == []


def test_removing_one_of_two_subnets_of_a_host_keeps_the_fdb_entry_they_share() -> None:
    backend, kernel = started()
    mac = "02:00:00:00:00:02"
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", mac))
    backend.add_peer(lease("10.5.3.0/24", "192.168.1.2", mac))  # same host, same VTEP: allowed
    backend.remove_peer(lease("10.5.2.0/24", "192.168.1.2", mac))
    assert kernel.fdb_entries[VXLAN] == {mac: IPv4Address("192.168.1.2")}
    assert set(kernel.neigh[VXLAN]) == {IPv4Address("10.5.3.0")}
    assert ("del-nexthop", IPv4Address("10.5.2.0")) in kernel.writes  # its own VTEP gateway: not left to a resync
    backend.remove_peer(lease("10.5.3.0/24", "192.168.1.2", mac))
    assert kernel.fdb_entries[VXLAN] == {} and kernel.neigh[VXLAN] == {} and kernel.routes == {}


def test_direct_routing_routes_an_on_link_peer_via_its_host_and_encapsulates_the_others() -> None:
    backend, kernel = started({"DirectRouting": True})
    far = IPv4Address("172.16.0.3")
    kernel.reach[far] = Reachability(far, oif=EXT.index, gateway=IPv4Address("192.168.1.254"))
    backend.sync(
        [lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02"), lease("10.5.3.0/24", str(far), "02:00:00:00:00:03")]
    )
    assert kernel.routes[IPv4Network("10.5.2.0/24")] == RouteSpec(
        IPv4Network("10.5.2.0/24"), IPv4Address("192.168.1.2"), EXT.index
    )
    assert kernel.routes[IPv4Network("10.5.3.0/24")] == encap_route("10.5.3.0/24")
    assert set(kernel.fdb_entries[VXLAN]) == {"02:00:00:00:00:03"}


def test_a_refused_neighbour_entry_costs_that_peer_its_route_and_nothing_else() -> None:
    backend, kernel = started()
    kernel.refuse_entries.add(IPv4Address("10.5.2.0"))
    backend.sync(
        [
            lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02"),
            lease("10.5.3.0/24", "192.168.1.3", "02:00:00:00:00:03"),
        ]
    )
    assert set(kernel.routes) == {IPv4Network("10.5.3.0/24")}
    assert "kernel refused its neighbour/FDB entry" in backend.book.refused[IPv4Network("10.5.2.0/24")]


def test_a_lease_with_bad_backend_data_is_skipped_and_loses_what_it_had() -> None:
    backend, kernel = started()
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "02:00:00:00:00:02"))
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "ff:ff:ff:ff:ff:ff"))  # a broadcast VtepMAC
    assert "multicast/broadcast" in backend.book.skipped[IPv4Network("10.5.2.0/24")]
    assert kernel.routes == {} and kernel.neigh[VXLAN] == {} and kernel.fdb_entries[VXLAN] == {}
