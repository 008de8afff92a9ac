"""flannel's `udp` backend with the data path in eBPF: same wire format, no userspace on the packet path.

    flannel0 (TUN, nobody reads it)   route <Network> dev flannel0, MTU = underlay - 28
      tc egress: flannel_encap         inner packet -> [IPv4][UDP :Port][inner]  -> redirect_neigh(underlay)
    underlay NIC                       routes <peer subnet> via <PublicIP> for peers on its own networks
      tc egress: flannel_ul_out        the same 28 bytes for those (udp/direct.py; --udp-encap underlay)
      tc ingress: flannel_tc_in (or XDP: flannel_xdp_in)   strip 28 bytes -> the stack forwards
    container bridge (docker0/cni0, found by the gateway address it holds)
      tc egress: flannel_br_out   hand the routed packet whole to the container's port (udp/delivery.py)

Kernel state left by this backend, all found again by name: the device flannel0 (its address, the
route, the tc filter go with it), our filters/XDP program on the underlay, the direct routes (proto 102
with an `mtu`, via the underlay), and the maps pinned under
--bpf-pin-dir. stop() leaves all of it in place so that traffic keeps flowing while the agent is down;
a restarted agent reloads the programs (adopting the pinned maps, whose entries are live), swaps them in
atomically and reconciles the peers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.backends.base import Backend, BackendError, PeerBook
from flannel_ebpf.backends.udp.delivery import DELIVERY_MODES, EndpointSync, detach_handoff_everywhere
from flannel_ebpf.backends.udp.device import DEVICE, OVERHEAD, configure_device, route_network, route_to_other_tun
from flannel_ebpf.backends.udp.device_guard import DeviceGuard
from flannel_ebpf.backends.udp.direct import ENCAP_MODES, DirectRoutes, remove_direct_routes_on
from flannel_ebpf.backends.udp.underlay import (
    SETTINGS_FILE,
    driver,
    gro_for_veth_xdp,
    loosen_rp_filter,
    remember_setting,
    restore_settings,
)
from flannel_ebpf.config import udp_port_problem
from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.maps import DatapathMapError, DatapathMaps, remove_pins
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.loaders import LoaderError, make_loader
from flannel_ebpf.loaders import attach as hooks
from flannel_ebpf.loaders.base import Attachment, Loader, foreign_xdp_refusal
from flannel_ebpf.loaders.probes import KernelFeatures, probe_kernel
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

DEFAULT_PORT = 8285


class UdpEbpfBackend(Backend):
    type_name = "udp"
    status_from_kernel = True

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        port = backend_config.get("Port", DEFAULT_PORT) or DEFAULT_PORT
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise BackendError(f"udp backend: Port must be an integer 1-65535, got {port!r}")
        problem = udp_port_problem(port)
        if problem:
            raise BackendError(f"udp backend: {problem}")
        self.port: int = port
        if options.udp_decap not in ("auto", "xdp", "tc"):
            raise BackendError(f"--udp-decap must be auto, xdp or tc, got {options.udp_decap!r}")
        if options.udp_delivery not in DELIVERY_MODES:
            raise BackendError(
                f"--udp-delivery must be one of {', '.join(DELIVERY_MODES)}, got {options.udp_delivery!r}"
            )
        if options.udp_delivery == "peer" and options.udp_decap == "xdp":
            raise BackendError(
                "--udp-delivery peer needs tc decapsulation (bpf_redirect_peer is tc-only): --udp-decap tc"
            )
        if options.udp_encap not in ENCAP_MODES:
            raise BackendError(f"--udp-encap must be one of {', '.join(ENCAP_MODES)}, got {options.udp_encap!r}")
        if options.xdp_mode not in ("auto", "native", "generic"):
            raise BackendError(f"--xdp-mode must be auto, native or generic, got {options.xdp_mode!r}")
        self.pin_dir = Path(options.bpf_pin_dir)
        self._ext: ExternalInterface | None = None
        self._local: LocalNetwork | None = None
        self._maps: DatapathMaps | None = None
        self._peers: dict[IPv4Network, IPv4Address] = {}  # what fl_peers holds (after start: adopted)
        self._leases_of: Counter[IPv4Address] = Counter()  # public IP -> how many of _peers it holds
        self._refused_full = 0  # peers not programmed because fl_peers is full (status: peers_refused_map_full)
        self._attachments: list[dict[str, Any]] = []
        self._features: KernelFeatures | None = None
        self._decap: str | None = None  # "xdp" | "tc" once started (--udp-decap auto resolved)
        self.book = PeerBook("udp (eBPF)")  # only its skipped leases are kept
        self._endpoint_sync: EndpointSync | None = None
        self._loader_name: str | None = None  # "elf" | "bcc" once started (--loader auto resolved)
        self._encap_pending: int | None = None  # flannel0's ifindex while the encap waits for the first sync
        self._decap_pending: int | None = None  # the underlay's, while the tc decap waits likewise
        self._guard: DeviceGuard | None = None  # makes flannel0 again if it goes (a flanneld taken over)
        self._direct: DirectRoutes | None = None  # --udp-encap underlay: the peers routed straight to it

    # --- Backend --------------------------------------------------------------------------------
    def overhead(self) -> int:
        return OVERHEAD

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        self._ext = ext
        return LeaseAttrs(public_ip=ext.public_ip, backend_type="udp", backend_data=None)

    def start(self, local: LocalNetwork) -> None:
        self._local = local
        self._ext = local.ext
        self._decap = self._decap_mode(local.ext)
        foreign = Loader.foreign_xdp(local.ext.index, layout.PROG_DECAP_XDP) if self._decap == "xdp" else None
        if foreign and not self.options.xdp_replace_foreign:  # refused before anything is created
            raise BackendError(f"udp (eBPF): {foreign_xdp_refusal(local.ext.index, foreign)}")
        tun_index = configure_device(local, route_now=False)
        old_rp_filter = loosen_rp_filter(local.ext.name)
        if old_rp_filter is not None:
            remember_setting(self._settings_file, f"rp_filter:{local.ext.name}", old_rp_filter)
        try:
            encap, decap, adopted = self._load_and_attach(local, tun_index)
        except BackendError as e:
            if self.options.udp_decap != "auto" or self._decap != "xdp":
                raise
            # auto chose XDP for this device, and the kernel or the driver would not take it (an old
            # kernel without multi-buffer XDP, a driver with MTU limits): tc works on every device.
            logger.warning("udp (eBPF): XDP decapsulation on {} failed, using tc instead: {}", local.ext.name, e)
            self._decap = "tc"
            encap, decap, adopted = self._load_and_attach(local, tun_index)
        self._attachments = [
            {"program": a.program, "ifindex": a.ifindex, "hook": a.hook, "prog_id": a.prog_id, "xdp_mode": a.xdp_mode}
            for a in (encap, decap)
        ]
        self._start_direct(local)
        if self._encap_pending is None:  # a restart: the encap is on flannel0 already, the route may be too
            route_network(tun_index, local.network)
        mode = f" ({decap.xdp_mode})" if decap.xdp_mode else ""
        logger.info(
            "udp (eBPF): encap on {} egress, decap {}{} on {}, port {}, {} pinned peers adopted from {}",
            DEVICE,
            decap.hook,
            mode,
            local.ext.name,
            self.port,
            adopted,
            self.pin_dir,
        )
        self._start_delivery(local)
        self._guard = DeviceGuard(DEVICE, lambda: self._restore_device(local)).start()

    def _start_direct(self, local: LocalNetwork) -> None:
        """--udp-encap underlay: the encap on the underlay's egress, then the direct routes of the peers
        a previous run left in fl_peers. flannel0: a previous run's direct routes go before its program."""
        direct = DirectRoutes(local)
        try:
            if self.options.udp_encap == "underlay":
                self._attach_from_pin(layout.PROG_ENCAP_UNDERLAY, local.ext.index, "egress")
                direct.reconcile(self._peers)
                self._direct = direct
                self._attachments.append(
                    {"program": layout.PROG_ENCAP_UNDERLAY, "ifindex": local.ext.index, "hook": "tc-egress",
                     "prog_id": self._pinned_id(layout.PROG_ENCAP_UNDERLAY), "xdp_mode": None}
                )  # fmt: skip
                logger.info("udp (eBPF): encap also on {} egress, for the peers routed straight to it", local.ext.name)
                return
            if direct.remove_all():
                logger.info("udp (eBPF): direct routes removed (--udp-encap flannel0)")
            direct.close()
            hooks.tc_detach(local.ext.index, "egress", layout.PROG_ENCAP_UNDERLAY)
        except (hooks.AttachError, bpfsys.BpfError, OSError) as e:
            direct.close()
            raise BackendError(f"udp (eBPF): encapsulation on {local.ext.name}: {e}") from e

    def _restore_device(self, local: LocalNetwork) -> int:
        """flannel0 again (ours: persistent), with the pinned encap program on its egress."""
        index = configure_device(local)
        self._attach_from_pin(layout.PROG_ENCAP, index, "egress")
        return index

    def _attach_from_pin(self, program: str, index: int, direction: str) -> None:
        fd = bpfsys.obj_get(layout.prog_pin_path(self.pin_dir, program))
        try:
            hooks.tc_attach(index, direction, fd, program, self._host_policy().clsact_record)
        finally:
            os.close(fd)

    def _load_and_attach(self, local: LocalNetwork, tun_index: int) -> tuple[Attachment, Attachment, int]:
        """Load this run's programs (adopting the pinned maps), fill the config, attach encap and decap
        (swapping a previous run's in place) and pin the programs; returns both attachments and the
        number of pinned peers adopted."""
        decap_program = layout.PROG_DECAP_XDP if self._decap == "xdp" else layout.PROG_DECAP_TC
        delivery = self.options.udp_delivery
        programs = [layout.PROG_ENCAP, decap_program, layout.PROG_PROBE_DECAP]
        programs += [layout.PROG_DELIVER] if delivery == "port" else []
        programs += [layout.PROG_ENCAP_UNDERLAY] if self.options.udp_encap == "underlay" else []
        loader: Loader = self._make_loader(programs)
        self._loader_name = loader.name
        try:
            loaded_at = time.monotonic()
            loader.load(programs)
            logger.info(
                "udp (eBPF): programs loaded by the {} loader in {:.3f}s", loader.name, time.monotonic() - loaded_at
            )
            self._features = probe_kernel(loader.program_fd(layout.PROG_PROBE_DECAP))
            self._open_maps()
            assert self._maps is not None
            # Config first: the maps are the pinned ones, so the programs still attached from a previous
            # run see the same (or an updated) config while the new ones are swapped in.
            self._maps.write_config(
                layout.DatapathConfig(
                    own_ip=local.ext.address,
                    tun_addr=local.subnet.network_address,
                    local_subnet=local.subnet,
                    network=local.network,
                    underlay_ifindex=local.ext.index,
                    underlay_mtu=local.ext.mtu,
                    port=self.port,
                    decap_l4_udp=self._features.decap_l4_udp,
                    deliver_peer=delivery == "peer",
                    allow_foreign_source=self.options.udp_allow_foreign_source,
                )
            )
            self._peers = self._maps.read_peers()
            self._leases_of = Counter(self._peers.values())
            adopted = len(self._peers)
            if any(f.name == layout.PROG_ENCAP for f in hooks.tc_filters(tun_index, "egress")):
                encap = loader.attach_tc(layout.PROG_ENCAP, tun_index, "egress")  # a restart: swap in place
            else:
                # A device that carries no encap yet (flanneld's flannel0 taken over, or a new one): attach
                # once the first sync has filled fl_peers, else each packet before it gets net-unreachable.
                encap = Attachment(layout.PROG_ENCAP, tun_index, "tc-egress", loader.prog_id(layout.PROG_ENCAP))
                self._encap_pending = tun_index
            if decap_program == layout.PROG_DECAP_XDP:
                decap = loader.attach_xdp(decap_program, local.ext.index, self.options.xdp_mode)
                if decap.xdp_mode == "native" and gro_for_veth_xdp(local.ext.name):
                    remember_setting(self._settings_file, f"gro:{local.ext.name}", 0)
                # Switching from tc decap: remove it only now, once XDP takes the packets.
                hooks.tc_detach(local.ext.index, "ingress", layout.PROG_DECAP_TC)
            elif self._encap_pending is not None and not any(
                f.name == decap_program for f in hooks.tc_filters(local.ext.index, "ingress")
            ):
                # Likewise: before fl_members is filled, decap would drop every peer's packet (a flanneld
                # beside us still takes them on its socket meanwhile).
                decap = Attachment(decap_program, local.ext.index, "tc-ingress", loader.prog_id(decap_program))
                self._decap_pending = local.ext.index
                Loader.detach_xdp(local.ext.index, layout.PROG_DECAP_XDP)
            else:
                decap = loader.attach_tc(decap_program, local.ext.index, "ingress")
                Loader.detach_xdp(local.ext.index, layout.PROG_DECAP_XDP)
            # Pinned: status finds the ids; the bridge hand-off is attached from its pin whenever the
            # container bridge appears (udp.delivery.EndpointSync). A previous run's programs that this
            # run does not use (another decap or delivery mode) are unpinned, so they can go.
            pinned = [p for p in programs if p != layout.PROG_PROBE_DECAP]
            for program in layout.PROGRAM_NAMES:
                path = layout.prog_pin_path(self.pin_dir, program)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # the previous run's program: replaced just now, or not used now
                if program in pinned:
                    bpfsys.obj_pin(loader.program_fd(program), path)
        except (LoaderError, DatapathMapError, OSError) as e:
            raise BackendError(f"udp (eBPF): {e}") from e
        finally:
            loader.close()  # attached programs stay; only our fds go
        return encap, decap, adopted

    def sync(self, peers: list[Lease]) -> None:
        maps = self._require_maps()
        desired: dict[IPv4Network, IPv4Address] = {}
        for lease in peers:
            if self._accept(lease):
                desired[lease.subnet] = lease.public_ip
        self.book.prune({lease.subnet for lease in peers})
        current = maps.read_peers()
        # Room first: departed peers leave the map before new ones go in (their direct routes before them).
        for subnet in current.keys() - desired.keys():
            if self._direct is not None:
                self._direct.remove(subnet)
            maps.delete_peer(subnet)
        desired = self._within_capacity(desired, current)
        for subnet, public_ip in desired.items():
            if current.get(subnet) != public_ip:
                try:
                    maps.set_peer(subnet, public_ip)
                except OSError as e:  # the kernel refused that one entry: that peer is missing, not the others
                    logger.error("udp (eBPF): cannot program peer {} at {}: {}", subnet, public_ip, e)
        self._peers = {subnet: ip for subnet, ip in maps.read_peers().items() if desired.get(subnet) == ip}
        self._leases_of = Counter(self._peers.values())
        self._sync_members()
        if self._direct is not None:
            self._direct.reconcile(self._peers)
        logger.debug("udp (eBPF): {} peers after sync", len(desired))

    def _within_capacity(
        self, desired: dict[IPv4Network, IPv4Address], current: dict[IPv4Network, IPv4Address]
    ) -> dict[IPv4Network, IPv4Address]:
        """At most fl_peers' max_entries peers: those already programmed first, then by subnet, so that
        a full map refuses the same peers on every sync (a counted refusal, said once) and never swaps
        a working peer for another, nor stops half-way."""
        capacity = layout.PEERS_MAP.max_entries
        if len(desired) <= capacity:
            if self._refused_full:
                logger.info("udp (eBPF): every peer fits in fl_peers again ({} of {})", len(desired), capacity)
            self._refused_full = 0
            return desired
        order = sorted(desired, key=lambda subnet: (subnet not in current, subnet))
        refused = len(desired) - capacity
        if refused != self._refused_full:
            logger.error(
                "udp (eBPF): {} peers, but the fl_peers map holds at most {}: {} peer(s) NOT programmed ({} "
                "first); hosts in those subnets are unreachable from here. Use fewer, larger subnets (a "
                "shorter SubnetLen) or vxlan for a cluster this size", len(desired), capacity, refused,
                ", ".join(str(subnet) for subnet in order[capacity : capacity + 5]),
            )  # fmt: skip
        self._refused_full = refused
        return {subnet: desired[subnet] for subnet in order[:capacity]}

    def add_peer(self, lease: Lease) -> None:
        if not self._accept(lease):
            if lease.subnet in self._peers:  # it changed into something unusable: its old entry goes
                self._drop_peer(lease.subnet)
            return
        maps = self._require_maps()
        previous = self._peers.get(lease.subnet)
        if previous is None and len(self._peers) >= layout.PEERS_MAP.max_entries:
            self._refused_full += 1
            logger.error("udp (eBPF): fl_peers is full ({} peers): peer {} at {} NOT programmed",
                         len(self._peers), lease.subnet, lease.public_ip)  # fmt: skip
            return
        self._peers[lease.subnet] = lease.public_ip
        if previous != lease.public_ip:
            self._leases_of[lease.public_ip] += 1
            if previous is not None:
                self._leases_of[previous] -= 1
        maps.set_peer(lease.subnet, lease.public_ip)
        if self._direct is not None:
            self._direct.add(lease.subnet, lease.public_ip)
        self._update_member(lease.public_ip)
        if previous is not None and previous != lease.public_ip:
            self._update_member(previous)
        logger.info("udp (eBPF): peer {} at {}", lease.subnet, lease.public_ip)

    def remove_peer(self, lease: Lease) -> None:
        self.book.forget(lease.subnet)
        self._drop_peer(lease.subnet)

    def _drop_peer(self, subnet: IPv4Network) -> None:
        maps = self._require_maps()
        public_ip = self._peers.pop(subnet, None)
        if public_ip is not None:
            self._leases_of[public_ip] -= 1
        if self._direct is not None:
            self._direct.remove(subnet)  # before the map entry: nothing leaves the underlay unencapsulated
        maps.delete_peer(subnet)
        if public_ip is not None:
            self._update_member(public_ip)
            logger.info("udp (eBPF): peer {} at {} removed", subnet, public_ip)

    def stop(self) -> None:
        # Leave programs attached and maps pinned: the data path keeps forwarding without us.
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._endpoint_sync is not None:
            self._endpoint_sync.stop()
            self._endpoint_sync = None
        if self._direct is not None:  # the routes stay, with the program that encapsulates for them
            self._direct.close()
            self._direct = None
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def teardown(self, local: LocalNetwork | None, hand_over: bool = False) -> None:
        """Remove everything. `hand_over` (`down --keep-datapath`): a flanneld already running beside this
        data path holds a TUN of its own (`flannel1`: it names its device `flannel%d`, and flannel0 was
        taken) with no route, since ours was there; the Network's route is moved onto it in place first,
        so the traffic goes over to flanneld without a gap."""
        self.stop()
        if hand_over and local is not None:
            route_to_other_tun(local.network)
        with IPRoute() as ipr:
            links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        # The direct routes first, while their program still encapsulates: then flannel0's route (or the
        # flanneld's it was moved to) carries every peer.
        removed = self._remove_direct_routes(local, links)
        if removed:
            logger.info("udp (eBPF): {} direct routes removed", removed)
        # Our decap programs, wherever they are: the recorded underlay, else every device (after a crash
        # or with no state file, and a device renamed or re-indexed since).
        # The hand-off sits on the container bridge: every device is looked at for it (its egress only).
        with IPRoute() as ipr:
            for name in detach_handoff_everywhere(ipr):
                logger.info("udp (eBPF): bridge-port hand-off removed from {}", name)
        # A clsact qdisc is shared with other tools: it goes only if we created it (recorded in the state
        # dir) and nothing at all is left on it; the devices we created one on are looked at too. The record
        # is the agent's (--state-dir), where attaching wrote it, also for one network of several.
        record = Path(self.options.clsact_record_dir or self.options.state_dir) / hooks.CLSACT_RECORD_FILE
        scope = [local.ext.index] if local is not None and local.ext.index in links else list(links)
        scope += [i for i, name in hooks.created_clsacts(record) if links.get(i) == name and i not in scope]
        for index in scope:
            try:
                if Loader.detach_xdp(index, layout.PROG_DECAP_XDP):
                    logger.info("udp (eBPF): XDP decap removed from {}", links.get(index))
                if hooks.tc_detach(index, "ingress", layout.PROG_DECAP_TC):
                    logger.info("udp (eBPF): tc decap removed from {}", links.get(index))
                if hooks.tc_detach(index, "egress", layout.PROG_ENCAP_UNDERLAY):
                    logger.info("udp (eBPF): encap removed from {} egress", links.get(index))
                self._remove_empty_clsact(index, links[index], record)
            except (hooks.AttachError, bpfsys.BpfError) as e:
                logger.warning("udp (eBPF): cannot clean {}: {}", links.get(index), e)
        with IPRoute() as ipr:
            index = next(iter(ipr.link_lookup(ifname=DEVICE)), None)
            if index is not None:
                try:
                    ipr.link("del", index=index)  # its address, route and tc filter go with it
                    logger.info("udp (eBPF): {} deleted", DEVICE)
                except NetlinkError as e:  # the rest of the teardown still runs
                    logger.warning("udp (eBPF): cannot delete {}: {}", DEVICE, e)
            alive = {(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for entry in hooks.created_clsacts(record):
            if entry not in alive:  # flannel0's, or a device gone since: nothing left to delete
                hooks.forget_clsact(record, *entry)
        remove_pins(self.pin_dir)
        restore_settings(self._settings_file)

    @staticmethod
    def _remove_direct_routes(local: LocalNetwork | None, links: dict[int, str]) -> int:
        """This network's direct routes; with no state (`local` None), those of every device that carries
        our underlay encap."""
        if local is not None and local.ext.index in links:
            direct = DirectRoutes(local)
            try:
                return direct.remove_all()
            finally:
                direct.close()
        devices = {i for i in links if any(f.name == layout.PROG_ENCAP_UNDERLAY for f in hooks.tc_filters(i, "egress"))}
        return remove_direct_routes_on(devices)

    @property
    def _settings_file(self) -> Path:
        return Path(self.options.state_dir) / SETTINGS_FILE

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "type": self.type_name,
            "datapath": "ebpf",
            "device": DEVICE,
            "port": self.port,
            "decap": self._decap or self.options.udp_decap,
            "delivery": self.options.udp_delivery,
            "encap": self.options.udp_encap,
            "loader": self._loader_name,  # None in a process that did not load them (cli fills it in)
            "peers_refused_map_full": self._refused_full,
            "skipped": {str(subnet): why for subnet, why in sorted(self.book.skipped.items())},
            "programs": self.programs_in_kernel(self.watched_devices() or None),
        }
        if self._features is not None:
            result["kernel_features"] = self._features.as_dict()
        if self._endpoint_sync is not None:
            result["container_bridge"] = self._endpoint_sync.status()
        try:
            with DatapathMaps(self.pin_dir) as maps:
                result["maps"] = maps.snapshot()
        except (DatapathMapError, OSError) as e:
            result["maps"] = None
            result["maps_error"] = str(e)
        return result

    # --- helpers --------------------------------------------------------------------------------
    def _decap_mode(self, ext: ExternalInterface) -> str:
        """--udp-decap auto: tc on veth underlays, XDP elsewhere (see docs/PERFORMANCE.md). On a veth,
        native XDP turns TSO off on the peer and copies every skb (skb_pp_cow_data), while tc decap sees
        the whole GSO skb; on a physical NIC XDP runs before GRO, so the inner TCP is GRO'd, while tc
        decap gets unmerged 1.5 KB packets (UDP GRO does not merge port 8285)."""
        if self.options.udp_decap != "auto":
            return self.options.udp_decap
        if self.options.udp_delivery == "peer" or driver(ext.name) == "veth":
            return "tc"
        if Loader.foreign_xdp(ext.index, layout.PROG_DECAP_XDP) and not self.options.xdp_replace_foreign:
            logger.info("udp (eBPF): {} has another tool's XDP program: decapsulating in tc", ext.name)
            return "tc"
        return "xdp"

    def _start_delivery(self, local: LocalNetwork) -> None:
        """Keep fl_endpoints (and the bridge hook) in step; remove a hand-off this run does not want."""
        assert self._features is not None
        delivery = self.options.udp_delivery
        attach_hook = delivery == "port" and self._features.bridge_handoff_needed
        logger.info("udp (eBPF): delivery: {}", delivery)
        if not attach_hook:  # a previous run's hand-off, left by another mode or kernel
            with IPRoute() as ipr:
                for name in detach_handoff_everywhere(ipr):
                    logger.info("udp (eBPF): bridge-port hand-off removed from {} (not wanted now)", name)
        if delivery == "bridge" or (delivery == "port" and not attach_hook):
            if delivery == "port":
                logger.info("udp (eBPF): this kernel keeps decapsulated skbs whole: no bridge hand-off needed")
            return
        record = self._host_policy().clsact_record
        self._endpoint_sync = EndpointSync(self.pin_dir, local.subnet, attach_hook=attach_hook, clsact_record=record)
        self._endpoint_sync.start()

    def _make_loader(self, programs: list[str]) -> Loader:
        try:
            return make_loader(self.options.loader, self.pin_dir, programs, self._host_policy())
        except LoaderError as e:
            raise BackendError(f"udp (eBPF): {e}") from e

    def _host_policy(self) -> hooks.HostPolicy:
        record_dir = self.options.clsact_record_dir
        return hooks.HostPolicy(
            replace_foreign_xdp=self.options.xdp_replace_foreign,
            clsact_record=Path(record_dir) / hooks.CLSACT_RECORD_FILE if record_dir else None,
        )

    def _open_maps(self) -> None:
        if self._maps is None:
            self._maps = DatapathMaps(self.pin_dir)

    def _require_maps(self) -> DatapathMaps:
        if self._maps is None:
            try:
                self._open_maps()
            except (DatapathMapError, OSError) as e:
                raise BackendError(f"udp (eBPF): maps not available, was start() run? {e}") from e
        assert self._maps is not None
        return self._maps

    def _own_ips(self) -> set[IPv4Address]:
        ext = self._ext or (self._local.ext if self._local else None)
        return {ext.public_ip, ext.address} if ext else set()

    def _accept(self, lease: Lease) -> bool:
        """Is this a lease we can send to? Logged once and skipped otherwise (never raised): one bad
        lease costs exactly that peer."""
        try:
            why = self._unusable(lease)
        except Exception as e:  # whatever a lease holds, evaluating it never aborts a sync
            why = f"cannot evaluate its lease: {type(e).__name__}: {e}"
        if why:
            self.book.skip(lease, why)
            return False
        self.book.usable(lease)
        return True

    def _unusable(self, lease: Lease) -> str | None:
        if lease.attrs.backend_type != "udp":
            return f"its backend is {lease.attrs.backend_type}, not udp"
        if lease.public_ip in self._own_ips():
            return f"its PublicIP {lease.public_ip} is our own"
        if self._local is not None and lease.subnet.overlaps(self._local.subnet):
            return f"overlaps our own subnet {self._local.subnet}"
        if self._local is not None and not lease.subnet.subnet_of(self._local.network):
            return f"outside the Network {self._local.network}"
        return None

    def _update_member(self, public_ip: IPv4Address) -> None:
        """fl_members[public_ip] = number of leases it holds; removed at zero."""
        maps = self._require_maps()
        count = self._leases_of[public_ip]  # kept with _peers: a watch event must not count 10,000 peers
        if count > 0:
            maps.set_member(public_ip, count)
        else:
            self._leases_of.pop(public_ip, None)
            maps.delete_member(public_ip)

    def _sync_members(self) -> None:
        maps = self._require_maps()
        desired = +self._leases_of  # (unary + drops the zero counts)
        current = maps.read_members()
        for public_ip, count in desired.items():
            if current.get(public_ip) != count:
                maps.set_member(public_ip, count)
        for public_ip in current.keys() - desired.keys():
            maps.delete_member(public_ip)
        if self._decap_pending is not None:
            self._attach_from_pin(layout.PROG_DECAP_TC, self._decap_pending, "ingress")
            self._decap_pending = None
        if self._encap_pending is not None:
            self._attach_from_pin(layout.PROG_ENCAP, self._encap_pending, "egress")
            assert self._local is not None
            route_network(self._encap_pending, self._local.network)
            logger.info("udp (eBPF): encap and decap attached once fl_peers and fl_members were filled")
            self._encap_pending = None

    @staticmethod
    def _remove_empty_clsact(index: int, name: str, record: Path) -> None:
        """Delete a device's clsact qdisc only if we created it and no filter at all is left on it.

        Other tools use clsact too and a qdisc names no owner, so the agent records each clsact it creates
        (loaders.attach.CLSACT_RECORD_FILE in --state-dir). One not recorded is never deleted, even empty:
        an empty clsact costs next to nothing, a deleted one breaks a tool that adds its filters later.
        After a reboot /run and the record are gone, so a `down` without state deletes none. One of ours
        that another tool's filter now uses stays, and we forget it: it is theirs as much as ours."""
        if (index, name) not in hooks.created_clsacts(record):
            return
        if hooks.tc_hook_in_use(index, "ingress") or hooks.tc_hook_in_use(index, "egress"):
            logger.info("udp (eBPF): clsact qdisc on {} kept: other filters use it", name)
        else:
            with IPRoute() as ipr, contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", index)
                logger.info("udp (eBPF): clsact qdisc removed from {} (we had added it)", name)
        hooks.forget_clsact(record, index, name)

    def watched_devices(
        self, ext: ExternalInterface | None = None, bridge: tuple[int, str] | None = None
    ) -> dict[int, str]:
        """Where this host's programs sit (index -> name): the underlay, flannel0 and the container bridge
        (this agent's, or `ext` and `bridge` as another process read them from the agent's state)."""
        ext = ext or self._ext
        if ext is None:
            return {}
        devices = {ext.index: ext.name}
        with IPRoute() as ipr:
            devices.update({i: DEVICE for i in ipr.link_lookup(ifname=DEVICE)})
        own = self._endpoint_sync.bridge if self._endpoint_sync is not None else None
        if own is not None:
            bridge = (own.index, own.name)
        if bridge is not None:
            devices[bridge[0]] = bridge[1]
        return devices

    def programs_in_kernel(self, devices: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """Our programs as the kernel has them attached now, on `devices` (the running agent knows where
        they are: a node with hundreds of pod veths is not scanned on every heartbeat), else on every
        device (a fresh `status` process)."""
        found: list[dict[str, Any]] = []
        links = devices
        if links is None:
            with IPRoute() as ipr:
                links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for index, name in links.items():
            xdp = hooks.xdp_query(index)
            if xdp is not None:
                info = bpfsys.prog_info_by_id(xdp[0])
                if info is not None and layout.is_our_program(info.name, layout.PROG_DECAP_XDP):
                    found.append(
                        {"program": info.name, "device": name, "hook": "xdp", "prog_id": xdp[0], "xdp_mode": xdp[1]}
                    )
            for direction in ("ingress", "egress"):
                for flt in hooks.tc_filters(index, direction):
                    if flt.name in layout.PROGRAM_NAMES or flt.name.startswith("flannel_"):
                        hook = f"tc-{direction}"
                        found.append(
                            {"program": flt.name, "device": name, "hook": hook, "prog_id": self._pinned_id(flt.name)}
                        )
        return found

    def _pinned_id(self, program: str) -> int:
        """The id of our pinned program of that name (0 if it is not pinned: another agent's, or gone)."""
        try:
            fd = bpfsys.obj_get(layout.prog_pin_path(self.pin_dir, program))
        except OSError:
            return 0
        try:
            return bpfsys.prog_info(fd).prog_id
        finally:
            os.close(fd)
