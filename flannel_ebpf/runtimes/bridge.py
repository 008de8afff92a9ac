"""`flannel-ebpf bridge [NAME]`: the containers' bridge (docker0, lxcbr0, cni0) made to match the lease.

The bridge holds FLANNEL_SUBNET as written in subnet.env (the gateway, 10.5.34.1/24) with MTU
FLANNEL_MTU and is up, exactly what `dockerd --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU` or the CNI bridge
plugin with isGateway would give it, so that LXC/LXD or a hand-made runtime can use it too.

Idempotent: each property is compared first and changed only when it differs, so a second run changes
nothing (no address flap, no link down). An address from an older lease is removed after the new one is
added: every IPv4 address inside FLANNEL_NETWORK other than the new one, and the address the previous run
recorded (the Network itself may have changed). Other addresses (say lxc-net's 10.0.3.1/24) are the
administrator's: kept, with a warning.

What was configured is recorded in `<state-dir>/bridge.json`; `flannel-ebpf health` then prints the
bridge form and checks the bridge still matches the lease (see `health_fields`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from loguru import logger

from flannel_ebpf.host.files import atomic_write

RECORD_FILE = "bridge.json"
DEFAULT_BRIDGE = "docker0"
IFNAMSIZ = 15


class BridgeError(RuntimeError):
    """The bridge cannot be made (a non-bridge device holds the name, a bad subnet file, netlink)."""


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    address: IPv4Interface  # FLANNEL_SUBNET: the gateway with the subnet's prefix length
    mtu: int
    network: IPv4Network | None = None  # FLANNEL_NETWORK: addresses inside it are ours to replace

    @classmethod
    def from_subnet_env(cls, name: str, env: dict[str, str]) -> BridgeSpec:
        check_name(name)
        try:
            address = IPv4Interface(env["FLANNEL_SUBNET"])
            mtu = int(env["FLANNEL_MTU"])
        except KeyError as e:
            raise BridgeError(f"the subnet file has no {e.args[0]} (is flannel-ebpf up running?)") from None
        except ValueError as e:
            raise BridgeError(f"the subnet file is not flannel's: {e}") from None
        network = None
        if env.get("FLANNEL_NETWORK"):
            try:
                network = IPv4Network(env["FLANNEL_NETWORK"])
            except ValueError as e:
                raise BridgeError(f"the subnet file's FLANNEL_NETWORK: {e}") from None
        if address.ip == address.network.network_address or not 68 <= mtu <= 65535:
            raise BridgeError(f"FLANNEL_SUBNET={address} FLANNEL_MTU={mtu} cannot address a bridge")
        return cls(name, address, mtu, network)


@dataclass
class BridgeRecord:
    """`<state-dir>/bridge.json`: the bridge the last `flannel-ebpf bridge` configured."""

    name: str
    address: str  # 10.5.34.1/24
    mtu: int
    subnet_file: str = ""
    updated: float = 0.0

    @property
    def label(self) -> str:
        return health_label(self.name)


@dataclass
class BridgeResult:
    spec: BridgeSpec
    index: int = 0
    changes: list[str] = field(default_factory=list)
    kept_foreign: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "; ".join(self.changes) if self.changes else "unchanged"
        return f"bridge {self.spec.name}: {self.spec.address} mtu {self.spec.mtu} up ({what})"


def check_name(name: str) -> None:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name) or name in (".", ".."):
        raise BridgeError(f"{name!r} is not a valid interface name")


def health_label(name: str) -> str:
    """The bridge's name as `health` prints it: without its trailing number (lxcbr0 -> lxcbr, docker0 ->
    docker, cni0 -> cni), as the juju charm printed it; a name of digits alone stays as it is."""
    return re.sub(r"\d+$", "", name) or name


def ensure_bridge(spec: BridgeSpec, previous: BridgeRecord | None = None) -> BridgeResult:
    """Make the bridge match `spec` in this network namespace, changing only what differs."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    result = BridgeResult(spec)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=spec.name)
            if not found:
                ipr.link("add", ifname=spec.name, kind="bridge")
                found = ipr.link_lookup(ifname=spec.name)
                result.changes.append("created")
            index = result.index = found[0]
            link = ipr.get_links(index)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind != "bridge":
                raise BridgeError(f"{spec.name} exists and is not a bridge (kind {kind or 'none'})")

            have = [
                IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ipr.get_addr(family=socket.AF_INET, index=index)
            ]
            if spec.address not in have:
                # The new address first, then the stale ones: the bridge is never without a gateway.
                ipr.addr("add", index=index, address=str(spec.address.ip), prefixlen=spec.address.network.prefixlen)
                result.changes.append(f"added {spec.address}")
            stale_recorded = (
                IPv4Interface(previous.address) if previous is not None and previous.name == spec.name else None
            )
            for addr in have:
                if addr == spec.address:
                    continue
                ours = (spec.network is not None and addr.ip in spec.network) or addr == stale_recorded
                if ours:
                    ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
                    result.changes.append(f"removed {addr}")
                else:
                    result.kept_foreign.append(str(addr))
            if link.get_attr("IFLA_MTU") != spec.mtu:
                ipr.link("set", index=index, mtu=spec.mtu)
                result.changes.append(f"mtu {link.get_attr('IFLA_MTU')} -> {spec.mtu}")
            if not link["flags"] & 1:  # IFF_UP
                ipr.link("set", index=index, state="up")
                result.changes.append("set up")
    except NetlinkError as e:
        raise BridgeError(f"{spec.name}: netlink: {e}") from None
    for foreign in result.kept_foreign:
        logger.warning("bridge {} also holds {}, not a flannel address: left as it is", spec.name, foreign)
    return result


def record_path(state_dir: str) -> str:
    return os.path.join(state_dir, RECORD_FILE)


def save_record(state_dir: str, spec: BridgeSpec, subnet_file: str) -> BridgeRecord:
    record = BridgeRecord(spec.name, str(spec.address), spec.mtu, subnet_file, time.time())
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    atomic_write(record_path(state_dir), json.dumps(asdict(record), indent=1) + "\n")
    return record


def load_record(state_dir: str) -> BridgeRecord | None:
    try:
        with open(record_path(state_dir)) as f:
            raw: dict[str, Any] = json.load(f)
        return BridgeRecord(
            name=str(raw["name"]),
            address=str(IPv4Interface(raw["address"])),
            mtu=int(raw["mtu"]),
            subnet_file=str(raw.get("subnet_file", "")),
            updated=float(raw.get("updated", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_problem(record: BridgeRecord, lease_subnet: str, mtu: int) -> str | None:
    """Why the recorded bridge no longer serves this host's containers (None when it does): the lease
    or the overlay MTU moved away from what it was configured with, or it lost its address or went down."""
    address = IPv4Interface(record.address)
    again = f"run `flannel-ebpf bridge {record.name}` again"
    if lease_subnet and str(address.network) != lease_subnet:
        return f"bridge {record.name} holds {address} but the lease is {lease_subnet}: {again}"
    if mtu and record.mtu != mtu:
        return f"bridge {record.name} was given MTU {record.mtu} but the overlay's is {mtu}: {again}"
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=record.name)
        if not found:
            return f"bridge {record.name} is gone: {again}"
        link = ipr.get_links(found[0])[0]
        have = {
            IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=socket.AF_INET, index=found[0])
        }
    if address not in have:
        return f"bridge {record.name} lost its address {address}: {again}"
    if not link["flags"] & 1:
        return f"bridge {record.name} is down"
    return None


def health_fields(record: BridgeRecord) -> str:
    """`lxcbr:10.10.16.1 subnet:10.10.16.1/24 mtu:1472`: label:gateway, FLANNEL_SUBNET, the bridge's MTU."""
    address = IPv4Interface(record.address)
    return f"{record.label}:{address.ip} subnet:{address} mtu:{record.mtu}"
