"""The network config at `<prefix>/config`: parse, apply flannel's defaults, validate. Pure code.

The rules are flanneld v0.20.2's (subnet/config.go), plus checks flanneld lacks (SubnetMin > SubnetMax,
unknown backend type at parse time, wrong JSON types). Every problem is one `ConfigError` whose message
is a single line the operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_ebpf.bounded_json import load_bounded_json

KNOWN_BACKENDS = ("udp", "vxlan", "host-gw", "alloc", "aws-vpc", "gce")
#: The network config is a few hundred bytes; refuse anything absurd before parsing it.
MAX_CONFIG_BYTES = 64 * 1024
#: Below this, UDP ports belong to the host's own services (DNS 53, DHCP 67/68, NTP 123, SNMP 161,
#: syslog 514, ...). The udp backend's decapsulation takes every datagram to its port from a member
#: host, so such a port would swallow that service's traffic: refused.
FIRST_OVERLAY_PORT = 1024
#: Ports >= 1024 that other tunnels or common services use: allowed, with a warning.
SHARED_UDP_PORTS = {
    1900: "SSDP",
    4500: "IPsec NAT traversal",
    4789: "IANA VXLAN",
    5353: "mDNS",
    5355: "LLMNR",
    6081: "Geneve",
    8472: "Linux/flannel vxlan",
    51820: "WireGuard",
}


class ConfigError(ValueError):
    """The network config is invalid; the message says what to fix."""


# Addresses that can never be a host's PublicIP, nor lie inside an overlay Network: packets to them never
# leave the host (loopback, "this network"), are never routed (link-local: valid on one link only, and home
# of cloud metadata services), or are not unicast at all (multicast, class E with 255.255.255.255).
UNUSABLE_RANGES: tuple[tuple[IPv4Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (IPv4Network("240.0.0.0/4"), "reserved class E / broadcast (240.0.0.0/4)"),
)


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict)  # the whole `Backend` object, incl. `Type`
    #: things that work but are probably a mistake: the agent logs each once at start
    warnings: tuple[str, ...] = field(default=(), compare=False)
    #: whether the config sets SubnetLen itself (else it is the default of `subnet_len_rule`)
    subnet_len_given: bool = field(default=True, compare=False)
    subnet_len_rule: str = field(default="v0.20", compare=False)

    def other_rule_subnet_len(self) -> int | None:
        """The SubnetLen the other era's flanneld derives from this Network (None: SubnetLen is set, or
        both eras agree): a peer lease of that length means hosts of both eras share one store."""
        if self.subnet_len_given:
            return None
        other = default_subnet_len(self.network, "v0.5" if self.subnet_len_rule == "v0.20" else "v0.20")
        return other if other != self.subnet_len else None

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """Whether a (leased) subnet fits this config: right length, inside [SubnetMin, SubnetMax]."""
        return (
            subnet.prefixlen == self.subnet_len
            and subnet.subnet_of(self.network)
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


#: the default SubnetLen rules: flanneld v0.5-v0.9 (etcd v2 era) and v0.10+ (v0.20.2: flannel-ebpf's v3 default)
SUBNET_LEN_RULES = ("v0.5", "v0.20")


def default_subnet_len(network: IPv4Network, rule: str = "v0.20") -> int:
    """The SubnetLen flanneld derives when the config sets none. v0.5 (to v0.9): a /24 for a Network
    shorter than /24, else one bit longer than the Network. v0.10 on (v0.20.2): a /24 for a Network of /22
    or shorter, else two bits longer. They differ for /23 to /28 Networks."""
    if rule == "v0.5":
        return 24 if network.prefixlen < 24 else network.prefixlen + 1
    return 24 if network.prefixlen <= 22 else network.prefixlen + 2


def _ipv4(value: Any, name: str) -> IPv4Address:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an IPv4 address string, got {value!r}")
    try:
        return IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{name} is not an IPv4 address: {value!r}") from None


def _given_address(doc: dict[str, Any], name: str) -> bool:
    """Whether `name` is set; "0.0.0.0" (flanneld's zero value, written out by some tools) is unset."""
    return name in doc and doc[name] != "0.0.0.0"


def network_problem(network: IPv4Network) -> str | None:
    """Why `network` can never be an overlay (None when it can): it covers addresses that are never
    routed between hosts, so its route would hijack them or its subnets could never be reached."""
    if network.prefixlen == 0:
        return f"Network {network} covers the whole IPv4 space, the host's own addresses and routes included"
    for bad, what in UNUSABLE_RANGES:
        if network.overlaps(bad):
            return f"Network {network} overlaps {what}, which can never be routed through an overlay"
    return None


def udp_port_problem(port: int) -> str | None:
    """Why a udp backend Port is refused (None when it is accepted)."""
    if port < FIRST_OVERLAY_PORT:
        return (
            f"Backend.Port {port} is a well-known port (below {FIRST_OVERLAY_PORT}) that belongs to the host's "
            "own services: the udp backend's decapsulation would swallow their traffic; use a port >= "
            f"{FIRST_OVERLAY_PORT} (flannel's default is 8285)"
        )
    return None


def udp_port_warning(port: int) -> str | None:
    if port in SHARED_UDP_PORTS:
        return (
            f"Backend.Port {port} is also used by {SHARED_UDP_PORTS[port]}: if this host runs it too, the udp "
            "backend's decapsulation takes its datagrams from member hosts"
        )
    return None


def parse_config(raw: bytes | str, subnet_len_rule: str = "v0.20") -> NetworkConfig:
    """Parse and validate the JSON at `<prefix>/config`. `subnet_len_rule` ("v0.20" or "v0.5"): the
    flanneld era whose default SubnetLen applies when the config sets none (default_subnet_len)."""
    if subnet_len_rule not in SUBNET_LEN_RULES:
        raise ValueError(f"unknown SubnetLen rule {subnet_len_rule!r}; known: {', '.join(SUBNET_LEN_RULES)}")
    try:
        doc = load_bounded_json(raw, "network config", MAX_CONFIG_BYTES)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(doc, dict):
        raise ConfigError("network config must be a JSON object")

    if doc.get("EnableIPv6"):
        raise ConfigError("EnableIPv6 is not supported by flannel-ebpf (IPv4 overlays only)")
    if doc.get("EnableIPv4") is False:
        raise ConfigError("EnableIPv4 is false: flannel-ebpf only runs IPv4 overlays")

    raw_network = doc.get("Network")
    if not raw_network:
        raise ConfigError("please define a correct Network parameter in the network config (e.g. 10.5.0.0/16)")
    if not isinstance(raw_network, str):
        raise ConfigError(f"Network must be a CIDR string, got {raw_network!r}")
    try:
        network = IPv4Network(raw_network, strict=False)
    except ValueError:
        raise ConfigError(f"Network is not an IPv4 CIDR: {raw_network!r}") from None
    problem = network_problem(network)
    if problem:
        raise ConfigError(problem)

    subnet_len = doc.get("SubnetLen", 0)
    subnet_len_given = bool(subnet_len)
    if isinstance(subnet_len, bool) or not isinstance(subnet_len, int) or subnet_len < 0:
        raise ConfigError(f"SubnetLen must be a positive integer, got {subnet_len!r}")
    if subnet_len:
        if subnet_len > 30:
            raise ConfigError(f"SubnetLen must be /30 or shorter, got /{subnet_len}")
        # The first subnet is never leased, so the network must hold at least four subnets.
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"SubnetLen /{subnet_len} is too short for Network {network}: it must be at least "
                f"/{network.prefixlen + 2} (the network must hold at least four subnets)"
            )
    elif network.prefixlen > 28:
        raise ConfigError(f"Network {network} is too small: the smallest useful network is a /28")
    else:
        subnet_len = default_subnet_len(network, subnet_len_rule)

    subnet_size = 1 << (32 - subnet_len)
    # flanneld keeps SubnetMin/SubnetMax as integers where 0 means unset: "0.0.0.0" is the default too.
    if _given_address(doc, "SubnetMin"):
        subnet_min = _ipv4(doc["SubnetMin"], "SubnetMin")
        if subnet_min not in network:
            raise ConfigError(f"SubnetMin {subnet_min} is not inside Network {network}")
    else:
        # Skip the first subnet: its network address would equal the overlay's own network address.
        subnet_min = network.network_address + subnet_size
    if _given_address(doc, "SubnetMax"):
        subnet_max = _ipv4(doc["SubnetMax"], "SubnetMax")
        if subnet_max not in network:
            raise ConfigError(f"SubnetMax {subnet_max} is not inside Network {network}")
    else:
        # int arithmetic: broadcast + 1 overflows IPv4Address for a Network at the top of the space
        subnet_max = IPv4Address(int(network.broadcast_address) + 1 - subnet_size)
    for name, value in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
        if int(value) % subnet_size:
            raise ConfigError(f"{name} {value} is not on a /{subnet_len} boundary")
    if subnet_min > subnet_max:
        raise ConfigError(f"SubnetMin {subnet_min} is above SubnetMax {subnet_max}: no subnet can be leased")

    backend = doc.get("Backend")
    if backend is None:
        backend = {}
    if not isinstance(backend, dict):
        raise ConfigError(f"Backend must be a JSON object, got {backend!r}")
    raw_type = backend.get("Type") or "udp"
    if not isinstance(raw_type, str):
        raise ConfigError(f"Backend.Type must be a string, got {raw_type!r}")
    # flanneld looks backends up by the lower-cased Type: "VXLAN" and "Host-GW" work there, so here too.
    backend_type = raw_type.lower()
    if backend_type not in KNOWN_BACKENDS:
        raise ConfigError(f"unknown backend type {raw_type!r}; known: {', '.join(KNOWN_BACKENDS)}")
    backend = dict(backend)
    if "Type" in backend:
        backend["Type"] = backend_type  # the backends and the state file see the canonical name
    port = backend.get("Port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
        raise ConfigError(f"Backend.Port must be a UDP port number (1-65535), got {port!r}")
    if port == 0:
        # Go's zero value: flanneld's vxlan leaves the port to the kernel (8472). A Port the backends never
        # see means the same for every backend (udp: 8285), so it is dropped here rather than in each.
        del backend["Port"]
        port = None
    warnings: list[str] = []
    if backend_type == "udp" and port is not None:
        problem = udp_port_problem(port)
        if problem:
            raise ConfigError(problem)
        warning = udp_port_warning(port)
        if warning:
            warnings.append(warning)

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=backend_type,
        backend=backend,
        warnings=tuple(warnings),
        subnet_len_given=subnet_len_given,
        subnet_len_rule=subnet_len_rule,
    )
