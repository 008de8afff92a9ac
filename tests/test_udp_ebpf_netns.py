"""The eBPF udp backend end to end, in network namespaces of its own.

    c1 (10.50.1.2) -- h1 (eth0 192.168.50.1) ==== veth ==== h2 (eth0 192.168.50.2) -- c2 (10.50.2.2)
    Network 10.50.0.0/16, h1 leases 10.50.1.0/24, h2 10.50.2.0/24

Each host's backend runs in a small Python subprocess (this file run with --driver under `ip netns exec`)
that takes JSON commands on stdin, so the pytest process never changes namespace. Names carry a random
`febXXXX` prefix; namespaces and pin directories are removed in the fixture finalizer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flannel_ebpf.lab.netns import Netns
from tests.helpers import close_pipes, wait_for

REPO = Path(__file__).resolve().parent.parent
NETWORK = "10.50.0.0/16"
HOSTS = {"h1": ("192.168.50.1", "10.50.1.0/24"), "h2": ("192.168.50.2", "10.50.2.0/24")}
PORT = 8285

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (network namespaces)"
    ),
]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def ping(ns: str, dst: str, count: int = 3) -> bool:
    proc = sh("ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.2", "-w", "5", dst, check=False)
    return proc.returncode == 0


# --------------------------------------------------------------------------------------------------
# the driver: runs inside a host namespace


def _driver() -> None:
    """Read JSON commands from stdin, answer one JSON line each."""
    from ipaddress import IPv4Address, IPv4Network

    from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend
    from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
    from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

    backend: UdpEbpfBackend | None = None
    local: LocalNetwork | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            result: Any = None
            if op == "start":
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    link = ipr.get_links(ipr.link_lookup(ifname=cmd["iface"])[0])[0]
                address = IPv4Address(cmd["address"])
                ext = ExternalInterface(cmd["iface"], link["index"], address, address, link.get_attr("IFLA_MTU"))
                options = BackendOptions(bpf_pin_dir=cmd["pin_dir"], udp_decap=cmd["decap"], xdp_mode=cmd["xdp_mode"])
                backend = UdpEbpfBackend({"Type": "udp", "Port": PORT}, options)
                backend.prepare(ext)
                local = LocalNetwork(IPv4Network(cmd["network"]), IPv4Network(cmd["subnet"]), ext, ext.mtu - 28)
                backend.start(local)
            elif op == "sync":
                assert backend is not None
                backend.sync(
                    [
                        Lease(IPv4Network(s), LeaseAttrs(IPv4Address(ip), p.get("type", "udp")))
                        for s, ip, p in ((p["subnet"], p["ip"], p) for p in cmd["peers"])
                    ]
                )
            elif op == "status":
                assert backend is not None
                result = backend.status()
            elif op == "stop":
                assert backend is not None
                backend.stop()
            elif op == "teardown":
                assert backend is not None
                backend.teardown(local)
            print(json.dumps({"ok": True, "result": result}), flush=True)
        except Exception as e:
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


@dataclass
class Agent:
    ns: str
    proc: subprocess.Popen[str]

    def call(self, op: str, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver in {self.ns} died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"{op} in {self.ns}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        close_pipes(self.proc)


@dataclass
class Lab:
    prefix: str
    scratch: Path
    namespaces: list[str] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def pin_dir(self, host: str) -> str:
        return f"/sys/fs/bpf/{self.prefix}-{host}"

    def add_ns(self, name: str) -> str:
        full = self.ns(name)
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def build(self) -> None:
        for host in HOSTS:
            self.add_ns(host)
            self.add_ns(host.replace("h", "c"))
        h1, h2 = self.ns("h1"), self.ns("h2")
        sh("ip", "-n", h1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", h2)
        for host, (address, subnet) in HOSTS.items():
            hns, cns = self.ns(host), self.ns(host.replace("h", "c"))
            sh("ip", "-n", hns, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", hns, "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", hns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # the "container": a veth into the host, addressed from the host's lease like Docker would
            gw = subnet.replace(".0/24", ".1")
            sh("ip", "-n", hns, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", cns)
            sh("ip", "-n", hns, "addr", "add", f"{gw}/24", "dev", "vc")
            sh("ip", "-n", hns, "link", "set", "vc", "up", "mtu", "1472")
            sh("ip", "-n", cns, "addr", "add", subnet.replace(".0/24", ".2/24"), "dev", "eth0")
            sh("ip", "-n", cns, "link", "set", "eth0", "up", "mtu", "1472")
            sh("ip", "-n", cns, "route", "add", "default", "via", gw)

    def start_agent(self, host: str, decap: str = "xdp", xdp_mode: str = "auto") -> Agent:
        ns = self.ns(host)
        # `ip netns exec` would remount /sys and hide the host's bpffs; the lab's wrapper keeps it.
        wrapped = Netns(ns, scratch_dir=self.scratch).wrap(
            [sys.executable, str(Path(__file__).resolve()), "--driver"], share_bpffs=True
        )
        proc = subprocess.Popen(
            wrapped,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        agent = Agent(ns, proc)
        self.agents[host] = agent
        address, subnet = HOSTS[host]
        agent.call(
            "start",
            iface="eth0",
            address=address,
            network=NETWORK,
            subnet=subnet,
            pin_dir=self.pin_dir(host),
            decap=decap,
            xdp_mode=xdp_mode,
        )
        peers = [{"subnet": s, "ip": ip} for h, (ip, s) in HOSTS.items() if h != host]
        agent.call("sync", peers=peers)
        return agent

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        for host in HOSTS:
            shutil.rmtree(self.pin_dir(host), ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(prefix=f"feb{secrets.token_hex(2)}", scratch=tmp_path)
    try:
        the_lab.build()
        yield the_lab
    finally:
        the_lab.close()


def counters(agent: Agent) -> dict[str, int]:
    return {k: v["packets"] for k, v in agent.call("status")["maps"]["counters"].items()}


def send_udp(ns: str, src: str, dst: str, payload_hex: str) -> None:
    code = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.bind(('{src}',0));s.sendto(bytes.fromhex('{payload_hex}'),('{dst}',{PORT}))"
    )
    sh("ip", "netns", "exec", ns, sys.executable, "-c", code)


def inner_icmp_echo(src: str, dst: str) -> str:
    """An IPv4 ICMP echo request (valid checksums) as hex: what a peer would encapsulate."""
    import struct
    from ipaddress import IPv4Address

    def csum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"spoofed!"
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, IPv4Address(src).packed, IPv4Address(dst).packed
    )
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return (hdr + icmp).hex()


def kernel_leftovers(lab: Lab, host: str) -> list[str]:
    ns = lab.ns(host)
    found: list[str] = []
    links = json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show").stdout)
    for link in links:
        if link["ifname"] == "flannel0":
            found.append("device flannel0")
        if link.get("xdp"):
            found.append(f"xdp on {link['ifname']}")
        filters = sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", link["ifname"], "ingress", check=False)
        if "flannel" in filters.stdout:
            found.append(f"tc filter on {link['ifname']}")
    if sh("ip", "-n", ns, "route", "show", "proto", "102").stdout.strip():
        found.append("routes proto 102")
    if Path(lab.pin_dir(host)).exists():
        found.append(f"pin dir {lab.pin_dir(host)}")
    return found


@pytest.mark.parametrize("decap", ["xdp", "tc"])
def test_two_hosts_ping_spoof_restart_teardown(lab: Lab, decap: str) -> None:
    a1 = lab.start_agent("h1", decap=decap)
    a2 = lab.start_agent("h2", decap=decap)
    c1, c2 = lab.ns("c1"), lab.ns("c2")

    # container to container, both ways, and host to the peer's flannel0 address
    assert ping(c1, "10.50.2.2"), "c1 -> c2 over the eBPF udp overlay"
    assert ping(c2, "10.50.1.2"), "c2 -> c1"
    assert ping(lab.ns("h1"), "10.50.2.0"), "h1 -> h2's flannel0 address"
    st1, st2 = counters(a1), counters(a2)
    assert st1["encap_ok"] >= 6 and st2["decap_ok"] >= 6
    status = a1.call("status")
    hooks = {(p["program"], p["hook"]) for p in status["programs"]}
    assert ("flannel_encap", "tc-egress") in hooks
    assert (("flannel_xdp_in", "xdp") if decap == "xdp" else ("flannel_tc_in", "tc-ingress")) in hooks
    assert status["maps"]["peers"] == {"10.50.2.0/24": "192.168.50.2"}
    assert status["maps"]["members"] == {"192.168.50.2": 1}

    # no peer for a destination inside the Network: ICMP net unreachable, like flanneld
    out = sh("ip", "netns", "exec", c1, "ping", "-n", "-c", "1", "-w", "2", "10.50.9.9", check=False)
    assert "Unreachable" in out.stdout, out.stdout
    assert counters(a1)["encap_no_peer_icmp"] >= 1

    # a packet to 8285 from an address holding no lease is dropped and counted
    sh("ip", "-n", lab.ns("h1"), "addr", "add", "192.168.50.9/24", "dev", "eth0")
    before = counters(a2)
    send_udp(lab.ns("h1"), "192.168.50.9", "192.168.50.2", inner_icmp_echo("10.50.1.2", "10.50.2.2"))
    # from a member, but for a destination outside h2's subnet
    send_udp(lab.ns("h1"), "192.168.50.1", "192.168.50.2", inner_icmp_echo("10.50.1.2", "10.50.7.7"))
    wait_for(
        lambda: (
            counters(a2)["decap_not_member"] > before["decap_not_member"]
            and counters(a2)["decap_not_local"] > before["decap_not_local"]
        ),
        what="both drops counted",
    )
    after = counters(a2)
    assert after["decap_not_member"] == before["decap_not_member"] + 1
    assert after["decap_not_local"] == before["decap_not_local"] + 1

    # restart h1's agent while c1 pings c2: the data path keeps forwarding and the pins are adopted
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", c1, "ping", "-n", "-i", "0.05", "-c", "60", "10.50.2.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    a1.call("stop")
    a1.close()
    time.sleep(0.5)
    a1 = lab.start_agent("h1", decap=decap)
    out_text, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in out_text, out_text
    assert a1.call("status")["maps"]["peers"] == {"10.50.2.0/24": "192.168.50.2"}

    # a peer gone: h1 no longer sends to it nor accepts from it
    a1.call("sync", peers=[])
    assert not ping(c1, "10.50.2.2", count=1)
    assert a1.call("status")["maps"]["members"] == {}

    for host, agent in (("h1", a1), ("h2", a2)):
        agent.call("teardown")
        assert kernel_leftovers(lab, host) == [], host


if __name__ == "__main__" and "--driver" in sys.argv:
    _driver()
