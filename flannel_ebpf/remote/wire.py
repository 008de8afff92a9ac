"""The JSON of flannel v0.5's client/server API (`remote/`), in both directions. Pure: no I/O.

The shapes (read from flanneld v0.5.5's subnet package; written here from scratch):
- network config: `{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.255.0",
  "SubnetLen": 24, "Backend": {...}}`: the defaults already filled in by the server.
- lease attributes: `{"PublicIP": "192.168.0.10", "BackendType": "vxlan", "BackendData": {...}}`.
- lease: `{"Subnet": "10.5.34.0/24", "Attrs": {...}, "Expiration": "2026-11-30T07:00:00.123Z"}` (Go's
  time.Time: RFC 3339; its zero value, year 1, means "no expiration known").
- watch result: `{"events": [{"type": "added"|"removed", "lease": {...}}], "snapshot": [lease...] | null,
  "cursor": "1234"}`: either events after the cursor the client sent, or (no cursor, or one too old) the
  whole current set; the client sends the returned cursor with its next watch.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_ebpf.bounded_json import load_bounded_json
from flannel_ebpf.config import NetworkConfig
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseFormatError

#: Go's zero time.Time as encoding/json writes it: flanneld's "never expires / unknown".
ZERO_TIME = "0001-01-01T00:00:00Z"
#: the largest response body a client reads (a snapshot of 10,000 leases is ~2 MB)
MAX_BODY_BYTES = 64 * 1024 * 1024
#: the largest request body the server reads: a lease or its attributes (a lease value in etcd is at most
#: 64 KiB too); anything bigger is refused (413) before it is read
MAX_REQUEST_BYTES = 64 * 1024
_FRACTION = re.compile(r"(\.\d{6})\d+")  # Go writes nanoseconds; Python's datetime takes microseconds


def format_time(expiration: float | None) -> str:
    if expiration is None:
        return ZERO_TIME
    return datetime.fromtimestamp(expiration, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: Any) -> float | None:
    """A Go time from the wire as a Unix time; None for the zero time (or anything before 1970)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(_FRACTION.sub(r"\1", text.replace("Z", "+00:00")))
    except ValueError:
        raise LeaseFormatError(f"Expiration is not an RFC 3339 time: {text[:60]!r}") from None
    if when.tzinfo is None:  # RFC 3339 requires one; a naive time would be read in this host's zone
        raise LeaseFormatError(f"Expiration has no time zone (RFC 3339 needs Z or +hh:mm): {text[:60]!r}")
    try:
        stamp = when.timestamp()
    except (OverflowError, ValueError):  # e.g. year 1 at +14:00 is in year 0 in UTC
        raise LeaseFormatError(f"Expiration is out of range: {text[:60]!r}") from None
    return stamp if stamp > 0 else None


def attrs_to_wire(attrs: LeaseAttrs) -> dict[str, Any]:
    # BackendType as stored: flanneld's udp hosts (v0.5 and v0.20) and ours write none for udp, and v0.5
    # leaves it out when empty (its vxlan and host-gw backends compare it; a missing one reads as udp).
    value: dict[str, Any] = {"PublicIP": str(attrs.public_ip)}
    if attrs.backend_type != "udp":
        value["BackendType"] = attrs.backend_type
    if attrs.backend_data is not None:
        value["BackendData"] = attrs.backend_data
    return value


def attrs_from_wire(value: Any) -> LeaseAttrs:
    """Validated as a lease value in etcd is (the same hostile-input limits)."""
    if not isinstance(value, dict):
        raise LeaseFormatError("lease Attrs is not a JSON object")
    return LeaseAttrs.from_json(json.dumps(value))


def lease_to_wire(lease: Lease) -> dict[str, Any]:
    return {
        "Subnet": str(lease.subnet),
        "Attrs": attrs_to_wire(lease.attrs),
        "Expiration": format_time(lease.expiration),
    }


def parse_subnet(value: Any) -> IPv4Network:
    if not isinstance(value, str):
        raise LeaseFormatError(f"lease Subnet is not a CIDR string: {str(value)[:60]!r}")
    try:
        return IPv4Network(value)  # strict: host bits set is not a subnet
    except ValueError:
        raise LeaseFormatError(f"lease Subnet is not an IPv4 subnet: {value[:60]!r}") from None


def lease_from_wire(value: Any, mod_revision: int = 0) -> Lease:
    if not isinstance(value, dict):
        raise LeaseFormatError("lease is not a JSON object")
    return Lease(
        parse_subnet(value.get("Subnet")),
        attrs_from_wire(value.get("Attrs")),
        parse_time(value.get("Expiration")),
        mod_revision=mod_revision,
    )


# A removed lease has no attributes on the wire (etcd sends no value on delete); the manager knows the
# peer by its subnet.
_NO_ATTRS = LeaseAttrs(public_ip=IPv4Address(0), backend_type="")


def event_to_wire(event: LeaseEvent) -> dict[str, Any]:
    if event.kind == LeaseEvent.REMOVED:
        return {"type": "removed", "lease": {"Subnet": str(event.lease.subnet), "Attrs": None,
                                             "Expiration": ZERO_TIME}}  # fmt: skip
    return {"type": "added", "lease": lease_to_wire(event.lease)}


def event_from_wire(value: Any) -> LeaseEvent:
    if not isinstance(value, dict):
        raise LeaseFormatError("watch event is not a JSON object")
    kind, lease = value.get("type"), value.get("lease")
    if kind == "removed":
        subnet = parse_subnet(lease.get("Subnet") if isinstance(lease, dict) else None)
        return LeaseEvent(LeaseEvent.REMOVED, Lease(subnet, _NO_ATTRS))
    if kind == "added":
        return LeaseEvent(LeaseEvent.ADDED, lease_from_wire(lease))
    raise LeaseFormatError(f"watch event of unknown type {str(kind)[:40]!r}")


def config_to_wire(config: NetworkConfig, raw: bytes) -> dict[str, Any]:
    """The config as a v0.5 server sent it: the document from etcd with the defaults made explicit (so a
    client computes nothing, and our defaults, not flanneld v0.5's, apply to every client)."""
    doc: dict[str, Any] = json.loads(raw)
    doc.update(
        Network=str(config.network),
        SubnetMin=str(config.subnet_min),
        SubnetMax=str(config.subnet_max),
        SubnetLen=config.subnet_len,
    )
    return doc


def parse_cursor(text: str) -> int:
    """A watch cursor: the etcd revision of the last event the client has (v0.5: etcd v2's index)."""
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ValueError(f"watch cursor is not a revision: {text[:40]!r}")
    return int(text)


def load_body(raw: bytes, what: str, max_bytes: int = MAX_BODY_BYTES) -> Any:
    return load_bounded_json(raw, what, max_bytes)
