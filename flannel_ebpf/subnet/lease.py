"""A subnet lease as flannel stores it in etcd: key `<prefix>/subnets/10.5.34.0-24`, JSON value.

Pure code: no etcd, no I/O. Everything that crosses a host boundary follows flanneld v0.20.2 exactly,
so that a flanneld host and a flannel-ebpf host can share one etcd.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

from flannel_ebpf.bounded_json import load_bounded_json
from flannel_ebpf.config import UNUSABLE_RANGES
from flannel_ebpf.logs import VALUE_LIMIT

#: a BackendType as flanneld names its backends (udp, vxlan, host-gw, aws-vpc, tencent-vpc, ...): it reaches
#: `status` output and a metric label, so no control characters and no arbitrary text
BACKEND_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")

# flanneld's key form: `10.5.34.0-24`, optionally followed by an IPv6 half (`&fc00::-64`) that we accept
# but do not use. ASCII digits only (`\d` would also match other scripts' digits); the exact spelling is
# then checked by writing the parsed subnet back (no leading zeros, no trailing newline, nothing around).
_V4_KEY_RE = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})")
_V6_KEY_RE = re.compile(r"([0-9a-f:]{2,39})-([0-9]{1,3})")

#: The largest lease value the agent reads. flanneld writes about 150 bytes; anything near this is hostile.
MAX_VALUE_BYTES = 64 * 1024


class LeaseFormatError(ValueError):
    """A key or value under `<prefix>/subnets/` that is not a valid flannel lease."""


def unusable_address_reason(ip: IPv4Address) -> str | None:
    """Why `ip` can never be a peer's PublicIP (None when it can)."""
    for network, what in UNUSABLE_RANGES:
        if ip in network:
            return f"{ip} is {what}"
    return None


def subnet_key(subnet: IPv4Network) -> str:
    """The last component of a lease key: `10.5.34.0-24`."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(name: str) -> IPv4Network:
    """Parse `10.5.34.0-24` (the part after `subnets/`) into a network.

    Only the exact form flanneld writes is a lease key: `10.5.34.0-024`, `10.5.34.0-24\\n` or
    `x10.5.34.0-24` would otherwise be aliases through which a peer could be deleted or hijacked.
    """
    v4, sep, v6 = name.partition("&")
    m = _V4_KEY_RE.fullmatch(v4)
    if not m:
        raise LeaseFormatError(f"not a subnet key: {short_repr(name, VALUE_LIMIT)}")
    try:
        subnet = IPv4Network(f"{m.group(1)}/{m.group(2)}")  # strict: no host bits
    except ValueError as e:
        raise LeaseFormatError(f"not a subnet key: {short_repr(name, VALUE_LIMIT)}: {e}") from None
    if subnet_key(subnet) != v4:
        written = subnet_key(subnet)
        raise LeaseFormatError(f"not a subnet key: {short_repr(name, VALUE_LIMIT)} (flanneld writes {written!r})")
    if sep:
        m6 = _V6_KEY_RE.fullmatch(v6)
        try:
            subnet6 = IPv6Network(f"{m6.group(1)}/{m6.group(2)}") if m6 else None
        except ValueError:
            subnet6 = None
        if subnet6 is None or f"{subnet6.network_address}-{subnet6.prefixlen}" != v6:
            raise LeaseFormatError(f"not a subnet key: {short_repr(name, VALUE_LIMIT)} (bad IPv6 part)")
    return subnet


@dataclass(frozen=True)
class LeaseAttrs:
    """The JSON value of a lease: what a host tells the others about itself."""

    public_ip: IPv4Address
    backend_type: str = "udp"
    backend_data: dict[str, Any] | None = None

    def to_json(self) -> str:
        # flanneld v0.20.2 writes PublicIP, PublicIPv6 (null), and BackendType/BackendData only when set;
        # its udp backend sets neither, so a udp lease is {"PublicIP": "...", "PublicIPv6": null}.
        value: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": None}
        if self.backend_type != "udp":
            value["BackendType"] = self.backend_type
        if self.backend_data is not None:
            value["BackendData"] = self.backend_data
        return json.dumps(value, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseAttrs:
        """Parse a lease value; accepts older forms and ignores unknown keys.

        Hostile values (huge, deeply nested, wrong types, an address that can never be a peer) raise
        LeaseFormatError and nothing else."""
        try:
            value = load_bounded_json(raw, "lease value", MAX_VALUE_BYTES)
        except ValueError as e:
            raise LeaseFormatError(str(e)) from None
        if not isinstance(value, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        raw_ip = value.get("PublicIP")
        try:
            # A string only: IPv4Address(7) would happily read the number 7 as 0.0.0.7.
            public_ip = IPv4Address(raw_ip) if isinstance(raw_ip, str) else None
        except ValueError:
            public_ip = None
        if public_ip is None:
            raise LeaseFormatError(f"lease has no usable PublicIP: {short_repr(raw_ip)}")
        why = unusable_address_reason(public_ip)
        if why:
            raise LeaseFormatError(f"lease PublicIP is never a peer: {why}")
        backend_type = value.get("BackendType") or "udp"
        if not isinstance(backend_type, str) or not BACKEND_NAME.fullmatch(backend_type):
            raise LeaseFormatError(f"lease BackendType is not a backend name: {short_repr(backend_type)}")
        data = value.get("BackendData")
        if data is not None and not isinstance(data, dict):
            raise LeaseFormatError(f"lease BackendData is not an object: {short_repr(data)}")
        return cls(public_ip=public_ip, backend_type=backend_type, backend_data=data)


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() for a log line: a hostile value must not flood the log."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


@dataclass(frozen=True)
class Lease:
    """A subnet and the host that holds it.

    `expiration` is a Unix time, or None: for a reservation (a key written without an etcd lease, which
    flannel never expires), and for leases read from a listing or a watch, whose expiration is not looked
    up (only this host's own lease needs it). `lease_id` and `mod_revision` are etcd's, used for safe
    renewal; `is_reservation` goes by `lease_id`.
    """

    subnet: IPv4Network
    attrs: LeaseAttrs
    expiration: float | None = None
    lease_id: int = 0
    mod_revision: int = 0

    @property
    def public_ip(self) -> IPv4Address:
        return self.attrs.public_ip

    @property
    def is_reservation(self) -> bool:
        return self.lease_id == 0


@dataclass(frozen=True)
class LeaseEvent:
    """A change seen on `<prefix>/subnets/`: a peer's lease added/replaced, or removed (delete/expiry)."""

    kind: str  # "added" | "removed"
    lease: Lease

    ADDED = "added"
    REMOVED = "removed"
