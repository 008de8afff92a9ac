"""host-gw, vxlan and alloc against a real kernel, in network namespaces of their own.

Topology (every name carries a random `fkbXXXX` prefix; everything is deleted in the fixture finalizer):

    segment A (bridge in ns swA) 192.168.10.0/24          segment B (bridge in ns swB) 192.168.20.0/24
      h1 eth0 .10.1   h2 eth0 .10.2   rt ethA .10.254  ---  rt ethB .20.254   h3 eth0 .20.3
    each host hN has a "container" namespace cN: cN eth0 10.5.N.2/24, host side 10.5.N.1/24 (its lease).

Each backend runs inside its host namespace in a small Python subprocess (this file run with --driver,
under `ip netns exec`) that takes JSON commands on stdin, so the pytest process never changes namespace.
Kernel state is read back with `ip -j` / `bridge -j`, and traffic is proven with ping between containers.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import close_pipes

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bridge") is None,
    reason="needs root and iproute2 (network namespaces)",
)


# --------------------------------------------------------------------------------------------------
# the lab


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def ipj(ns: str, *args: str) -> Any:
    out = sh("ip", "-n", ns, "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def fdb(ns: str, dev: str) -> list[dict[str, Any]]:
    out = sh("ip", "netns", "exec", ns, "bridge", "-j", "fdb", "show", "dev", dev).stdout.strip()
    return [e for e in (json.loads(out) if out else []) if e.get("dst")]


def our_routes(ns: str) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in ipj(ns, "route", "show", "proto", "102")}


def perm_neigh(ns: str, dev: str) -> dict[str, str]:
    return {
        n["dst"]: n["lladdr"]
        for n in ipj(ns, "neigh", "show", "dev", dev)
        if "PERMANENT" in n.get("state", []) and "lladdr" in n
    }


def ping(src_ns: str, dst: str, count: int = 3) -> bool:
    proc = sh("ip", "netns", "exec", src_ns, "ping", "-n", "-c", str(count), "-i", "0.2", "-w", "6", dst, check=False)
    return proc.returncode == 0


@dataclass
class Lab:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    drivers: list[Driver] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def add_ns(self, short: str) -> str:
        name = self.ns(short)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def build(self) -> None:
        for sw in ("swA", "swB"):
            ns = self.add_ns(sw)
            sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", ns, "link", "set", "br0", "up")
        rt = self.add_ns("rt")
        sh("ip", "netns", "exec", rt, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._plug(rt, "ethA", "swA", "rt", "192.168.10.254/24")
        self._plug(rt, "ethB", "swB", "rt", "192.168.20.254/24")
        for n, seg, addr, gw in (
            (1, "swA", "192.168.10.1/24", "192.168.10.254"),
            (2, "swA", "192.168.10.2/24", "192.168.10.254"),
            (3, "swB", "192.168.20.3/24", "192.168.20.254"),
        ):
            h = self.add_ns(f"h{n}")
            sh("ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._plug(h, "eth0", seg, f"h{n}", addr)
            sh("ip", "-n", h, "route", "add", "default", "via", gw)
            c = self.add_ns(f"c{n}")
            sh("ip", "-n", h, "link", "add", "veth-c", "type", "veth", "peer", "name", "eth0", "netns", c)
            sh("ip", "-n", h, "addr", "add", f"10.5.{n}.1/24", "dev", "veth-c")
            sh("ip", "-n", h, "link", "set", "veth-c", "up")
            sh("ip", "-n", c, "addr", "add", f"10.5.{n}.2/24", "dev", "eth0")
            sh("ip", "-n", c, "link", "set", "eth0", "up")
            sh("ip", "-n", c, "route", "add", "default", "via", f"10.5.{n}.1")

    def _plug(self, ns: str, ifname: str, switch: str, port: str, addr: str) -> None:
        """A veth from `ns` into the bridge of `switch` (created inside the namespaces, never in root)."""
        sw = self.ns(switch)
        sh("ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", sw)
        sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")

    def driver(self, host: str, backend: str, config: dict[str, Any] | None = None, **ext: Any) -> Driver:
        d = Driver(self.ns(host), backend, config or {}, ext)
        self.drivers.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.drivers:
            d.kill()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
            close_pipes(p)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        leftovers = [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(self.prefix)]
        for ns in leftovers:
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab(prefix=f"fkb{secrets.token_hex(2)}")
    try:
        the_lab.build()
        yield the_lab
    finally:
        the_lab.cleanup()


class Driver:
    """A backend living in a subprocess inside a host namespace; one JSON command per line."""

    def __init__(self, ns: str, backend: str, config: dict[str, Any], ext: dict[str, Any]) -> None:
        self.ns = ns
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # the driver's stderr, shown if it dies; closed in kill()
        self.errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--driver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.logs: list[str] = []
        self.call("init", backend=backend, config=config, **ext)

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"driver in {self.ns} did not answer {op}"
        line = self.proc.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise AssertionError(f"driver in {self.ns} died during {op}:\n{self.errors.read()}")
        reply = json.loads(line)
        self.logs.extend(reply["logs"])
        if not reply["ok"]:
            raise DriverError(reply["error_type"], reply["error"])
        return reply["result"]

    def attrs(self) -> dict[str, Any]:
        """prepare(): the lease value this host publishes, parsed."""
        return json.loads(self.call("prepare"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        close_pipes(self.proc)
        self.errors.close()


class DriverError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def lease(n: int, value: dict[str, Any], subnet: str | None = None) -> dict[str, Any]:
    """A peer lease as the agent would hand it over, from the JSON value host n published."""
    return {
        "subnet": subnet or f"10.5.{n}.0/24",
        "public_ip": value["PublicIP"],
        "backend_type": value.get("BackendType") or "udp",
        "backend_data": value.get("BackendData"),
    }


def start(d: Driver, n: int) -> None:
    d.call("start", subnet=f"10.5.{n}.0/24", network="10.5.0.0/16")


# --------------------------------------------------------------------------------------------------
# alloc


def test_alloc_publishes_flanneld_alloc_lease(lab: Lab) -> None:
    d = lab.driver("h1", "alloc", iface="eth0")
    raw = d.call("prepare")
    # flanneld's alloc sets only PublicIP: the value has no BackendType, exactly like its udp lease
    assert raw == '{"PublicIP":"192.168.10.1","PublicIPv6":null}'
    start(d, 1)
    d.call("sync", peers=[lease(2, {"PublicIP": "192.168.10.2"})])
    assert d.call("overhead") == 0
    assert our_routes(lab.ns("h1")) == {}


# --------------------------------------------------------------------------------------------------
# host-gw


def test_hostgw_refuses_public_ip_behind_nat(lab: Lab) -> None:
    d = lab.driver("h1", "host-gw", iface="eth0", public_ip="203.0.113.7")
    with pytest.raises(DriverError) as err:
        d.call("prepare")
    assert err.value.kind == "BackendError"
    assert "203.0.113.7" in err.value.message and "NAT" in err.value.message


def test_hostgw_flat_routed_recheck_and_teardown(lab: Lab) -> None:
    h1, h2, h3 = (lab.driver(f"h{n}", "host-gw", iface="eth0") for n in (1, 2, 3))
    v1, v2, v3 = h1.attrs(), h2.attrs(), h3.attrs()
    assert v1 == {"PublicIP": "192.168.10.1", "PublicIPv6": None, "BackendType": "host-gw"}
    for n, d in ((1, h1), (2, h2), (3, h3)):
        start(d, n)
    assert h1.call("overhead") == 0
    udp_peer = lease(4, {"PublicIP": "192.168.10.9"})  # a udp host: not ours to route
    h1.call("sync", peers=[lease(2, v2), lease(3, v3), udp_peer])
    h2.call("sync", peers=[lease(1, v1), lease(3, v3)])

    ns1 = lab.ns("h1")
    routes = our_routes(ns1)
    assert set(routes) == {"10.5.2.0/24"}, routes
    assert routes["10.5.2.0/24"]["gateway"] == "192.168.10.2" and routes["10.5.2.0/24"]["dev"] == "eth0"
    # containers on one segment talk across host-gw
    assert ping(lab.ns("c1"), "10.5.2.2")

    # the far peer: refused with a reason, logged naming the peer, and no route at all
    status = h1.call("status")
    assert set(status["peers"]) == {"10.5.2.0/24"}
    refused = status["refused"]["10.5.3.0/24"]
    assert refused["public_ip"] == "192.168.20.3" and "192.168.10.254" in refused["reason"]
    assert any("10.5.3.0/24" in ln and "192.168.20.3" in ln and "ERROR" in ln for ln in h1.logs)
    assert "BackendType" in status["skipped"]["10.5.4.0/24"]["reason"]
    # h3 alone on its segment refuses both others
    h3.call("sync", peers=[lease(1, v1), lease(2, v2)])
    assert our_routes(lab.ns("h3")) == {}
    assert set(h3.call("status")["refused"]) == {"10.5.1.0/24", "10.5.2.0/24"}

    # the same through a watch event: still refused, still no route
    h1.call("add_peer", lease=lease(3, v3))
    assert set(our_routes(ns1)) == {"10.5.2.0/24"}
    # re-check: the refusal is logged once, not on every resync
    errors = sum("ERROR" in ln for ln in h1.logs)
    h1.call("resync")
    assert sum("ERROR" in ln for ln in h1.logs) == errors

    # re-check picks up a peer that becomes directly connected (here: h1 gets an address on B's network)
    sh("ip", "-n", ns1, "addr", "add", "192.168.20.1/24", "dev", "eth0")
    h1.call("resync")
    assert our_routes(ns1)["10.5.3.0/24"]["gateway"] == "192.168.20.3"
    assert "10.5.3.0/24" in h1.call("status")["peers"]
    # ... and refuses it again once it is not
    sh("ip", "-n", ns1, "addr", "del", "192.168.20.1/24", "dev", "eth0")
    h1.call("resync")
    assert set(our_routes(ns1)) == {"10.5.2.0/24"}
    assert "10.5.3.0/24" in h1.call("status")["refused"]

    # re-check restores a route someone deleted
    sh("ip", "-n", ns1, "route", "del", "10.5.2.0/24")
    h1.call("resync")
    assert "10.5.2.0/24" in our_routes(ns1)

    # peer removal
    h1.call("remove_peer", lease=lease(2, v2))
    assert our_routes(ns1) == {}
    assert not ping(lab.ns("c1"), "10.5.2.2", count=1)

    # a route that is not ours (another proto) is never touched by sync or teardown
    sh("ip", "-n", ns1, "route", "add", "10.99.0.0/16", "via", "192.168.10.254")
    h1.call("add_peer", lease=lease(2, v2))
    assert "10.5.2.0/24" in our_routes(ns1)
    h1.call("teardown")
    assert our_routes(ns1) == {}
    assert any(r["dst"] == "10.99.0.0/16" for r in ipj(ns1, "route"))


# --------------------------------------------------------------------------------------------------
# vxlan


def vxlan_mesh(lab: Lab, config: dict[str, Any] | None = None) -> tuple[list[Driver], list[dict[str, Any]]]:
    drivers = [lab.driver(f"h{n}", "vxlan", config, iface="eth0") for n in (1, 2, 3)]
    values = [d.attrs() for d in drivers]
    for i, d in enumerate(drivers):
        start(d, i + 1)
    for i, d in enumerate(drivers):
        d.call("sync", peers=[lease(j + 1, v) for j, v in enumerate(values) if j != i])
    return drivers, values


def test_vxlan_device_lease_and_traffic(lab: Lab) -> None:
    (h1, _h2, _h3), values = vxlan_mesh(lab)
    ns1 = lab.ns("h1")
    v1 = values[0]
    # the lease value, field for field and in flanneld's order
    assert list(v1) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData"]
    assert list(v1["BackendData"]) == ["VNI", "VtepMAC"]
    assert v1["BackendType"] == "vxlan" and v1["BackendData"]["VNI"] == 1

    (link,) = ipj(ns1, "-d", "link", "show", "flannel.1")
    info = link["linkinfo"]["info_data"]
    assert link["address"] == v1["BackendData"]["VtepMAC"]
    assert link["mtu"] == 1450 and "UP" in link["flags"]
    assert info["id"] == 1 and info["port"] == 8472 and info["local"] == "192.168.10.1"
    assert info["link"] == "eth0" and not info.get("learning")
    addrs = [a for a in ipj(ns1, "addr", "show", "dev", "flannel.1")[0]["addr_info"] if a["family"] == "inet"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("10.5.1.0", 32)]
    assert h1.call("overhead") == 50

    routes = our_routes(ns1)
    assert set(routes) == {"10.5.2.0/24", "10.5.3.0/24"}
    for n in (2, 3):
        r = routes[f"10.5.{n}.0/24"]
        assert r["gateway"] == f"10.5.{n}.0" and r["dev"] == "flannel.1" and "onlink" in r["flags"]
    assert perm_neigh(ns1, "flannel.1") == {
        "10.5.2.0": values[1]["BackendData"]["VtepMAC"],
        "10.5.3.0": values[2]["BackendData"]["VtepMAC"],
    }
    assert {(e["mac"], e["dst"]) for e in fdb(ns1, "flannel.1")} == {
        (values[1]["BackendData"]["VtepMAC"], "192.168.10.2"),
        (values[2]["BackendData"]["VtepMAC"], "192.168.20.3"),
    }
    # flat (same segment) and routed (h3 is behind the router): both work over vxlan
    assert ping(lab.ns("c1"), "10.5.2.2")
    assert ping(lab.ns("c1"), "10.5.3.2")
    assert ping(lab.ns("c3"), "10.5.2.2")
    # the host itself reaches remote containers from its flannel.1 address
    assert ping(ns1, "10.5.3.2")
    status = h1.call("status")
    assert status["device"]["name"] == "flannel.1" and set(status["peers"]) == {"10.5.2.0/24", "10.5.3.0/24"}


def test_vxlan_peer_removal_mac_change_and_garbage(lab: Lab) -> None:
    (h1, h2, _h3), values = vxlan_mesh(lab)
    ns1 = lab.ns("h1")
    mac2 = values[1]["BackendData"]["VtepMAC"]

    # peer removal takes route, nexthop object, neighbour and FDB entry (no resync needed)
    assert {nh.get("gateway") for nh in ipj(ns1, "nexthop", "show", "proto", "102")} == {"10.5.2.0", "10.5.3.0"}
    h1.call("remove_peer", lease=lease(2, values[1]))
    assert set(our_routes(ns1)) == {"10.5.3.0/24"}
    assert {nh.get("gateway") for nh in ipj(ns1, "nexthop", "show", "proto", "102")} == {"10.5.3.0"}
    assert "10.5.2.0" not in perm_neigh(ns1, "flannel.1")
    assert mac2 not in {e["mac"] for e in fdb(ns1, "flannel.1")}
    assert not ping(lab.ns("c1"), "10.5.2.2", count=1)

    # h2 comes back with a new VtepMAC (its device was recreated): old FDB entry gone, new one in
    h1.call("add_peer", lease=lease(2, values[1]))
    assert ping(lab.ns("c1"), "10.5.2.2")
    new_mac = "02:aa:bb:cc:dd:ee"
    h2_ns = lab.ns("h2")
    sh("ip", "-n", h2_ns, "link", "set", "flannel.1", "address", new_mac)
    changed = {**values[1], "BackendData": {"VNI": 1, "VtepMAC": new_mac}}
    h1.call("add_peer", lease=lease(2, changed))
    macs = {e["mac"]: e["dst"] for e in fdb(ns1, "flannel.1")}
    assert mac2 not in macs and macs[new_mac] == "192.168.10.2"
    assert perm_neigh(ns1, "flannel.1")["10.5.2.0"] == new_mac
    h2.call("sync", peers=[lease(1, values[0]), lease(3, values[2])])
    assert ping(lab.ns("c1"), "10.5.2.2")

    # garbage BackendData: logged, skipped, never raised, nothing in the kernel
    garbage = [
        ("10.5.20.0/24", None),
        ("10.5.21.0/24", {"VNI": 1}),
        ("10.5.22.0/24", {"VNI": 1, "VtepMAC": "not-a-mac"}),
        ("10.5.23.0/24", {"VNI": 1, "VtepMAC": "ff:ff:ff:ff:ff:ff"}),
        ("10.5.24.0/24", {"VNI": 1, "VtepMAC": 42}),
        ("10.5.25.0/24", "a string"),
    ]
    for i, (subnet, data) in enumerate(garbage):
        bad = {"subnet": subnet, "public_ip": f"192.168.10.{50 + i}", "backend_type": "vxlan", "backend_data": data}
        h1.call("add_peer", lease=bad)
    skipped = h1.call("status")["skipped"]
    assert set(skipped) == {s for s, _ in garbage}
    assert set(our_routes(ns1)) == {"10.5.2.0/24", "10.5.3.0/24"}
    assert len(fdb(ns1, "flannel.1")) == 2
    assert any("10.5.22.0/24" in ln and "not-a-mac" in ln for ln in h1.logs)
    # and the same through a full sync
    peers = [lease(2, changed), lease(3, values[2])]
    peers += [
        {"subnet": s, "public_ip": "192.168.10.77", "backend_type": "vxlan", "backend_data": d} for s, d in garbage
    ]
    h1.call("sync", peers=peers)
    assert set(our_routes(ns1)) == {"10.5.2.0/24", "10.5.3.0/24"}
    assert ping(lab.ns("c1"), "10.5.3.2")

    # a lease that changes into garbage loses its old entries
    h1.call("add_peer", lease={**lease(3, values[2]), "backend_data": {"VNI": 1}})
    assert set(our_routes(ns1)) == {"10.5.2.0/24"}
    assert "10.5.3.0" not in perm_neigh(ns1, "flannel.1")
    assert {e["dst"] for e in fdb(ns1, "flannel.1")} == {"192.168.10.2"}

    # teardown leaves nothing
    h1.call("teardown")
    assert ipj(ns1, "link", "show", "type", "vxlan") == []
    assert our_routes(ns1) == {}
    assert all(not r.get("dev", "").startswith("flannel") for r in ipj(ns1, "route"))


def test_vxlan_direct_routing(lab: Lab) -> None:
    (h1, _h2, _h3), values = vxlan_mesh(lab, {"DirectRouting": True})
    ns1 = lab.ns("h1")
    routes = our_routes(ns1)
    # h2 shares h1's segment: a plain host-gw route, no neighbour or FDB entry for it
    assert routes["10.5.2.0/24"]["gateway"] == "192.168.10.2" and routes["10.5.2.0/24"]["dev"] == "eth0"
    # h3 is behind the router: vxlan
    assert routes["10.5.3.0/24"]["dev"] == "flannel.1" and "onlink" in routes["10.5.3.0/24"]["flags"]
    assert perm_neigh(ns1, "flannel.1") == {"10.5.3.0": values[2]["BackendData"]["VtepMAC"]}
    assert {e["dst"] for e in fdb(ns1, "flannel.1")} == {"192.168.20.3"}
    assert ping(lab.ns("c1"), "10.5.2.2")
    assert ping(lab.ns("c1"), "10.5.3.2")
    peers = h1.call("status")["peers"]
    assert peers["10.5.2.0/24"]["direct_routing"] and not peers["10.5.3.0/24"]["direct_routing"]
    # teardown removes the direct route too (it lives on eth0, not on flannel.1)
    h1.call("teardown")
    assert our_routes(ns1) == {}


def test_vxlan_restart_adopts_without_flapping(lab: Lab) -> None:
    (h1, _h2, _h3), values = vxlan_mesh(lab)
    ns1 = lab.ns("h1")
    before = (our_routes(ns1), perm_neigh(ns1, "flannel.1"), fdb(ns1, "flannel.1"))
    monitor = subprocess.Popen(
        ["ip", "-n", ns1, "monitor", "route", "neigh", "link"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lab.procs.append(monitor)
    time.sleep(0.3)
    # the agent stops (the data path stays) and a new one starts on the same lease
    h1.call("stop")
    h1.kill()
    assert ping(lab.ns("c1"), "10.5.2.2")  # still forwarding with no agent
    again = lab.driver("h1", "vxlan", iface="eth0")
    assert again.attrs() == values[0]  # same VtepMAC: peers' entries for us stay valid
    start(again, 1)
    again.call("sync", peers=[lease(2, values[1]), lease(3, values[2])])
    time.sleep(0.3)
    monitor.terminate()
    events, _ = monitor.communicate(timeout=5)
    assert (our_routes(ns1), perm_neigh(ns1, "flannel.1"), fdb(ns1, "flannel.1")) == before
    # any IPv4 event on flannel.1 or on a peer route would be a flap (container-side ARP noise is not, and
    # neither is the kernel's own late IPv6 link-local setup of the device)
    churn = [
        ln
        for ln in events.splitlines()
        if ("flannel.1" in ln or "10.5.2.0/24" in ln or "10.5.3.0/24" in ln) and "fe80:" not in ln
    ]
    assert churn == [], events
    assert ping(lab.ns("c1"), "10.5.3.2")


def test_vxlan_recreates_incompatible_device_keeping_mac(lab: Lab) -> None:
    ns1 = lab.ns("h1")
    mac = "02:11:22:33:44:55"
    # a leftover flannel.1 with the wrong port and learning on
    sh("ip", "-n", ns1, "link", "add", "flannel.1", "address", mac, "type", "vxlan", "id", "1", "dev", "eth0")
    sh("ip", "-n", ns1, "link", "set", "flannel.1", "type", "vxlan", "dstport", "4789", check=False)
    d = lab.driver("h1", "vxlan", {"Port": 8472}, iface="eth0")
    value = d.attrs()
    assert value["BackendData"]["VtepMAC"] == mac
    (link,) = ipj(ns1, "-d", "link", "show", "flannel.1")
    info = link["linkinfo"]["info_data"]
    assert info["port"] == 8472 and not info.get("learning") and info["local"] == "192.168.10.1"
    assert any("recreating" in ln for ln in d.logs)
    # a non-default VNI and port give flannel.<VNI> on that port
    d2 = lab.driver("h2", "vxlan", {"VNI": 4097, "Port": 4789}, iface="eth0")
    v2 = d2.attrs()
    assert v2["BackendData"]["VNI"] == 4097
    (link2,) = ipj(lab.ns("h2"), "-d", "link", "show", "flannel.4097")
    assert link2["linkinfo"]["info_data"]["id"] == 4097 and link2["linkinfo"]["info_data"]["port"] == 4789


# --------------------------------------------------------------------------------------------------
# the driver: runs inside a host namespace


def _driver_main() -> None:  # pragma: no cover - runs in a subprocess
    from ipaddress import IPv4Address, IPv4Network

    from loguru import logger
    from pyroute2 import IPRoute

    from flannel_ebpf.backends.alloc import AllocBackend
    from flannel_ebpf.backends.hostgw import HostGwBackend
    from flannel_ebpf.backends.vxlan import VxlanBackend
    from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
    from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

    logs: list[str] = []
    logger.remove()
    logger.add(lambda m: logs.append(f"{m.record['level'].name} {m.record['message']}"), level="DEBUG")
    classes = {"alloc": AllocBackend, "host-gw": HostGwBackend, "vxlan": VxlanBackend}
    state: dict[str, Any] = {}

    def to_lease(d: dict[str, Any]) -> Lease:
        attrs = LeaseAttrs(IPv4Address(d["public_ip"]), d["backend_type"], d["backend_data"])
        return Lease(subnet=IPv4Network(d["subnet"]), attrs=attrs)

    def handle(op: str, a: dict[str, Any]) -> Any:
        if op == "init":
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=a["iface"])[0]
                mtu = ipr.get_links(idx)[0].get_attr("IFLA_MTU")
                addr = IPv4Address(ipr.get_addr(family=2, index=idx)[0].get_attr("IFA_ADDRESS"))
            public = IPv4Address(a["public_ip"]) if a.get("public_ip") else addr
            state["ext"] = ExternalInterface(a["iface"], idx, addr, public, mtu)
            state["be"] = classes[a["backend"]](a["config"], BackendOptions())
            return None
        be = state["be"]
        if op == "prepare":
            return be.prepare(state["ext"]).to_json()
        if op == "start":
            local = LocalNetwork(
                IPv4Network(a["network"]), IPv4Network(a["subnet"]), state["ext"], state["ext"].mtu - be.overhead()
            )
            state["local"] = local
            return be.start(local)
        if op == "sync":
            return be.sync([to_lease(p) for p in a["peers"]])
        if op in ("add_peer", "remove_peer"):
            return getattr(be, op)(to_lease(a["lease"]))
        if op == "teardown":
            return be.teardown(state.get("local"))
        if op in ("resync", "stop", "status", "overhead"):
            return getattr(be, op)()
        raise ValueError(f"unknown op {op}")

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            reply: dict[str, Any] = {"ok": True, "result": handle(op, cmd)}
        except Exception as e:
            reply = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
        reply["logs"] = logs[:]
        logs.clear()
        sys.stdout.write(json.dumps(reply, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and "--driver" in sys.argv:
    _driver_main()
