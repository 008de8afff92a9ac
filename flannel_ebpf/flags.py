"""The flag table of `flannel-ebpf`: every flag with its default and FLANNELD_* variable, and flanneld's flags
that flannel-ebpf refuses. Read by the CLI (`up`, `down`, `status`, `health`) and by the runtime sub-commands,
whose defaults are `up`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flannel_ebpf.subnet.store import DEFAULT_PREFIX


@dataclass(frozen=True)
class Flag:
    name: str  # without dashes; FLANNELD_<NAME> in the environment
    default: Any
    help: str
    kind: str = "str"  # str | int | float | bool | list | choice
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "FLANNELD_" + self.name.upper().replace("-", "_")


# flanneld's flags (the ones that make sense without Kubernetes), then flannel-ebpf's own.
FLAGS = (
    Flag("etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379", "comma-separated etcd endpoints"),
    Flag("etcd-prefix", DEFAULT_PREFIX, "etcd prefix"),
    Flag("etcd-keyfile", "", "TLS key file for etcd"),
    Flag("etcd-certfile", "", "TLS certificate file for etcd"),
    Flag("etcd-cafile", "", "TLS CA file for etcd"),
    Flag(
        "etcd-api",
        "v3",
        "etcd API the config and leases live in: v3 (flanneld v0.10+), v2 (flanneld v0.5-v0.9: etcd 3.4/3.5 "
        "with --enable-v2)",
        "choice",
        ("v3", "v2"),
    ),
    Flag(
        "subnet-len-rule",
        "auto",
        "default SubnetLen when the config sets none: v0.5 (/24 below a /24 Network, else one bit longer), v0.20 "
        "(/24 up to a /22 Network, else two bits longer), auto (v0.5 with --etcd-api v2, else v0.20)",
        "choice",
        ("auto", "v0.5", "v0.20"),
    ),
    Flag("etcd-username", "", "etcd user name"),
    Flag("etcd-password", "", "etcd password"),
    Flag("iface", [], "interface (name or IPv4) for inter-host traffic; repeatable, first match wins", "list"),
    Flag("iface-regex", [], "regex matched (unanchored) against interface IPs, then names; repeatable", "list"),
    Flag("iface-can-reach", "", "use the interface (and source address) the kernel routes this IPv4 address via"),
    Flag("net-config-path", "", "read the network config from this JSON file instead of <etcd-prefix>/config"),
    Flag("public-ip", "", "IP the other hosts reach this one at (default: the interface's address)"),
    Flag("subnet-file", "/run/flannel/subnet.env", "where FLANNEL_NETWORK/SUBNET/MTU/IPMASQ are written"),
    Flag("subnet-lease-renew-margin", 60, "renew the lease this many minutes before it expires (1-1439)", "int"),
    Flag("ip-masq", False, "masquerade traffic leaving the overlay (iptables FLANNEL-POSTRTG)", "bool"),
    Flag("iptables-resync", 5, "re-check the iptables rules every N seconds", "int"),
    Flag("iptables-forward-rules", True, "accept overlay traffic in the FORWARD chain (FLANNEL-FWD)", "bool"),
    Flag("healthz-ip", "0.0.0.0", "address of the /healthz HTTP endpoint"),
    Flag("healthz-port", 0, "port of the /healthz HTTP endpoint (0: off)", "int"),
    # older flanneld's (v0.5) client/server mode
    Flag("listen", "", "run as the server of client/server mode on this address (e.g. :8888, fd://)"),
    Flag("remote", "", "run as a client of the server at this address (e.g. 10.1.2.3:8888): no etcd access"),
    Flag("remote-keyfile", "", "TLS key file for the client/server link"),
    Flag("remote-certfile", "", "TLS certificate file for the client/server link"),
    Flag("remote-cafile", "", "TLS CA file for the client/server link (server: clients must present a cert)"),
    Flag(
        "listen-trust-any-client",
        False,
        "server: let any client write the leases of any PublicIP, as flanneld v0.5 did (default: only the "
        "IPv4 addresses in its certificate's IP SANs with --remote-cafile, else its source address)",
        "bool",
    ),
    # older flanneld's (v0.5-v0.7) multi-network mode
    Flag("networks", "", "run in multi-network mode and serve these comma-separated networks"),
    Flag("subnet-dir", "/run/flannel/networks", "multi-network mode: where <network>.env files are written"),
    # flannel-ebpf's own
    Flag("state-dir", "/run/flannel-ebpf", "directory of the agent's state file (read by status/health/down)"),
    Flag("bpf-pin-dir", "/sys/fs/bpf/flannel-ebpf", "where the eBPF udp path pins its maps"),
    Flag("udp-datapath", "ebpf", "udp backend implementation", "choice", ("ebpf", "tun")),
    Flag(
        "udp-decap",
        "auto",
        "where the eBPF udp path decapsulates (auto: tc on veth underlays, XDP elsewhere)",
        "choice",
        ("auto", "xdp", "tc"),
    ),
    Flag(
        "udp-delivery",
        "port",
        "how decapsulated packets reach local containers: port (routed, FORWARD kept, handed whole to the "
        "container's bridge port), bridge (the kernel's bridge alone), peer (straight in: bypasses host netfilter)",
        "choice",
        ("port", "bridge", "peer"),
    ),
    Flag(
        "udp-encap",
        "flannel0",
        "where the eBPF udp path encapsulates: flannel0 (every peer), underlay (peers on the underlay's own "
        "networks are routed straight to it and encapsulated on its egress; a MASQUERADE of overlay traffic "
        "then picks the underlay's address, which receivers drop)",
        "choice",
        ("flannel0", "underlay"),
    ),
    Flag("xdp-mode", "auto", "XDP attach mode for --udp-decap xdp", "choice", ("auto", "native", "generic")),
    Flag(
        "udp-allow-foreign-source",
        False,
        "eBPF udp decap accepts any inner source from a member, as flanneld does (default: only sources in "
        "a subnet the sending host leases); for hosts that route other networks into the overlay",
        "bool",
    ),
    Flag(
        "xdp-replace-foreign",
        False,
        "replace another tool's XDP program on the interface (default: refuse to start, naming it)",
        "bool",
    ),
    Flag(
        "loader",
        "auto",
        "how eBPF programs get into the kernel: elf (precompiled objects, no compiler), bcc (compiles the C "
        "sources at start: development), auto (elf when objects for this version are installed, else bcc)",
        "choice",
        ("auto", "elf", "bcc"),
    ),
    Flag("subnet-lease-ttl", 24 * 3600, "lease TTL in seconds (flannel: 24 h; short values for labs)", "int"),
    Flag("lease-check-interval", 10.0, "seconds between checks that our lease is still ours", "float"),
    Flag("resync-interval", 10.0, "seconds between full reconciles of the data path", "float"),
    Flag(
        "subnet-relist-interval",
        300.0,
        "seconds between full listings of the leases in etcd, reconciled against what the watch delivered "
        "(0: only when needed)",
        "float",
    ),
    Flag("etcd-retry-max", 1.0, "longest wait in seconds between two attempts while etcd fails", "float"),
    Flag("allow-subnet-change", False, "take a new subnet if ours is held by another host", "bool"),
)

TRUE_WORDS = {"1", "true", "yes", "on", "t"}
FALSE_WORDS = {"0", "false", "no", "off", "", "f"}
_KUBE_WHY = "its leases live in etcd only; for the Kubernetes subnet manager run flanneld"


@dataclass(frozen=True)
class Unsupported:
    """A flanneld flag flannel-ebpf does not have: why, and the flanneld defaults that change nothing (a
    setting that is a no-op in flanneld too is accepted, e.g. FLANNELD_KUBE_SUBNET_MGR=false)."""

    why: str
    boolean: bool = False
    harmless: tuple[str, ...] = ("",)


#: flanneld v0.20.2's flags (klog's included) and older flanneld's that flannel-ebpf does not support.
UNSUPPORTED = {
    "kube-subnet-mgr": Unsupported(_KUBE_WHY, boolean=True, harmless=tuple(FALSE_WORDS)),
    "kube-api-url": Unsupported(_KUBE_WHY),
    "kubeconfig-file": Unsupported(_KUBE_WHY),
    "kube-annotation-prefix": Unsupported(_KUBE_WHY, harmless=("", "flannel.alpha.coreos.com")),
    # a no-op without the Kubernetes subnet manager, whatever its value
    "set-node-network-unavailable": Unsupported(_KUBE_WHY, boolean=True, harmless=tuple(TRUE_WORDS | FALSE_WORDS)),
    "public-ipv6": Unsupported("flannel-ebpf runs IPv4 overlays only"),
    "vmodule": Unsupported("klog's per-file log levels; use -v"),
    "log_backtrace_at": Unsupported("klog's Go stack traces; there are none to log"),
}
