"""host-gw's decisions against an in-memory kernel (tests/fake_netlink.py): which routes a sync, a watch
event and a teardown add, replace and delete. No root; the namespace tests (test_backends_netns.py) check
the same backend against the real kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.backends.base import BackendError
from flannel_ebpf.backends.hostgw import HostGwBackend
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.routes import Reachability, RouteSpec
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from tests.fake_netlink import FakeNetlink

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.1.1"), IPv4Address("192.168.1.1"), 1500)
LOCAL = LocalNetwork(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), EXT, 1500)


def lease(subnet: str, ip: str, backend_type: str = "host-gw") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), backend_type, None))


def route(subnet: str, ip: str) -> RouteSpec:
    return RouteSpec(IPv4Network(subnet), IPv4Address(ip), EXT.index)


def started(options: BackendOptions | None = None, local: LocalNetwork = LOCAL) -> tuple[HostGwBackend, FakeNetlink]:
    backend = HostGwBackend({"Type": "host-gw"}, options or BackendOptions())
    kernel = FakeNetlink(ext_index=EXT.index, links={3: "eth1"})
    backend.netlink = kernel
    backend.prepare(EXT)
    backend.start(local)
    return backend, kernel


def test_sync_routes_each_peer_via_its_host_and_skips_leases_it_must_not_program() -> None:
    backend, kernel = started()
    backend.sync(
        [
            lease("10.5.2.0/24", "192.168.1.2"),
            lease("10.5.3.0/24", "192.168.1.3"),
            lease("10.5.4.0/24", "192.168.1.4", "vxlan"),  # another backend's lease
            lease("10.5.1.0/25", "192.168.1.5"),  # overlaps our own subnet
            lease("10.5.6.0/24", "192.168.1.1"),  # our own address: a stale lease of this host
        ]
    )
    assert kernel.routes == {
        IPv4Network("10.5.2.0/24"): route("10.5.2.0/24", "192.168.1.2"),
        IPv4Network("10.5.3.0/24"): route("10.5.3.0/24", "192.168.1.3"),
    }
    assert set(backend.book.skipped) == {IPv4Network(s) for s in ("10.5.4.0/24", "10.5.1.0/25", "10.5.6.0/24")}
    assert "BackendType is 'vxlan'" in backend.book.skipped[IPv4Network("10.5.4.0/24")]


def test_a_peer_behind_a_router_is_refused_with_why_and_programmed_once_it_is_on_link() -> None:
    backend, kernel = started()
    far = IPv4Address("172.16.0.9")
    kernel.reach[far] = Reachability(far, oif=3, gateway=IPv4Address("192.168.1.254"))
    peer = lease("10.5.9.0/24", str(far))
    backend.sync([peer])
    assert kernel.routes == {}
    reason = backend.book.refused[peer.subnet]
    assert "via the router 192.168.1.254 (dev eth1)" in reason and "one L2 segment" in reason
    del kernel.reach[far]  # the peer moved onto our segment
    backend.resync()
    assert kernel.routes == {peer.subnet: route("10.5.9.0/24", str(far))}
    assert peer.subnet not in backend.book.refused and peer.subnet in backend.book.programmed


def test_a_restarted_agent_adopts_right_routes_without_a_write_and_fixes_wrong_and_stale_ones() -> None:
    backend, kernel = started()
    kernel.routes = {
        IPv4Network("10.5.2.0/24"): route("10.5.2.0/24", "192.168.1.2"),  # right
        IPv4Network("10.5.3.0/24"): route("10.5.3.0/24", "192.168.1.99"),  # the peer's address changed
        IPv4Network("10.5.4.0/24"): route("10.5.4.0/24", "192.168.1.4"),  # its lease is gone
    }
    backend.sync([lease("10.5.2.0/24", "192.168.1.2"), lease("10.5.3.0/24", "192.168.1.3")])
    assert kernel.writes == [
        ("del-route", IPv4Network("10.5.4.0/24")),
        ("route", route("10.5.3.0/24", "192.168.1.3")),
    ]
    kernel.writes.clear()
    backend.resync()
    assert kernel.writes == []  # nothing flaps on a re-check


def test_a_route_the_kernel_refuses_costs_that_peer_only() -> None:
    backend, kernel = started()
    kernel.refuse_routes.add(IPv4Network("10.5.2.0/24"))
    backend.sync([lease("10.5.2.0/24", "192.168.1.2"), lease("10.5.3.0/24", "192.168.1.3")])
    assert set(kernel.routes) == {IPv4Network("10.5.3.0/24")}
    assert "kernel refused route" in backend.book.refused[IPv4Network("10.5.2.0/24")]


def test_watch_events_replace_one_route_and_a_lease_turned_unusable_loses_its_route() -> None:
    backend, kernel = started()
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2"))
    assert kernel.writes == [("route", route("10.5.2.0/24", "192.168.1.2"))]
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2", "vxlan"))  # it changed backend
    assert IPv4Network("10.5.2.0/24") not in kernel.routes
    assert IPv4Network("10.5.2.0/24") in backend.book.skipped
    backend.add_peer(lease("10.5.3.0/24", "192.168.1.3"))
    backend.remove_peer(lease("10.5.3.0/24", "192.168.1.3"))
    assert kernel.routes == {} and backend.book.leases.keys() == {IPv4Network("10.5.2.0/24")}


def test_a_failing_kernel_on_a_watch_event_is_recorded_not_raised() -> None:
    backend, kernel = started()
    kernel.refuse_routes.add(IPv4Network("10.5.2.0/24"))
    backend.add_peer(lease("10.5.2.0/24", "192.168.1.2"))
    assert backend.book.refused[IPv4Network("10.5.2.0/24")].startswith("programming failed")


def test_in_multi_network_mode_sync_and_teardown_touch_only_routes_into_their_own_network() -> None:
    backend, kernel = started(BackendOptions(network_name="blue"))
    other = route("10.6.2.0/24", "192.168.1.2")  # the other network's route to the same host
    kernel.routes[other.dst] = other
    backend.sync([lease("10.5.2.0/24", "192.168.1.2")])
    assert set(kernel.routes) == {IPv4Network("10.5.2.0/24"), other.dst}
    backend.teardown(LOCAL)
    assert kernel.routes == {other.dst: other}
    assert kernel.closed == 1


def test_peers_before_prepare_is_an_error_naming_the_missing_step() -> None:
    backend = HostGwBackend({"Type": "host-gw"}, BackendOptions())
    backend.netlink = FakeNetlink(ext_index=EXT.index)
    backend.sync([lease("10.5.2.0/24", "192.168.1.2")])  # evaluated per peer: refused, not raised
    assert "prepare() was not called" in backend.book.refused[IPv4Network("10.5.2.0/24")]
    with pytest.raises(BackendError, match="host-gw: prepare\\(\\) was not called"):
        backend._ext()
