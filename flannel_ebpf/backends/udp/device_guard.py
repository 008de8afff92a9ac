"""Keeps the eBPF udp path's overlay device: when flannel0 disappears, it is made again at once.

Why: a flanneld taken over while it still runs (the udp takeover, docs/MIGRATING.md) owns flannel0, a TUN
that lives only as long as flanneld's process holds it open. The agent, started beside it, attaches its
encap to that very device and so carries the traffic already; when flanneld then exits, the kernel
deletes flannel0, its route and the filter. This thread sees the RTM_DELLINK and puts back the agent's
own (persistent) flannel0, its address and route, and the pinned encap program: the gap is the time of
a few netlink requests, not an agent restart. It also repairs a flannel0 deleted by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from loguru import logger
from pyroute2 import IPRoute

_RTMGRP_LINK = 0x1
_RTM_DELLINK = 17
_IFLA_IFNAME = 3
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG_LEN = 16
_RTA_HDR = struct.Struct("=HH")  # len, type


def deleted_links(data: bytes) -> set[str]:
    """The names of the links an rtnetlink datagram (several messages) says were deleted."""
    names: set[str] = set()
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, kind = _NLMSG_HDR.unpack_from(data, offset)[:2]
        if length < _NLMSG_HDR.size or offset + length > len(data):
            break
        if kind == _RTM_DELLINK:
            attr = offset + _NLMSG_HDR.size + _IFINFOMSG_LEN
            while attr + _RTA_HDR.size <= offset + length:
                rta_len, rta_type = _RTA_HDR.unpack_from(data, attr)
                if rta_len < _RTA_HDR.size:
                    break
                if rta_type == _IFLA_IFNAME:
                    names.add(data[attr + _RTA_HDR.size : attr + rta_len].split(b"\0", 1)[0].decode(errors="replace"))
                attr += (rta_len + 3) & ~3
        offset += (length + 3) & ~3
    return names


class DeviceGuard:
    """A thread that calls `restore()` (which returns the new ifindex) whenever `device` is deleted."""

    def __init__(self, device: str, restore: Callable[[], int]) -> None:
        self.device = device
        self.restore = restore
        self.restored = 0  # how many times
        self._stop_r, self._stop_w = os.pipe()
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="device-guard", daemon=True
        )

    def start(self) -> DeviceGuard:
        self._thread.start()
        self._subscribed.wait(5)  # subscribed before start() returns: no deletion from now on is missed
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        # A plain netlink socket: pyroute2's reads ahead into a buffer of its own, so select() on it can
        # sleep through an event it already holds (seen: a deletion handled 12 s late).
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as events:
            events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            events.bind((0, _RTMGRP_LINK))
            self._subscribed.set()
            watched: list[socket.socket | int] = [events, self._stop_r]
            while not self._stopping.is_set():
                ready, _, _ = select.select(watched, [], [])
                if self._stop_r in ready:
                    return
                try:
                    data = events.recv(1 << 16)
                except OSError as e:  # ENOBUFS after a burst: look the device up instead
                    logger.debug("udp (eBPF): device guard's netlink socket: {}", e)
                    data = b""
                    if self._device_missing():
                        self._restore()
                    continue
                if self.device in deleted_links(data):
                    self._restore()

    def _device_missing(self) -> bool:
        with IPRoute() as ipr:
            return not ipr.link_lookup(ifname=self.device)

    def _restore(self) -> None:
        began = time.monotonic()
        try:
            index = self.restore()
        except Exception as e:  # never kill the thread: the next deletion is handled again
            logger.error("udp (eBPF): {} was deleted and could not be made again: {}", self.device, e)
            return
        self.restored += 1
        logger.info(
            "udp (eBPF): {} was deleted: made again (#{}) with the encap attached in {:.1f} ms",
            self.device,
            index,
            (time.monotonic() - began) * 1000,
        )
