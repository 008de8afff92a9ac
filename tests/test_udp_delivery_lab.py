"""How decapsulated packets reach local containers (`--udp-delivery`), through the real agent in a
namespace lab with a real etcd and Docker-style `docker0` bridges.

- port (the default): the host routes the packet (FORWARD applies: a DROP rule there stops it), then
  the hand-off on docker0's tc egress gives it whole to the container's port. Bytes per packet at the
  container's eth0 show whether GSO skbs arrived whole (tens of KB) or were cut by the bridge (~1.4 KB).
- bridge: the kernel's own path, for contrast: on kernels that need the hand-off it segments.
- peer: straight into the container; FORWARD is bypassed, as docs/DATAPATH.md says.
  Its pinned maps removed under the agent, the endpoint sync says so once and retries after a pause.
`down` removes the hook, the clsact qdisc it needed and the pins.
"""

from __future__ import annotations

import os
import time

import pytest

from flannel_ebpf.datapath import layout
from flannel_ebpf.loaders.probes import BRIDGE_TUNNEL_GSO_SINCE, kernel_version
from tests.helpers import rx_bytes_per_packet, wait_delivery_settled, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.bpf]

UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
WHOLE = 8000  # bytes per received packet above which TCP arrived as GSO skbs, not MTU-size segments


def bring_up(lab_factory, *args):
    lab = lab_factory(2, network_config=UDP)
    lab.start_agents(["--lease-check-interval", "1", *args])
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    if not args:  # the default (port) attaches a hook to docker0; bridge and peer attach none
        wait_delivery_settled(lab)
    return lab


def counters(lab, host) -> dict[str, int]:
    live = lab.agent_status(host)["live"]
    return {name: c["packets"] for name, c in live["maps"]["counters"].items()}


def tcp_bytes_per_packet(lab, src, dst) -> float:
    server = lab.iperf3_server(dst)
    try:
        return rx_bytes_per_packet(lab, dst, lambda: lab.iperf3(src, dst, seconds=2))
    finally:
        server.stop()


def forward_drop(lab, host, ip, on: bool) -> None:
    rule = ["FORWARD", "-d", str(ip), "-j", "DROP"]
    lab.exec(host, ["iptables", "-I" if on else "-D", *rule])


def hand_off_ids(lab, host) -> list[str]:
    """Program ids of the hand-off filters on docker0's egress."""
    out = lab.exec(host, ["tc", "filter", "show", "dev", "docker0", "egress"]).stdout
    return [
        line.split(" id ")[1].split()[0] for line in out.splitlines() if "flannel_br_out" in line and " id " in line
    ]


def needs_handoff(lab, host) -> bool:
    return lab.agent_status(host)["live"]["maps"]["config"]["decap_l4_udp"] is False and (
        kernel_version(os.uname().release) < BRIDGE_TUNNEL_GSO_SINCE
    )


def test_default_delivery_keeps_skbs_whole_and_the_forward_chain(lab_factory):
    lab = bring_up(lab_factory)  # no delivery flag: the default, and --udp-decap auto (tc on a veth)
    h1c, h2c = lab.containers
    status = lab.agent_status("h2")["live"]
    hooks = {(p["program"], p["device"], p["hook"]) for p in status["programs"]}
    assert ("flannel_tc_in", "eth0", "tc-ingress") in hooks  # auto picked tc decap on the veth underlay
    if needs_handoff(lab, "h2"):
        assert ("flannel_br_out", "docker0", "tc-egress") in hooks
    assert lab.ping(h1c, h2c).received == 3  # the host resolves the container: now an endpoint
    wait_for(lambda: str(h2c.ip) in lab.agent_status("h2")["live"]["maps"]["endpoints"], what="h2c an endpoint")
    endpoint = lab.agent_status("h2")["live"]["maps"]["endpoints"][str(h2c.ip)]
    port_mac = lab.exec(h2c, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    assert endpoint["mac"] == port_mac

    per_packet = tcp_bytes_per_packet(lab, h1c, h2c)
    print(f"default delivery: {per_packet:.0f} bytes per packet at the container")
    assert per_packet > WHOLE
    assert counters(lab, "h2")["deliver_port"] > 0 or not needs_handoff(lab, "h2")

    # The host's FORWARD chain still decides.
    forward_drop(lab, "h2", h2c.ip, on=True)
    assert lab.ping(h1c, h2c, count=2).received == 0
    forward_drop(lab, "h2", h2c.ip, on=False)
    assert lab.ping(h1c, h2c).received == 3

    # kill -9: the hook and the endpoints stay, traffic keeps its fast path; a restart replaces the
    # hook in place (one filter, the new program).
    lab.kill_agent("h2")
    before = counters(lab, "h2")["deliver_port"]
    assert lab.ping(h1c, h2c).received == 3
    assert counters(lab, "h2")["deliver_port"] >= before + 3 or not needs_handoff(lab, "h2")
    hooked_before = hand_off_ids(lab, "h2")
    lab.start_agent("h2", ["--lease-check-interval", "1"])
    lab.wait_ready("h2", 60)
    if needs_handoff(lab, "h2"):
        wait_for(lambda: len(hand_off_ids(lab, "h2")) == 1 and hand_off_ids(lab, "h2") != hooked_before, what="swap")
    assert lab.ping(h1c, h2c).received == 3

    # down: no hook, no clsact on the bridge (it held only ours), no pins.
    assert lab.stop_agent("h2") == 0
    assert lab.agent_down("h2").ok
    assert "clsact" not in lab.exec("h2", ["tc", "qdisc", "show", "dev", "docker0"]).stdout
    assert lab.exec("h2", ["tc", "filter", "show", "dev", "docker0", "egress"]).stdout.strip() == ""
    assert not os.path.exists(lab.pin_dir("h2"))


def test_bridge_delivery_is_the_kernels_path(lab_factory):
    lab = bring_up(lab_factory, "--udp-delivery", "bridge")
    h1c, h2c = lab.containers
    programs = lab.agent_status("h2")["live"]["programs"]
    assert not any(p["program"] == "flannel_br_out" for p in programs)
    per_packet = tcp_bytes_per_packet(lab, h1c, h2c)
    print(f"bridge delivery: {per_packet:.0f} bytes per packet at the container")
    if needs_handoff(lab, "h2"):
        assert per_packet < 2000  # what the hand-off exists for: the bridge cut every skb
    else:
        assert per_packet > WHOLE


def test_peer_delivery_goes_straight_in_and_bypasses_forward(lab_factory):
    lab = bring_up(lab_factory, "--udp-delivery", "peer")
    h1c, h2c = lab.containers
    status = lab.agent_status("h2")["live"]
    assert status["maps"]["config"]["deliver_peer"] is True
    assert not any(p["program"] == "flannel_br_out" for p in status["programs"])  # no bridge hook
    assert lab.ping(h1c, h2c).received == 3  # the host resolves the container: now an endpoint
    wait_for(lambda: str(h2c.ip) in lab.agent_status("h2")["live"]["maps"]["endpoints"], what="h2c an endpoint")
    before = counters(lab, "h2")["deliver_peer"]
    per_packet = tcp_bytes_per_packet(lab, h1c, h2c)
    print(f"peer delivery: {per_packet:.0f} bytes per packet at the container")
    assert per_packet > WHOLE
    assert counters(lab, "h2")["deliver_peer"] > before
    forward_drop(lab, "h2", h2c.ip, on=True)  # not consulted: that is what this mode gives up (iptables
    # has applied the rule when the command returns: nothing to wait for)
    assert lab.ping(h1c, h2c).received == 3

    # Its pinned endpoints map removed under the running agent, the endpoint sync cannot open the maps:
    # it says so once and retries after a pause. It used to retry at once, thousands of times a second,
    # from the first periodic reconcile (due 10 s after its last success) on: watched past that.
    layout.pin_path(lab.pin_dir("h2"), layout.ENDPOINTS_MAP).unlink()
    lab.exec("h2", ["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"])  # a netlink event: a reconcile now
    time.sleep(12)
    log = lab.agent_log("h2", last_run=True).splitlines()
    failed = [line for line in log if "WARNING" in line and "cannot update the container endpoints" in line]
    assert len(failed) == 1, f"{len(failed)} warnings in 12 s: {failed[:2]}"
