"""flannel0 of the eBPF udp path, as flanneld makes it: a TUN that nobody reads (the encap program on its
egress takes every packet), the lease's network address as /32, MTU = underlay MTU - 28, the route
`<Network> dev flannel0` (proto 102), and the per-device sysctls it needs."""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from ipaddress import IPv4Network
from pathlib import Path

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.backends.base import BackendError
from flannel_ebpf.host.types import LocalNetwork
from flannel_ebpf.netlink.routes import ROUTE_PROTOCOL

DEVICE = "flannel0"
OVERHEAD = 28  # outer IPv4 (20) + UDP (8): flannel's udp encapsulation
_FLANNELD_TUN_RE = re.compile(r"^flannel\d+$")
_IFF_LOWER_UP = 1 << 16


def sysctl(path: str, value: str) -> None:
    """Set a per-device sysctl of our own device (in the caller's namespace); a failure is logged."""
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as e:
        logger.warning("cannot set {} = {}: {}", path.replace("/", "."), value, e)


def configure_device(local: LocalNetwork, route_now: bool = True) -> int:
    """flannel0 as flanneld makes it: TUN, lease network address /32, route <Network>, MTU - 28.
    `route_now=False`: the route waits for the encap (`route_network`), so a Network routed to
    another live device (a flanneld's flannel1) keeps its route until flannel0 can carry packets."""
    mtu = local.ext.mtu - OVERHEAD
    address = str(local.subnet.network_address)
    with IPRoute() as ipr:
        index: int | None = next(iter(ipr.link_lookup(ifname=DEVICE)), None)
        if index is None:
            try:
                ipr.link("add", ifname=DEVICE, kind="tuntap", mode="tun")  # persistent, no reader
            except NetlinkError as e:
                raise BackendError(f"udp (eBPF): cannot create TUN {DEVICE}: {e}") from e
            index = int(ipr.link_lookup(ifname=DEVICE)[0])
        # No IPv6 on the overlay device: it would only send router solicitations into the encap.
        sysctl(f"net/ipv6/conf/{DEVICE}/disable_ipv6", "1")
        # Our ICMP errors (no peer, frag needed) come back in on flannel0 from flannel0's own address.
        sysctl(f"net/ipv4/conf/{DEVICE}/accept_local", "1")
        ipr.link("set", index=index, mtu=mtu, state="up")
        for addr in ipr.get_addr(family=socket.AF_INET, index=index):
            have = (addr.get_attr("IFA_ADDRESS"), addr["prefixlen"])
            if have != (address, 32):
                ipr.addr("del", index=index, address=have[0], prefixlen=have[1])
        try:
            ipr.addr("add", index=index, address=address, prefixlen=32)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise BackendError(f"udp (eBPF): cannot address {DEVICE}: {e}") from e
        for route in ipr.get_routes(family=socket.AF_INET, oif=index, proto=ROUTE_PROTOCOL):
            dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            if dst != str(local.network):
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=dst, oif=index, proto=ROUTE_PROTOCOL)
    if route_now:
        route_network(index, local.network)
    return index


def route_network(index: int, network: IPv4Network) -> None:
    """`<Network> dev flannel0`, replacing in place whatever route the Network had (flanneld's)."""
    with IPRoute() as ipr:
        try:
            ipr.route("replace", dst=str(network), oif=index, proto=ROUTE_PROTOCOL)
        except NetlinkError as e:
            raise BackendError(f"udp (eBPF): cannot route {network} to {DEVICE}: {e}") from e


def route_to_other_tun(network: IPv4Network) -> None:
    """`down --keep-datapath`: the Network's route moved in place onto a flanneld's own TUN, if one runs."""
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            # flanneld's: flannel<N>, a TUN that a process reads (carrier up); ours has no reader
            if name == DEVICE or not _FLANNELD_TUN_RE.match(name) or kind != "tun":
                continue
            if not link["flags"] & _IFF_LOWER_UP:
                continue
            try:
                ipr.route("replace", dst=str(network), oif=link["index"])
            except NetlinkError as e:
                logger.warning("udp (eBPF): cannot move the route of {} to {}: {}", network, name, e)
                return
            logger.info("udp (eBPF): route {} moved to {} (flanneld's TUN) before removing ours", network, name)
            return
    logger.info("udp (eBPF): no flanneld TUN yet: the route of {} goes with {}", network, DEVICE)
