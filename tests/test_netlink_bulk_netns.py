"""netlink.bulk against the kernel, in a namespace of our own: what it writes is what iproute2 reads back,
a refused request costs exactly that request (in the middle of a chunk too), and its dumps and route
lookups agree with iproute2's.

The module talks to the namespace it runs in, so the checks run in one Python process started inside
the namespace (`ip netns exec`); the test compares its report with `ip -j` output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from flannel_ebpf.lab.agent import cli_env
from flannel_ebpf.lab.netns import create_netns, delete_netns, new_prefix

PROBE = """
import errno, json, socket
from ipaddress import IPv4Address, IPv4Network
from flannel_ebpf.netlink import bulk as nb

eth = socket.if_nametoindex("e0")
out = {}
with nb.BulkNetlink() as bulk:
    # 600 routes over nexthops (three chunks), one of them through a device that does not exist
    requests = []
    for i in range(600):
        gw = IPv4Address("192.168.7.0") + 2 + i % 200
        requests.append(nb.nexthop_replace(int(gw), gw, eth, False, 102))
        requests.append(nb.route_via_nexthop(IPv4Network((0x0A000000 + i * 256, 24)), int(gw), 102, 254))
    requests[301] = nb.route_replace(IPv4Network("10.0.150.0/24"), IPv4Address("192.168.7.9"), 999, False, 102, 254)
    codes = bulk.execute(requests)
    out["failed"] = {str(i): errno.errorcode.get(c, c) for i, c in enumerate(codes) if c}
    # vxlan-style entries on a vxlan device
    vx = socket.if_nametoindex("vx0")
    codes = bulk.execute([nb.neigh_replace(vx, IPv4Address("10.9.0.0"), "02:00:00:00:00:01"),
                          nb.fdb_replace(vx, "02:00:00:00:00:01", IPv4Address("192.168.7.5")),
                          nb.route_replace(IPv4Network("10.9.0.0/24"), IPv4Address("10.9.0.0"), vx, True, 102, 254)])
    out["vxlan_codes"] = codes
    routes = [r for r in bulk.routes() if r.proto == 102]
    out["routes"] = {str(r.dst): [str(r.gateway), r.oif, r.onlink] for r in routes}
    out["nexthops"] = sorted(i for i, p in (bulk.nexthops() or {}).items() if p == 102)
    out["neigh"] = [[s, d.hex(), m.hex()] for s, _f, d, m in bulk.neighbours(vx)]
    out["fdb"] = [[s, d.hex(), m.hex()] for s, _f, d, m in bulk.neighbours(vx, nb.AF_BRIDGE) if d]
    found = bulk.lookup([IPv4Address("192.168.7.20"), IPv4Address("10.0.3.1"), IPv4Address("127.0.0.1"),
                         IPv4Address("203.0.113.1")])
    out["lookup"] = {str(a): [l.oif, str(l.gateway), l.local, l.error] for a, l in found.items()}
    out["eth"], out["vx"] = eth, vx
print(json.dumps(out))
"""


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"{new_prefix()}-nl"
    netns = create_netns(name)
    try:
        for cmd in (
            "link add e0 type veth peer name e1",
            "link set e0 up",
            "link set e1 up",
            "link set lo up",
            "addr add 192.168.7.1/24 dev e0",
            "link add vx0 type vxlan id 7 dstport 8472 dev e0 local 192.168.7.1 nolearning",
            "link set vx0 up",
        ):
            netns.ip(*cmd.split())
        yield name
    finally:
        delete_netns(name)


def ip_json(ns: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def test_bulk_requests_dumps_and_lookups(ns: str) -> None:
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE], capture_output=True, text=True, env=cli_env(),
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)

    # exactly the one bad request failed, in the middle of the second chunk; everything else is in
    assert list(out["failed"]) == ["301"], out["failed"]  # ENETUNREACH here: no device 999
    routes = {r["dst"]: r for r in ip_json(ns, "-4", "route", "show", "proto", "102")}
    assert len(routes) == 600  # 599 over nexthops + the vxlan one
    assert "10.0.150.0/24" not in routes
    assert routes["10.0.3.0/24"]["gateway"] == "192.168.7.5" and "nhid" in routes["10.0.3.0/24"]
    assert "onlink" in routes["10.9.0.0/24"]["flags"]
    assert len(ip_json(ns, "nexthop", "show", "proto", "102")) == 200

    # dumps read back what iproute2 sees (including the onlink flag and the nexthop objects)
    assert out["vxlan_codes"] == [0, 0, 0]
    assert len(out["routes"]) == 600
    assert out["routes"]["10.0.3.0/24"] == ["192.168.7.5", out["eth"], False]
    assert out["nexthops"] == sorted(int.from_bytes(bytes([192, 168, 7, 2 + i]), "big") for i in range(200))
    assert [0x80, "0a090000", "020000000001"] in out["neigh"]
    assert [0x80, "c0a80705", "020000000001"] in out["fdb"]

    # lookups: the FIB's answer per address, errors included
    assert out["lookup"]["192.168.7.20"][:3] == [out["eth"], "None", False]
    assert out["lookup"]["10.0.3.1"][:3] == [out["eth"], "192.168.7.5", False]
    assert out["lookup"]["127.0.0.1"][2] is True
    assert out["lookup"]["203.0.113.1"][3] != 0, "no route: an errno, not an answer"
