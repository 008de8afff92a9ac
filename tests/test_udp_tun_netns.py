"""The userspace udp (TUN) path against a real kernel, in network namespaces of our own.

Lab: two hosts on one veth underlay, each with a container namespace behind a veth (as Docker would be
with --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU):

    c1 10.5.1.2 -- vc1 10.5.1.1 [h1] eth0 192.168.77.1 ==== 192.168.77.2 eth0 [h2] vc2 10.5.2.1 -- c2 10.5.2.2
                              flannel0 10.5.1.0/32                     flannel0 10.5.2.0/32

Each host runs UdpTunBackend in a small Python process under `ip netns exec` (the pytest process never
changes namespace). Nothing here touches the root namespace; every namespace is deleted at the end.
No ping/tcpdump on this machine: ICMP echo and packet capture are small raw-socket scripts.

The first tests are pure (checksum, ICMP builder, peer table) and need no privilege.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flannel_ebpf.backends.udp.tun_proxy import (
    PeerTable,
    build_net_unreachable,
    decrement_ttl,
    internet_checksum,
)
from tests.helpers import close_pipes, wait_for

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NETWORK = "10.5.0.0/16"
UNDERLAY_MTU = 1500
OVERLAY_MTU = UNDERLAY_MTU - 28
PORT = 8285


# --------------------------------------------------------------------------------------------------
# Pure tests
# --------------------------------------------------------------------------------------------------


def ipv4_header(ttl: int, src: bytes, dst: bytes, proto: int = 17, payload_len: int = 8, frag: int = 0) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0x1234, frag, ttl, proto, 0, src, dst))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header)


def test_decrement_ttl_keeps_checksum_valid() -> None:
    rng = secrets.SystemRandom()
    for _ in range(2000):
        header = bytearray(
            ipv4_header(rng.randint(2, 255), secrets.token_bytes(4), secrets.token_bytes(4), rng.randint(0, 255))
        )
        ttl = header[8]
        assert decrement_ttl(header)
        assert header[8] == ttl - 1
        assert internet_checksum(header) == 0  # a valid header sums to 0xffff
    for ttl in (0, 1):
        header = bytearray(ipv4_header(ttl, b"\x0a\x05\x01\x02", b"\x0a\x05\x02\x02"))
        assert not decrement_ttl(header)


def test_net_unreachable_rules() -> None:
    src, dst, tun = bytes([10, 5, 1, 2]), bytes([10, 5, 9, 9]), bytes([10, 5, 1, 0])
    udp = ipv4_header(64, src, dst, proto=17) + b"\x30\x39\x00\x09\x00\x08\x00\x00" + b"tail"
    reply = build_net_unreachable(udp, tun)
    assert reply is not None
    assert internet_checksum(reply[:20]) == 0 and internet_checksum(reply[20:]) == 0
    assert reply[9] == 1 and reply[12:16] == tun and reply[16:20] == src
    assert reply[20:22] == bytes([3, 0])  # destination unreachable, net
    assert reply[28:] == udp[:28]  # the offender's header and first 8 payload bytes
    # An echo request gets an answer (RFC 1122); an ICMP error never does.
    echo = ipv4_header(64, src, dst, proto=1) + b"\x08\x00\x00\x00\x00\x01\x00\x01"
    assert build_net_unreachable(echo, tun) is not None
    error = ipv4_header(64, src, dst, proto=1) + b"\x03\x01\x00\x00\x00\x00\x00\x00"
    assert build_net_unreachable(error, tun) is None
    # Only the first fragment; nothing to 0.0.0.0 or multicast; nothing about a malformed header.
    assert build_net_unreachable(ipv4_header(64, src, dst, frag=0x0010) + bytes(8), tun) is None
    assert build_net_unreachable(ipv4_header(64, bytes(4), dst) + bytes(8), tun) is None
    assert build_net_unreachable(ipv4_header(64, bytes([224, 0, 0, 1]), dst) + bytes(8), tun) is None
    assert build_net_unreachable(b"\x45" + bytes(10), tun) is None
    assert build_net_unreachable(b"\x4f" + bytes(30), tun) is None  # IHL 60 > packet


def test_peer_table_longest_prefix() -> None:
    table = PeerTable()
    net = lambda s: int.from_bytes(bytes(int(x) for x in s.split(".")), "big")  # noqa: E731
    table.set(net("10.5.2.0"), 24, "192.168.77.2", PORT)
    table.set(net("10.5.2.128"), 25, "192.168.77.3", PORT)
    assert table.lookup(net("10.5.2.7")) == ("192.168.77.2", PORT)
    assert table.lookup(net("10.5.2.200")) == ("192.168.77.3", PORT)
    assert table.lookup(net("10.5.3.1")) is None
    table.delete(net("10.5.2.128"), 25)
    assert table.lookup(net("10.5.2.200")) == ("192.168.77.2", PORT)
    table.replace([[net("10.5.7.0"), 24, "192.168.77.9", PORT]])
    assert table.lookup(net("10.5.2.7")) is None and len(table) == 1


# --------------------------------------------------------------------------------------------------
# The namespace lab
# --------------------------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun",
)

# Runs one host's backend. Reads JSON commands on stdin, answers one JSON line each.
RUNNER = r"""
import json, socket, sys
from ipaddress import IPv4Address, IPv4Network
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.backends.udp_tun import UdpTunBackend
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

cfg = json.loads(sys.argv[1])
addr = IPv4Address(cfg["address"])
ext = ExternalInterface(cfg["iface"], socket.if_nametoindex(cfg["iface"]), addr, addr, cfg["mtu"])
backend = UdpTunBackend({"Type": "udp"}, BackendOptions(state_dir=cfg["state_dir"], udp_datapath="tun"))
attrs = backend.prepare(ext)
local = LocalNetwork(IPv4Network(cfg["network"]), IPv4Network(cfg["subnet"]), ext, ext.mtu - backend.overhead())
lease = lambda p: Lease(IPv4Network(p["subnet"]), LeaseAttrs(IPv4Address(p["public_ip"])))
backend.start(local)
backend.sync([lease(p) for p in cfg["peers"]])
print(json.dumps({"attrs": json.loads(attrs.to_json())}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, out = cmd["op"], {}
    if op == "status":
        out = backend.status()
    elif op == "add_peer":
        backend.add_peer(lease(cmd["peer"]))
    elif op == "remove_peer":
        backend.remove_peer(lease(cmd["peer"]))
    elif op == "stop":
        backend.stop()
    elif op == "start":
        backend.start(local)
        backend.sync([lease(p) for p in cfg["peers"]])
    elif op == "teardown":
        backend.teardown(local)
    print(json.dumps(out), flush=True)
backend.stop()
"""

# ICMP echo with a raw socket: prints {"result": "reply"|"unreachable"|"timeout", ...} per probe.
PING = r"""
import json, os, select, socket, struct, sys, time
dst, ttl, count, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
def csum(b):
    b += b"\0" * (len(b) % 2); s = sum(struct.unpack(f"!{len(b)//2}H", b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
ident = os.getpid() & 0xffff
for seq in range(1, count + 1):
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    s.sendto(msg, (dst, 0))
    out, deadline = {"result": "timeout", "seq": seq}, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if not select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
            break
        pkt, (src, _) = s.recvfrom(65535)
        ihl = (pkt[0] & 15) * 4
        typ, code = pkt[ihl], pkt[ihl + 1]
        if typ == 0 and struct.unpack_from("!HH", pkt, ihl + 4) == (ident, seq):
            out = {"result": "reply", "seq": seq, "from": src, "ttl": pkt[8]}
            break
        if typ == 3:
            inner = pkt[ihl + 8:]
            iihl = (inner[0] & 15) * 4
            if struct.unpack_from("!HH", inner, iihl + 4) == (ident, seq):
                out = {"result": "unreachable", "seq": seq, "from": src, "code": code}
                break
    print(json.dumps(out), flush=True)
    time.sleep(0.05)
"""

# Captures IPv4 frames on one device (AF_PACKET): prints "ready", then a JSON list of hex IPv4 packets
# that contain the marker bytes.
CAPTURE = r"""
import json, select, socket, sys, time
iface, marker, count, timeout = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((iface, 0))
print("ready", flush=True)
found, deadline = [], time.monotonic() + timeout
while len(found) < count and time.monotonic() < deadline:
    if not select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
        break
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING and sys.argv[5] == "in":
        continue
    if marker in frame:
        found.append(frame[14:].hex())
print(json.dumps(found), flush=True)
"""

# Sends one hand-made UDP datagram (payload given in hex) from src to dst:port.
SEND_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.sendto(bytes.fromhex(sys.argv[4]), (sys.argv[2], int(sys.argv[3])))
"""

# A UDP send to an address, then a receive: prints the errno the ICMP error turned into.
UDP_PROBE = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: net-unreachable is a soft error, ask for it
s.settimeout(2)
s.connect((sys.argv[1], 9))
s.send(b"probe")
try:
    s.recv(100)
    print("data")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def sh(*args: str, timeout: float = 10, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def ns_python(ns: str, code: str, *args: str, timeout: float = 15) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{ns}: {proc.stderr}"
    return proc.stdout


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class Agent:
    """One host's backend, driven over its runner's stdin/stdout."""

    ns: str
    proc: subprocess.Popen
    attrs: dict
    log: Path

    def call(self, op: str, timeout: float = 10, **kw: object) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"{self.ns}: no answer to {op}; log: {self.log.read_text()}")
        line = self.proc.stdout.readline()
        assert line, f"{self.ns}: runner exited; log: {self.log.read_text()}"
        return json.loads(line)

    def counters(self) -> dict:
        status = self.call("status")
        assert status["counters"] is not None, status
        return status["counters"]


@dataclass
class Lab:
    prefix: str
    tmp: Path
    namespaces: list[str] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)
    spawned: list[subprocess.Popen] = field(default_factory=list)
    proxy_pids: set[int] = field(default_factory=set)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add_ns(self, name: str) -> str:
        full = self.ns(name)
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def start_agent(self, host: str, iface: str, address: str, subnet: str, peers: list[dict]) -> Agent:
        ns = self.ns(host)
        cfg = {
            "iface": iface,
            "address": address,
            "mtu": UNDERLAY_MTU,
            "network": NETWORK,
            "subnet": subnet,
            "peers": peers,
            "state_dir": str(self.tmp / host),
        }
        log = self.tmp / f"{host}.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, PYTHON, "-c", RUNNER, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        self.spawned.append(proc)
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 20)[0]:
            raise AssertionError(f"{host}: backend did not start; log: {log.read_text()}")
        line = proc.stdout.readline()
        assert line, f"{host}: backend failed; log: {log.read_text()}"
        agent = Agent(ns, proc, json.loads(line)["attrs"], log)
        self.agents[host] = agent
        self.note_proxy(agent)
        return agent

    def note_proxy(self, agent: Agent) -> None:
        pid = agent.call("status")["proxy"]["pid"]
        if pid:
            self.proxy_pids.add(pid)

    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.proc.stdin.close()  # the runner stops its backend at end of input
        for proc in self.spawned:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            close_pipes(proc)
        for pid in self.proxy_pids:  # forwarding processes the runners started, should any outlive them
            with contextlib.suppress(ProcessLookupError, PermissionError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
                if b"udp.tun_proxy" in cmdline:
                    os.kill(pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def build_topology(lab: Lab) -> None:
    h1, h2, c1, c2 = (lab.add_ns(n) for n in ("h1", "h2", "c1", "c2"))
    # Underlay: veths created inside the namespaces, never in the root namespace.
    sh("ip", "-n", h1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", h2)
    for host, idx in ((h1, 1), (h2, 2)):
        sh("ip", "-n", host, "addr", "add", f"192.168.77.{idx}/24", "dev", "eth0")
        sh("ip", "-n", host, "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", host, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    for host, ctr, idx in ((h1, c1, 1), (h2, c2, 2)):
        sh("ip", "-n", ctr, "link", "add", "eth0", "type", "veth", "peer", "name", f"vc{idx}", "netns", host)
        sh("ip", "-n", host, "addr", "add", f"10.5.{idx}.1/24", "dev", f"vc{idx}")
        sh("ip", "-n", host, "link", "set", f"vc{idx}", "mtu", str(OVERLAY_MTU), "up")
        sh("ip", "-n", ctr, "addr", "add", f"10.5.{idx}.2/24", "dev", "eth0")
        sh("ip", "-n", ctr, "link", "set", "eth0", "mtu", str(OVERLAY_MTU), "up")
        sh("ip", "-n", ctr, "route", "add", "default", "via", f"10.5.{idx}.1")


PEER_H1 = {"subnet": "10.5.1.0/24", "public_ip": "192.168.77.1"}
PEER_H2 = {"subnet": "10.5.2.0/24", "public_ip": "192.168.77.2"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(prefix="ftn" + secrets.token_hex(2), tmp=tmp_path_factory.mktemp("udp-tun"))
    try:
        build_topology(lab)
        # Each agent gets every lease, its own included: the backend must skip its own.
        lab.start_agent("h1", "eth0", "192.168.77.1", "10.5.1.0/24", [PEER_H1, PEER_H2])
        lab.start_agent("h2", "eth0", "192.168.77.2", "10.5.2.0/24", [PEER_H1, PEER_H2])
        yield lab
    finally:
        lab.close()


def ping(lab: Lab, ns: str, dst: str, ttl: int = 64, count: int = 1, payload: bytes = b"flannel-tun") -> list[dict]:
    out = ns_python(lab.ns(ns), PING, dst, str(ttl), str(count), payload.hex())
    return [json.loads(line) for line in out.splitlines()]


def capture(lab: Lab, ns: str, iface: str, marker: bytes, direction: str = "any") -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(ns), PYTHON, "-c", CAPTURE, iface, marker.hex(), "1", "5", direction],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lab.spawned.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def captured(proc: subprocess.Popen) -> list[bytes]:
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return [bytes.fromhex(h) for h in json.loads(out)]


# --------------------------------------------------------------------------------------------------
# Lab tests (run in file order: the last one stops and tears down)
# --------------------------------------------------------------------------------------------------


@needs_root
def test_device_route_and_lease(lab: Lab) -> None:
    h1 = lab.ns("h1")
    assert lab.agents["h1"].attrs == {"PublicIP": "192.168.77.1", "PublicIPv6": None}
    link = json.loads(sh("ip", "-n", h1, "-d", "-j", "link", "show", "flannel0").stdout)[0]
    assert link["mtu"] == OVERLAY_MTU
    assert link["linkinfo"]["info_kind"] == "tun"
    assert "UP" in link["flags"]
    addrs = json.loads(sh("ip", "-n", h1, "-j", "addr", "show", "dev", "flannel0").stdout)[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [("10.5.1.0", 32)]
    routes = json.loads(sh("ip", "-n", h1, "-j", "route", "show", NETWORK).stdout)
    assert len(routes) == 1 and routes[0]["dev"] == "flannel0"
    status = lab.agents["h1"].call("status")
    assert status["peers"] == [PEER_H2]  # its own lease skipped
    assert status["proxy"]["running"] and status["proxy"]["peers"] == 1


@needs_root
def test_ping_both_directions(lab: Lab) -> None:
    before = {h: lab.agents[h].counters() for h in ("h1", "h2")}
    (r,) = ping(lab, "c1", "10.5.2.2")
    assert r["result"] == "reply", r
    # c2 answers with TTL 64: h2 forwards (63), h2's proxy (62), h1's proxy (61), h1 forwards (60).
    assert r["ttl"] == 60, r
    (r,) = ping(lab, "c2", "10.5.1.2")
    assert r["result"] == "reply" and r["ttl"] == 60, r
    # Host to host: h1 reaches h2's flannel0 address (h1's flannel0 address is the source).
    (r,) = ping(lab, "h1", "10.5.2.0")
    assert r["result"] == "reply", r
    after = {h: lab.agents[h].counters() for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        assert after[h]["tx_packets"] - before[h]["tx_packets"] >= 3
        assert after[h]["rx_packets"] - before[h]["rx_packets"] >= 3


@needs_root
def test_wire_format_is_udp_8285_carrying_the_inner_packet(lab: Lab) -> None:
    marker = secrets.token_bytes(12)
    cap = capture(lab, "h2", "eth0", marker, direction="in")
    (r,) = ping(lab, "c1", "10.5.2.2", payload=marker)
    assert r["result"] == "reply", r
    (pkt,) = captured(cap)
    ihl = (pkt[0] & 15) * 4
    assert pkt[9] == 17 and pkt[12:16] == bytes([192, 168, 77, 1]) and pkt[16:20] == bytes([192, 168, 77, 2])
    sport, dport, udp_len = struct.unpack_from("!HHH", pkt, ihl)
    assert (sport, dport) == (PORT, PORT)
    inner = pkt[ihl + 8 :]
    assert udp_len == 8 + len(inner)  # nothing but the inner packet in the payload
    assert inner[0] == 0x45 and struct.unpack_from("!H", inner, 2)[0] == len(inner)
    assert inner[9] == 1 and inner[12:16] == bytes([10, 5, 1, 2]) and inner[16:20] == bytes([10, 5, 2, 2])
    assert inner[8] == 62  # 64, minus h1 forwarding, minus h1's proxy
    assert internet_checksum(inner[:20]) == 0
    assert inner.endswith(marker)


@needs_root
def test_hand_made_datagram_arrives_in_the_container(lab: Lab) -> None:
    marker = secrets.token_bytes(12)
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + marker)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    inner = bytearray(ipv4_header(9, bytes([10, 5, 2, 77]), bytes([10, 5, 1, 2]), proto=1, payload_len=len(icmp)))
    before = lab.agents["h1"].counters()
    cap = capture(lab, "c1", "eth0", marker, direction="in")
    ns_python(lab.ns("h2"), SEND_UDP, "192.168.77.2", "192.168.77.1", str(PORT), (bytes(inner) + icmp).hex())
    (pkt,) = captured(cap)
    assert pkt[12:16] == bytes([10, 5, 2, 77]) and pkt.endswith(marker)
    assert pkt[8] == 7  # 9, minus h1's proxy, minus h1 forwarding to the container
    # A datagram for a destination outside h1's subnet is not injected (flannel would inject it).
    stray = ipv4_header(9, bytes([10, 5, 2, 77]), bytes([10, 5, 2, 2]), proto=1, payload_len=len(icmp))
    ns_python(lab.ns("h2"), SEND_UDP, "192.168.77.2", "192.168.77.1", str(PORT), (stray + icmp).hex())
    wait_for(lambda: lab.agents["h1"].counters()["drop_not_local"] > before["drop_not_local"], what="the stray counted")
    after = lab.agents["h1"].counters()
    assert after["rx_packets"] - before["rx_packets"] == 1
    assert after["drop_not_local"] - before["drop_not_local"] == 1


@needs_root
def test_ttl_is_decremented_and_expires(lab: Lab) -> None:
    before = {h: lab.agents[h].counters() for h in ("h1", "h2")}
    # TTL 2: h1 forwarding leaves 1, h1's proxy drops it.
    assert ping(lab, "c1", "10.5.2.2", ttl=2)[0]["result"] == "timeout"
    # TTL 3: 2 after forwarding, 1 after h1's proxy, h2's proxy drops it.
    assert ping(lab, "c1", "10.5.2.2", ttl=3)[0]["result"] == "timeout"
    # TTL 5: reaches c2 with 1.
    assert ping(lab, "c1", "10.5.2.2", ttl=5)[0]["result"] == "reply"
    after = {h: lab.agents[h].counters() for h in ("h1", "h2")}
    assert after["h1"]["drop_ttl_tx"] - before["h1"]["drop_ttl_tx"] == 1
    assert after["h2"]["drop_ttl_rx"] - before["h2"]["drop_ttl_rx"] == 1


@needs_root
def test_net_unreachable_for_a_subnet_no_peer_holds(lab: Lab) -> None:
    before = lab.agents["h1"].counters()
    (r,) = ping(lab, "c1", "10.5.9.9")
    assert r == {"result": "unreachable", "seq": 1, "from": "10.5.1.0", "code": 0}, r
    # Not only for ICMP: a UDP socket sees the error as ENETUNREACH.
    assert ns_python(lab.ns("c1"), UDP_PROBE, "10.5.9.9").strip() == "ENETUNREACH"
    after = lab.agents["h1"].counters()
    assert after["drop_no_route"] - before["drop_no_route"] == 2
    assert after["icmp_unreachable_sent"] - before["icmp_unreachable_sent"] == 2


@needs_root
def test_peer_removal_and_return(lab: Lab) -> None:
    h1 = lab.agents["h1"]
    h1.call("remove_peer", peer=PEER_H2)
    (r,) = ping(lab, "c1", "10.5.2.2")
    assert r["result"] == "unreachable", r
    h1.call("add_peer", peer=PEER_H2)
    (r,) = ping(lab, "c1", "10.5.2.2")
    assert r["result"] == "reply", r


@needs_root
def test_iperf3_over_the_tun_path(lab: Lab, record_property: pytest.RecordProperty) -> None:
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 not installed")
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("c2"), "iperf3", "-s", "-1", "-B", "10.5.2.2", "--forceflush"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lab.spawned.append(server)
    assert server.stdout is not None
    assert select.select([server.stdout], [], [], 5)[0], "iperf3 server did not start"
    server.stdout.readline()
    proxies = {h: lab.agents[h].call("status")["proxy"]["pid"] for h in ("h1", "h2")}
    cpu_before = {h: proc_cpu_seconds(pid) for h, pid in proxies.items()}
    client = sh(
        "ip", "netns", "exec", lab.ns("c1"), "iperf3", "-c", "10.5.2.2", "-t", "3", "-J", timeout=30, check=False
    )
    server.wait(10)
    assert client.returncode == 0, client.stdout[-2000:] + client.stderr
    result = json.loads(client.stdout)
    gbps = result["end"]["sum_received"]["bits_per_second"] / 1e9
    retransmits = result["end"]["sum_sent"].get("retransmits")
    record_property("udp_tun_tcp1_gbps", gbps)
    cpu = {
        h: tuple(round(a - b, 2) for a, b in zip(proc_cpu_seconds(pid), cpu_before[h], strict=True))
        for h, pid in proxies.items()
    }
    print(f"\niperf3 TCP 1 stream over the udp TUN path: {gbps:.3f} Gbit/s (retransmits {retransmits})")
    print(f"forwarding processes' CPU seconds (user, system) over 3 s: {cpu}")
    (lab.tmp / "iperf3.json").write_text(client.stdout)
    assert gbps > 0.01
    counters = lab.agents["h1"].counters()
    print(f"h1 counters: {counters}")


@needs_root
def test_stop_restart_and_teardown(lab: Lab) -> None:
    h1 = lab.agents["h1"]
    ns = lab.ns("h1")
    pid = h1.call("status")["proxy"]["pid"]
    h1.call("stop")
    assert not Path(f"/proc/{pid}").exists() or b"udp.tun_proxy" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    # The device persists and keeps the route: overlay traffic ends in flannel0, nothing forwards it.
    assert sh("ip", "-n", ns, "link", "show", "flannel0", check=False).returncode == 0
    assert ping(lab, "c1", "10.5.2.2")[0]["result"] == "timeout"
    # A restarted agent adopts the device and forwards again.
    h1.call("start")
    lab.note_proxy(h1)
    assert ping(lab, "c1", "10.5.2.2")[0]["result"] == "reply"
    h1.call("teardown")
    assert sh("ip", "-n", ns, "link", "show", "flannel0", check=False).returncode != 0
    assert json.loads(sh("ip", "-n", ns, "-j", "route", "show", NETWORK).stdout) == []
    assert not (lab.tmp / "h1" / "udp-tun-proxy.pid").exists()
    status = h1.call("status")
    assert status["proxy"]["running"] is False
