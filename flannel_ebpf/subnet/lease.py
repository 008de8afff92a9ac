"""A subnet lease as flannel stores it in etcd: key `<prefix>/subnets/10.5.34.0-24`, JSON value.

Pure code: no etcd, no I/O. Everything that crosses a host boundary follows flanneld v0.20.2 exactly,
so that a flanneld host and a flannel-ebpf host can share one etcd.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

# flanneld's key form, with the optional IPv6 half (`&fc00::-64`) that we accept but do not use.
_KEY_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-fA-F\d:]+)-(\d+))?$")


class LeaseFormatError(ValueError):
    """A key or value under `<prefix>/subnets/` that is not a valid flannel lease."""


def subnet_key(subnet: IPv4Network) -> str:
    """The last component of a lease key: `10.5.34.0-24`."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(name: str) -> IPv4Network:
    """Parse `10.5.34.0-24` (the part after `subnets/`) into a network."""
    m = _KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(f"not a subnet key: {name!r}")
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError as e:
        raise LeaseFormatError(f"not a subnet key: {name!r}: {e}") from e


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
        """Parse a lease value; accepts older forms and ignores unknown keys."""
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseFormatError(f"lease value is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        raw_ip = value.get("PublicIP")
        try:
            # A string only: IPv4Address(7) would happily read the number 7 as 0.0.0.7.
            public_ip = IPv4Address(raw_ip) if isinstance(raw_ip, str) else None
        except ValueError:
            public_ip = None
        if public_ip is None or public_ip.is_unspecified or public_ip.is_multicast or public_ip.is_loopback:
            raise LeaseFormatError(f"lease has no usable PublicIP: {raw_ip!r}")
        backend_type = value.get("BackendType") or "udp"
        if not isinstance(backend_type, str):
            raise LeaseFormatError(f"lease BackendType is not a string: {backend_type!r}")
        data = value.get("BackendData")
        if data is not None and not isinstance(data, dict):
            raise LeaseFormatError(f"lease BackendData is not an object: {data!r}")
        return cls(public_ip=public_ip, backend_type=backend_type, backend_data=data)


@dataclass(frozen=True)
class Lease:
    """A subnet and the host that holds it.

    `expiration` is a Unix time, or None for a reservation (a key written without an etcd lease, which
    flannel never expires). `lease_id` and `mod_revision` are etcd's, used for safe renewal.
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
