"""What a backend is told about this host: the underlay interface, the lease it holds, the agent's flags."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay interface chosen with --iface/--iface-regex/--public-ip."""

    name: str
    index: int
    address: IPv4Address  # the interface's own address (what the udp sender binds to)
    public_ip: IPv4Address  # what other hosts use to reach us (--public-ip, else `address`)
    mtu: int


@dataclass(frozen=True)
class LocalNetwork:
    """What a backend needs to know about this host once it holds a lease."""

    network: IPv4Network  # the whole overlay (config's Network)
    subnet: IPv4Network  # this host's lease
    ext: ExternalInterface
    mtu: int  # the overlay MTU written to subnet.env (ext.mtu minus the backend's overhead)


@dataclass(frozen=True)
class BackendOptions:
    """Agent options a backend may use (from flags; not from etcd)."""

    state_dir: str = "/run/flannel-ebpf"  # per-agent files (the TUN path's pid, etc.)
    bpf_pin_dir: str = "/sys/fs/bpf/flannel-ebpf"  # where the eBPF udp path pins its maps
    udp_datapath: str = "ebpf"  # "ebpf" | "tun": which udp implementation
    udp_decap: str = "auto"  # "auto" | "xdp" | "tc": where the eBPF udp path decapsulates
    udp_delivery: str = "port"  # "port" | "bridge" | "peer": how decapsulated packets reach containers
    udp_encap: str = "flannel0"  # "flannel0" | "underlay": where the eBPF udp path encapsulates (udp/direct.py)
    udp_allow_foreign_source: bool = False  # eBPF decap accepts any inner source from a member (flanneld's way)
    xdp_mode: str = "auto"  # "auto" | "native" | "generic"
    loader: str = "auto"  # "auto" (elf when precompiled objects are present, else bcc) | "elf" | "bcc"
    xdp_replace_foreign: bool = False  # replace another tool's XDP program on the underlay (else refuse)
    #: the agent's --state-dir, where attaching records the clsact qdiscs it creates ("": not recorded)
    clsact_record_dir: str = ""
    network_name: str = ""  # multi-network mode (--networks): the network this backend serves; "" classic
