"""How the eBPF udp path delivers decapsulated packets into local containers (`--udp-delivery`).

    port   (default) the host routes the packet as always (FORWARD, POSTROUTING, conntrack); at the
           container bridge's tc egress, flannel_br_out hands it to the bridge port of its destination
           instead of the bridge's own transmit. On kernels whose decap leaves the tunnel GSO state
           and whose bridge segments such skbs (6.18 and older: see loaders/probes.py), that keeps
           64 KB skbs whole on the way into the container. Elsewhere nothing is attached.
    bridge the kernel's path alone: the bridge forwards (segments in software before 6.19).
    peer   opt-in: tc decap redirects straight into the container (bpf_redirect_peer). Host routing,
           netfilter and the bridge are skipped: see docs/DATAPATH.md for what that gives up.

The container bridge is found, not configured: it is the bridge holding this host's gateway address
(FLANNEL_SUBNET's first address, as `dockerd --bip=$FLANNEL_SUBNET` or the CNI bridge plugin set it),
and it may appear long after the agent starts. fl_endpoints maps each container address to its bridge
port and MAC, joined from the bridge's neighbour table (IP -> MAC, what the host resolved) and its FDB
(MAC -> port). EndpointSync keeps that map and the bridge hook in step from netlink events, with a
full reconcile on every event batch and every `resync` seconds: state, not deltas. A reconcile that
fails (its pinned maps removed under the agent, say) is retried after a pause that doubles each time, up
to `resync`, and the same failure is logged once (then once a minute while it lasts), not on every try.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.maps import DatapathMaps
from flannel_ebpf.loaders import attach as hooks

DELIVERY_MODES = ("port", "bridge", "peer")

# rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*)
_RTMGRP_LINK = 0x1
_RTMGRP_NEIGH = 0x4
_RTMGRP_IPV4_IFADDR = 0x10
# neighbour states with a usable link-layer address: REACHABLE STALE DELAY PROBE NOARP PERMANENT
_NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80
_DEBOUNCE = 0.05  # seconds of quiet that end a burst of netlink events
_DRAIN_MAX = 0.2  # the longest a burst may hold off a reconcile
_RETRY_FIRST = 0.5  # seconds before the first retry of a failed reconcile; doubled at each failure
_REPEAT_WARNING = 60.0  # seconds before the same failure, still going on, is logged again


def retry_delay(failures: int, resync: float) -> float:
    """The pause after `failures` failed reconciles in a row: 0.5 s, 1 s, 2 s, ... up to `resync`."""
    return min(resync, _RETRY_FIRST * 2.0 ** min(max(failures - 1, 0), 30))


@dataclass(frozen=True)
class ContainerBridge:
    name: str
    index: int
    mac: str


def find_container_bridge(ipr: IPRoute, gateway: IPv4Address) -> ContainerBridge | None:
    """The bridge device that holds `gateway` (docker0, cni0, ...), or None (not created yet)."""
    for addr in ipr.get_addr(family=socket.AF_INET):
        if addr.get_attr("IFA_ADDRESS") != str(gateway):
            continue
        links = ipr.get_links(addr["index"])
        if not links:
            continue
        link = links[0]
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
            logger.debug("{} holds {} but is not a bridge", link.get_attr("IFLA_IFNAME"), gateway)
            continue
        return ContainerBridge(link.get_attr("IFLA_IFNAME"), link["index"], link.get_attr("IFLA_ADDRESS"))
    return None


def container_ports(ipr: IPRoute, bridge: ContainerBridge) -> set[int]:
    """The bridge's ports that lead into a container: veths that are up, whose peer lives in another
    network namespace (what bpf_redirect_peer needs, and what a container's port looks like)."""
    ports = set()
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if (
            link.get_attr("IFLA_MASTER") == bridge.index
            and kind == "veth"
            and link.get_attr("IFLA_LINK_NETNSID") is not None
            and link.get_attr("IFLA_OPERSTATE") == "UP"
        ):
            ports.add(link["index"])
    return ports


def read_endpoints(ipr: IPRoute, bridge: ContainerBridge, subnet: IPv4Network) -> dict[IPv4Address, layout.Endpoint]:
    """Container address -> (bridge port, MAC): the host's neighbours on the bridge joined with its FDB.

    Only container ports count, and a MAC the bridge has learned on more than one port is left out: a
    container forging another's MAC gets no hand-off for it (the bridge's own forwarding decides, as it
    would without us)."""
    ports = container_ports(ipr, bridge)
    port_of_mac: dict[str, int] = {}
    ambiguous: set[str] = set()
    for entry in ipr.get_neighbours(family=socket.AF_BRIDGE):
        mac, port = (entry.get_attr("NDA_LLADDR") or "").lower(), entry["ifindex"]
        if entry.get_attr("NDA_MASTER") != bridge.index or port not in ports or not mac:
            continue
        if port_of_mac.setdefault(mac, port) != port:
            ambiguous.add(mac)
    for mac in ambiguous:
        del port_of_mac[mac]
    endpoints: dict[IPv4Address, layout.Endpoint] = {}
    for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge.index):
        dst, mac = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
        if not dst or not mac or not entry["state"] & _NUD_VALID:
            continue
        ip = IPv4Address(dst)
        port = port_of_mac.get(mac.lower())
        if ip in subnet and port is not None:
            endpoints[ip] = layout.Endpoint(port, mac.lower(), bridge.mac)
    return endpoints


def detach_handoff_everywhere(ipr: IPRoute, keep: int | None = None) -> list[str]:
    """Remove our hand-off filter from every device but `keep`; returns the devices cleaned. A device
    that refuses is logged and skipped: one stubborn device must not stop a teardown."""
    cleaned = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if link["index"] == keep:
            continue
        try:
            if hooks.tc_detach(link["index"], "egress", layout.PROG_DELIVER):
                cleaned.append(name)
        except hooks.AttachError as e:
            logger.warning("udp (eBPF): cannot remove the bridge hand-off from {}: {}", name, e)
    return cleaned


class EndpointSync:
    """A thread that keeps fl_endpoints (and, in port mode, the bridge hook) in step with the host.

    It owns its netlink sockets and map fds (pyroute2 sockets are not thread-safe), so it never
    contends with the agent's data-plane calls; it touches nothing but fl_endpoints and the hook.
    """

    def __init__(
        self,
        pin_dir: Path,
        subnet: IPv4Network,
        *,
        attach_hook: bool,
        resync: float = 10.0,
        clsact_record: Path | None = None,
    ) -> None:
        self.pin_dir = pin_dir
        self.clsact_record = clsact_record  # where a clsact qdisc the hook creates is recorded (loaders.attach)
        self.subnet = subnet
        self.gateway = subnet.network_address + 1  # FLANNEL_SUBNET's address: Docker's --bip
        self.attach_hook = attach_hook
        self.resync = resync
        self.bridge: ContainerBridge | None = None
        self.endpoints = 0
        self._hooked: int | None = None  # the bridge this run attached its program to
        self.last_reconcile = 0.0  # when a reconcile last succeeded
        self.last_error: str | None = None
        self.failures = 0  # failed reconciles in a row
        self._due = 0.0  # when the thread reconciles next, at the latest (events may bring it forward)
        self._warned = 0.0  # when last_error was last logged as a warning
        self._stopping = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        # The thread runs in a copy of its creator's context: in multi-network mode that holds the network
        # name the agent tags every log line with (logger.contextualize), which a new thread does not inherit.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="endpoint-sync", daemon=True
        )
        self._lock = threading.Lock()  # reconcile() from the thread or from a caller, one at a time

    def start(self) -> None:
        self.reconcile()  # the bridge may already be there: ready before start() returns
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; the map and the hook stay (traffic keeps flowing while the agent is away)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else its select() still holds the pipe: it is a daemon thread
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def status(self) -> dict[str, Any]:
        hooked = self.bridge is not None and self._hooked == self.bridge.index
        return {
            "bridge": self.bridge.name if self.bridge else None,
            "bridge_index": self.bridge.index if self.bridge else None,
            "gateway": str(self.gateway),
            "hook": f"tc egress of {self.bridge.name}" if hooked and self.bridge else None,
            "endpoints": self.endpoints,
            "last_reconcile": self.last_reconcile,
            "last_error": self.last_error,
            "failures": self.failures,
        }

    def reconcile(self) -> None:
        """Find the bridge, make the hook and fl_endpoints match it. Errors are logged (and shown by
        status), never raised: the thread must outlive anything the host hands it. After a failure the
        thread waits retry_delay() before the next try, and a failure like the last is logged once a
        minute (at debug level in between)."""
        with self._lock:
            try:
                self._reconcile()
            except Exception as e:
                self._failed(f"{type(e).__name__}: {e}")
                return
            if self.failures:
                logger.info("udp (eBPF): container endpoints updated again, after {} failed attempt(s)", self.failures)
            self.failures, self.last_error = 0, None
            self._due = time.time() + self.resync

    def _failed(self, error: str) -> None:
        now = time.time()
        self.failures += 1
        delay = retry_delay(self.failures, self.resync)
        self._due = now + delay
        if error != self.last_error or now - self._warned >= _REPEAT_WARNING:
            still = f" (still: {self.failures} attempts in a row)" if error == self.last_error else ""
            logger.warning("udp (eBPF): cannot update the container endpoints: {}{}", error, still)
            self._warned = now
        else:
            logger.debug(
                "udp (eBPF): cannot update the container endpoints: {} (again; next try in {:.1f} s)", error, delay
            )
        self.last_error = error

    def _reconcile(self) -> None:
        with IPRoute() as ipr:
            bridge = find_container_bridge(ipr, self.gateway)
            # A bridge without a MAC of its own takes its lowest port's: the MAC changes as containers
            # come and go, the bridge does not.
            if (bridge and bridge.index) != (self.bridge and self.bridge.index):
                if bridge is None:
                    logger.info("udp (eBPF): no container bridge holds {} (yet)", self.gateway)
                else:
                    logger.info("udp (eBPF): container bridge {} holds {}", bridge.name, self.gateway)
                keep = bridge.index if bridge is not None and self.attach_hook else None
                for name in detach_handoff_everywhere(ipr, keep=keep):
                    logger.info("udp (eBPF): bridge hand-off removed from {}", name)
            self.bridge = bridge
            desired = read_endpoints(ipr, bridge, self.subnet) if bridge else {}
        if bridge is not None and self.attach_hook and not self._stopping.is_set():
            self._ensure_hook(bridge)
        with DatapathMaps(self.pin_dir) as maps:
            current = maps.read_endpoints()
            for ip in current.keys() - desired.keys():  # first: room for the new ones in a full map
                maps.delete_endpoint(ip)
            for ip, endpoint in desired.items():
                if current.get(ip) == endpoint:
                    continue
                try:
                    maps.set_endpoint(ip, endpoint)
                except OSError as e:  # that container takes the bridge's path; the others are kept
                    logger.error("udp (eBPF): cannot record endpoint {}: {}", ip, e)
                    continue
                logger.debug("udp (eBPF): endpoint {} on port #{} ({})", ip, endpoint.port_ifindex, endpoint.mac)
            self.endpoints = len(maps.read_endpoints())
        self.last_reconcile = time.time()

    def _ensure_hook(self, bridge: ContainerBridge) -> None:
        """Attach this run's program once per bridge (replacing a previous run's in place, atomically),
        and again whenever someone removed it."""
        present = any(f.name == layout.PROG_DELIVER for f in hooks.tc_filters(bridge.index, "egress"))
        if present and self._hooked == bridge.index:
            return
        fd = bpfsys.obj_get(layout.prog_pin_path(self.pin_dir, layout.PROG_DELIVER))
        try:
            hooks.tc_attach(bridge.index, "egress", fd, layout.PROG_DELIVER, self.clsact_record)
        finally:
            os.close(fd)
        self._hooked = bridge.index
        logger.info("udp (eBPF): bridge-port hand-off attached to {} (tc egress)", bridge.name)

    def _run(self) -> None:
        with IPRoute() as events:
            events.bind(groups=_RTMGRP_LINK | _RTMGRP_NEIGH | _RTMGRP_IPV4_IFADDR)
            while not self._stopping.is_set():
                due = self._due - time.time()  # a full reconcile every `resync` s, or the retry of a failed one
                ready, _, _ = select.select([events, self._stop_r], [], [], max(0.0, due))
                # Drain a burst (a container start is a dozen link/FDB/neighbour events) before one
                # reconcile, for at most _DRAIN_MAX seconds: a stream of events (a container flooding
                # forged MACs, say) must not hold the reconcile off.
                drain_until = time.monotonic() + _DRAIN_MAX
                while events in ready and self._stop_r not in ready and time.monotonic() < drain_until:
                    try:
                        events.get()
                    except (NetlinkError, OSError) as e:  # ENOBUFS after a flood: the reconcile covers it
                        logger.debug("udp (eBPF): netlink event socket: {}", e)
                    ready, _, _ = select.select([events, self._stop_r], [], [], _DEBOUNCE)
                if self._stop_r in ready:
                    return
                if self.failures and time.time() < self._due:
                    continue  # events do not cut a retry's pause short: the retry reconciles in full anyway
                self.reconcile()
