"""Mixed clusters against the real thing: flannel's own flanneld v0.20.2 (built from its tag, unchanged;
`../shared/flanneld/`) and flannel-ebpf agents on one etcd (v3) and one overlay, on udp (flannel-ebpf on
its eBPF data path), vxlan and host-gw.

Four hosts: h1 and h2 run flanneld, h3 and h4 flannel-ebpf, so every kind of pair is there (flanneld to
flanneld, flanneld to flannel-ebpf both ways, flannel-ebpf to flannel-ebpf). All four start together;
a container per host; every container pings every other. Then each flannel-ebpf agent is killed (-9)
and started again, and each flanneld is stopped (SIGTERM) and started again, one host after another;
then all four at once (agents killed, flanneld stopped, all started together): every host keeps its
subnet and its lease, and every pair answers again. Last, TCP (iperf3) both ways between a flanneld
host's container and a flannel-ebpf host's.

flanneld v0.20.2's known watch fault (DESIGN.md §1): it handles only the first event of each etcd watch
response and goes on from "now", so a flanneld started together with other hosts may never learn some
of their leases (until its renewal, hours later). Right after the start together the test therefore
asserts what each side can owe: the flannel-ebpf hosts know every lease, and every pair whose two ends
know each other answers; the pairs flanneld's fault cuts off are printed, not asserted. A restarted
flanneld lists the leases afresh, so after the restarts the full mesh is asserted.

On udp the TCP check turns tx checksum offload off in the flannel-ebpf hosts' containers: tc
encapsulation runs before the kernel completes an offloaded (CHECKSUM_PARTIAL) inner checksum, and a
veth never completes it, so flanneld's userspace TUN reader would get TCP segments with unfinished
checksums. Without it the flannel-ebpf side's SYNs reach flanneld's side with bad checksums
(TcpInCsumErrors there) and TCP never connects. A physical NIC or virtio completes the checksums; see
tests/test_udp_interop_lab.py. Pings are unaffected (ICMP checksums are never offloaded).

A missing flanneld binary fails these tests (FlanneldMissing), it never skips them.
"""

from __future__ import annotations

import time

import pytest

from flannel_ebpf.lab.flanneld import FLANNELD_DIR_ENV, FlanneldMissing, find_flanneld, unpack_flanneld
from tests.flanneld_helpers import (
    AGENT_ARGS,
    EBPF_HOSTS,
    FLANNELD_HOSTS,
    NETWORK,
    ebpf_peers,
    flanneld_logged_peers,
    routed_peers,
    start_mixed,
    subnet_of,
)

pytestmark = pytest.mark.lab

VERSION = "v0.20.2"


@pytest.mark.parametrize("version", [VERSION, "v0.5.5"])
def test_flanneld_binary_is_there(tmp_path, version):
    """The interop tests run the real binaries: each must be found and must be the version it claims."""
    binary = unpack_flanneld(version, tmp_path)
    assert binary.stat().st_mode & 0o111


def test_a_missing_flanneld_binary_is_an_error_naming_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(FLANNELD_DIR_ENV, str(tmp_path))
    with pytest.raises(FlanneldMissing, match=FLANNELD_DIR_ENV) as e:
        find_flanneld(VERSION)
    assert str(tmp_path / f"flanneld-{VERSION}.xz") in str(e.value)


def test_lab_start_flanneld_fails_without_the_binary(lab_factory, tmp_path, monkeypatch):
    monkeypatch.setenv(FLANNELD_DIR_ENV, str(tmp_path))
    lab = lab_factory(1, network_config={"Network": NETWORK, "Backend": {"Type": "udp"}})
    with pytest.raises(FlanneldMissing):
        lab.start_flanneld("h1", VERSION)


# ------------------------------------------------------------------ helpers


def known_peers(lab, host: str, backend: str, subnets: dict[str, str]) -> set[str]:
    """The peer subnets `host`'s flannel has programmed: routes for vxlan and host-gw (both implementations
    add one per peer); for udp, flanneld's own log (its peers live in its memory) or the eBPF peer map."""
    lease_subnets = set(subnets.values()) - {subnets[host]}
    if backend != "udp":
        return routed_peers(lab, host, lease_subnets)
    fd = lab.flanneld_of(host)
    if fd is not None and fd.running:
        return flanneld_logged_peers(fd) & lease_subnets
    return ebpf_peers(lab, host, lease_subnets)


def wait_ebpf_hosts_know_all(lab, backend: str, subnets: dict[str, str], timeout: float = 20.0) -> None:
    """flannel-ebpf's watch misses nothing: each of its hosts programs every other host's lease."""
    deadline = time.monotonic() + timeout
    while True:
        missing = {
            h: sorted(set(subnets.values()) - {subnets[h]} - known_peers(lab, h, backend, subnets)) for h in EBPF_HOSTS
        }
        if not any(missing.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"flannel-ebpf hosts miss leases: {missing} (leases {subnets})")
        time.sleep(0.5)


def check_mesh(lab, backend: str, subnets: dict[str, str], phase: str, full: bool) -> None:
    """Every container pings every other. `full`: every pair must answer; else the pairs whose two hosts
    know each other's lease must (the others are flanneld's watch fault: printed)."""
    wait_ebpf_hosts_know_all(lab, backend, subnets)
    known = {h: known_peers(lab, h, backend, subnets) for h in lab.host_names}
    unknown = {h: sorted(set(subnets.values()) - {subnets[h]} - known[h]) for h in lab.host_names}
    matrix = lab.ping_matrix(count=3, interval=0.2, timeout=2.0)
    host_of = {c.name: c.host.name for c in lab.containers}
    answered = sum(r.reachable for r in matrix.results.values())
    print(f"\n{backend}, {phase}: {answered}/{len(matrix.results)} pairs answer; leases {subnets}")
    print(f"leases a host has not programmed: {unknown}\n{matrix.format()}")
    if full:
        assert not any(unknown.values()), f"{phase}: hosts miss leases: {unknown}"
        assert matrix.all_ok, f"{phase}: {[str(r) for r in matrix.failures()]}\n{matrix.format()}"
        return
    owed = [
        r
        for (src, dst), r in matrix.results.items()
        if subnets[host_of[dst]] in known[host_of[src]] and subnets[host_of[src]] in known[host_of[dst]]
    ]
    failed = [str(r) for r in owed if not r.reachable]
    assert not failed, f"{phase}: pairs whose hosts know each other do not answer: {failed}\n{matrix.format()}"
    # flanneld's fault can cut off only pairs with a flanneld end; never one between flannel-ebpf hosts.
    assert all(
        matrix.results[(a, b)].reachable
        for a in host_of
        for b in host_of
        if a != b and host_of[a] in EBPF_HOSTS and host_of[b] in EBPF_HOSTS
    ), matrix.format()


def assert_lease_forms(lab, backend: str) -> None:
    """flanneld and flannel-ebpf publish the same lease JSON (so each reads the other's)."""
    keys = {"udp": {"PublicIP", "PublicIPv6"}, "vxlan": {"PublicIP", "PublicIPv6", "BackendType", "BackendData"}}
    expected = keys.get(backend, {"PublicIP", "PublicIPv6", "BackendType"})
    leases = lab.leases()
    assert len(leases) == len(lab.host_names), leases
    for value in leases.values():
        assert set(value) == expected, value
        if backend != "udp":
            assert value["BackendType"] == backend, value


# ------------------------------------------------------------------ the mixed cluster


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_flanneld_and_flannel_ebpf_hosts_started_together_and_restarted(lab_factory, backend):
    lab, subnets = start_mixed(lab_factory, backend, VERSION)
    assert_lease_forms(lab, backend)
    if backend == "udp":
        for h in EBPF_HOSTS:  # the eBPF data path really runs (else this is no interop proof)
            assert lab.agent_status(h)["backend_status"]["datapath"] == "ebpf"
        for h in FLANNELD_HOSTS:
            assert "flannel0" in lab.exec(h, ["ip", "-o", "link", "show", "flannel0"]).stdout

    check_mesh(lab, backend, subnets, "started together", full=False)

    # Restarts: a crashed agent comes back on its subnet; a stopped flanneld too (it relists the leases).
    # The leases (and vxlan's VTEP MACs) survive restarts, so no peer depends on seeing an update.
    leases = lab.leases()
    for h in EBPF_HOSTS:
        lab.kill_agent(h)
        lab.start_agent(h, AGENT_ARGS[backend])
        lab.wait_ready(h, 90)
        assert subnet_of(lab, h) == subnets[h], f"{h} changed subnet on restart"
    for h in FLANNELD_HOSTS:
        fd = lab.flanneld_of(h)
        code = fd.stop()
        print(f"flanneld on {h} exited {code} on SIGTERM")
        lab.start_flanneld(h, VERSION)
        lab.wait_ready(h, 60)
        assert subnet_of(lab, h) == subnets[h], f"{h} (flanneld) changed subnet on restart:\n{fd.log_tail()}"
    assert lab.leases() == leases
    check_mesh(lab, backend, subnets, "after restarts one by one", full=True)

    for h in EBPF_HOSTS:
        lab.kill_agent(h)
    for h in FLANNELD_HOSTS:
        lab.flanneld_of(h).stop()
    for h in FLANNELD_HOSTS:
        lab.start_flanneld(h, VERSION)
    for h in EBPF_HOSTS:
        lab.start_agent(h, AGENT_ARGS[backend])
    lab.wait_all_ready(90)
    assert {h: subnet_of(lab, h) for h in lab.host_names} == subnets
    assert lab.leases() == leases
    # Each flanneld lists the leases at start, and they are all there already: no watch event needed.
    check_mesh(lab, backend, subnets, "after restarting all together", full=True)

    tcp_both_ways(lab, backend, lab.containers_of(FLANNELD_HOSTS[0])[0], lab.containers_of(EBPF_HOSTS[0])[0])


def tcp_both_ways(lab, backend: str, flanneld_side, ebpf_side) -> None:
    if backend == "udp":  # see the module's docstring: veth leaves offloaded checksums unfinished
        for h in EBPF_HOSTS:
            for c in lab.containers_of(h):
                lab.exec(c, ["ethtool", "-K", "eth0", "tx", "off"])
    server = lab.iperf3_server(ebpf_side)
    try:
        for reverse in (False, True):
            report = lab.iperf3(flanneld_side, ebpf_side, seconds=1, reverse=reverse)
            received = report["end"]["sum_received"]
            way = f"{ebpf_side} -> {flanneld_side}" if reverse else f"{flanneld_side} -> {ebpf_side}"
            print(f"{backend} TCP {way}: {received['bits_per_second'] / 1e9:.2f} Gbit/s")
            assert received["bytes"] > 100_000, (way, report["end"])
    finally:
        server.stop()


def test_what_a_stopped_flanneld_leaves_and_its_removal(lab_factory):
    """flanneld's exit leaves its FORWARD chain behind (in the host's namespace): listed, then removed."""
    lab = lab_factory(1, network_config={"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    fd = lab.start_flanneld("h1", VERSION)
    lab.wait_ready("h1", 60)
    assert "filter/FLANNEL-FWD" in fd.leftovers()["iptables"]
    fd.stop()
    left = fd.leftovers()
    print(f"left by a stopped flanneld {VERSION}: {left}")
    assert left["devices"] == ["flannel.1"] and left["iptables"] == ["filter/FLANNEL-FWD"], left
    assert left["files"] == [str(lab.host("h1").subnet_file)], left
    fd.remove_iptables_rules()
    assert fd.leftovers()["iptables"] == []
    assert "FLANNEL" not in lab.exec("h1", ["iptables-save"]).stdout
