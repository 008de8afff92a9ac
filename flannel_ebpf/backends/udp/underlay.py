"""What the eBPF udp path changes on the underlay interface (GRO for native XDP on a veth, loose reverse-path
filtering), and the record of the original values that teardown puts back."""

from __future__ import annotations

import array
import fcntl
import json
import socket
import struct
from pathlib import Path

from loguru import logger

from flannel_ebpf.host.files import atomic_write

#: in --state-dir: the settings changed, with their original values, for teardown to put back
SETTINGS_FILE = "udp-ebpf-changed-settings.json"

_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x03
_ETHTOOL_GGRO = 0x2B
_ETHTOOL_SGRO = 0x2C


def _ethtool(sock: socket.socket, iface: str, request: bytearray) -> bytearray:
    """One SIOCETHTOOL ioctl: `request` is the ethtool struct (cmd first), filled in place."""
    buf = array.array("B", request)
    address, _length = buf.buffer_info()
    ifreq = struct.pack("16sP", iface.encode()[:15], address)
    fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
    return bytearray(buf.tobytes())


def set_gro(iface: str, on: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _ethtool(sock, iface, bytearray(struct.pack("II", _ETHTOOL_SGRO, int(on))))


def driver(iface: str) -> str:
    """The device's driver name as ethtool reports it ("veth", "virtio_net", "mlx5_core", ...)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            # struct ethtool_drvinfo: cmd, then driver[32] (196 bytes in all)
            info = _ethtool(sock, iface, bytearray(struct.pack("I", _ETHTOOL_GDRVINFO)) + bytearray(192))
    except OSError:
        return ""
    return info[4:36].split(b"\0", 1)[0].decode(errors="replace")


def gro_for_veth_xdp(iface: str) -> bool:
    """Native XDP on a veth underlay: switch GRO on (about twice the throughput, docs/PERFORMANCE.md).
    Without GRO the veth peer stops sending GSO packets to an XDP
    device (it segments everything in software) and nothing merges them again after XDP_PASS; with it,
    the peer keeps TSO and veth's NAPI runs GRO. Physical NICs are left as they are; a failure is logged."""
    try:
        if driver(iface) != "veth":
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            # struct ethtool_value: cmd, data
            (_cmd, gro) = struct.unpack("II", _ethtool(sock, iface, bytearray(struct.pack("II", _ETHTOOL_GGRO, 0))))
            if gro:
                return False
        set_gro(iface, True)
        logger.info("udp (eBPF): GRO switched on for {} (veth with native XDP: keeps GSO packets whole)", iface)
        return True
    except OSError as e:
        logger.warning("udp (eBPF): cannot switch GRO on for {}: {}", iface, e)
        return False


def loosen_rp_filter(iface: str) -> int | None:
    """Decapsulated packets arrive on the underlay NIC while the route back to their source points at
    flannel0: strict reverse-path filtering (rp_filter=1, e.g. RHEL's default) would drop every one of them.
    The kernel uses max(all, iface), so loose mode (2) on the interface is enough and leaves `all` alone.
    Returns the interface's previous value when it changed it."""

    def read(name: str) -> int:
        try:
            with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    if max(read("all"), read(iface)) != 1:
        return None
    previous = read(iface)
    with open(f"/proc/sys/net/ipv4/conf/{iface}/rp_filter", "w") as f:
        f.write("2")
    logger.info("udp (eBPF): set rp_filter=2 (loose) on {}: strict mode drops decapsulated packets", iface)
    return previous


def remember_setting(path: Path, key: str, original: int) -> None:
    """Record a setting's original value the first time we change it (a restart keeps the first)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved.setdefault(key, original)
    atomic_write(str(path), json.dumps(saved) + "\n")


def restore_settings(path: Path) -> None:
    """Put back every setting `path` records, then forget them."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for key, original in saved.items():
        kind, _, iface = key.partition(":")
        try:
            if kind == "gro":
                set_gro(iface, bool(original))
            elif kind == "rp_filter":
                with open(f"/proc/sys/net/ipv4/conf/{iface}/rp_filter", "w") as f:
                    f.write(str(original))
            logger.info("udp (eBPF): {} on {} put back to {}", kind, iface, original)
        except OSError as e:  # the interface may be gone
            logger.warning("udp (eBPF): cannot put {} back on {}: {}", kind, iface, e)
    path.unlink(missing_ok=True)
