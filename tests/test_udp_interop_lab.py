"""flannel-ebpf's two udp data paths on one overlay: a host with the eBPF data path and a host with the
project's userspace TUN path (`--udp-datapath tun`, flannel-ebpf's re-implementation of flanneld's
classic design: raw inner IPv4 packet in UDP to port 8285, nothing else).

Both ends are this project's code, so this is no proof of interop with flanneld: that is
tests/test_flanneld_interop_lab.py, against flannel's own flanneld v0.20.2 binary. What this covers is
the TUN path itself and the eBPF path against it: each direction crosses both paths (h1 (tun)
encapsulates in userspace and h2 (eBPF) decapsulates in its program, and the other way round). Pings go
both ways, then iperf3 TCP moves data both ways (every segment of it crossing both paths, ACKs
included).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import wait_delivery_settled

pytestmark = pytest.mark.lab

UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
FLANNEL_UDP_PORT = 8285


def bring_up(lab_factory, h2_datapath: str = "ebpf", h2_extra: tuple[str, ...] = ()):
    lab = lab_factory(2, network_config=UDP)
    lab.start_agent("h1", ["--udp-datapath", "tun"])
    lab.start_agent("h2", ["--udp-datapath", h2_datapath, *h2_extra])
    lab.wait_all_ready(60)  # bcc compiles the eBPF programs at start
    for host in lab.host_names:
        assert lab.subnet_env(host).mtu == 1500 - 28, "flannel's udp MTU: underlay - 28 on both paths"
        lab.add_container(host)
    if h2_datapath == "ebpf":
        # A known limit of veth underlays, not of the wire format: tc encapsulation runs before the kernel
        # completes offloaded (CHECKSUM_PARTIAL) TCP/UDP checksums, and a veth never completes them, so a
        # userspace receiver (the TUN path, as flanneld's) would see unfinished inner checksums. A physical NIC
        # (drivers drop checksum offload for unknown UDP tunnels) or virtio (the hypervisor fills it in)
        # completes them; here the eBPF host's container sends complete checksums, as it would through one.
        lab.exec(lab.containers_of("h2")[0], ["ethtool", "-K", "eth0", "tx", "off"])
        wait_delivery_settled(lab, ["h2"])  # the bridge hook's clsact costs one packet when it is added
    return lab


def csum_errors(lab, container) -> str:
    """The receiving stack's checksum-error counters: what an encapsulation that forwards a packet with
    an unfinished (CHECKSUM_PARTIAL) inner checksum to a userspace receiver leads to."""
    names = ["TcpInCsumErrors", "UdpInCsumErrors", "IpExtInCsumErrors"]
    out = lab.exec(container, ["nstat", "-az", *names], check=False).stdout
    return " ".join(" ".join(line.split()[:2]) for line in out.splitlines() if line.split()[:1] in ([n] for n in names))


def assert_overlay_works_both_ways(lab) -> None:
    c1, c2 = lab.containers
    for src, dst in ((c1, c2), (c2, c1)):
        r = lab.ping(src, dst, count=5, interval=0.1)
        assert r.received == r.sent == 5, f"{src} -> {dst}: {r}\n{r.output}"
    # Full-size packets (DF set) fit the overlay MTU on both paths: the two agree on the 28-byte overhead.
    big = 1472 - 28  # ICMP payload filling an MTU-1472 packet
    for src, dst in ((c1, c2), (c2, c1)):
        r = lab.ping(src, dst, count=3, interval=0.1, size=big)
        assert r.received == 3, f"{src} -> {dst} at {big + 28} bytes: {r}"
    server = lab.iperf3_server(c2)
    try:
        for reverse in (False, True):
            direction = "h2 -> h1" if reverse else "h1 -> h2"
            try:
                report = lab.iperf3(c1, c2, seconds=2, reverse=reverse)
            except RuntimeError as e:
                raise AssertionError(
                    f"TCP {direction}: {e}; checksum errors: {c1.name}: {csum_errors(lab, c1)}, "
                    f"{c2.name}: {csum_errors(lab, c2)}"
                ) from e
            received = report["end"]["sum_received"]["bytes"]
            print(f"{direction}: {report['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s")
            assert received > 1_000_000, (direction, report["end"])
    finally:
        server.stop()


def test_tun_host_and_ebpf_host_share_the_overlay(lab_factory):
    lab = bring_up(lab_factory)
    # h2 really runs the eBPF data path (and h1 the userspace one): otherwise this proves nothing.
    h2_backend = lab.agent_status("h2")["backend_status"]
    assert h2_backend["datapath"] == "ebpf" and h2_backend["decap"] == "tc", h2_backend  # auto, on a veth
    assert lab.agent_status("h1")["backend_status"]["datapath"] == "tun"
    assert "flannel_tc_in" in lab.exec("h2", ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert "clsact" in lab.exec("h2", ["tc", "qdisc", "show", "dev", "flannel0"]).stdout
    assert "xdp" not in json.loads(lab.exec("h1", ["ip", "-j", "-d", "link", "show", "eth0"]).stdout)[0]
    # Both publish flannel's udp lease form (no BackendType), so either can be a flanneld.
    for value in lab.leases().values():
        assert set(value) == {"PublicIP", "PublicIPv6"}, value

    assert_overlay_works_both_ways(lab)
    # The eBPF programs carried the traffic (no fallback through some other path).
    counters = lab.agent_status("h2")["backend_status"]["maps"]["counters"]
    assert counters["encap_ok"]["packets"] > 1000 and counters["decap_ok"]["packets"] > 1000, counters


def test_tun_host_and_ebpf_host_with_xdp_decap(lab_factory):
    lab = bring_up(lab_factory, h2_extra=("--udp-decap", "xdp"))
    h2_link = json.loads(lab.exec("h2", ["ip", "-j", "-d", "link", "show", "eth0"]).stdout)[0]
    assert "xdp" in h2_link, f"no XDP program on h2's eth0: {h2_link}"
    assert_overlay_works_both_ways(lab)


def test_two_tun_hosts_baseline(lab_factory):
    """The reference pair: the project's TUN path on both ends (what the mixed pair must equal)."""
    lab = bring_up(lab_factory, h2_datapath="tun")
    assert_overlay_works_both_ways(lab)
