"""`/run/flannel/subnet.env`: what Docker/CNI read to address containers. Same variables as flanneld."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

from flannel_ebpf.host.files import atomic_write
from flannel_ebpf.subnet.allocation import gateway_address


def render(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    gateway = IPv4Interface((gateway_address(subnet), subnet.prefixlen))
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={gateway}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"
    )


def write(path: str, network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> None:
    atomic_write(path, render(network, subnet, mtu, ip_masq))


def read(path: str) -> dict[str, str]:
    """The variables of an existing subnet file ({} if there is none or it cannot be read)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def previous_subnet(path: str) -> IPv4Network | None:
    """The subnet this host used last time (FLANNEL_SUBNET's network), if the file says so."""
    raw = read(path).get("FLANNEL_SUBNET")
    if not raw:
        return None
    try:
        return IPv4Interface(raw).network
    except ValueError:
        return None
