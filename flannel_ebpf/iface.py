"""Choosing the underlay interface as flanneld does: --iface (name or IP, in order), then --iface-regex,
else the interface of the default route. --public-ip overrides what other hosts use to reach us."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute

from flannel_ebpf.backends.base import ExternalInterface


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
    return links


def _default_route_index(ipr: IPRoute) -> int | None:
    for route in ipr.get_default_routes(family=socket.AF_INET):
        oif = route.get_attr("RTA_OIF")
        if oif:
            return oif
    return None


def choose_interface(
    ifaces: list[str] | None = None, regexes: list[str] | None = None, public_ip: str = ""
) -> ExternalInterface:
    with IPRoute() as ipr:
        links = _links(ipr)
        chosen: tuple[_Link, IPv4Address | None] | None = None
        for spec in ifaces or []:
            try:
                wanted = IPv4Address(spec)
            except ValueError:
                wanted = None
            for link in links:
                if (wanted is not None and wanted in link.addresses) or (link.name == spec and link.addresses):
                    chosen = (link, wanted)
                    break
            if chosen:
                break
        for pattern in (regexes or []) if chosen is None else []:
            rx = re.compile(pattern)
            for link in links:
                hit = next((a for a in link.addresses if rx.fullmatch(str(a))), None)
                if hit or (rx.fullmatch(link.name) and link.addresses):
                    chosen = (link, hit)
                    break
            if chosen:
                break
        # As flanneld: the --iface list first, then the regexes; only when all of them miss is it an error.
        if chosen is None and (ifaces or regexes):
            tried = [f"--iface {i}" for i in ifaces or []] + [f"--iface-regex {r}" for r in regexes or []]
            raise InterfaceError(f"no interface with an IPv4 address matches {', '.join(tried)}")
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
