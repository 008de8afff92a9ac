"""Attaching programs to devices, the same for every loader: tc (clsact, direct-action) and XDP.

tc goes through pyroute2. XDP uses a hand-built RTM_SETLINK because pyroute2 0.7 encodes
IFLA_XDP_FLAGS as 16 bits (the kernel wants 32) and so cannot choose the XDP mode; the kernel's
extended ack message is returned in the error, which says why an attach was refused.
All calls act in the calling process's network namespace.

Other tools share these hooks, so nothing here takes what is not ours: an XDP program that is not ours
is replaced only when the operator says so (--xdp-replace-foreign), a replace names the program it
expects to find (IFLA_XDP_EXPECTED_FD, so a program attached meanwhile is never clobbered), tc filters
are removed by their exact name, and a clsact qdisc is ours only if we created it (recorded in the
state dir: see HostPolicy). The HostPolicy is an option of each loader (make_loader), never process-wide.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_ebpf.datapath import bpfsys

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
XDP_FLAGS_REPLACE = 1 << 4  # with IFLA_XDP_EXPECTED_FD: replace only that program (kernel 5.7+)
XDP_MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
#: IFLA_XDP_ATTACHED values
XDP_ATTACHED_NAMES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


#: in --state-dir: the clsact qdiscs we created (and so may delete once they hold no filter at all)
CLSACT_RECORD_FILE = "clsact-created.json"


class AttachError(RuntimeError):
    """The kernel refused an attach/detach; the message carries its reason."""


@dataclass
class HostPolicy:
    """How a loader treats hooks that other tools share with us. The agent's backends make it from
    --xdp-replace-foreign and --state-dir; the defaults are the safe ones for any other caller."""

    #: replace an XDP program that is not ours (else attaching refuses, naming it)
    replace_foreign_xdp: bool = False
    #: where tc_attach records a clsact qdisc it created (None: nothing recorded, so never deleted)
    clsact_record: Path | None = None


def ifname(ifindex: int) -> str:
    """A device's name in this namespace (`#<index>` if it has none)."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"#{ifindex}"


def created_clsacts(record: Path) -> list[tuple[int, str]]:
    """(ifindex, ifname) of each clsact qdisc the record says we created."""
    try:
        entries = json.loads(record.read_text())
        return [(int(e["ifindex"]), str(e["ifname"])) for e in entries]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def _record_clsact(record: Path, ifindex: int) -> None:
    entry = (ifindex, ifname(ifindex))
    entries = [e for e in created_clsacts(record) if e != entry] + [entry]
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps([{"ifindex": i, "ifname": n} for i, n in entries]) + "\n")
        tmp.replace(record)
    except OSError as e:  # then `down` leaves that (empty) clsact in place: safe
        logger.warning("cannot record the clsact qdisc created on {} in {}: {}", entry[1], record, e)


def forget_clsact(record: Path, ifindex: int, name: str) -> None:
    """Drop one entry from the record (the file goes when it is empty)."""
    entries = [e for e in created_clsacts(record) if e != (ifindex, name)]
    with contextlib.suppress(OSError):
        if entries:
            record.write_text(json.dumps([{"ifindex": i, "ifname": n} for i, n in entries]) + "\n")
        else:
            record.unlink(missing_ok=True)


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    direction: str  # "ingress" | "egress"
    name: str  # TCA_BPF_NAME, as given at attach time
    prio: int
    handle: int


def tc_attach(ifindex: int, direction: str, prog_fd: int, name: str, clsact_record: Path | None = None) -> None:
    """Make `prog_fd` the direct-action filter at clsact `direction` of `ifindex` (replace in place); a
    clsact qdisc created here is recorded in `clsact_record` (None: not recorded, so never deleted)."""
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
            if clsact_record is not None:
                _record_clsact(clsact_record, ifindex)  # ours: `down` may delete it once no filter at all is left on it
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


def tc_hook_in_use(ifindex: int, direction: str) -> bool:
    """Whether any filter at all (any kind, any priority, any chain) sits at a clsact hook."""
    with IPRoute() as ipr:
        try:
            return bool(list(ipr.get_filters(index=ifindex, parent=TC_PARENT[direction])))
        except NetlinkError:
            return False


def has_clsact(ifindex: int) -> bool:
    with IPRoute() as ipr:
        try:
            return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))
        except NetlinkError:
            return False


def tc_detach(ifindex: int, direction: str, name: str) -> int:
    """Delete our filters (TCA_BPF_NAME exactly `name`) at a hook; returns how many went. Filters of
    other tools, whatever their priority, stay."""
    removed = 0
    for flt in tc_filters(ifindex, direction):
        if flt.name != name:
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
_IFLA_XDP_EXPECTED_FD = 8
_NETLINK_EXT_ACK = 11
_NLMSGERR_ATTR_MSG = 1


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _setlink_xdp(ifindex: int, prog_fd: int, flags: int, expected_fd: int | None = None) -> None:
    xdp = _nla(_IFLA_XDP_FD, struct.pack("=i", prog_fd)) + _nla(_IFLA_XDP_FLAGS, struct.pack("=I", flags))
    if expected_fd is not None:
        xdp += _nla(_IFLA_XDP_EXPECTED_FD, struct.pack("=i", expected_fd))
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


def _changed(ifindex: int, expected_id: int, found: int) -> AttachError:
    return AttachError(
        f"the XDP program on {ifname(ifindex)} changed while we attached (expected "
        f"{f'id {expected_id}' if expected_id else 'none'}, found {f'id {found}' if found else 'none'}): "
        f"another tool is using it"
    )


def xdp_attach(ifindex: int, prog_fd: int, mode: str, expected_id: int = 0) -> str:
    """Attach the device's XDP program, replacing only the program with id `expected_id` (0: the hook
    must be free). mode: native | generic | auto.

    The kernel enforces the expectation (XDP_FLAGS_REPLACE with IFLA_XDP_EXPECTED_FD, or
    XDP_FLAGS_UPDATE_IF_NOEXIST), so a program another tool attaches meanwhile is never replaced, and
    the expected one is swapped atomically (no packet sees an empty hook). auto tries the current
    program's mode, then native (the driver's hook), then generic. The expected program attached in the
    other mode than the one asked is detached first (the kernel refuses both at once). Returns the mode
    in use.
    """
    if mode not in ("native", "generic", "auto"):
        raise AttachError(f"unknown XDP mode {mode!r} (native, generic or auto)")
    current = xdp_query(ifindex)
    found = current[0] if current is not None else 0
    if found != expected_id:
        raise _changed(ifindex, expected_id, found)
    expected_fd: int | None = None
    try:
        if current is not None:
            try:
                expected_fd = bpfsys.prog_fd_by_id(current[0])
            except bpfsys.BpfError:
                raise _changed(ifindex, expected_id, 0) from None
            if current[1] not in XDP_MODE_FLAGS or (mode != "auto" and current[1] != mode):
                _xdp_detach_expected(ifindex, current[1], expected_fd)
                current = None
        tries = [current[1]] if (mode == "auto" and current is not None) else []
        tries += ["native", "generic"] if mode == "auto" else [mode]
        errors: list[str] = []
        for attempt in dict.fromkeys(tries):  # ordered, without repeats
            try:
                if current is not None and attempt == current[1]:
                    _setlink_xdp(ifindex, prog_fd, XDP_MODE_FLAGS[attempt] | XDP_FLAGS_REPLACE, expected_fd)
                else:
                    _setlink_xdp(ifindex, prog_fd, XDP_MODE_FLAGS[attempt] | XDP_FLAGS_UPDATE_IF_NOEXIST)
                return attempt
            except OSError as e:
                errors.append(f"{attempt}: {e}")
        raise AttachError(f"cannot attach XDP to {ifname(ifindex)}: {'; '.join(errors)}")
    finally:
        if expected_fd is not None:
            os.close(expected_fd)


def _xdp_detach_expected(ifindex: int, mode: str, expected_fd: int) -> None:
    """Detach exactly the program `expected_fd` refers to (the kernel checks it is still the one)."""
    try:
        _setlink_xdp(ifindex, -1, XDP_MODE_FLAGS.get(mode, 0) | XDP_FLAGS_REPLACE, expected_fd)
    except OSError as e:
        raise AttachError(f"cannot detach XDP from {ifname(ifindex)}: {e}") from e


def xdp_detach(ifindex: int, expected_id: int | None = None) -> bool:
    """Remove the device's XDP program (either mode); with `expected_id`, only if it is still that
    program. False if there was none (or another one)."""
    current = xdp_query(ifindex)
    if current is None or (expected_id is not None and current[0] != expected_id):
        return False
    if expected_id is None:
        try:
            _setlink_xdp(ifindex, -1, XDP_MODE_FLAGS.get(current[1], 0))
        except OSError as e:
            raise AttachError(f"cannot detach XDP from {ifname(ifindex)}: {e}") from e
        return True
    try:
        fd = bpfsys.prog_fd_by_id(expected_id)
    except bpfsys.BpfError:
        return False  # gone meanwhile
    try:
        _xdp_detach_expected(ifindex, current[1], fd)
    finally:
        os.close(fd)
    return True
