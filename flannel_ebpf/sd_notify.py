"""systemd's readiness protocol (sd_notify(3)) with the standard library alone.

A service started with `Type=notify` gets `NOTIFY_SOCKET` in its environment: a unix datagram socket,
either a path (`/run/systemd/notify`) or, when it starts with `@`, a name in the abstract namespace (the
`@` stands for the leading NUL byte). Each datagram is newline-separated `KEY=VALUE` lines: `READY=1`
once the service does its job, `STOPPING=1` when it begins to stop, `STATUS=...` for `systemctl status`.

Without `NOTIFY_SOCKET` (not run by systemd) every call is a no-op, so the agent calls it unconditionally.
A failure to notify is logged and never fatal: the data path matters more than systemd's bookkeeping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from loguru import logger

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes | None:
    """The address `NOTIFY_SOCKET` names, as socket.sendto takes it: a path, or bytes starting with NUL
    for the abstract namespace. None when the value is not one systemd would give (e.g. empty)."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the name is everything after '@', NUL-prefixed, no trailing NUL.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd also knows vsock:...; this agent only runs under a local systemd


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one datagram with `lines` (e.g. "READY=1", "STATUS=..."). True if it was sent."""
    env = os.environ if environ is None else environ
    address = socket_address(env.get(ENV, ""))
    if address is None:
        return False
    # STATUS text must stay on one line: a newline would start a bogus KEY=VALUE assignment.
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as e:
        logger.warning("cannot notify systemd at {}: {}", env.get(ENV), e)
        return False
    logger.debug("notified systemd: {}", " ".join(lines))
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
