"""The eBPF udp backend through the real agent in a namespace lab with a real etcd: every pair pings on a
flat and a routed underlay, TCP moves data both ways, kill -9 of an agent under a ping flood loses nothing,
a deleted lease stops traffic, spoofed packets are counted drops, `down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

from flannel_ebpf.lab.traffic import PingResult, count_flood
from tests.helpers import pinned_map_ids, wait_delivery_settled, wait_for
from tests.packets import inner_echo

pytestmark = [pytest.mark.lab, pytest.mark.bpf]

UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
PREFIX = "/coreos.com/network"
FLOOD_COUNT = 3000  # 2 ms apart: at least 6 s, well past the kill (wanted: 1000 pings after it)


def bring_up(lab_factory, decap, hosts=3, topology="flat", segments=None, loader="auto", encap="flannel0"):
    lab = lab_factory(hosts, topology=topology, segments=segments, network_config=UDP)
    lab.start_agents(["--udp-decap", decap, "--loader", loader, "--lease-check-interval", "1", "--udp-encap", encap])
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    wait_delivery_settled(lab)
    return lab


def counters(lab, host) -> dict[str, int]:
    live = lab.agent_status(host)["live"]
    return {name: c["packets"] for name, c in live["maps"]["counters"].items()}


@pytest.mark.parametrize(
    ("decap", "topology", "loader"),
    [("xdp", "flat", "elf"), ("tc", "flat", "elf"), ("xdp", "routed", "elf"), ("tc", "routed", "elf"),
     ("tc", "routed", "bcc")],
)  # fmt: skip
def test_all_pairs_ping_and_tcp_both_ways(lab_factory, decap, topology, loader):
    segments = ["a", "a", "b"] if topology == "routed" else None
    lab = bring_up(lab_factory, decap, topology=topology, segments=segments, loader=loader, encap="underlay")
    assert all(lab.subnet_env(h).mtu == 1472 for h in lab.host_names)  # underlay 1500 - 28
    matrix = lab.ping_matrix()
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()
    h1c, _, h3c = lab.containers
    server = lab.iperf3_server(h3c)
    try:
        for reverse in (False, True):
            report = lab.iperf3(h1c, h3c, seconds=2, reverse=reverse)
            received = report["end"]["sum_received"]
            assert received["bytes"] > 10_000_000, report["end"]
            print(f"udp-ebpf {loader} {decap} {topology} {'h3->h1' if reverse else 'h1->h3'}: "
                  f"{received['bits_per_second'] / 1e9:.2f} Gbit/s")  # fmt: skip
    finally:
        server.stop()
    status = lab.agent_status("h1")
    programs = status["live"]["programs"]
    hooks = {p.get("hook") for p in programs}
    assert any("egress" in str(h) for h in hooks)
    assert any(decap in str(h) for h in hooks)
    assert all(p.get("prog_id", 0) > 0 for p in programs), programs  # ids as bpftool shows them
    c = counters(lab, "h1")
    assert c["encap_ok"] > 0 and c["decap_ok"] > 0
    # --udp-encap underlay: h1 routes the peers on its own segment straight to eth0, with
    # flannel0's MTU and address; a peer behind the router goes through flannel0
    subnets = {h: lab.subnet_env(h).subnet.network for h in lab.host_names}
    direct = {str(subnets[h]): lab.host(h).underlay_ip for h in lab.host_names[1:]}
    if topology == "routed":
        direct.pop(str(subnets["h3"]))
    routes = lab.exec("h1", ["ip", "-4", "route", "show", "proto", "102"]).stdout
    own = subnets["h1"].network_address
    for subnet, gateway in direct.items():
        want = rf"^{re.escape(subnet)} .*via {gateway} dev eth0 .*src {own}\b.*mtu 1472"
        assert re.search(want, routes, re.M), routes
    assert len(re.findall(r" dev eth0 ", routes)) == len(direct), routes
    for host in lab.host_names:  # the loader asked for is the one that loaded the programs
        assert lab.agent_status(host)["live"].get("loader") == loader
        assert f"programs loaded by the {loader} loader" in lab.agent_log(host)


@pytest.mark.parametrize("decap", ["xdp", "auto"])
def test_agent_kill_9_under_flood_loses_nothing_and_restart_adopts(lab_factory, decap):
    lab = bring_up(lab_factory, decap, hosts=2)
    h1c, h2c = lab.containers
    # One count-bounded flood, no gap (it ends on an answer: no probe in flight is counted as lost). The
    # kill lands inside it: after h1's encapsulation counter shows it flowing, while it still runs.
    flooded: dict[str, PingResult] = {}
    flood = threading.Thread(
        target=lambda: flooded.update(r=count_flood(lab.node(h1c), str(h2c.ip), FLOOD_COUNT, deadline=60)),
        daemon=True,
    )
    encap_before = counters(lab, "h1")["encap_ok"]
    flood.start()
    wait_for(lambda: counters(lab, "h1")["encap_ok"] >= encap_before + 200, what="the flood flowing")
    lab.kill_agent("h1")
    lab.kill_agent("h2")
    assert flood.is_alive(), "the flood ended before the kill"
    encap_at_kill = counters(lab, "h1")["encap_ok"]  # read from the pinned maps: the agents are gone
    flood.join(75)
    r = flooded["r"]
    encapsulated_after_kill = counters(lab, "h1")["encap_ok"] - encap_at_kill
    print(f"kill -9 of both agents under a ping flood: {r.sent - r.received} of {r.sent} lost, "
          f"{encapsulated_after_kill} encapsulated after the kill")  # fmt: skip
    assert r.sent >= FLOOD_COUNT and r.received == r.sent, r
    assert encapsulated_after_kill >= 1000
    peers_before = lab.agent_status("h1")["live"]["maps"]["peers"]
    ids_before = pinned_map_ids(lab, "h1")
    lab.start_agent("h1", ["--lease-check-interval", "1"])
    lab.wait_ready("h1", 60)
    after = lab.agent_status("h1")
    assert after["live"]["maps"]["peers"] == peers_before  # same content...
    assert pinned_map_ids(lab, "h1") == ids_before  # ...in the very same maps: adopted, not re-created
    assert re.search(r"\b1 pinned peers adopted", lab.agent_log("h1", last_run=True)), "the peer map was adopted"
    assert lab.ping(h1c, h2c).received == 3


@pytest.mark.parametrize("topology", ["flat", "routed"])
def test_packets_that_wait_for_the_underlays_arp_are_all_delivered(lab_factory, topology):
    """The default encapsulation (on flannel0) towards a peer on the same segment and one behind the router:
    each round starts with h1's neighbour entry for the next hop (the peer, or the router; nothing else of h1's
    goes there) deleted, so the first packets wait in the kernel's queue for ARP and are sent from there;
    none may be lost."""
    routed = topology == "routed"
    lab = bring_up(lab_factory, "tc", hosts=3 if routed else 2, topology=topology,
                   segments=["a", "a", "b"] if routed else None)  # fmt: skip
    h1c, target = lab.containers[0], lab.containers[-1]
    route = json.loads(lab.exec("h1", ["ip", "-j", "-4", "route", "get", str(target.host.underlay_ip)]).stdout)[0]
    next_hop = route.get("gateway", route["dst"])
    assert (next_hop != route["dst"]) == routed, route
    for round_no in range(3):
        lab.exec("h1", ["ip", "neigh", "del", next_hop, "dev", "eth0"], check=False)  # may have aged out
        assert lab.exec("h1", ["ip", "neigh", "show", next_hop, "dev", "eth0"]).stdout.strip() == ""
        r = count_flood(lab.node(h1c), str(target.ip), 50, deadline=20)
        assert (r.sent, r.received) == (50, 50), (round_no, next_hop, r)
        assert "lladdr" in lab.exec("h1", ["ip", "neigh", "show", next_hop, "dev", "eth0"]).stdout


def test_deleted_lease_stops_traffic_and_spoofed_packets_are_counted(lab_factory):
    lab = bring_up(lab_factory, "xdp", hosts=2)
    h1c, h2c = lab.containers
    h1 = lab.host("h1")
    # A UDP datagram to 8285 from a machine that holds no lease (etcd's namespace) carrying an inner packet
    # for h1's container: dropped in XDP and counted.
    before = counters(lab, "h1").get("decap_not_member", 0)
    inner = inner_echo(src="10.5.200.2", dst=str(h1c.ip))
    sender = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
        f"[s.sendto(bytes.fromhex('{inner.hex()}'), ('{h1.underlay_ip}', 8285)) for _ in range(5)]"
    )
    lab.exec(lab.etcd_ns, ["/usr/bin/python3", "-c", sender])
    wait_for(lambda: counters(lab, "h1").get("decap_not_member", 0) >= before + 5, what="spoofed drops counted")

    # h2 goes away without its agent (killed), and its lease is deleted: h1 stops sending to it.
    h2_subnet = lab.subnet_env("h2").subnet.network
    lab.kill_agent("h2")
    assert lab.ping(h1c, h2c).received == 3  # the data path outlives the agent
    lab.etcd_delete(f"{PREFIX}/subnets/{h2_subnet.network_address}-{h2_subnet.prefixlen}")
    wait_for(lambda: not lab.agent_status("h1")["live"]["maps"]["peers"], what="peer removed from the map")
    unreachable = lab.exec(h1c, ["ping", "-c", "1", "-W", "1", str(h2c.ip)], check=False)
    assert unreachable.returncode != 0
    assert "Unreachable" in unreachable.stdout, unreachable.stdout


def gro(lab, host) -> str:
    out = lab.exec(host, ["ethtool", "-k", "eth0"]).stdout
    return next(line.split(":")[1].split()[0] for line in out.splitlines() if "generic-receive-offload" in line)


def test_down_leaves_nothing_behind(lab_factory):
    lab = lab_factory(2, network_config=UDP)
    gro_before = gro(lab, "h1")
    lab.exec("h1", ["sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1"])  # strict, as on RHEL
    lab.start_agents(["--udp-decap", "xdp", "--udp-encap", "underlay"])
    lab.wait_all_ready(60)
    assert gro(lab, "h1") == "on"  # native XDP on a veth: switched on by the agent
    assert lab.exec("h1", ["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]).stdout.strip() == "2"
    pin_dir = str(lab.pin_dir("h1"))
    assert os.path.isdir(pin_dir)
    assert " dev eth0 " in lab.exec("h1", ["ip", "route", "show", "proto", "102"]).stdout  # a direct route
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1", ["--release-lease"]).ok
    links = json.loads(lab.exec("h1", ["ip", "-j", "-d", "link", "show"]).stdout)
    assert not any(link["ifname"] == "flannel0" for link in links)
    assert not any("xdp" in link for link in links), "no XDP program left on any device"
    assert lab.exec("h1", ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout.strip() == ""
    assert lab.exec("h1", ["tc", "filter", "show", "dev", "eth0", "egress"]).stdout.strip() == ""
    assert lab.exec("h1", ["ip", "route", "show", "proto", "102"]).stdout.strip() == ""
    assert not os.path.exists(pin_dir)
    assert gro(lab, "h1") == gro_before  # what the agent changed on the interface is put back
    assert lab.exec("h1", ["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]).stdout.strip() == "1"
    assert len(lab.etcd_get_prefix(f"{PREFIX}/subnets/")) == 1


def test_down_after_a_crash_that_lost_the_state_removes_the_direct_routes_and_encap(lab_factory):
    """kill -9, then the state dir is lost: `down` finds the direct routes by the device whose egress holds
    flannel_ul_out and removes them, and nothing of the underlay encap is left."""
    lab = lab_factory(2, network_config=UDP)
    lab.start_agents(["--udp-decap", "tc", "--udp-encap", "underlay"])
    lab.wait_all_ready(60)
    assert " dev eth0 " in lab.exec("h1", ["ip", "route", "show", "proto", "102"]).stdout  # a direct route
    lab.kill_agent("h1")
    state = lab.host("h1").state_dir / "state.json"
    assert state.exists()
    state.unlink()
    down = lab.agent_down("h1")
    assert down.ok, down.stderr
    assert "direct routes removed" in down.stderr + down.stdout, down.stderr
    assert lab.exec("h1", ["ip", "route", "show", "proto", "102"]).stdout.strip() == ""
    assert lab.exec("h1", ["tc", "filter", "show", "dev", "eth0", "egress"]).stdout.strip() == ""
    assert "flannel0" not in lab.exec("h1", ["ip", "-o", "link", "show"]).stdout


def test_udp_encap_flannel0_and_back_moves_the_peers_routes_and_keeps_every_pair(lab_factory):
    """A restart with --udp-encap flannel0 removes the direct routes and the underlay's encap program, and
    the peer is reached through flannel0; back to the default, both return. Every pair pings throughout."""
    lab = bring_up(lab_factory, "tc", hosts=2, encap="underlay")
    peer_container = str(lab.containers[1].ip)

    def path() -> tuple[str, str, str]:
        route = lab.exec("h1", ["ip", "-4", "route", "get", peer_container]).stdout
        egress = lab.exec("h1", ["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
        direct = [r for r in lab.exec("h1", ["ip", "-4", "route", "show", "proto", "102"]).stdout.splitlines()
                  if " dev eth0 " in r]  # fmt: skip
        return route, egress, "\n".join(direct)

    route, egress, direct = path()
    assert " dev eth0 " in route and "mtu 1472" in route and "flannel_ul_out" in egress and direct, (route, direct)
    for encap, device in (("flannel0", "flannel0"), ("underlay", "eth0")):
        assert lab.stop_agent("h1") == 0
        lab.start_agent("h1", ["--udp-decap", "tc", "--udp-encap", encap])
        lab.wait_ready("h1", 60)
        route, egress, direct = path()
        assert f" dev {device} " in route, route
        assert ("flannel_ul_out" in egress) == (encap == "underlay"), egress
        assert bool(direct) == (encap == "underlay"), direct
        matrix = lab.ping_matrix()
        assert matrix.all_ok, matrix.failures()


def test_status_through_ip_netns_exec_says_bpffs_is_hidden_not_unpinned(lab_factory):
    """`ip netns exec` mounts a fresh /sys, hiding the host's bpffs: status run that way must say so, not
    that the maps were never pinned, while the agent's programs run (the lab's own wrapper shows them)."""
    from flannel_ebpf.lab.agent import cli_command, cli_env

    lab = lab_factory(2, network_config=UDP)
    lab.start_agents(["--udp-decap", "tc"])
    lab.wait_all_ready(60)
    state_dir = str(lab.host("h1").state_dir)
    seen = lab.agent_cli("h1", "status", "--long", "--state-dir", state_dir)  # with the host's bpffs
    assert seen.ok and "  maps     " in seen.stdout and "cannot read the data path" not in seen.stdout, seen.stdout
    summary = lab.agent_cli("h1", "status", "--state-dir", state_dir)
    assert "encap_ok" in summary.stdout and "unknown:" not in summary.stdout, summary.stdout
    hidden_summary = lab.node("h1").exec([*cli_command(), "status", "--state-dir", state_dir], env=cli_env())
    assert "traffic     unknown: bpffs is not mounted here" in hidden_summary.stdout, hidden_summary.stdout

    hidden = lab.node("h1").exec(
        [*cli_command(), "status", "--long", "--state-dir", state_dir], env=cli_env(), check=False
    )
    assert hidden.argv[:3] == ["ip", "netns", "exec"]
    lines = [line for line in hidden.stdout.splitlines() if "bpffs" in line]
    assert len(lines) == 1, hidden.stdout + hidden.stderr
    assert lines[0].startswith("  maps_error: bpffs is not mounted here (/sys/fs/bpf/"), lines[0]
    assert "outside `ip netns exec`" in lines[0], lines[0]
    assert "not pinned" not in hidden.stdout
    assert " running, phase ready" in hidden.stdout
