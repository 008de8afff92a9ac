"""`flannel-ebpf up --remote=HOST:PORT`: the lease manager's registry, spoken over flannel v0.5's HTTP API
to a `--listen` server instead of etcd. The agent (data path, lease manager) is the same as in etcd mode.

How the registry's operations map onto the API (see server.py for the routes):
- get_config              GET  config (404: not written yet -> None, the agent waits)
- list_leases             GET  leases (no cursor): the snapshot; its cursor is the listing's revision
- watch_leases(rev)       GET  leases?next=rev-1, again and again (long polls); a snapshot in the answer
                          (cursor compacted or from before an etcd data loss) raises WatchCompacted:
                          the manager relists, as after an etcd compaction
- create/update_lease     PUT  leases/<subnet>?ttl=: the server creates the key only if it is free and
                          renews it only for the same PublicIP (409 -> None: the caller re-reads)
- get_lease               GET  leases/<subnet>; delete_lease DELETE leases/<subnet>?PublicIP=
- current_revision        the revision and cluster id headers of GET config
- presence claims         not over the API: no one-agent-per-PublicIP guard in client mode

Against a flanneld v0.5 server (told apart by its answer to GET config: ours sends the revision header,
v0.5's does not) the client uses only the four routes v0.5 has, as v0.5's own client does:
- acquisition is POST leases with the LeaseAttrs (v0.5's PUT is an unconditional write: only POST is
  create-only there); the server picks the subnet (its PublicIP's lease if there is one);
- a watch request stays open as long as the server wants: v0.5's server waits for the next lease change
  without a time limit, and it keeps an etcd watch per outstanding request even after the client went
  away. So there is no client timeout on it (TCP keepalive finds a dead server), and a poll is never
  abandoned: a consumer that stops (a relist) leaves its request running, and the next watch takes its
  answer over. One poll per network is open at any time;
- get_lease and current_revision send nothing: the lease is the one the server last returned, kept up to
  date by the watch's events for its subnet; renewals (PUT) go out only when due, as v0.5's renewer's;
- releasing a lease (DELETE) is not possible there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import aetcd.exceptions
import aiohttp
from loguru import logger

from flannel_ebpf.remote import wire
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseFormatError, subnet_key
from flannel_ebpf.subnet.store import EtcdTLS, Listing, WatchCompacted

REVISION_HEADER = "X-Flannel-Ebpf-Revision"
CLUSTER_HEADER = "X-Flannel-Ebpf-Cluster-Id"
#: how long a watch request may take beyond the server's long-poll time before the server counts as lost
WATCH_GRACE = 10.0
WATCH_TIMEOUT = 25.0 + WATCH_GRACE
#: TCP keepalive on the client's connections: a v0.5 server's long poll has no time limit, so a server
#: that vanished without closing the connection is found by these probes (after about a minute)
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


class RemoteError(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """The server could not be reached or did not answer as expected. A ClientError, so that the agent's
    loops retry it with their bounded back-off exactly as they retry etcd's errors."""

    one_line = True  # describe_etcd_error shows it as is


@dataclass
class _Poll:
    """A watch request in flight (v0.5 server): the cursor it was sent with and its task."""

    cursor: int
    task: asyncio.Future[tuple[int, bytes, Any]]


@dataclass
class _Link:
    """What the registries of one network on one server share (the agent's config, lease and watch
    registries): whether the server answers (either one's failure makes the agent not-ready, either
    one's success ends that), which server it is, and against a v0.5 server the poll in flight and the
    view of our own leases."""

    lost_reason: str = ""
    since: float = 0.0
    #: None until a GET config answered; then True for a flanneld v0.5 server (no revision header)
    v05: bool | None = None
    poll: _Poll | None = None
    #: v0.5 server: our leases by subnet as last written or watched (None: the watch saw it removed)
    own: dict[IPv4Network, Lease | None] = field(default_factory=dict)


_LINKS: dict[str, _Link] = {}


class RemoteRegistry:
    """A LeaseSource (SubnetRegistry's interface) over HTTP(S) to a flannel-ebpf (or flanneld v0.5) server."""

    def __init__(self, server: str, network: str = "", tls: EtcdTLS | None = None, timeout: float = 5.0) -> None:
        self.tls = tls if tls is not None and tls.enabled else None
        scheme = "https" if self.tls else "http"
        server = server.split("://", 1)[-1].rstrip("/")
        self.url = f"{scheme}://{server}"
        self.base = f"{self.url}/v1/{network or '_'}"
        self.endpoints = [self.url]
        self.prefix = self.base
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._link = _LINKS.setdefault(self.base, _Link())

    # --- what the agent reads for its messages ---

    @property
    def endpoint(self) -> str:
        return self.url

    def tls_for(self, endpoint: str) -> EtcdTLS | None:
        return None  # the agent's etcd TLS diagnosis does not apply; our errors say what went wrong

    @property
    def config_key(self) -> str:
        return f"{self.base}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.base}/leases/"

    def lease_key(self, subnet: IPv4Network) -> str:
        return self.subnets_prefix + subnet_key(subnet)

    def presence_key(self, public_ip: IPv4Address) -> str:
        return f"{self.base} (no presence claims in client mode)"

    # --- connection ---

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.tls is None:
            return False
        ctx = ssl.create_default_context(cafile=self.tls.cafile or None)
        if self.tls.certfile:
            ctx.load_cert_chain(self.tls.certfile, self.tls.keyfile or None)
        return ctx

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = _KeepaliveConnector(ssl=self._ssl(), limit=8)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    @property
    def v05(self) -> bool:
        """The server is a flanneld v0.5 (known once a GET config was answered)."""
        return self._link.v05 is True

    @property
    def periodic_relists(self) -> bool:
        """Whether the lease manager should relist every --subnet-relist-interval: not against a v0.5
        server, whose client never relists (no traffic beyond its own), and whose watch misses nothing."""
        return not self.v05

    async def reconnect(self) -> None:
        await self.close()  # the next request opens new connections

    async def close(self) -> None:
        poll = self._link.poll
        if poll is not None and getattr(poll.task, "registry", None) is self:
            poll.task.cancel()  # its connection closes with the session
            self._link.poll = None
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def lost_reason(self) -> str:
        """Why the server is unreachable right now ("" while it answers): the agent turns not-ready."""
        return self._link.lost_reason

    def _lost(self, reason: str) -> RemoteError:
        if not self._link.lost_reason:
            self._link.since = time.monotonic()
            logger.warning("{}", reason)
        self._link.lost_reason = reason
        return RemoteError(reason)

    async def _request(
        self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
        timeout: float | None = None, accept: tuple[int, ...] = (200,), unlimited: bool = False,
    ) -> tuple[int, bytes, Any]:  # fmt: skip
        """(status, body, headers) for a status in `accept`; anything else raises RemoteError. `unlimited`:
        no time limit once connected (a v0.5 server's long poll)."""
        limit = (
            aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
            if unlimited
            else aiohttp.ClientTimeout(total=timeout or self._timeout)
        )
        url = f"{self.base}/{path}" if path else self.base
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._client().request(
                method, url, data=data, params=params, headers=headers, timeout=limit,
            ) as response:  # fmt: skip
                raw = await response.content.read(wire.MAX_BODY_BYTES + 1)
                status, got_headers = response.status, response.headers
        except ssl.SSLError as e:
            raise self._lost(f"TLS with the flannel server {self.url} failed: {e}") from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise self._lost(f"the flannel server {self.url} presents an untrusted certificate "
                             f"(check --remote-cafile): {e}") from None  # fmt: skip
        except (aiohttp.ClientError, OSError) as e:
            hint = ""
            dropped = isinstance(e, aiohttp.ServerDisconnectedError) or getattr(e, "errno", None) == errno.ECONNRESET
            if self.tls is not None and not self.tls.certfile and dropped:
                # TLS 1.3: a server that wants a client certificate drops the connection after the handshake
                # (the client sees the disconnect or, as often, a reset)
                hint = "; if it requires client certificates (mutual TLS), set --remote-certfile and --remote-keyfile"
            raise self._lost(f"flannel server {self.url} unreachable ({type(e).__name__}: {e}){hint}") from None
        except TimeoutError:
            raise self._lost(f"flannel server {self.url} did not answer {method} {path} in time") from None
        if status >= 500 and status not in accept:
            text = raw[:300].decode(errors="replace").strip()
            raise self._lost(f"flannel server {self.url} answered {status} to {method} {path}: {text}")
        if self._link.lost_reason:
            logger.info("flannel server {} answers again after {:.1f}s", self.url, time.monotonic() - self._link.since)
            self._link.lost_reason = ""
        if status not in accept:
            text = raw[:300].decode(errors="replace").strip()
            raise RemoteError(f"flannel server {self.url} answered {status} to {method} {path}: {text}")
        if method == "GET" and path == "config" and status == 200:
            v05 = REVISION_HEADER not in got_headers
            if v05 != self._link.v05:
                logger.info("flannel server {} is {}", self.url,
                            "a flanneld v0.5: using only its API" if v05 else "a flannel-ebpf server")  # fmt: skip
            self._link.v05 = v05
        return status, raw, got_headers

    @staticmethod
    def _decode(raw: bytes, what: str) -> Any:
        try:
            return wire.load_body(raw, what)
        except ValueError as e:
            raise RemoteError(f"the flannel server sent a bad {what}: {e}") from None

    # --- reads ---

    async def get_config(self) -> bytes | None:
        status, raw, _ = await self._request("GET", "config", accept=(200, 404, 500))
        if status == 500:
            if b"Key not found" in raw:  # a v0.5 server answers 500 with etcd's error for a missing config
                return None
            text = raw[:300].decode(errors="replace").strip()
            raise self._lost(f"flannel server {self.url} answered 500 to GET config: {text}")
        return raw if status == 200 else None

    async def v2_config_hint(self) -> str:
        return ""  # no etcd to look in: the server reads the config

    async def current_revision(self) -> tuple[int, int]:
        if self.v05:
            # Nothing to ask: v0.5's server tells neither a revision nor a cluster. A cluster id of 0
            # turns the lease manager's data-loss check off; its watch answers a snapshot instead.
            return 0, 0
        _, _, headers = await self._request("GET", "config", accept=(200, 404))
        if REVISION_HEADER in headers:
            try:
                return int(headers[REVISION_HEADER]), int(headers.get(CLUSTER_HEADER, "0"), 16)
            except ValueError:
                pass
        return (await self.list_leases()).revision, 0  # a flanneld v0.5 server: its cursor

    def _lease(self, value: Any, headers: Any = None) -> Lease:
        revision = headers.get(REVISION_HEADER, "0") if headers is not None else "0"
        try:
            return wire.lease_from_wire(value, int(revision) if revision.isdigit() else 0)
        except LeaseFormatError as e:
            raise RemoteError(f"the flannel server sent a bad lease: {e}") from None

    async def list_leases(self, page_size: int = 0) -> Listing:
        _, raw, _ = await self._request("GET", "leases")
        body = self._decode(raw, "watch result")
        listing = self._listing(body)
        if self._link.own:
            held = {lease.subnet: lease for lease in listing.leases}
            for subnet in self._link.own:
                self._link.own[subnet] = held.get(subnet)
        return listing

    def _listing(self, body: Any) -> Listing:
        if not isinstance(body, dict):
            raise RemoteError("the flannel server sent a watch result that is not an object")
        leases, garbage = [], []
        for value in body.get("snapshot") or []:
            try:
                leases.append(wire.lease_from_wire(value))
            except LeaseFormatError as e:
                garbage.append((f"{self.subnets_prefix}{str(value)[:60]}", str(e)))
        try:
            revision = wire.parse_cursor(str(body.get("cursor")))
        except ValueError as e:
            raise RemoteError(f"the flannel server sent a bad cursor: {e}") from None
        return Listing(leases, revision, garbage)

    async def get_lease(self, subnet: IPv4Network) -> Lease | None:
        if self.v05 and subnet in self._link.own:
            return self._link.own[subnet]  # v0.5 has no such route: what we wrote, as watched since
        path = f"leases/{subnet_key(subnet)}"
        status, raw, headers = await self._request("GET", path, accept=(200, 404, 405, 422))
        if status == 200:
            return self._lease(self._decode(raw, "lease"), headers)
        if status == 422:  # the key holds a value that is not a lease: what etcd's registry raises then
            raise LeaseFormatError(f"flannel server {self.url}: {raw[:300].decode(errors='replace').strip()}")
        if status == 404 and raw.startswith(b"no lease"):  # our server's answer for a free subnet
            return None
        # flanneld v0.5's server has no such route: find it in a snapshot
        return next((lease for lease in (await self.list_leases()).leases if lease.subnet == subnet), None)

    # --- writes ---

    async def _put(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        body = {"Subnet": str(subnet), "Attrs": wire.attrs_to_wire(attrs), "Expiration": wire.ZERO_TIME}
        params = {"ttl": str(ttl)} if ttl and not self.v05 else None  # v0.5's TTL is always 24 h
        status, raw, headers = await self._request(
            "PUT", f"leases/{subnet_key(subnet)}", body=body, params=params, accept=(200, 409)
        )
        if status == 409:
            logger.debug("flannel server refused {}: {}", subnet, raw[:200].decode(errors="replace").strip())
            return None
        lease = self._lease(self._decode(raw, "lease"), headers)
        if self.v05:
            self._link.own[lease.subnet] = lease
        return lease

    async def acquire_lease(self, attrs: LeaseAttrs) -> Lease | None:
        """v0.5 server: the acquisition as its own client makes it, POST with our attributes; the server
        picks the subnet, create-only (its PublicIP's lease if it has one). None against our server: the
        lease manager acquires with its create-only PUTs (which honour the subnet file's subnet)."""
        if not self.v05:
            return None
        _, raw, headers = await self._request("POST", "leases", body=wire.attrs_to_wire(attrs))
        lease = self._lease(self._decode(raw, "lease"), headers)
        if lease.public_ip != attrs.public_ip:
            raise RemoteError(f"the flannel server answered our acquisition with {lease.subnet} of {lease.public_ip}")
        self._link.own = {lease.subnet: lease}
        return lease

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        if self.v05 and (subnet not in self._link.own or self._link.own[subnet] is not None):
            # v0.5's PUT is an unconditional write: it would overwrite whoever holds the subnet. Only our
            # own lease, once the watch saw it removed and nobody take it since, is written again (v0.5's
            # client would write it at its next renewal whatever the key held by then).
            return None
        return await self._put(subnet, attrs, ttl)

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        return await self._put(lease.subnet, attrs, ttl)

    async def delete_lease(self, lease: Lease) -> bool:
        status, raw, _ = await self._request(
            "DELETE", f"leases/{subnet_key(lease.subnet)}", params={"PublicIP": str(lease.public_ip)},
            accept=(200, 404, 405, 409),
        )  # fmt: skip
        if status in (404, 405) and not raw.startswith(b"no lease"):
            # not our server's "no lease": a server without the route (flanneld v0.5's)
            raise RemoteError(f"flannel server {self.url} cannot release leases (a flanneld v0.5 server has "
                              f"no DELETE); {lease.subnet} expires after its TTL")  # fmt: skip
        return status in (200, 404)

    # --- presence: the server has no such thing; every claim succeeds (documented) ---

    async def claim_presence(self, public_ip: IPv4Address, identity: str, ttl: int) -> tuple[int, str]:
        return 1, ""  # a token "claim" (not an etcd lease): the manager treats 0 as a refusal

    async def refresh_presence(self, lease_id: int) -> bool:
        return True

    async def release_presence(self, lease_id: int) -> None:
        return None

    # --- watch ---

    async def watch_leases(self, start_revision: int) -> AsyncIterator[tuple[int, LeaseEvent | None, str]]:
        """Long polls from `start_revision` on, forever. Within one answer every event but the last carries
        the previous cursor: if the caller stops in the middle of an answer, it resumes before it (events
        are idempotent: an add replaces, a remove of an absent peer is nothing)."""
        cursor = max(start_revision - 1, 0)
        if self._link.lost_reason:
            # A long poll answers only when something happens: ask something quick first, so that the
            # server's return is noticed (and health is ready again) at once.
            await self._request("GET", "config", accept=(200, 404, 500))
        while True:
            if self.v05:
                raw = await self._v05_poll(cursor)
            else:
                _, raw, _ = await self._request("GET", "leases", params={"next": str(cursor)}, timeout=WATCH_TIMEOUT)
            body = self._decode(raw, "watch result")
            if not isinstance(body, dict):
                raise RemoteError("the flannel server sent a watch result that is not an object")
            if body.get("snapshot") is not None:
                # The server no longer has our cursor's history: relist (the manager reconciles the set).
                raise WatchCompacted(cursor)
            try:
                after = wire.parse_cursor(str(body.get("cursor")))
            except ValueError as e:
                raise RemoteError(f"the flannel server sent a bad cursor: {e}") from None
            events = body.get("events") or []
            for i, value in enumerate(events):
                try:
                    event = wire.event_from_wire(value)
                except LeaseFormatError as e:
                    yield (after if i == len(events) - 1 else cursor), None, f"{self.subnets_prefix}?: {e}"
                    continue
                if event.lease.subnet in self._link.own:
                    self._link.own[event.lease.subnet] = event.lease if event.kind == LeaseEvent.ADDED else None
                yield (after if i == len(events) - 1 else cursor), event, ""
            if not events and after != cursor:
                yield after, None, ""  # only keys that are not leases: the cursor moves on all the same
            cursor = max(cursor, after)

    async def _v05_poll(self, cursor: int) -> bytes:
        """The answer to a watch from `cursor` on a v0.5 server, through the one poll in flight: a poll
        left by a consumer that stopped is taken over (its answer is the first event after its cursor:
        used if it is after ours too, else dropped), never abandoned, since v0.5's server would keep its
        etcd watch until the next change."""
        link = self._link
        while True:
            poll = link.poll
            if poll is None or poll.cursor > cursor or (poll.task.done() and poll.cursor != cursor):
                task = asyncio.ensure_future(
                    self._request("GET", "leases", params={"next": str(cursor)}, unlimited=True)
                )
                task.registry = self  # type: ignore[attr-defined]  # whose session it uses (close())
                task.add_done_callback(_retrieve)
                poll = link.poll = _Poll(cursor, task)
            try:
                _, raw, _ = await asyncio.shield(poll.task)
            except RemoteError:
                if link.poll is poll:
                    link.poll = None
                if poll.cursor == cursor:
                    raise
                continue
            except asyncio.CancelledError:
                if poll.task.cancelled() and link.poll is poll:
                    link.poll = None
                raise
            if link.poll is poll:
                link.poll = None
            if poll.cursor == cursor:
                return raw
            with contextlib.suppress(ValueError, AttributeError):
                body = wire.load_body(raw, "watch result")
                if body.get("snapshot") is not None or wire.parse_cursor(str(body.get("cursor"))) > cursor:
                    return raw
            # an answer about what we already have: ask from our cursor


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A poll nobody awaits any more may fail: its error is taken here (the next watch meets it anew)."""
    if not task.cancelled():
        task.exception()


class _KeepaliveConnector(aiohttp.TCPConnector):
    """TCP keepalive on every connection (aiohttp sets none): a v0.5 server's watch request may be
    silent for hours, and only keepalive probes tell a silent server from a vanished one."""

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        return transport, protocol
