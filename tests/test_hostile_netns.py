"""Issue 14 against a real kernel, in namespaces of their own: one bad peer costs exactly that peer in a
vxlan sync; the agent warns about host routes its Network overlaps, and refuses configs that can never
work with one line (real agent, real etcd, namespace lab)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_backends_netns import Lab, lease, our_routes, ping, sh, start

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bridge") is None,
    reason="needs root and iproute2 (network namespaces)",
)


@pytest.fixture
def netlab() -> Iterator[Lab]:
    the_lab = Lab(prefix=f"fkh{secrets.token_hex(2)}")
    try:
        the_lab.build()
        yield the_lab
    finally:
        the_lab.cleanup()


def test_vxlan_sync_with_a_wrong_vni_type_costs_only_that_peer(netlab: Lab) -> None:
    h1 = netlab.driver("h1", "vxlan", None, iface="eth0")
    h2 = netlab.driver("h2", "vxlan", None, iface="eth0")
    v1, v2 = h1.attrs(), h2.attrs()
    start(h1, 1)
    start(h2, 2)
    bad = [
        {"subnet": f"10.5.{30 + i}.0/24", "public_ip": f"192.168.10.{30 + i}", "backend_type": "vxlan",
         "backend_data": {"VNI": vni, "VtepMAC": f"02:00:00:00:00:{30 + i:02x}"}}
        for i, vni in enumerate([[1], {"x": 1}, "1", 1 << 30])
    ]  # fmt: skip
    for _ in range(2):  # the first sync and a periodic resync
        h1.call("sync", peers=[*bad, lease(2, v2)])  # used to raise TypeError: unhashable type 'list'
    h2.call("sync", peers=[lease(1, v1)])
    assert set(our_routes(netlab.ns("h1"))) == {"10.5.2.0/24"}
    status = h1.call("status")
    assert set(status["skipped"]) == {b["subnet"] for b in bad} and "10.5.2.0/24" in status["peers"]
    assert ping(netlab.ns("c1"), "10.5.2.2")
    said = [line for line in h1.logs if "10.5.30.0/24" in line]
    assert len(said) == 1 and "VNI" in said[0]  # logged once, not on every resync


def _in_ns(ns: str, code: str) -> object:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


OVERLAPS = """
import json
from ipaddress import IPv4Network as N
from flannel_ebpf.netlink.routes import overlapping_routes
from flannel_ebpf.network import warn_route_overlaps
print(json.dumps({
    "overlay": overlapping_routes(N("10.5.0.0/16"), exclude=N("10.5.1.0/24")),
    "no_exclude": overlapping_routes(N("10.5.0.0/16")),
    "underlay": overlapping_routes(N("192.168.0.0/16"), exclude=N("192.168.99.0/24")),
    "clear": overlapping_routes(N("10.77.0.0/16")),
    "warnings": warn_route_overlaps(N("192.168.0.0/16"), N("192.168.99.0/24")),
}))
"""


def test_routes_the_network_overlaps_are_found(netlab: Lab) -> None:
    ns = netlab.ns("h1")
    sh("ip", "-n", ns, "route", "add", "10.0.0.0/8", "via", "192.168.10.254")  # e.g. a VPN's route
    sh("ip", "-n", ns, "route", "add", "10.5.7.0/24", "via", "192.168.10.254", "proto", "102")  # ours: ignored
    got = _in_ns(ns, OVERLAPS)
    assert isinstance(got, dict)
    # the container bridge (10.5.1.0/24, our own lease) and the default route are not conflicts
    assert got["overlay"] == ["10.0.0.0/8 via 192.168.10.254 dev eth0"]
    assert sorted(got["no_exclude"]) == ["10.0.0.0/8 via 192.168.10.254 dev eth0", "10.5.1.0/24 dev veth-c"]
    assert got["underlay"] == ["192.168.10.0/24 dev eth0"]  # a Network covering the underlay
    assert got["clear"] == ["10.0.0.0/8 via 192.168.10.254 dev eth0"]
    assert len(got["warnings"]) == 1 and "192.168.10.0/24 dev eth0" in got["warnings"][0]


@pytest.mark.lab
def test_agent_refuses_hopeless_configs_in_one_line_and_warns_on_overlaps(lab_factory):
    lab = lab_factory(1)
    for config, expected in (
        ({"Network": "128.0.0.0/1"}, "Network 128.0.0.0/1 overlaps link-local (169.254.0.0/16)"),
        ({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 53}}, "Backend.Port 53 is a well-known port"),
    ):
        lab.set_network_config(config)
        agent = lab.start_agent("h1")
        wait_for(lambda agent=agent: not agent.running, what="agent exit on a hopeless config")
        assert agent.proc.returncode == 1
        log = lab.agent_log("h1")
        errors = [line for line in log.splitlines() if "ERROR" in line]
        assert expected in errors[-1], errors
        assert "Traceback" not in log
    # A Network that covers the underlay (192.168.50.0/24 in the lab): allowed, with a warning.
    lab.set_network_config({"Network": "192.168.0.0/16", "SubnetMin": "192.168.100.0", "Backend": {"Type": "alloc"}})
    lab.start_agent("h1")
    lab.wait_ready("h1", 30)
    log = lab.agent_log("h1")
    assert "overlaps the host's route 192.168.50.0/24" in log
    assert lab.stop_agent("h1") == 0
