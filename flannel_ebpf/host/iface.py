"""Choosing the underlay interface as flanneld v0.20.2 does.

Precedence (flanneld's): when none of --iface, --iface-regex, --iface-can-reach is given, the interface
holding --public-ip if one does, else the interface of the default route. Otherwise each --iface in
order (an IPv4 address: the interface holding it; else an interface name), then each --iface-regex in
order, then --iface-can-reach; the first that yields an interface with an IPv4 address wins, and when all
of them miss it is an error. --public-ip only overrides what other hosts use to reach us.

A regex is matched unanchored, as Go's regexp.MatchString (`eth` matches `eth0`, `^192\\.168\\.` matches
192.168.1.5). For each regex, every interface's addresses are tried first (interfaces in index order),
and only then every interface's name.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.host.types import ExternalInterface


class InterfaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Link:
    name: str
    index: int
    mtu: int
    addresses: tuple[IPv4Address, ...]


def _links(ipr: IPRoute) -> list[_Link]:
    addresses: dict[int, list[IPv4Address]] = {}
    for msg in ipr.get_addr(family=socket.AF_INET):
        # IFA_LOCAL is our own address; IFA_ADDRESS is the far end's on a point-to-point link.
        address = IPv4Address(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
        if not (address.is_loopback or address.is_link_local):
            addresses.setdefault(msg["index"], []).append(address)
    links = []
    for msg in ipr.get_links():
        links.append(
            _Link(
                name=msg.get_attr("IFLA_IFNAME"),
                index=msg["index"],
                mtu=msg.get_attr("IFLA_MTU"),
                addresses=tuple(addresses.get(msg["index"], ())),
            )
        )
    return sorted(links, key=lambda lk: lk.index)  # Go's net.Interfaces() order


def _default_route_index(ipr: IPRoute) -> int | None:
    for route in ipr.get_default_routes(family=socket.AF_INET):
        oif: int | None = route.get_attr("RTA_OIF")
        if oif:
            return oif
    return None


_Choice = tuple[_Link, IPv4Address | None]


def _by_iface(links: list[_Link], spec: str) -> _Choice | None:
    """--iface: an IPv4 address names the interface holding it (and that address); else a name."""
    try:
        wanted: IPv4Address | None = IPv4Address(spec)
    except ValueError:
        wanted = None
    for link in links:
        if wanted is not None and wanted in link.addresses:
            return link, wanted
        if wanted is None and link.name == spec and link.addresses:
            return link, None
    return None


def _by_regex(links: list[_Link], pattern: str) -> _Choice | None:
    """--iface-regex: first every interface's addresses, then every interface's name (flanneld's order).
    An interface without an IPv4 address is passed over (flanneld would take it and then fail)."""
    rx = re.compile(pattern)
    for link in links:
        hit = next((a for a in link.addresses if rx.search(str(a))), None)
        if hit is not None:
            return link, hit
    for link in links:
        if link.addresses and rx.search(link.name):
            return link, None
    return None


def _by_route(ipr: IPRoute, links: list[_Link], destination: str) -> _Choice | None:
    """--iface-can-reach: the interface and source address the kernel's route lookup picks for
    `destination`, as `ip route get` shows them."""
    try:
        routes = ipr.route("get", dst=destination)
    except NetlinkError as e:  # e.g. ENETUNREACH: no route at all
        logger.info("no route to --iface-can-reach {}: {}", destination, e)
        return None
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        link = next((lk for lk in links if lk.index == oif), None)
        if link is None:
            continue
        src = route.get_attr("RTA_PREFSRC")
        return link, IPv4Address(src) if src else None
    return None


def choose_interface(
    ifaces: list[str] | None = None,
    regexes: list[str] | None = None,
    public_ip: str = "",
    can_reach: str = "",
) -> ExternalInterface:
    ifaces, regexes = list(ifaces or []), list(regexes or [])
    with IPRoute() as ipr:
        links = _links(ipr)
        chosen: _Choice | None = None
        if ifaces or regexes or can_reach:
            for spec in ifaces:
                chosen = _by_iface(links, spec)
                if chosen:
                    break
                logger.info("no interface with an IPv4 address matches --iface {}", spec)
            for pattern in regexes if chosen is None else []:
                chosen = _by_regex(links, pattern)
                if chosen:
                    break
                logger.info("no interface name or IPv4 address matches --iface-regex {}", pattern)
            if chosen is None and can_reach:
                chosen = _by_route(ipr, links, can_reach)
            if chosen is None:
                tried = [f"--iface {i}" for i in ifaces] + [f"--iface-regex {r}" for r in regexes]
                tried += [f"--iface-can-reach {can_reach}"] if can_reach else []
                available = ", ".join(f"{lk.name}:{'/'.join(map(str, lk.addresses)) or '-'}" for lk in links)
                raise InterfaceError(
                    f"no interface with an IPv4 address matches {', '.join(tried)} (interfaces: {available})"
                )
        else:
            if public_ip:
                # flanneld looks for the interface holding --public-ip (and fails when none does); a
                # public IP that is NATed to this host is no interface's, so then the default route's.
                chosen = _by_iface(links, public_ip)
            if chosen is None:
                index = _default_route_index(ipr)
                link = next((lk for lk in links if lk.index == index), None)
                if link is None:
                    raise InterfaceError("no default route to pick an interface from; pass --iface")
                chosen = (link, None)
    link, address = chosen
    if address is None:
        if not link.addresses:
            raise InterfaceError(f"interface {link.name} has no IPv4 address")
        address = link.addresses[0]
    public = IPv4Address(public_ip) if public_ip else address
    return ExternalInterface(name=link.name, index=link.index, address=address, public_ip=public, mtu=link.mtu)
