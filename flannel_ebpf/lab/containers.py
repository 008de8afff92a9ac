"""Containers as Docker would make them with `--bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU`.

The host namespace gets a bridge `docker0` holding FLANNEL_SUBNET's address (the gateway, e.g.
10.5.34.1/24) with MTU FLANNEL_MTU; each container is a namespace of its own with `eth0` (a veth whose
peer is a port of docker0), the next free address of the subnet, MTU FLANNEL_MTU and a default route via
the bridge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from loguru import logger

from .netns import ExecResult, Netns, create_netns, veth_between
from .topology import Host

BRIDGE = "docker0"


@dataclass(frozen=True)
class SubnetEnv:
    """The subnet file flannel writes (`/run/flannel/subnet.env`)."""

    network: IPv4Network
    subnet: IPv4Interface  # the host's gateway address with the subnet length: 10.5.34.1/24
    mtu: int
    ipmasq: bool
    raw: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        env: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip('"')
        try:
            return cls(
                network=IPv4Network(env["FLANNEL_NETWORK"]),
                subnet=IPv4Interface(env["FLANNEL_SUBNET"]),
                mtu=int(env["FLANNEL_MTU"]),
                ipmasq=env.get("FLANNEL_IPMASQ", "false").lower() == "true",
                raw=env,
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"not a flannel subnet file ({e}): {text!r}") from e

    @classmethod
    def read(cls, path: Path) -> SubnetEnv:
        return cls.parse(path.read_text())

    @staticmethod
    def render(network: str, subnet: str, mtu: int, ipmasq: bool = False) -> str:
        """A subnet file as flannel writes it (for tests that run without an agent)."""
        return (
            f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={subnet}\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n"
        )


@dataclass
class Container:
    name: str  # e.g. h1c1
    host: Host
    ns: Netns
    ip: IPv4Address
    gateway: IPv4Address
    mtu: int
    host_veth: str

    @property
    def netns(self) -> str:
        return self.ns.name

    def exec(self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> ExecResult:
        return self.ns.exec(argv, timeout=timeout, check=check)

    def __str__(self) -> str:
        return f"{self.name}({self.ip})"


def ensure_bridge(host: Host, env: SubnetEnv, bridge: str = BRIDGE) -> None:
    """Create or re-address the bridge to match the subnet file (a new lease means a new --bip)."""
    node = host.node
    assert isinstance(node, Netns)
    link = node.ip("-o", "link", "show", bridge, check=False)
    if not link.ok:
        node.ip("link", "add", bridge, "type", "bridge")
    addrs = node.ip("-o", "-4", "addr", "show", "dev", bridge).stdout
    if str(env.subnet) not in addrs.split():
        node.ip("addr", "flush", "dev", bridge)
        node.ip("addr", "add", str(env.subnet), "dev", bridge)
    node.ip("link", "set", bridge, "mtu", str(env.mtu))
    node.ip("link", "set", bridge, "up")


def make_container(host: Host, name: str, env: SubnetEnv, used: set[IPv4Address], bridge: str = BRIDGE) -> Container:
    """A container namespace on `host`, addressed from `env`, a port of `bridge`; `used` are addresses
    already taken."""
    node = host.node
    assert isinstance(node, Netns)
    ensure_bridge(host, env, bridge)
    # Docker hands out the subnet's addresses in order, skipping the bridge's own.
    free = (a for a in env.subnet.network.hosts() if a != env.subnet.ip and a not in used)
    ip = next(free, None)
    if ip is None:
        raise RuntimeError(f"{host.name}: no free address left in {env.subnet.network}")
    prefix = node.name.rsplit("-", 1)[0]
    ns = create_netns(f"{prefix}-{name}", node.scratch_dir)
    host_veth = f"veth{name}"[:15]
    # Created inside the container namespace, the peer born in the host namespace.
    veth_between(ns, "eth0", node, host_veth, mtu=env.mtu)
    node.ip("link", "set", host_veth, "master", bridge, "up")
    ns.ip("addr", "add", f"{ip}/{env.subnet.network.prefixlen}", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "default", "via", str(env.subnet.ip), "dev", "eth0")
    logger.debug("container {} on {}: {} mtu {}", name, host.name, ip, env.mtu)
    return Container(name, host, ns, ip, env.subnet.ip, env.mtu, host_veth)
