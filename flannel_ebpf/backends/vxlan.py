"""The `vxlan` backend: the kernel's VXLAN device `flannel.<VNI>`, programmed over netlink.

Device (as flanneld v0.20.2): VNI `VNI` (default 1), UDP port `Port` (default 8472, the Linux default),
learning off unless `Learning`, `GBP` if asked, local = the external interface's own address (as flanneld:
with --public-ip behind NAT the outer source must still be an address this host owns), dev = the external
interface; MTU = underlay MTU - 50; it holds the lease's network address as a /32.

Per peer lease (BackendData `{"VNI":1,"VtepMAC":"…"}`):
  route  `<subnet> via <subnet network address> dev flannel.<VNI> onlink proto 102`
  neigh  `<subnet network address> lladdr <VtepMAC> permanent` on flannel.<VNI>
  fdb    `<VtepMAC> dst <PublicIP> self permanent` on flannel.<VNI>
With `DirectRouting` and the peer on a network directly connected to the external interface, a host-gw
route replaces all three.

Every write is compare-then-write against the kernel, so a restarted agent (start + sync) adopts what the
previous one left without flapping a single entry.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Any

from loguru import logger
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.backends.base import BackendError, RoutedBackend
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.peers import NUD_PERMANENT, FdbEntry, Neighbour
from flannel_ebpf.netlink.routes import (
    RouteSpec,
    host_gw_route,
    vxlan_route,
)
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, short_repr

#: VXLAN (50) = outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
ENCAP_OVERHEAD = 50
DEFAULT_VNI = 1
#: the port Linux uses when none is given (IANA's 4789 is not the kernel default); flanneld relies on it
LINUX_DEFAULT_PORT = 8472
#: how much of a peer's bad value a log line quotes
SHORT_LIMIT = 40
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC (as flanneld's pkg/mac)."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def parse_mac(value: Any) -> str:
    """Normalise a VtepMAC from a lease to lower-case `aa:bb:…`; ValueError if it is not a unicast MAC."""
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
        raise ValueError(f"VtepMAC {short_repr(value, SHORT_LIMIT)} is not a MAC address")
    mac = value.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 0x01:
        raise ValueError(f"VtepMAC {mac} is a multicast/broadcast address")
    if mac == "00:00:00:00:00:00":
        raise ValueError("VtepMAC is all zeros")
    return mac


@dataclass(frozen=True)
class VxlanConfig:
    """The `Backend` section of the network config, as flanneld reads it for vxlan."""

    vni: int = DEFAULT_VNI
    port: int = 0  # 0: the kernel's default (8472)
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False

    @classmethod
    def from_backend_config(cls, cfg: dict[str, Any]) -> VxlanConfig:
        def get_int(key: str, default: int, lo: int, hi: int) -> int:
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise BackendError(f"vxlan: Backend.{key} must be an integer in [{lo}, {hi}], got {value!r}")
            return value

        def get_bool(key: str) -> bool:
            value = cfg.get(key, False)
            if not isinstance(value, bool):
                raise BackendError(f"vxlan: Backend.{key} must be true or false, got {value!r}")
            return value

        return cls(
            vni=get_int("VNI", DEFAULT_VNI, 0, 0xFFFFFF),
            port=get_int("Port", 0, 0, 65535),
            gbp=get_bool("GBP"),
            learning=get_bool("Learning"),
            direct_routing=get_bool("DirectRouting"),
        )

    @property
    def device_name(self) -> str:
        return f"flannel.{self.vni}"

    @property
    def effective_port(self) -> int:
        return self.port or LINUX_DEFAULT_PORT


@dataclass(frozen=True)
class VxlanPeer:
    """What one peer lease puts in the kernel."""

    subnet: IPv4Network
    public_ip: IPv4Address
    vtep_mac: str | None  # None for a DirectRouting peer
    route: RouteSpec

    @property
    def direct(self) -> bool:
        return self.vtep_mac is None

    def info(self) -> dict[str, Any]:
        return {
            "public_ip": str(self.public_ip),
            "vtep_mac": self.vtep_mac,
            "direct_routing": self.direct,
            "route": self.route.describe(),
        }


class ProgrammedPeers(dict[IPv4Network, "VxlanPeer"]):
    """The peers programmed in the kernel, by subnet, with an index of who uses which VtepMAC: a watch
    event asks "who else has this MAC?", which must not cost a scan of 10,000 peers."""

    def __init__(self) -> None:
        super().__init__()
        self._by_mac: dict[str, set[IPv4Network]] = {}

    def __setitem__(self, subnet: IPv4Network, peer: VxlanPeer) -> None:
        self.pop(subnet, None)
        super().__setitem__(subnet, peer)
        if peer.vtep_mac:
            self._by_mac.setdefault(peer.vtep_mac, set()).add(subnet)

    def pop(self, subnet: IPv4Network, default: Any = None) -> Any:
        peer = super().pop(subnet, default)
        if peer is not default and peer.vtep_mac:
            users = self._by_mac.get(peer.vtep_mac, set())
            users.discard(subnet)
            if not users:
                self._by_mac.pop(peer.vtep_mac, None)
        return peer

    def clear(self) -> None:
        super().clear()
        self._by_mac.clear()

    def other_with_mac(self, mac: str, except_subnet: IPv4Network) -> VxlanPeer | None:
        """Another programmed peer that uses `mac` (any one of them), or None."""
        return next((self[s] for s in self._by_mac.get(mac, ()) if s != except_subnet), None)


def _linkinfo(link: Any) -> tuple[str | None, Any]:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None, None
    return info.get_attr("IFLA_INFO_KIND"), info.get_attr("IFLA_INFO_DATA")


class VxlanBackend(RoutedBackend):
    type_name = "vxlan"

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        self.cfg = VxlanConfig.from_backend_config(backend_config)
        self.ifindex: int | None = None
        self.vtep_mac: str | None = None
        self._peers = ProgrammedPeers()  # programmed in the kernel
        self._vni_warned: set[tuple[IPv4Network, Any]] = set()

    def overhead(self) -> int:
        return ENCAP_OVERHEAD

    # ------------------------------------------------------------------------------------------------
    # the device

    def _incompatibility(self, link: Any, ext: ExternalInterface) -> str | None:
        """Why an existing `flannel.<VNI>` cannot be adopted, or None (as flanneld's vxlanLinksIncompat,
        plus learning, which decides whether unknown MACs are flooded)."""
        kind, data = _linkinfo(link)
        if kind != "vxlan" or data is None:
            return f"it is a {kind or 'non-vxlan'} device"
        checks: list[tuple[str, Any, Any]] = [
            ("vni", data.get_attr("IFLA_VXLAN_ID"), self.cfg.vni),
            ("external interface", data.get_attr("IFLA_VXLAN_LINK"), ext.index),
            ("local address", data.get_attr("IFLA_VXLAN_LOCAL"), str(ext.address)),
            ("port", data.get_attr("IFLA_VXLAN_PORT"), self.cfg.effective_port),
            ("gbp", data.get_attr("IFLA_VXLAN_GBP") is not None, self.cfg.gbp),
            ("learning", bool(data.get_attr("IFLA_VXLAN_LEARNING")), self.cfg.learning),
            ("group", data.get_attr("IFLA_VXLAN_GROUP") or None, None),
            ("l2miss", bool(data.get_attr("IFLA_VXLAN_L2MISS")), False),
        ]
        for what, have, want in checks:
            if have != want:
                return f"{what} is {have}, want {want}"
        return None

    def _create_device(self, ext: ExternalInterface, mac: str) -> None:
        kwargs: dict[str, Any] = {
            "ifname": self.cfg.device_name,
            "kind": "vxlan",
            "address": mac,
            "mtu": ext.mtu - ENCAP_OVERHEAD,
            "vxlan_id": self.cfg.vni,
            "vxlan_link": ext.index,
            "vxlan_local": str(ext.address),
            "vxlan_port": self.cfg.effective_port,
            "vxlan_learning": 1 if self.cfg.learning else 0,
        }
        if self.cfg.gbp:
            kwargs["vxlan_gbp"] = True
        self.ipr.link("add", **kwargs)

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        self.ext = ext
        name = self.cfg.device_name
        links = self.ipr.get_links(ifname=name) if self.ipr.link_lookup(ifname=name) else []
        if links:
            existing = links[0]
            mac = existing.get_attr("IFLA_ADDRESS")
            why = self._incompatibility(existing, ext)
            if why is None:
                logger.info("vxlan: adopting existing {} (VtepMAC {})", name, mac)
            else:
                # recreate, but keep the MAC: peers' FDB entries for us stay valid
                logger.warning("vxlan: {} exists with an incompatible configuration ({}); recreating it", name, why)
                self.ipr.link("del", index=existing["index"])
                self._create_device(ext, mac)
        else:
            mac = random_vtep_mac()
            self._create_device(ext, mac)
            logger.info(
                "vxlan: created {} (VNI {}, port {}, local {}, dev {}, VtepMAC {})",
                name,
                self.cfg.vni,
                self.cfg.effective_port,
                ext.address,
                ext.name,
                mac,
            )
        self.ifindex = self.ipr.link_lookup(ifname=name)[0]
        self.vtep_mac = self.ipr.get_links(self.ifindex)[0].get_attr("IFLA_ADDRESS")
        # IPv6 router advertisements have no business on a tunnel device (flanneld turns them off too)
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass
        # field names and order as flanneld's vxlanLeaseAttrs: {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}
        return LeaseAttrs(
            public_ip=ext.public_ip,
            backend_type=self.type_name,
            backend_data={"VNI": self.cfg.vni, "VtepMAC": self.vtep_mac},
        )

    def start(self, local: LocalNetwork) -> None:
        self._index()
        self.local = local
        self.ext = local.ext
        want = IPv4Network(f"{local.subnet.network_address}/32")
        # exactly one address of the overlay on the device: ours. A /32 creates no broadcast/subnet route.
        have_want = False
        for addr in self.ipr.get_addr(family=AF_INET, index=self.ifindex):
            a = IPv4Address(addr.get_attr("IFA_ADDRESS"))
            if a == want.network_address and addr["prefixlen"] == 32:
                have_want = True
            elif a in local.network:
                logger.info("vxlan: removing stale address {}/{} from {}", a, addr["prefixlen"], self.cfg.device_name)
                self.ipr.addr("del", index=self.ifindex, address=str(a), prefixlen=addr["prefixlen"])
        if not have_want:
            self.ipr.addr("add", index=self.ifindex, address=str(want.network_address), prefixlen=32)
        mtu = local.ext.mtu - ENCAP_OVERHEAD
        self.ipr.link("set", index=self.ifindex, mtu=mtu, state="up")
        logger.info("vxlan: {} up, address {}, mtu {}", self.cfg.device_name, want, mtu)

    # ------------------------------------------------------------------------------------------------
    # peers: desired state

    def _evaluate(self, lease: Lease, mac_owner: Callable[[str], VxlanPeer | None]) -> VxlanPeer | None:
        """The peer to program for a lease, or None (the reason is in the book). `mac_owner(mac)`: a
        peer other than this lease's already holding that VtepMAC."""
        ext = self._checked_ext(lease)
        if ext is None:
            return None
        data = lease.attrs.backend_data
        if not isinstance(data, dict):
            self.book.skip(lease, "its lease has no BackendData (VNI, VtepMAC)")
            return None
        try:
            mac = parse_mac(data.get("VtepMAC"))
        except ValueError as e:
            self.book.skip(lease, f"invalid BackendData: {e}")
            return None
        vni = data.get("VNI")
        if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni <= 0xFFFFFF):
            # flanneld cannot decode such a lease either
            self.book.skip(
                lease, f"invalid BackendData: VNI {short_repr(vni, SHORT_LIMIT)} is not a VXLAN network identifier"
            )
            return None
        if vni is not None and vni != self.cfg.vni and (lease.subnet, vni) not in self._vni_warned:
            self._vni_warned.add((lease.subnet, vni))  # once per lease, not on every resync
            # flanneld ignores a peer's VNI; so do we, but a mismatch means its packets will not decap here
            logger.warning("vxlan: peer {} announces VNI {}, this host uses {}", lease.subnet, vni, self.cfg.vni)
        if self.cfg.direct_routing and self.netlink.reachability(lease.public_ip).directly_connected_on(ext.index):
            # same L2 segment: no encapsulation needed (flanneld's DirectRouting)
            route = host_gw_route(lease.subnet, lease.public_ip, ext.index)
            return VxlanPeer(lease.subnet, lease.public_ip, None, route)
        other = mac_owner(mac)
        if other is not None and other.subnet != lease.subnet and other.public_ip != lease.public_ip:
            # one FDB entry per MAC: two hosts claiming one VtepMAC cannot both be served
            self.book.refuse(lease, f"VtepMAC {mac} is already used by peer {other.subnet} ({other.public_ip})")
            return None
        return VxlanPeer(lease.subnet, lease.public_ip, mac, vxlan_route(lease.subnet, self._index()))

    # ------------------------------------------------------------------------------------------------
    # peers: Backend interface

    def _sync(self, peers: list[Lease]) -> None:
        claimed: dict[str, VxlanPeer] = {}  # VtepMAC -> the first peer (by subnet) that holds it

        def evaluate(lease: Lease) -> VxlanPeer | None:
            peer = self._evaluate(lease, claimed.get)
            if peer is not None and peer.vtep_mac:
                claimed.setdefault(peer.vtep_mac, peer)
            return peer

        desired = self._evaluate_each(sorted(peers, key=lambda x: x.subnet), evaluate)

        want_neigh = {p.subnet.network_address for p in desired.values() if p.vtep_mac}
        want_fdb = {p.vtep_mac for p in desired.values() if p.vtep_mac}
        # neighbours and FDB first, routes last: a route must never point at an unresolved next hop
        changes = 0
        index = self._index()
        for ip, (_mac, state) in self.netlink.neighbours(index).items():
            if ip not in want_neigh and state & NUD_PERMANENT:
                self.netlink.delete_neighbour(index, ip)
                changes += 1
        have_fdb = self.netlink.fdb(index)
        for mac in have_fdb:
            if mac not in want_fdb:
                self.netlink.delete_fdb(index, mac)
                changes += 1
        have_neigh = self.netlink.neighbours(index)
        # What is missing or wrong goes in one batch; a request the kernel refuses costs exactly that peer
        # (no route for it, below; the next resync retries it).
        requests: list[tuple[VxlanPeer, Neighbour | FdbEntry]] = []
        for peer in desired.values():
            if peer.vtep_mac is None:
                continue
            ip = peer.subnet.network_address
            if have_neigh.get(ip, ("", 0)) != (peer.vtep_mac, NUD_PERMANENT):
                requests.append((peer, Neighbour(ip, peer.vtep_mac)))
            if have_fdb.get(peer.vtep_mac) != peer.public_ip:
                requests.append((peer, FdbEntry(peer.vtep_mac, peer.public_ip)))
                have_fdb[peer.vtep_mac] = peer.public_ip
        failed: dict[IPv4Network, str] = {}
        for (peer, _entry), code in zip(requests, self.netlink.write(index, [e for _, e in requests]), strict=True):
            if code:
                failed[peer.subnet] = f"kernel refused its neighbour/FDB entry: {os.strerror(code)}"
        changes += len(requests)
        desired = {s: p for s, p in desired.items() if s not in failed}
        for subnet, reason in failed.items():
            self.book.refuse(self.book.leases[subnet], reason)
        result = self.netlink.reconcile_routes((p.route for p in desired.values()), self.route_scope(self.local))
        self._peers.clear()
        for subnet, peer in desired.items():
            lease = self.book.leases[subnet]
            if subnet in result.failed:
                self.book.refuse(lease, result.failed[subnet])
                continue
            self._peers[subnet] = peer
            self.book.accept(lease, peer.info())
        if changes or result.changed:
            logger.info(
                "vxlan: sync: {} neighbour/fdb changes; routes: {} added, {} replaced, {} removed, {} kept",
                changes,
                len(result.added),
                len(result.replaced),
                len(result.removed),
                result.unchanged,
            )

    def add_peer(self, lease: Lease) -> None:
        self.book.leases[lease.subnet] = lease
        try:
            new = self._evaluate(lease, lambda mac: self._peers.other_with_mac(mac, lease.subnet))
            old = self._peers.get(lease.subnet)
            if new is None:
                if old is not None:
                    self._unprogram(old)
                else:
                    self.netlink.delete_route(lease.subnet)
                return
            if new != old:
                self._program(new, old)
            self._peers[lease.subnet] = new
            self.book.accept(lease, new.info())
        except Exception as e:  # a peer must never take the agent down: record it, resync retries
            self._peers.pop(lease.subnet, None)
            self.book.refuse(lease, f"programming failed: {e}")

    def remove_peer(self, lease: Lease) -> None:
        self.book.forget(lease.subnet)
        old = self._peers.get(lease.subnet)
        if old is not None:
            self._unprogram(old)
        else:
            self.netlink.delete_route(lease.subnet)
        logger.info("vxlan: subnet removed: {}", lease.subnet)

    def _mac_in_use(self, mac: str, except_subnet: IPv4Network) -> bool:
        return self._peers.other_with_mac(mac, except_subnet) is not None

    def _program(self, new: VxlanPeer, old: VxlanPeer | None) -> None:
        index = self._index()
        if new.vtep_mac is not None:
            self.netlink.replace_neighbour(index, Neighbour(new.subnet.network_address, new.vtep_mac))
            self.netlink.replace_fdb(index, FdbEntry(new.vtep_mac, new.public_ip))
        self.netlink.replace_route(new.route)  # one replace: comparing first would dump every route per event
        if old is not None and old.vtep_mac is not None:
            if new.vtep_mac is None:
                self.netlink.delete_neighbour(index, old.subnet.network_address)
            if old.vtep_mac != new.vtep_mac and not self._mac_in_use(old.vtep_mac, old.subnet):
                self.netlink.delete_fdb(index, old.vtep_mac)

    def _unprogram(self, old: VxlanPeer) -> None:
        self.netlink.delete_route(old.subnet)
        if old.vtep_mac is not None:
            index = self._index()
            self.netlink.drop_nexthop(old.route.gateway)
            self.netlink.delete_neighbour(index, old.subnet.network_address)
            if not self._mac_in_use(old.vtep_mac, old.subnet):
                self.netlink.delete_fdb(index, old.vtep_mac)
        self._peers.pop(old.subnet, None)

    # ------------------------------------------------------------------------------------------------

    def teardown(self, local: LocalNetwork | None) -> None:
        name = self.cfg.device_name
        for index in self.ipr.link_lookup(ifname=name):
            kind, _ = _linkinfo(self.ipr.get_links(index)[0])
            if kind == "vxlan":
                # its neighbours, FDB entries and the routes through it go with it
                self.ipr.link("del", index=index)
                logger.info("vxlan: deleted {}", name)
        count = self.netlink.delete_all_routes(self.route_scope(local))  # DirectRouting's, on the ext iface
        if count:
            logger.info("vxlan: teardown removed {} direct routes", count)
        self.ifindex = None
        self._peers.clear()
        self.stop()

    def status(self) -> dict[str, Any]:
        device: dict[str, Any] | None = None
        if self.ifindex is not None:
            try:
                link = self.ipr.get_links(self.ifindex)[0]
                device = {
                    "name": link.get_attr("IFLA_IFNAME"),
                    "index": self.ifindex,
                    "vtep_mac": link.get_attr("IFLA_ADDRESS"),
                    "mtu": link.get_attr("IFLA_MTU"),
                    "state": link.get_attr("IFLA_OPERSTATE"),
                    "vni": self.cfg.vni,
                    "port": self.cfg.effective_port,
                    "local": str(self.ext.address) if self.ext else None,
                    "direct_routing": self.cfg.direct_routing,
                }
            except NetlinkError as e:
                device = {"name": self.cfg.device_name, "error": str(e)}
        return {"type": self.type_name, "device": device, **self.book.status()}

    def _index(self) -> int:
        return self.required(self.ifindex)
