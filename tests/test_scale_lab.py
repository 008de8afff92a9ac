"""Thousands of peers, correctly: the small version of `make bench-scale`, asserting outcomes, not speed.

Per backend, one host and a real etcd holding 2,000 leases in flanneld's format (one etcd lease per key,
as real flanneld hosts leave them). The agent must program exactly those peers into the kernel, then a
burst of 200 more, then forget 100 that leave, and survive a kill -9 and restart without changing a
single entry. And the eBPF udp path's fl_peers map, filled past its 65,536 entries, refuses the excess
with one counted error instead of programming a random part of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from flannel_ebpf.bench import scale
from flannel_ebpf.datapath import layout
from flannel_ebpf.lab.agent import cli_env
from flannel_ebpf.lab.lab import Lab
from tests.helpers import wait_for

LEASES, BURST, LEAVING = 2000, 200, 100

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


@pytest.fixture(params=["udp", "vxlan", "host-gw"])
def scale_lab(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, str]]:
    backend = request.param
    lab = scale.scale_lab(backend)
    try:
        yield lab, backend
    finally:
        lab.stop_agent("h1")
        lab.agent_down("h1")
        lab.close()


def _wait_peers(lab: Lab, backend: str, want: dict[str, str], what: str) -> None:
    wait_for(lambda: scale.count_programmed(lab, "h1", backend) == len(want), timeout=60, what=what)
    have = scale.kernel_peers(lab, "h1", backend)
    assert have == want, f"{what}: {len(set(have.items()) ^ set(want.items()))} entries differ"


def test_thousands_of_flanneld_leases(scale_lab: tuple[Lab, str]) -> None:
    lab, backend = scale_lab
    scale.seed(lab, backend, 0, LEASES)
    lab.start_agent("h1")
    lab.wait_ready("h1", timeout=60)
    _wait_peers(lab, backend, scale.expected_peers(0, LEASES), "the listed peers")

    scale.seed(lab, backend, LEASES, BURST)
    _wait_peers(lab, backend, scale.expected_peers(0, LEASES + BURST), "a burst of new leases")

    scale.remove(lab, 0, LEAVING)
    left = scale.expected_peers(LEAVING, LEASES + BURST - LEAVING)
    _wait_peers(lab, backend, left, "after leases left")
    wait_for(lambda: len(lab.agent_status("h1").get("peers", [])) == len(left), what="the state file's peers")

    # kill -9 and restart: the new agent finds the kernel already right and changes nothing.
    lab.kill_agent("h1")
    before = scale.kernel_peers(lab, "h1", backend)
    lab.start_agent("h1")
    lab.wait_ready("h1", timeout=60)
    assert scale.kernel_peers(lab, "h1", backend) == before == left
    log = lab.agent_log("h1", last_run=True)
    if backend == "udp":
        assert f"{len(left)} pinned peers adopted" in log, log[-2000:]
    else:
        # the sync logs "<backend>: sync: ... added, ... replaced, ... removed" only when it changed something
        assert f"{backend}: sync:" not in log, "a restart changed routes or neighbours"

    lab.stop_agent("h1")
    lab.agent_down("h1", check=True)
    ns = lab.hosts["h1"].netns
    for what in (["route", "show", "proto", "102"], ["nexthop", "show", "proto", "102"]):
        out = subprocess.run(["ip", "-n", ns, *what], capture_output=True, text=True, check=False).stdout
        assert out.strip() == "", f"`down` left {what}: {out[:300]}"


# fl_peers full: the backend driven directly in the lab host's namespace (65,541 leases through etcd
# would only make the test slower; the map, the programs and the kernel are the real ones).
_FULL_MAP_DRIVER = """
import json, sys
from ipaddress import IPv4Address, IPv4Network
from pyroute2 import IPRoute
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

pin_dir, capacity, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with IPRoute() as ipr:
    index = ipr.link_lookup(ifname="eth0")[0]
    mtu = ipr.get_links(index)[0].get_attr("IFLA_MTU")
    address = IPv4Address(ipr.get_addr(index=index, family=2)[0].get_attr("IFA_ADDRESS"))
ext = ExternalInterface("eth0", index, address, address, mtu)
backend = UdpEbpfBackend({"Type": "udp"}, BackendOptions(bpf_pin_dir=pin_dir))
backend.prepare(ext)
local = LocalNetwork(IPv4Network("10.0.0.0/8"), IPv4Network("10.0.0.0/25"), ext, mtu - 28)
backend.start(local)
# /25 subnets: 131,072 of them in a /8, more than fl_peers holds
leases = [Lease(IPv4Network((0x0A000000 + (i + 1) * 128, 25)), LeaseAttrs(IPv4Address(0xAC100001 + i % 60000)))
          for i in range(capacity + extra)]
def programmed():
    return {"refused": backend.status()["peers_refused_map_full"], "programmed": len(backend._maps.read_peers())}
report = {}
backend.sync(leases)
report["full"] = programmed()
backend.add_peer(Lease(IPv4Network("10.255.255.0/25"), LeaseAttrs(IPv4Address("172.16.9.9"))))
report["add_when_full"] = programmed()["programmed"]
backend.sync(leases[: capacity - 10])
report["fits"] = programmed()
backend.teardown(local)
print(json.dumps(report))
"""


def test_udp_full_peer_map_refuses_the_excess_counted() -> None:
    capacity, extra = layout.PEERS_MAP.max_entries, 5
    lab = Lab(1, with_etcd=False).up()
    try:
        argv = [sys.executable, "-c", _FULL_MAP_DRIVER, str(lab.pin_dir("h1")), str(capacity), str(extra)]
        result = lab.hosts["h1"].exec(argv, timeout=300, share_bpffs=True, env=cli_env())
    finally:
        lab.close()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["full"] == {"refused": extra, "programmed": capacity}, report
    assert report["add_when_full"] == capacity, "a watch event must not squeeze into a full map"
    assert report["fits"] == {"refused": 0, "programmed": capacity - 10}, report
    assert result.stderr.count("holds at most") == 1, "the refusal is said once, not per peer"
    assert "every peer fits in fl_peers again" in result.stderr
