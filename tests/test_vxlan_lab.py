"""The vxlan backend through the real agent in a namespace lab: flat and routed underlay, iperf3, peer
churn (a peer recreating its device), restarts that keep traffic flowing, DirectRouting."""

from __future__ import annotations

import json

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.lab

VXLAN = {"Network": "10.8.0.0/16", "Backend": {"Type": "vxlan"}}


def fdb(lab, host):
    return json.loads(lab.exec(host, ["bridge", "-j", "fdb", "show", "dev", "flannel.1"]).stdout or "[]")


def bring_up(lab_factory, topology="flat", segments=None, config=VXLAN):
    lab = lab_factory(3, topology=topology, segments=segments, network_config=config)
    lab.start_agents()
    lab.wait_all_ready(30)
    for host in lab.host_names:
        lab.add_container(host)
    return lab


@pytest.mark.parametrize("topology", ["flat", "routed"])
def test_vxlan_all_pairs_ping_and_tcp_moves_data(lab_factory, topology):
    lab = bring_up(lab_factory, topology, ["a", "a", "b"] if topology == "routed" else None)
    for host in lab.host_names:
        assert lab.subnet_env(host).mtu == 1450  # underlay 1500 - 50
    matrix = lab.ping_matrix()
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()
    lease = json.loads(next(iter(lab.etcd_get_prefix("/coreos.com/network/subnets/").values())))
    assert lease["BackendType"] == "vxlan" and set(lease["BackendData"]) == {"VNI", "VtepMAC"}
    h1c, _, h3c = lab.containers
    server = lab.iperf3_server(h3c)
    try:
        for reverse in (False, True):
            report = lab.iperf3(h1c, h3c, seconds=2, reverse=reverse)
            sent = report["end"]["sum_received"]["bytes"]
            assert sent > 10_000_000, report["end"]
            print(f"vxlan {topology} {'h3->h1' if reverse else 'h1->h3'}: "
                  f"{report['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s")  # fmt: skip
    finally:
        server.stop()


def test_vxlan_restart_keeps_traffic_and_peer_churn_replaces_entries(lab_factory):
    lab = bring_up(lab_factory)
    h1c, h2c, h3c = lab.containers
    # An agent restart: the kernel holds the state, traffic keeps flowing while the agent is down.
    lab.kill_agent("h2")
    assert lab.ping(h1c, h2c).received == 3
    lab.start_agent("h2")
    lab.wait_ready("h2", 30)
    assert lab.ping(h1c, h2c).received == 3

    # h3 goes away and comes back with a new VTEP MAC (its device recreated): h1 replaces its FDB entry.
    old_mac = lab.exec("h3", ["cat", "/sys/class/net/flannel.1/address"]).stdout.strip()
    assert any(e["mac"] == old_mac for e in fdb(lab, "h1"))
    assert lab.stop_agent("h3") == 0
    assert lab.agent_down("h3").ok  # removes flannel.1, keeps the lease
    lab.start_agent("h3")
    lab.wait_ready("h3", 30)
    new_mac = lab.exec("h3", ["cat", "/sys/class/net/flannel.1/address"]).stdout.strip()
    assert new_mac != old_mac
    wait_for(lambda: any(e["mac"] == new_mac for e in fdb(lab, "h1")), what="h1 learns the new VtepMAC")
    assert not any(e["mac"] == old_mac for e in fdb(lab, "h1"))
    assert lab.ping(h1c, h3c).received == 3

    # h3's lease is deleted: its route, neighbour and FDB entry go from h1.
    h3_subnet = lab.subnet_env("h3").subnet.network
    lab.stop_agent("h3")
    lab.etcd_delete(f"/coreos.com/network/subnets/{h3_subnet.network_address}-{h3_subnet.prefixlen}")
    wait_for(lambda: not any(e["mac"] == new_mac for e in fdb(lab, "h1")), what="fdb entry removed")
    routes = lab.exec("h1", ["ip", "route", "show", str(h3_subnet)]).stdout
    neigh = lab.exec("h1", ["ip", "neigh", "show", str(h3_subnet.network_address)]).stdout
    assert routes.strip() == "" and neigh.strip() == ""


def test_vxlan_direct_routing_uses_plain_routes_on_the_same_segment(lab_factory):
    config = {"Network": "10.8.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
    lab = bring_up(lab_factory, "routed", ["a", "a", "b"], config)
    assert lab.ping_matrix().all_ok
    h2 = lab.subnet_env("h2").subnet.network
    h3 = lab.subnet_env("h3").subnet.network
    via_h2 = lab.exec("h1", ["ip", "route", "show", str(h2)]).stdout
    via_h3 = lab.exec("h1", ["ip", "route", "show", str(h3)]).stdout
    assert f"via {lab.host('h2').underlay_ip} dev eth0" in via_h2  # same segment: no encapsulation
    assert "dev flannel.1" in via_h3  # across the router: vxlan
