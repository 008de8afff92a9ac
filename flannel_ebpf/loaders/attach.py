"""Attaching programs to devices, the same for every loader: tc (clsact, direct-action) and XDP.

tc goes through pyroute2. XDP uses a hand-built RTM_SETLINK because pyroute2 0.7 encodes
IFLA_XDP_FLAGS as 16 bits (the kernel wants 32) and so cannot choose the XDP mode; the kernel's
extended ack message is returned in the error, which says why an attach was refused.
All calls act in the calling process's network namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# clsact's two hooks (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS))
TC_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
#: our filters' priority and handle: fixed, so that a restarted agent replaces them in place (one
#: RTM_NEWTFILTER with NLM_F_REPLACE swaps the program atomically, no packet sees "no filter")
TC_PRIO = 0xF1A
TC_HANDLE = 1
ETH_P_ALL = 0x0003

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
#: IFLA_XDP_ATTACHED values
XDP_ATTACHED_NAMES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


class AttachError(RuntimeError):
    """The kernel refused an attach/detach; the message carries its reason."""


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    direction: str  # "ingress" | "egress"
    name: str  # TCA_BPF_NAME, as given at attach time
    prio: int
    handle: int


def tc_attach(ifindex: int, direction: str, prog_fd: int, name: str) -> None:
    """Make `prog_fd` the direct-action filter at clsact `direction` of `ifindex` (replace in place)."""
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AttachError(f"cannot add clsact qdisc on #{ifindex}: {e}") from e
        try:
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                TC_HANDLE,
                fd=prog_fd,
                name=name,
                parent=TC_PARENT[direction],
                prio=TC_PRIO,
                protocol=ETH_P_ALL,
                direct_action=True,
            )
        except NetlinkError as e:
            raise AttachError(f"cannot attach {name} to tc {direction} of #{ifindex}: {e}") from e


def tc_filters(ifindex: int, direction: str) -> list[TcFilter]:
    """The bpf filters at a clsact hook (empty when there is no clsact qdisc)."""
    result: list[TcFilter] = []
    with IPRoute() as ipr:
        try:
            msgs = ipr.get_filters(index=ifindex, parent=TC_PARENT[direction])
        except NetlinkError:
            return result
        for msg in msgs:
            if msg.get_attr("TCA_KIND") != "bpf":
                continue
            opts = msg.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if name is None:
                continue  # the per-prio chain head, not a filter
            result.append(TcFilter(ifindex, direction, name, msg["info"] >> 16, msg["handle"]))
    return result


def tc_detach(ifindex: int, direction: str, name_prefix: str) -> int:
    """Delete our filters (name starting with `name_prefix`) at a hook; returns how many went."""
    removed = 0
    for flt in tc_filters(ifindex, direction):
        if not flt.name.startswith(name_prefix):
            continue
        with IPRoute() as ipr:
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    ifindex,
                    flt.handle,
                    parent=TC_PARENT[direction],
                    prio=flt.prio,
                    protocol=ETH_P_ALL,
                )
                removed += 1
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV):
                    raise AttachError(f"cannot remove tc filter {flt.name} from #{ifindex}: {e}") from e
    return removed


# --- XDP ----------------------------------------------------------------------------------------

_RTM_SETLINK = 19
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_IFLA_XDP = 43
_NLA_F_NESTED = 0x8000
_IFLA_XDP_FD = 1
_IFLA_XDP_ATTACHED = 2
_IFLA_XDP_FLAGS = 3
_IFLA_XDP_PROG_ID = 4
_NETLINK_EXT_ACK = 11
_NLMSGERR_ATTR_MSG = 1


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _setlink_xdp(ifindex: int, prog_fd: int, flags: int) -> None:
    xdp = _nla(_IFLA_XDP_FD, struct.pack("=i", prog_fd)) + _nla(_IFLA_XDP_FLAGS, struct.pack("=I", flags))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0) + _nla(_IFLA_XDP | _NLA_F_NESTED, xdp)
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(270, _NETLINK_EXT_ACK, 1)  # SOL_NETLINK: ask for the kernel's reason text
        sock.bind((0, 0))
        sock.send(msg)
        reply = sock.recv(65536)
    _length, mtype = struct.unpack_from("=IH", reply, 0)
    if mtype != _NLMSG_ERROR:
        return
    (error,) = struct.unpack_from("=i", reply, 16)
    if error == 0:
        return
    reason = ""
    # Extended ack: after nlmsgerr (error + the echoed 16-byte request header) come TLVs.
    offset = 16 + 4 + 16
    while offset + 4 <= len(reply):
        alen, atype = struct.unpack_from("=HH", reply, offset)
        if alen < 4:
            break
        if atype == _NLMSGERR_ATTR_MSG:
            reason = reply[offset + 4 : offset + alen].split(b"\0", 1)[0].decode(errors="replace")
        offset += (alen + 3) & ~3
    raise OSError(-error, f"{os.strerror(-error)}{': ' + reason if reason else ''}")


def xdp_query(ifindex: int) -> tuple[int, str] | None:
    """(program id, "native"/"generic"/...) of the XDP program on a device, or None."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if xdp is None:
        return None
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    if not prog_id:
        return None
    mode_name = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}
    return prog_id, mode_name.get(mode, str(mode))


def xdp_attach(ifindex: int, prog_fd: int, mode: str) -> str:
    """Attach (or atomically replace) the device's XDP program. mode: native | generic | auto.

    auto tries native (the driver's hook) and falls back to generic. A program already attached in
    the other mode is detached first (the kernel refuses both at once). Returns the mode in use.
    """
    if mode not in ("native", "generic", "auto"):
        raise AttachError(f"unknown XDP mode {mode!r} (native, generic or auto)")
    current = xdp_query(ifindex)
    if current is not None and mode != "auto" and current[1] != mode:
        xdp_detach(ifindex)
        current = None
    tries = [current[1]] if (mode == "auto" and current is not None) else []
    tries += ["native", "generic"] if mode == "auto" else [mode]
    errors: list[str] = []
    for attempt in dict.fromkeys(tries):  # ordered, without repeats
        try:
            _setlink_xdp(ifindex, prog_fd, XDP_MODE_FLAGS[attempt])
            return attempt
        except OSError as e:
            errors.append(f"{attempt}: {e}")
    raise AttachError(f"cannot attach XDP to #{ifindex}: {'; '.join(errors)}")


def xdp_detach(ifindex: int) -> bool:
    """Remove whatever XDP program the device has (either mode). False if there was none."""
    current = xdp_query(ifindex)
    if current is None:
        return False
    flags = XDP_MODE_FLAGS.get(current[1], 0)
    try:
        _setlink_xdp(ifindex, -1, flags)
    except OSError as e:
        raise AttachError(f"cannot detach XDP from #{ifindex}: {e}") from e
    return True
