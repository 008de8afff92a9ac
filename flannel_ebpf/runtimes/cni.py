"""`flannel-ebpf cni-config`: the CNI conflist flannel's CNI plugin amounts to, written out in full.

flannel's CNI plugin (github.com/flannel-io/cni-plugin) is a meta-plugin: at every ADD it reads
subnet.env and hands a `bridge` plugin configuration to the real plugins. With the default config that
flannel's Kubernetes manifest installs (network `cbr0`, CNI 0.3.1, delegate `hairpinMode` and
`isDefaultGateway`, then `portmap` with the portMappings capability), that configuration is:
- `bridge`: bridge name unset (so the plugin's default, cni0), `isGateway: true`, `ipMasq` the opposite
  of FLANNEL_IPMASQ (masquerade in the bridge plugin only when flannel does not), `mtu` FLANNEL_MTU;
- `host-local` IPAM with one range, the lease's subnet (FLANNEL_SUBNET's network), and a route to
  FLANNEL_NETWORK (each network when it lists several);
- `portmap` after it.
Here those come out as a plain conflist, so any runtime (containerd, CRI-O, podman, nerdctl) gets the
same containers without the flannel plugin binary. It must be rewritten when the lease or the MTU
changes (the meta-plugin read subnet.env at every ADD; this file is a snapshot).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

DEFAULT_OUTPUT = "/etc/cni/net.d/10-flannel.conflist"
DEFAULT_NETWORK_NAME = "cbr0"  # flannel's manifest
DEFAULT_BRIDGE = "cni0"  # the bridge plugin's default, which flannel's delegate leaves unset
DEFAULT_CNI_VERSION = "0.3.1"  # flannel's manifest


class CniConfigError(ValueError):
    """The subnet file lacks what the conflist needs."""


@dataclass(frozen=True)
class CniOptions:
    network_name: str = DEFAULT_NETWORK_NAME
    bridge: str = DEFAULT_BRIDGE
    cni_version: str = DEFAULT_CNI_VERSION
    portmap: bool = True


def _required(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise CniConfigError(f"the subnet file has no {key} (is flannel-ebpf up running?)")
    return value


def conflist(env: Mapping[str, str], options: CniOptions = CniOptions()) -> dict[str, Any]:
    """The conflist for the subnet file `env` (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ)."""
    try:
        networks: list[IPv4Network] = []
        for part in _required(env, "FLANNEL_NETWORK").split(","):
            net = IPv4Network(part.strip())
            if net not in networks:  # flannel's plugin also drops repeats
                networks.append(net)
        subnet = IPv4Interface(_required(env, "FLANNEL_SUBNET")).network
        mtu = int(_required(env, "FLANNEL_MTU"))
    except ValueError as e:
        if isinstance(e, CniConfigError):
            raise
        raise CniConfigError(f"the subnet file is not flannel's: {e}") from None
    # flannel's plugin reads anything but "true" as false (and requires the variable to be present).
    flannel_masq = _required(env, "FLANNEL_IPMASQ") == "true"
    bridge: dict[str, Any] = {
        "type": "bridge",
        "bridge": options.bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "hairpinMode": True,
        "ipMasq": not flannel_masq,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": str(subnet)}]],
            "routes": [{"dst": str(n)} for n in networks],
        },
    }
    plugins: list[dict[str, Any]] = [bridge]
    if options.portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"name": options.network_name, "cniVersion": options.cni_version, "plugins": plugins}


def render(env: Mapping[str, str], options: CniOptions = CniOptions()) -> str:
    return json.dumps(conflist(env, options), indent=2) + "\n"
