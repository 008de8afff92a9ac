"""The pinned maps, opened by path: what the backend writes and `status` reads.

Works the same whichever loader created the maps (bcc or ELF): only bpf(2) on pinned fds.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger

from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.layout import MapSpec, Reason


class DatapathMapError(RuntimeError):
    """A pinned map is missing or does not have the layout the programs expect."""


def _unescape_mount_path(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _at_or_below(path: str, point: str) -> bool:
    return path == point or path.startswith(point.rstrip("/") + "/")


def mount_of(path: str | Path, mountinfo: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount that holds `path`, from /proc/<pid>/mountinfo text (in
    mount order): the longest visible mount point above it. A later mount hides the earlier ones at or
    below its mount point (a fresh sysfs on /sys hides the bpffs on /sys/fs/bpf)."""
    target = os.path.normpath(os.path.join("/", str(path)))
    visible: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = _unescape_mount_path(fields[4])
        fstype = line.split(" - ", 1)[1].split()[0]
        visible = [(p, t) for p, t in visible if not _at_or_below(p, point)]
        visible.append((point, fstype))
    holding = [(p, t) for p, t in visible if _at_or_below(target, p)]
    return max(holding, key=lambda m: len(m[0]), default=("/", ""))


def bpffs_missing(pin_dir: str | Path, mountinfo_path: str = "/proc/self/mountinfo") -> str | None:
    """Why `pin_dir` cannot hold pins in this mount namespace (None when it is on a bpffs), e.g. under
    `ip netns exec`, which mounts a fresh /sys and so hides the host's /sys/fs/bpf."""
    try:
        with open(mountinfo_path) as f:
            point, fstype = mount_of(pin_dir, f.read())
    except OSError:
        return None  # cannot tell: say nothing rather than guess
    if fstype == "bpf":
        return None
    return (
        f"bpffs is not mounted here ({pin_dir} is on {fstype or 'an unknown filesystem'} at {point}): the pins "
        "live in another mount namespace; run this outside `ip netns exec` (it mounts its own /sys), or mount bpffs"
    )


def pinned_map_mismatch(pin_dir: str | Path, spec: MapSpec) -> str | None:
    """Why the map pinned for `spec` cannot be adopted (None if it can, or if there is none)."""
    path = layout.pin_path(pin_dir, spec)
    if not path.exists():
        return None
    try:
        fd = bpfsys.obj_get(path)
    except OSError as e:
        return f"{path}: cannot open: {e}"
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    got = (info.map_type, info.key_size, info.value_size, info.max_entries, info.flags)
    want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
    if got != want:
        return f"{path}: (type, key, value, max, flags) is {got}, these programs need {want}"
    return None


def remove_pins(pin_dir: str | Path) -> None:
    """Unpin our maps and programs and remove the pin directory (each dies with its last user)."""
    directory = Path(pin_dir)
    pins = [layout.pin_path(directory, spec) for spec in layout.ALL_MAPS]
    pins += [layout.prog_pin_path(directory, program) for program in layout.PROGRAM_NAMES]
    for path in pins:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if directory.is_dir():
        try:
            directory.rmdir()
        except OSError:
            logger.warning("{} holds files that are not ours; left in place", directory)


@dataclass
class CounterValue:
    packets: int = 0
    bytes: int = 0


class DatapathMaps:
    """Open fds on the pinned maps (layout.ALL_MAPS). Close with close() (or use as a context manager)."""

    def __init__(self, pin_dir: str | Path) -> None:
        self.pin_dir = Path(pin_dir)
        self._fds: dict[str, int] = {}
        try:
            for spec in layout.ALL_MAPS:
                why = pinned_map_mismatch(self.pin_dir, spec)
                if why:
                    raise DatapathMapError(why)
                path = layout.pin_path(self.pin_dir, spec)
                if not path.exists():
                    why = bpffs_missing(self.pin_dir) or f"{path} is not pinned (programs never loaded?)"
                    raise DatapathMapError(why)
                self._fds[spec.name] = bpfsys.obj_get(path)
        except BaseException:
            self.close()
            raise
        self._ncpus = bpfsys.possible_cpus()

    def __enter__(self) -> DatapathMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def fd(self, spec: MapSpec) -> int:
        return self._fds[spec.name]

    # --- config ---------------------------------------------------------------------------------
    def read_config(self) -> layout.DatapathConfig | None:
        raw = bpfsys.map_lookup(self.fd(layout.CONFIG_MAP), layout.pack_u32(0), layout.CONFIG_MAP.value_size)
        return layout.DatapathConfig.unpack(raw) if raw else None

    def write_config(self, config: layout.DatapathConfig) -> None:
        bpfsys.map_update(self.fd(layout.CONFIG_MAP), layout.pack_u32(0), config.pack())

    # --- peers: subnet -> PublicIP --------------------------------------------------------------
    def read_peers(self) -> dict[IPv4Network, IPv4Address]:
        fd = self.fd(layout.PEERS_MAP)
        peers: dict[IPv4Network, IPv4Address] = {}
        for key in bpfsys.map_keys(fd, layout.PEERS_MAP.key_size):
            value = bpfsys.map_lookup(fd, key, layout.PEERS_MAP.value_size)
            if value is not None:
                peers[layout.unpack_peer_key(key)] = layout.unpack_ip(value)
        return peers

    def set_peer(self, subnet: IPv4Network, public_ip: IPv4Address) -> None:
        bpfsys.map_update(self.fd(layout.PEERS_MAP), layout.pack_peer_key(subnet), layout.pack_ip(public_ip))

    def delete_peer(self, subnet: IPv4Network) -> bool:
        return bpfsys.map_delete(self.fd(layout.PEERS_MAP), layout.pack_peer_key(subnet))

    # --- members: PublicIP -> number of leases ---------------------------------------------------
    def read_members(self) -> dict[IPv4Address, int]:
        fd = self.fd(layout.MEMBERS_MAP)
        members: dict[IPv4Address, int] = {}
        for key in bpfsys.map_keys(fd, layout.MEMBERS_MAP.key_size):
            value = bpfsys.map_lookup(fd, key, layout.MEMBERS_MAP.value_size)
            if value is not None:
                members[layout.unpack_ip(key)] = layout.unpack_u32(value)
        return members

    def set_member(self, public_ip: IPv4Address, leases: int) -> None:
        bpfsys.map_update(self.fd(layout.MEMBERS_MAP), layout.pack_ip(public_ip), layout.pack_u32(leases))

    def delete_member(self, public_ip: IPv4Address) -> bool:
        return bpfsys.map_delete(self.fd(layout.MEMBERS_MAP), layout.pack_ip(public_ip))

    # --- endpoints: local container IPv4 -> bridge port ----------------------------------------------
    def read_endpoints(self) -> dict[IPv4Address, layout.Endpoint]:
        fd = self.fd(layout.ENDPOINTS_MAP)
        endpoints: dict[IPv4Address, layout.Endpoint] = {}
        for key in bpfsys.map_keys(fd, layout.ENDPOINTS_MAP.key_size):
            value = bpfsys.map_lookup(fd, key, layout.ENDPOINTS_MAP.value_size)
            if value is not None:
                endpoints[layout.unpack_ip(key)] = layout.Endpoint.unpack(value)
        return endpoints

    def set_endpoint(self, ip: IPv4Address, endpoint: layout.Endpoint) -> None:
        bpfsys.map_update(self.fd(layout.ENDPOINTS_MAP), layout.pack_ip(ip), endpoint.pack())

    def delete_endpoint(self, ip: IPv4Address) -> bool:
        return bpfsys.map_delete(self.fd(layout.ENDPOINTS_MAP), layout.pack_ip(ip))

    # --- counters -------------------------------------------------------------------------------
    def read_counters(self) -> dict[Reason, CounterValue]:
        """Per reason, summed over CPUs."""
        fd = self.fd(layout.COUNTERS_MAP)
        slot = (layout.COUNTERS_MAP.value_size + 7) // 8 * 8  # per-CPU values are 8-byte aligned
        result: dict[Reason, CounterValue] = {}
        for reason in Reason:
            raw = bpfsys.map_lookup(fd, layout.pack_u32(int(reason)), slot * self._ncpus)
            total = CounterValue()
            if raw:
                for cpu in range(self._ncpus):
                    packets, nbytes = layout.unpack_counter(raw[cpu * slot : (cpu + 1) * slot])
                    total.packets += packets
                    total.bytes += nbytes
            result[reason] = total
        return result

    def counters_by_label(self) -> dict[str, dict[str, int]]:
        """What `status` shows: {"decap_not_member": {"packets": 3, "bytes": 252}, ...}."""
        return {r.label: {"packets": c.packets, "bytes": c.bytes} for r, c in self.read_counters().items()}

    def snapshot(self) -> dict[str, Any]:
        config = self.read_config()
        return {
            "pin_dir": str(self.pin_dir),
            "config": None
            if config is None
            else {
                "own_ip": str(config.own_ip),
                "tun_addr": str(config.tun_addr),
                "local_subnet": str(config.local_subnet),
                "network": str(config.network),
                "underlay_ifindex": config.underlay_ifindex,
                "underlay_mtu": config.underlay_mtu,
                "port": config.port,
                "decap_l4_udp": config.decap_l4_udp,
                "deliver_peer": config.deliver_peer,
                "allow_foreign_source": config.allow_foreign_source,
            },
            "peers": {str(k): str(v) for k, v in sorted(self.read_peers().items())},
            "members": {str(k): v for k, v in sorted(self.read_members().items())},
            "endpoints": {
                str(ip): {"port_ifindex": e.port_ifindex, "mac": e.mac}
                for ip, e in sorted(self.read_endpoints().items())
            },
            "counters": self.counters_by_label(),
        }
