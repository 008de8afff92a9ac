"""The pinned maps shared by the agent and the programs in bpf/: names, sizes, encodings, reasons.

Mirrors bpf/lib/flannel.h (struct fl_config, fl_peer_key, fl_peer, fl_counter, enum fl_reason);
tests/test_bpf_programs.py checks that the two agree. Addresses are stored in network order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path


def _bpf_source_dir() -> Path:
    """flannel_ebpf/bpf/ in an installed package (the wheel carries sources and objects there), else the
    checkout's bpf/ (an editable install or a plain checkout)."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "bpf"
    return installed if installed.is_dir() else package.parent / "bpf"


#: the C sources (bcc compiles them at start-up) and the objects `make bpf` compiled (the ELF loader's)
BPF_SOURCE_DIR = _bpf_source_dir()

# BPF_MAP_TYPE_* (linux/bpf.h)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1


@dataclass(frozen=True)
class MapSpec:
    """What a pinned map must look like to be adopted by the current programs."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


CONFIG_MAP = MapSpec("fl_config", MAP_TYPE_ARRAY, 4, 40, 1)
PEERS_MAP = MapSpec("fl_peers", MAP_TYPE_LPM_TRIE, 8, 4, 65536, BPF_F_NO_PREALLOC)
MEMBERS_MAP = MapSpec("fl_members", MAP_TYPE_HASH, 4, 4, 65536, BPF_F_NO_PREALLOC)
ENDPOINTS_MAP = MapSpec("fl_endpoints", MAP_TYPE_HASH, 4, 16, 65536, BPF_F_NO_PREALLOC)
COUNTERS_MAP = MapSpec("fl_counters", MAP_TYPE_PERCPU_ARRAY, 4, 16, 48)
#: the encap program's per-CPU ICMP token bucket (struct fl_icmp_bucket); the agent never writes it
ICMP_BUCKET_MAP = MapSpec("fl_icmp_bucket", MAP_TYPE_PERCPU_ARRAY, 4, 16, 1)
ALL_MAPS: tuple[MapSpec, ...] = (CONFIG_MAP, PEERS_MAP, MEMBERS_MAP, ENDPOINTS_MAP, COUNTERS_MAP, ICMP_BUCKET_MAP)


class Reason(IntEnum):
    """enum fl_reason: why a packet passed or was dropped (the fl_counters index)."""

    ENCAP_OK = 0
    ENCAP_NOT_IPV4 = 1
    ENCAP_MALFORMED = 2
    ENCAP_NO_PEER_ICMP = 3
    ENCAP_NO_PEER_DROP = 4
    ENCAP_TTL_EXPIRED = 5
    ENCAP_TOO_BIG_ICMP = 6
    ENCAP_TOO_BIG_DROP = 7
    ENCAP_NO_CONFIG = 8
    ENCAP_ERROR = 9
    ENCAP_ICMP_BAD_SOURCE = 10
    ENCAP_ICMP_RATE_LIMITED = 11
    UL_PASS_NO_PEER = 12
    UL_PASS_OTHER = 13
    DECAP_OK = 16
    DECAP_PASS_OTHER = 17
    DECAP_FRAGMENT = 18
    DECAP_IP_OPTIONS = 19
    DECAP_NOT_MEMBER = 20
    DECAP_NOT_LOCAL = 21
    DECAP_MALFORMED = 22
    DECAP_TTL_EXPIRED = 23
    DECAP_NO_CONFIG = 24
    DECAP_ERROR = 25
    DECAP_FOREIGN_SOURCE = 26
    DELIVER_PORT = 32
    DELIVER_PEER = 33
    DELIVER_NO_ENDPOINT = 34
    DELIVER_MAC_MISMATCH = 35
    DELIVER_PASS_OTHER = 36

    @property
    def label(self) -> str:
        """The name `status` shows: `encap_ok`, `decap_not_member`, ..."""
        return self.name.lower()


#: reasons under which a packet continues (everything else is a drop)
PASS_REASONS = frozenset(
    {
        Reason.ENCAP_OK,
        Reason.ENCAP_NO_PEER_ICMP,
        Reason.ENCAP_TOO_BIG_ICMP,
        Reason.UL_PASS_NO_PEER,
        Reason.UL_PASS_OTHER,
        Reason.DECAP_OK,
        Reason.DECAP_PASS_OTHER,
        Reason.DECAP_FRAGMENT,  # left untouched to the kernel's reassembly (never decapsulated)
        Reason.DECAP_NO_CONFIG,
        Reason.DELIVER_PORT,
        Reason.DELIVER_PEER,
        Reason.DELIVER_NO_ENDPOINT,
        Reason.DELIVER_MAC_MISMATCH,
        Reason.DELIVER_PASS_OTHER,
    }
)

# Program names (the C function names; the kernel keeps the first 15 characters) and attach points.
PROG_ENCAP = "flannel_encap"  # tc egress on flannel0
PROG_ENCAP_UNDERLAY = "flannel_ul_out"  # tc egress on the underlay: the peers routed straight to it
PROG_DECAP_XDP = "flannel_xdp_in"  # XDP on the underlay
PROG_DECAP_TC = "flannel_tc_in"  # tc ingress on the underlay
PROG_DELIVER = "flannel_br_out"  # tc egress on the container bridge: hand-off to the bridge port
PROG_PROBE_DECAP = "flannel_probe_decap"  # never attached: run once to probe the kernel
PROGRAM_NAMES = (PROG_ENCAP, PROG_ENCAP_UNDERLAY, PROG_DECAP_XDP, PROG_DECAP_TC, PROG_DELIVER, PROG_PROBE_DECAP)
#: C source of each program (one file per attach point)
PROGRAM_SOURCES = {
    PROG_ENCAP: "udp_encap.c",
    PROG_ENCAP_UNDERLAY: "udp_encap_underlay.c",
    PROG_DECAP_XDP: "udp_decap_xdp.c",
    PROG_DECAP_TC: "udp_decap_tc.c",
    PROG_DELIVER: "udp_deliver_tc.c",
    PROG_PROBE_DECAP: "probe_decap.c",
}

# fl_config.flags
CFG_READY = 1
CFG_DECAP_L4_UDP = 2  # the kernel knows BPF_F_ADJ_ROOM_DECAP_L4_UDP (probed)
CFG_DELIVER_PEER = 4  # tc decap delivers with bpf_redirect_peer (netfilter bypassed)
CFG_ALLOW_FOREIGN_SOURCE = 8  # decap accepts any inner source from a member (flanneld's behaviour)
_CONFIG = struct.Struct("=4s4s4s4s4s4sII2sHI")  # struct fl_config, 40 bytes; port in network order
_PEER_KEY = struct.Struct("=I4s")  # struct fl_peer_key: prefixlen (host order), addr (network order)
_COUNTER = struct.Struct("=QQ")  # struct fl_counter: packets, bytes
assert _CONFIG.size == CONFIG_MAP.value_size and _PEER_KEY.size == PEERS_MAP.key_size


@dataclass(frozen=True)
class DatapathConfig:
    """fl_config[0]: what the programs need to know about this host."""

    own_ip: IPv4Address  # outer source; the outer destination decap accepts
    tun_addr: IPv4Address  # flannel0's address: source of ICMP errors
    local_subnet: IPv4Network  # this host's lease
    network: IPv4Network  # the whole overlay
    underlay_ifindex: int
    underlay_mtu: int
    port: int = 8285
    decap_l4_udp: bool = False  # CFG_DECAP_L4_UDP
    deliver_peer: bool = False  # CFG_DELIVER_PEER
    allow_foreign_source: bool = False  # CFG_ALLOW_FOREIGN_SOURCE

    def pack(self) -> bytes:
        flags = CFG_READY | (CFG_DECAP_L4_UDP if self.decap_l4_udp else 0)
        flags |= CFG_DELIVER_PEER if self.deliver_peer else 0
        flags |= CFG_ALLOW_FOREIGN_SOURCE if self.allow_foreign_source else 0
        return _CONFIG.pack(
            self.own_ip.packed,
            self.tun_addr.packed,
            self.local_subnet.network_address.packed,
            self.local_subnet.netmask.packed,
            self.network.network_address.packed,
            self.network.netmask.packed,
            self.underlay_ifindex,
            self.underlay_mtu,
            self.port.to_bytes(2, "big"),
            flags,
            0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> DatapathConfig | None:
        """None when the agent never filled the slot (flags without CFG_READY)."""
        own, tun, sub, mask, net, netmask, ifindex, mtu, port, flags, _ = _CONFIG.unpack(raw[: _CONFIG.size])
        if not flags & CFG_READY:
            return None
        return cls(
            own_ip=IPv4Address(own),
            tun_addr=IPv4Address(tun),
            local_subnet=IPv4Network(f"{IPv4Address(sub)}/{IPv4Address(mask)}"),
            network=IPv4Network(f"{IPv4Address(net)}/{IPv4Address(netmask)}"),
            underlay_ifindex=ifindex,
            underlay_mtu=mtu,
            port=int.from_bytes(port, "big"),
            decap_l4_udp=bool(flags & CFG_DECAP_L4_UDP),
            deliver_peer=bool(flags & CFG_DELIVER_PEER),
            allow_foreign_source=bool(flags & CFG_ALLOW_FOREIGN_SOURCE),
        )


_ENDPOINT = struct.Struct("=I6s6s")  # struct fl_endpoint: port ifindex, container MAC, bridge MAC
assert _ENDPOINT.size == ENDPOINTS_MAP.value_size


@dataclass(frozen=True)
class Endpoint:
    """fl_endpoints[<container IPv4>]: where a local container sits on the container bridge."""

    port_ifindex: int  # the bridge port (the container's host-side veth)
    mac: str  # the container's MAC, "aa:bb:cc:dd:ee:ff"
    bridge_mac: str  # the bridge's own MAC

    def pack(self) -> bytes:
        return _ENDPOINT.pack(self.port_ifindex, _mac_bytes(self.mac), _mac_bytes(self.bridge_mac))

    @classmethod
    def unpack(cls, raw: bytes) -> Endpoint:
        ifindex, mac, bridge_mac = _ENDPOINT.unpack(raw[: _ENDPOINT.size])
        return cls(ifindex, _mac_text(mac), _mac_text(bridge_mac))


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def pack_peer_key(subnet: IPv4Network) -> bytes:
    return _PEER_KEY.pack(subnet.prefixlen, subnet.network_address.packed)


def unpack_peer_key(raw: bytes) -> IPv4Network:
    prefixlen, addr = _PEER_KEY.unpack(raw[: _PEER_KEY.size])
    return IPv4Network(f"{IPv4Address(addr)}/{prefixlen}")


def pack_ip(ip: IPv4Address) -> bytes:
    return ip.packed


def unpack_ip(raw: bytes) -> IPv4Address:
    return IPv4Address(raw[:4])


def pack_u32(value: int) -> bytes:
    return struct.pack("=I", value)


def unpack_u32(raw: bytes) -> int:
    value: int = struct.unpack("=I", raw[:4])[0]
    return value


def unpack_counter(raw: bytes) -> tuple[int, int]:
    """One CPU's slot: (packets, bytes)."""
    return _COUNTER.unpack(raw[: _COUNTER.size])


def pin_path(pin_dir: str | Path, spec: MapSpec) -> Path:
    return Path(pin_dir) / spec.name


def prog_pin_path(pin_dir: str | Path, program: str) -> Path:
    """Where an attached program is pinned: `flannel-ebpf status` (another process) finds its id there,
    and so does `bpftool prog show pinned ...`."""
    return Path(pin_dir) / f"prog_{program}"


def is_our_program(kernel_name: str, program: str) -> bool:
    """Whether a program the kernel names `kernel_name` is `program`: the kernel keeps the first 15
    characters of a name; an unnamed program ("") is never ours."""
    return bool(kernel_name) and kernel_name == program[:15]
