"""The `host-gw` backend: no encapsulation, each peer host is the next hop for its own subnet.

Per peer lease: `<subnet> via <PublicIP> dev <ext iface> proto 102`. That only works when the peer is on
a network directly connected to our external interface (one L2 segment). flanneld v0.20.2 logs a failure
to add such a route once and then forgets the peer; here a misplaced peer is refused with a clear reason
(visible in `status()`), no route is installed for it, and the agent's periodic full `sync()` (every
--resync-interval, 10 s like flanneld's route check) retries it and restores routes someone deleted.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from flannel_ebpf.backends.base import BackendError, RoutedBackend
from flannel_ebpf.host.types import ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.routes import (
    Reachability,
    RouteSpec,
    host_gw_route,
    not_direct_reason,
)
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs


class HostGwBackend(RoutedBackend):
    type_name = "host-gw"

    def overhead(self) -> int:
        return 0

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        if ext.public_ip != ext.address:
            # as flanneld: peers would route to an address that is not on our interface (a NAT)
            raise BackendError(
                f"host-gw: the public IP {ext.public_ip} differs from the address {ext.address} of "
                f"{ext.name}, so this host is probably behind NAT; host-gw needs peers to reach this host's "
                "interface address directly (drop --public-ip or use the vxlan backend)"
            )
        self.ext = ext
        return LeaseAttrs(public_ip=ext.public_ip, backend_type=self.type_name, backend_data=None)

    def start(self, local: LocalNetwork) -> None:
        self.local = local
        self.ext = local.ext
        logger.info("host-gw: routing peer subnets via their hosts on {}", local.ext.name)

    # ------------------------------------------------------------------------------------------------
    # peers

    def _desired(self, lease: Lease, reach: Reachability | None = None) -> RouteSpec | None:
        """The route for a peer, or None (then the reason is recorded in the book). `reach`: the kernel's
        route to the peer, if already looked up (a full sync asks for all of them in one batch)."""
        ext = self._checked_ext(lease)
        if ext is None:
            return None
        reach = reach or self.netlink.reachability(lease.public_ip)
        if not reach.directly_connected_on(ext.index):
            self.book.refuse(lease, not_direct_reason(reach, ext.name, self.netlink.link_name))
            return None
        return host_gw_route(lease.subnet, lease.public_ip, ext.index)

    def _sync(self, peers: list[Lease]) -> None:
        reach = self.netlink.reachability_of_many(lease.public_ip for lease in peers)
        desired = self._evaluate_each(peers, lambda lease: self._desired(lease, reach.get(lease.public_ip)))
        result = self.netlink.reconcile_routes(desired.values(), self.route_scope(self.local))
        for lease in peers:
            spec = desired.get(lease.subnet)
            if spec is None:
                continue
            if lease.subnet in result.failed:
                self.book.refuse(lease, result.failed[lease.subnet])
            else:
                self.book.accept(lease, {"public_ip": str(lease.public_ip), "route": spec.describe()})
        if result.changed:
            logger.info(
                "host-gw: sync: {} routes added, {} replaced, {} removed, {} already right",
                len(result.added),
                len(result.replaced),
                len(result.removed),
                result.unchanged,
            )

    def add_peer(self, lease: Lease) -> None:
        self.book.leases[lease.subnet] = lease
        try:
            spec = self._desired(lease)
            if spec is None:
                # a lease that changed into something we cannot serve must not leave its old route behind
                self.netlink.delete_route(lease.subnet)
                return
            # One replace, not a dump of every route to compare first: that cost O(peers) per event.
            self.netlink.replace_route(spec)
            self.book.accept(lease, {"public_ip": str(lease.public_ip), "route": spec.describe()})
        except Exception as e:  # a peer must never take the agent down: record it, resync retries
            self.book.refuse(lease, f"programming failed: {e}")

    def remove_peer(self, lease: Lease) -> None:
        self.book.forget(lease.subnet)
        if self.netlink.delete_route(lease.subnet):
            logger.info("host-gw: subnet removed: {}", lease.subnet)

    def teardown(self, local: LocalNetwork | None) -> None:
        count = self.netlink.delete_all_routes(self.route_scope(local))
        logger.info("host-gw: teardown removed {} routes", count)
        self.stop()

    def status(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "ext_iface": self.ext.name if self.ext else None,
            **self.book.status(),
        }
