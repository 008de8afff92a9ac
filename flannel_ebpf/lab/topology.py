"""The lab's underlay: L2 segments (bridges inside a switch namespace), a router between them, hosts.

    flat:    h1 h2 h3 etcd ── br-a (switch ns)                    192.168.50.0/24
    routed:  h1 h2 etcd ── br-a ── rt ── br-b ── h3               192.168.50.0/24 | 192.168.51.0/24

Addresses: the router is .1 on every segment, etcd .2 on segment a, host hN is .(10+N) on its segment.
Routes between segments are added inside the lab's namespaces only (never a default route: traffic the
lab did not plan for has nowhere to go).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import IO, Literal

from loguru import logger

from .netns import IFNAMSIZ, ExecResult, Netns, Node, create_netns, veth_between

Topology = Literal["flat", "routed"]
SEGMENT_NETWORKS: dict[str, IPv4Network] = {
    "a": IPv4Network("192.168.50.0/24"),
    "b": IPv4Network("192.168.51.0/24"),
}
ROUTER_INDEX = 1
ETCD_INDEX = 2
HOST_INDEX_BASE = 10
UNDERLAY_IFACE = "eth0"


@dataclass(frozen=True)
class Segment:
    """One L2 segment of the underlay: a bridge in the switch namespace."""

    name: str
    network: IPv4Network

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"

    @property
    def gateway(self) -> IPv4Address:
        """The router's address on this segment (present only in the routed topology)."""
        return self.address(ROUTER_INDEX).ip

    def address(self, index: int) -> IPv4Interface:
        return IPv4Interface(f"{self.network[index]}/{self.network.prefixlen}")


@dataclass
class Host:
    """A lab host: what it is (name, underlay address, its files). How it is reached is its `node`."""

    name: str
    node: Node
    segment: Segment
    underlay: IPv4Interface
    dir: Path
    iface: str = UNDERLAY_IFACE

    @property
    def underlay_ip(self) -> IPv4Address:
        return self.underlay.ip

    @property
    def netns(self) -> str:
        return self.node.name

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def state_dir(self) -> Path:
        return self.dir

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> ExecResult:
        return self.node.exec(argv, timeout=timeout, check=check, input=input, env=env, share_bpffs=share_bpffs)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> subprocess.Popen[bytes]:
        return self.node.popen(argv, stdout=stdout, stderr=stderr, env=env, share_bpffs=share_bpffs)


@dataclass
class Underlay:
    """The switch namespace with one bridge per segment, and (routed) the router between them."""

    prefix: str
    scratch_dir: Path
    topology: Topology
    switch: Netns | None = None
    router: Netns | None = None
    segments: dict[str, Segment] = field(default_factory=dict)

    def ns_name(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def build(self) -> None:
        names = ["a"] if self.topology == "flat" else ["a", "b"]
        self.segments = {n: Segment(n, SEGMENT_NETWORKS[n]) for n in names}
        self.switch = create_netns(self.ns_name("sw"), self.scratch_dir)
        for seg in self.segments.values():
            self.switch.ip("link", "add", seg.bridge, "type", "bridge")
            self.switch.ip("link", "set", seg.bridge, "up")
        if self.topology == "routed":
            self.router = create_netns(self.ns_name("rt"), self.scratch_dir)
            for seg in self.segments.values():
                self._plug(self.router, f"eth-{seg.name}", "rt", seg, ROUTER_INDEX, routes=False)
            self.router.sysctl("net.ipv4.ip_forward", "1")
        logger.debug("underlay {} up: {}", self.topology, ", ".join(str(s.network) for s in self.segments.values()))

    def attach(self, ns: Netns, short: str, segment: str, index: int, ifname: str = UNDERLAY_IFACE) -> IPv4Interface:
        """Plug `ns` into a segment as `ifname` with address .<index>; returns that address."""
        return self._plug(ns, ifname, short, self.segments[segment], index, routes=True)

    def _plug(self, ns: Netns, ifname: str, short: str, seg: Segment, index: int, routes: bool) -> IPv4Interface:
        assert self.switch is not None
        port = f"{short}-{seg.name}"
        if len(port) > IFNAMSIZ:
            raise ValueError(f"switch port name {port!r} too long: use a shorter host name")
        addr = seg.address(index)
        # Created inside `ns`, the peer born directly in the switch namespace.
        veth_between(ns, ifname, self.switch, port)
        self.switch.ip("link", "set", port, "master", seg.bridge, "up")
        ns.ip("addr", "add", str(addr), "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        if routes and self.router is not None:
            for other in self.segments.values():
                if other.name != seg.name:
                    ns.ip("route", "add", str(other.network), "via", str(seg.gateway), "dev", ifname)
        return addr


def split_segments(n_hosts: int, topology: Topology) -> list[str]:
    """Default placement: everything on `a` (flat); the first half (rounded up) on `a`, the rest on `b`."""
    if topology == "flat":
        return ["a"] * n_hosts
    n_a = (n_hosts + 1) // 2
    return ["a"] * n_a + ["b"] * (n_hosts - n_a)
