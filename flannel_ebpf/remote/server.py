"""`flannel-ebpf up --listen=ADDR`: the server of flannel's client/server mode (flanneld v0.5's `remote/`).

It is the only process that talks to etcd. Clients (`up --remote=ADDR`) read the network config, lease,
renew and watch subnets through it over HTTP(S). As flanneld v0.5's server, it does no networking itself:
no interface, no backend, no subnet file.

Routes (`{network}` is `_` for the default network, else a name under the etcd prefix, as v0.5's
multi-network mode laid them out):
- GET  /v1/{network}/config              the network config, defaults filled in (404: not written yet)
- POST /v1/{network}/leases              acquire a lease for the posted LeaseAttrs (the server picks)
- PUT  /v1/{network}/leases/{subnet}     renew that lease; also creates it when the key is free
- GET  /v1/{network}/leases[?next=C]     watch: events after cursor C (long poll), or a snapshot
Added (a v0.5 client never calls them; v0.5's server answered 404/405 there):
- GET    /v1/{network}/leases/{subnet}               one lease with its expiration (404: none; 422: the value
                                                     in etcd is not a lease, and says why)
- DELETE /v1/{network}/leases/{subnet}?PublicIP=IP   release it, only if IP still holds it
Every response carries `X-Flannel-Ebpf-Revision` and `X-Flannel-Ebpf-Cluster-Id` when known, and PUT
accepts `?ttl=SECONDS` (default: the server's --subnet-lease-ttl). Request bodies over 64 KiB are refused
(413) before they are read, and so are chunked ones (411: a body needs a Content-Length).

Lease safety is the etcd registry's: create-only transactions, compare-revision renewals, and a PUT for a
subnet that another PublicIP holds is refused (409), never an overwrite (v0.5's server overwrote it).

Writes (POST, PUT, DELETE) are authorized, reads are not (v0.5's server authorized nothing): a client may
only write leases of a PublicIP it is. With mutual TLS that is an IPv4 address among its certificate's IP
subject alternative names; otherwise (plain HTTP, or TLS without a client CA) the connection's source
address. `--listen-trust-any-client` turns the check off (NATed clients without certificates). A PublicIP
holds at most one lease per network, so a client can hold at most one lease per address it is, per network.
A refusal is 403 and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any

from aiohttp import hdrs, web
from loguru import logger

from flannel_ebpf import sd_notify
from flannel_ebpf.config import ConfigError, NetworkConfig, parse_config
from flannel_ebpf.http_limits import (
    ANSWER_HOOK,
    LISTEN_BACKLOG,
    ConnectionLimits,
    GuardedListener,
    quiet_connection_errors,
)
from flannel_ebpf.logs import clip
from flannel_ebpf.remote import api_metrics, wire
from flannel_ebpf.subnet.allocation import OutOfSubnets
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseFormatError, parse_subnet_key
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions
from flannel_ebpf.subnet.registry import ETCD_RETRYABLE, SubnetRegistry, describe_etcd_error
from flannel_ebpf.subnet.store import EtcdTLS, WatchCompacted

#: a watch with nothing to report is answered (no events, same cursor) after this long, so that the
#: client learns the server is alive and a dead connection is noticed on both sides
POLL_SECONDS = 25.0
#: after the first event, more that etcd delivers within this window go into the same answer
BATCH_WINDOW = 0.02
BATCH_MAX = 1000
ACQUIRE_ATTEMPTS = 10  # as flanneld v0.5: lost races before an acquisition gives up (the client retries)
_NETWORK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
#: a client host holds one long poll and renews now and then: 512 connections serve hundreds of hosts, and
#: with the descriptors of etcd's channels stay well under the 1024 that systemd's default soft limit allows
SERVER_LIMITS = ConnectionLimits(max_connections=512, request_seconds=5.0, keepalive_seconds=30.0)
REVISION_HEADER = "X-Flannel-Ebpf-Revision"
CLUSTER_HEADER = "X-Flannel-Ebpf-Cluster-Id"


class HttpError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class ServerOptions:
    listen: str  # `[tcp://]host:port`, `:port`, `fd://` or `fd://N` (systemd socket activation)
    tls: EtcdTLS  # --remote-cafile/certfile/keyfile: a CA means clients must present a certificate
    ttl: int = 24 * 3600
    poll_seconds: float = POLL_SECONDS
    #: the flanneld era whose default SubnetLen applies to a config without one (config.default_subnet_len)
    subnet_len_rule: str = "v0.20"
    limits: ConnectionLimits = SERVER_LIMITS
    #: --listen-trust-any-client: any client may write the leases of any PublicIP (flanneld v0.5's server)
    trust_any_client: bool = False

    @property
    def mutual_tls(self) -> bool:
        return bool(self.tls.enabled and self.tls.cafile)


@dataclass(frozen=True)
class ClientIdentity:
    """What the connection proves about a client: the IPv4 addresses it may write leases for, and how."""

    addresses: frozenset[IPv4Address]
    proof: str  # "certificate CN=node-2" or "source address"

    def __str__(self) -> str:
        ips = sorted(self.addresses)
        shown = ",".join(str(ip) for ip in ips[:4]) + (f",+{len(ips) - 4}" if len(ips) > 4 else "")
        return f"{self.proof} [{shown or 'no IPv4 address'}]"


def certificate_identity(cert: dict[str, Any] | None) -> ClientIdentity:
    """The IPv4 IP SANs of a verified peer certificate (ssl.SSLObject.getpeercert()); DNS names, IPv6
    addresses and the CN name no PublicIP."""
    addresses = set()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "IP Address":
            with contextlib.suppress(ValueError):
                addresses.add(IPv4Address(value.strip()))  # IPv6 entries fail here: not a PublicIP
    cn = next((v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"), "")
    cn = "".join(c if c.isprintable() else "?" for c in str(cn)[:64])
    return ClientIdentity(frozenset(addresses), f"certificate CN={cn}" if cn else "certificate")


def source_identity(peername: Any) -> ClientIdentity:
    """The TCP peer's address, IPv4-mapped IPv6 (a dual-stack listener's ::ffff:10.0.0.1) as IPv4."""
    host = peername[0] if isinstance(peername, tuple) and peername else ""
    try:
        address = ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return ClientIdentity(frozenset(), "unknown source address")
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is None:
            return ClientIdentity(frozenset(), f"source address {str(address)[:40]}")
        address = address.ipv4_mapped
    return ClientIdentity(frozenset({address}), "source address")


class Expirations:
    """The expiration of etcd leases by id, for the leases of listings and watch events (flanneld v0.5's
    server sent each lease's real expiry; an etcd v3 key knows only its lease id). A renewal grants a new
    lease id (flannel's and ours), so an id's expiry is looked up once; ids no longer seen are dropped.
    At most LOOKUPS_PER_ANSWER lookups go into one answer (a first snapshot of 10,000 leases would
    otherwise wait for 10,000 round trips): the rest show the zero time until later answers fill them."""

    LOOKUPS_PER_ANSWER = 1000
    PARALLEL = 16
    MAX_KNOWN = 100_000

    def __init__(self) -> None:
        self._known: dict[int, float] = {}

    async def fill(self, registry: SubnetRegistry, leases: list[Lease], complete: bool = False) -> list[Lease]:
        """`leases` with their expirations; `complete`: the whole set (a snapshot), so ids it lacks go."""
        missing = list({lease.lease_id for lease in leases if lease.lease_id and lease.lease_id not in self._known})
        gate = asyncio.Semaphore(self.PARALLEL)

        async def look_up(lease_id: int) -> None:
            async with gate:
                with contextlib.suppress(*ETCD_RETRYABLE):
                    probe = Lease(IPv4Network("0.0.0.0/32"), _NOBODY, None, lease_id=lease_id)
                    found = await registry.with_expiration(probe)
                    if found.expiration is not None:
                        self._known[lease_id] = found.expiration

        await asyncio.gather(*(look_up(lease_id) for lease_id in missing[: self.LOOKUPS_PER_ANSWER]))
        if complete or len(self._known) > self.MAX_KNOWN:
            seen = {lease.lease_id for lease in leases}
            self._known = {lease_id: when for lease_id, when in self._known.items() if lease_id in seen}
        return [
            dataclasses.replace(lease, expiration=self._known[lease.lease_id])
            if lease.expiration is None and lease.lease_id in self._known
            else lease
            for lease in leases
        ]


_NOBODY = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"))


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it (keys may be made up)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def server_ssl_context(tls: EtcdTLS) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    if not (tls.certfile and tls.keyfile):
        raise ValueError("serving TLS needs --remote-certfile and --remote-keyfile")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.certfile, tls.keyfile)
    if tls.cafile:
        ctx.load_verify_locations(tls.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate signed by that CA, no API
    return ctx


def listen_socket(listen: str, environ: dict[str, str] | None = None) -> socket.socket:
    """The listening socket for --listen: a TCP address, or a socket systemd passed (LISTEN_FDS)."""
    env = os.environ if environ is None else environ
    scheme, sep, rest = listen.partition("://")
    if not sep:
        scheme, rest = "tcp", listen
    if scheme == "fd":
        count = int(env.get("LISTEN_FDS", "0") or 0)
        if env.get("LISTEN_PID") and env["LISTEN_PID"] != str(os.getpid()):
            count = 0  # meant for another process (our parent)
        fd = int(rest) if rest else 3
        if not 3 <= fd < 3 + count:
            raise ValueError(f"--listen={listen}: fd {fd} was not passed by systemd (LISTEN_FDS={count})")
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock
    if scheme != "tcp":
        raise ValueError(f"--listen={listen}: unknown scheme {scheme!r} (tcp:// or fd://)")
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--listen={listen}: no port (e.g. 0.0.0.0:8888 or :8888)")
    host = host.strip("[]") or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server binds at once
    sock.bind((host, int(port)))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class RemoteServer:
    """The API over etcd: `make_registry(prefix)` makes the default network's registry; every other network
    is a view of it under its own prefix (SubnetRegistry.for_prefix), made per request: one etcd connection
    for all networks, and a request for a network that does not exist leaves nothing behind."""

    def __init__(self, make_registry: Callable[[str], SubnetRegistry], prefix: str, options: ServerOptions) -> None:
        self._prefix = prefix.rstrip("/")
        self.options = options
        self._root = make_registry(self._prefix)
        self._last_reconnect = 0.0
        self._refusals = _RefusalLog()
        #: one write at a time per (network, PublicIP): the one-lease-per-PublicIP check and the write it
        #: allows must not interleave with another request's for that address
        self._writers = KeyedLocks()
        self._expirations = Expirations()
        #: set when the server stops: long polls answer at once (no events, same cursor), so that the
        #: clients reconnect to the next server instead of holding this one's shutdown up
        self.stopping = asyncio.Event()

    def app(self) -> web.Application:
        # client_max_size: a body is never read past the limit, whatever its framing
        app = web.Application(
            client_max_size=wire.MAX_REQUEST_BYTES + 1,
            middlewares=[api_metrics.LEASE_API.middleware, self._refuse_big_bodies],
        )
        app.router.add_get("/v1/{network}/config", self._wrap(self.get_config))
        app.router.add_post("/v1/{network}/leases", self._wrap(self.acquire_lease))
        app.router.add_post("/v1/{network}/leases/", self._wrap(self.acquire_lease))  # v0.5's client adds "/"
        app.router.add_get("/v1/{network}/leases", self._wrap(self.watch_leases))
        app.router.add_put("/v1/{network}/leases/{subnet}", self._wrap(self.renew_lease))
        app.router.add_get("/v1/{network}/leases/{subnet}", self._wrap(self.get_lease))
        app.router.add_delete("/v1/{network}/leases/{subnet}", self._wrap(self.delete_lease))
        return app

    async def close(self) -> None:
        await self._root.close()

    # --- plumbing ---

    def registry(self, request: web.Request) -> SubnetRegistry:
        network = request.match_info["network"]
        if network != "_" and (not _NETWORK_NAME.fullmatch(network) or network in (".", "..")):
            raise HttpError(400, f"bad network name {network[:64]!r}")
        if network == "_":
            return self._root
        return self._root.for_prefix(f"{self._prefix}/{network}")

    @web.middleware
    async def _refuse_big_bodies(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A body announced bigger than any request needs is refused before a byte of it is read, and so is
        a body without a Content-Length (chunked: flanneld v0.5's client and ours always send the length)."""
        size = request.content_length
        if hdrs.TRANSFER_ENCODING in request.headers:
            error = HttpError(411, "a request body needs a Content-Length (no Transfer-Encoding)")
            self._refusals.log(request, error)
            response = web.Response(status=411, text=f"{error}\n")
            response.force_close()
            return response
        if size is not None and size > wire.MAX_REQUEST_BYTES:
            error = HttpError(413, f"request body of {size} bytes is larger than the {wire.MAX_REQUEST_BYTES} accepted")
            self._refusals.log(request, error)
            response = web.Response(status=413, text=f"{error}\n")
            response.force_close()  # the rest of that body is not worth a kept-alive connection
            return response
        return await handler(request)

    def _wrap(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except HttpError as e:
                self._refusals.log(request, e)
                return web.Response(status=e.status, text=str(e) + "\n")
            except LeaseFormatError as e:
                # Only what etcd holds gets here (a request's own bad input is a 400 in its handler): a bad
                # value costs its key, never the etcd connection (no reconnect) nor any other request.
                error = self._bad_stored_lease(request, e)
                self._refusals.log(request, error)
                return web.Response(status=error.status, text=f"{error}\n")
            except ETCD_RETRYABLE as e:
                # Only etcd's calls can get here: the request's own I/O (its body) is read in _json, whose
                # errors are the client's (a 4xx), never a reason to drop every request's etcd connection.
                reason = describe_etcd_error(e)
                self._refusals.log(request, HttpError(503, reason))
                await self._reconnect(request)
                return web.Response(status=503, text=reason + "\n")

        return run

    async def _reconnect(self, request: web.Request) -> None:
        # One reconnect per second at most: every request in flight fails together when etcd goes away.
        if time.monotonic() - self._last_reconnect < 1.0:
            return
        self._last_reconnect = time.monotonic()
        with contextlib.suppress(HttpError):
            await self.registry(request).reconnect()

    def _bad_stored_lease(self, request: web.Request, error: LeaseFormatError) -> HttpError:
        """The answer for a lease key whose value in etcd is not a lease: 422 to a read; 409 to a write
        (the key exists, so it can be neither created nor renewed nor released until it is deleted)."""
        where = request.match_info.get("subnet", "?")
        with contextlib.suppress(HttpError, LeaseFormatError):
            where = self.registry(request).lease_key(parse_subnet_key(where))
        status = 422 if request.method == "GET" else 409
        return HttpError(status, f"the value at {where} is not a valid lease: {error}")

    async def _json(self, request: web.Request, what: str) -> Any:
        """The request's body as JSON. Called before any etcd call of its handler: whatever goes wrong in
        reading it (a reset, a half-close, a body that does not come) is the client's, a 4xx."""
        try:
            raw = await asyncio.wait_for(request.read(), self.options.limits.request_seconds)
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(413, f"{what} is larger than the {wire.MAX_REQUEST_BYTES} bytes accepted") from None
        except TimeoutError:
            raise HttpError(408, f"{what} did not arrive within {self.options.limits.request_seconds:g} s") from None
        except Exception as e:  # the connection's errors: ConnectionResetError, aiohttp's payload errors
            raise HttpError(400, f"{what} could not be read: {clip(type(e).__name__)}: {clip(e)}") from None
        try:
            return wire.load_body(raw, what, wire.MAX_REQUEST_BYTES)
        except ValueError as e:
            raise HttpError(400, f"JSON decoding error: {e}") from None

    async def _respond(self, registry: SubnetRegistry, value: Any, revision: int = 0) -> web.Response:
        headers = {}
        if revision:
            headers[REVISION_HEADER] = str(revision)
        return web.json_response(value, headers=headers)

    async def _config(self, registry: SubnetRegistry) -> tuple[NetworkConfig, bytes]:
        raw = await registry.get_config()
        if raw is None:
            raise HttpError(404, f"no network config at {registry.config_key}")
        try:
            return parse_config(raw, self.options.subnet_len_rule), raw
        except ConfigError as e:
            raise HttpError(500, f"invalid network config at {registry.config_key}: {e}") from None

    def _subnet(self, request: web.Request) -> IPv4Network:
        try:
            return parse_subnet_key(request.match_info["subnet"])
        except LeaseFormatError as e:
            raise HttpError(400, str(e)) from None

    def identity(self, request: web.Request) -> ClientIdentity:
        transport = request.transport
        if transport is None:
            return ClientIdentity(frozenset(), "closed connection")
        if self.options.mutual_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            return certificate_identity(ssl_object.getpeercert() if ssl_object is not None else None)
        return source_identity(transport.get_extra_info("peername"))

    def authorize(self, request: web.Request, public_ip: IPv4Address) -> None:
        """A write for `public_ip` by this request's client, or 403 before anything is written."""
        if self.options.trust_any_client:
            return
        identity = self.identity(request)
        if public_ip not in identity.addresses:
            raise HttpError(403, f"{identity} may not write leases of PublicIP {public_ip}")

    async def _other_leases(self, registry: SubnetRegistry, public_ip: IPv4Address, subnet: IPv4Network) -> list[str]:
        """The subnets `public_ip` holds in this network besides `subnet`."""
        leases = (await registry.list_leases()).leases
        return [str(lease.subnet) for lease in leases if lease.public_ip == public_ip and lease.subnet != subnet]

    # --- the API ---

    async def get_config(self, request: web.Request) -> web.Response:
        registry = self.registry(request)
        revision, cluster_id = await registry.current_revision()
        config, raw = await self._config(registry)
        response = web.json_response(wire.config_to_wire(config, raw))
        # What the client's lease manager checks every few seconds: a revision going backwards or another
        # cluster id means etcd lost its data, and the client relists (as an agent on etcd would).
        response.headers[REVISION_HEADER] = str(revision)
        response.headers[CLUSTER_HEADER] = f"{cluster_id:x}"
        return response

    async def acquire_lease(self, request: web.Request) -> web.Response:
        """flanneld v0.5's acquisition for a client that names only its attributes: its PublicIP's lease if
        it has one, else a random free subnet; through the same create-only transactions as an agent."""
        registry = self.registry(request)
        try:
            attrs = wire.attrs_from_wire(await self._json(request, "lease attributes"))
        except LeaseFormatError as e:
            raise HttpError(400, str(e)) from None
        self.authorize(request, attrs.public_ip)
        config, _ = await self._config(registry)
        manager = LeaseManager(config, attrs, registry, registry, LeaseOptions(ttl=self.options.ttl))
        # The acquisition reuses the PublicIP's lease when it has one: serialized per address, it never
        # makes a second one (the one-lease-per-PublicIP limit)
        async with self._writers.hold((request.match_info["network"], attrs.public_ip)):
            for _ in range(ACQUIRE_ATTEMPTS):
                try:
                    lease = await manager.acquire_once(None)  # one attempt of the agent's own acquisition
                except OutOfSubnets as e:
                    raise HttpError(503, str(e)) from None
                if lease is not None:
                    logger.info("lease {} acquired for {}", lease.subnet, attrs.public_ip)
                    return await self._respond(registry, wire.lease_to_wire(lease), lease.mod_revision)
        raise HttpError(503, "lost every race for a free subnet; try again")

    async def renew_lease(self, request: web.Request) -> web.Response:
        """Renew (or re-create) one lease. Refused when another PublicIP holds the subnet: the client that
        lost it must not take it back from the host that leased it since."""
        registry = self.registry(request)
        subnet = self._subnet(request)
        body = await self._json(request, "lease")
        try:
            sent = wire.lease_from_wire(body)
        except LeaseFormatError as e:
            raise HttpError(400, str(e)) from None
        if sent.subnet != subnet:
            raise HttpError(400, f"lease {sent.subnet} sent to the URL of {subnet}")
        self.authorize(request, sent.attrs.public_ip)
        ttl = self._ttl(request)
        config, _ = await self._config(registry)
        if not config.contains_subnet(subnet):
            raise HttpError(400, f"subnet {subnet} does not fit the network config ({config.network} /"
                                 f"{config.subnet_len}, {config.subnet_min} to {config.subnet_max})")  # fmt: skip
        async with self._writers.hold((request.match_info["network"], sent.attrs.public_ip)):
            for _ in range(3):  # a race lost to another writer: read again and decide again
                current = await registry.get_lease(subnet)
                if current is None:
                    held = await self._other_leases(registry, sent.attrs.public_ip, subnet)
                    if held:  # one lease per PublicIP per network: else one client could drain the network
                        raise HttpError(403, f"{sent.public_ip} already holds {', '.join(held[:3])} in this "
                                             f"network (one lease per PublicIP); not creating {subnet}")  # fmt: skip
                    got = await registry.create_lease(subnet, sent.attrs, ttl)
                    if got is not None:
                        logger.info("lease {} created for {}", subnet, sent.attrs.public_ip)
                elif current.public_ip != sent.attrs.public_ip:
                    raise HttpError(409, f"subnet {subnet} is held by {current.public_ip}, not by {sent.public_ip}")
                else:
                    got = await registry.update_lease(current, sent.attrs, ttl)
                if got is not None:
                    return await self._respond(registry, wire.lease_to_wire(got), got.mod_revision)
        raise HttpError(409, f"subnet {subnet} keeps changing under us; try again")

    def _ttl(self, request: web.Request) -> int:
        raw = request.query.get("ttl")
        if raw is None:
            return self.options.ttl
        # isdigit() alone takes superscripts (int() fails on them) and other scripts' digits
        if not (raw.isascii() and raw.isdigit()) or not 10 <= int(raw) <= 7 * 24 * 3600:
            raise HttpError(400, f"ttl must be 10 to {7 * 24 * 3600} seconds, not {raw[:20]!r}")
        return int(raw)

    async def get_lease(self, request: web.Request) -> web.Response:
        registry = self.registry(request)
        lease = await registry.get_lease(self._subnet(request))
        if lease is None:
            raise HttpError(404, f"no lease at {registry.lease_key(self._subnet(request))}")
        return await self._respond(registry, wire.lease_to_wire(lease), lease.mod_revision)

    async def delete_lease(self, request: web.Request) -> web.Response:
        registry = self.registry(request)
        subnet = self._subnet(request)
        try:
            holder = IPv4Address(request.query.get("PublicIP", ""))
        except ValueError:
            raise HttpError(400, "DELETE needs ?PublicIP=<the address holding the lease>") from None
        self.authorize(request, holder)
        lease = await registry.get_lease(subnet)
        if lease is None:
            raise HttpError(404, f"no lease at {registry.lease_key(subnet)}")
        if lease.public_ip != holder:
            raise HttpError(409, f"subnet {subnet} is held by {lease.public_ip}, not by {holder}")
        if not await registry.delete_lease(lease):
            raise HttpError(409, f"subnet {subnet} changed meanwhile; not deleted")
        logger.info("lease {} of {} released", subnet, holder)
        return web.json_response({})

    async def watch_leases(self, request: web.Request) -> web.Response:
        """No cursor: a snapshot and its revision. A cursor: the events after it, waiting for the first one
        up to poll_seconds. A cursor etcd no longer has (compacted), or one beyond etcd's revision (etcd
        lost its data, or this is another cluster), gets a snapshot: the client replaces its whole view, so
        it misses nothing either way."""
        registry = self.registry(request)
        raw = request.query.get("next")
        if raw is None:
            return await self._snapshot(registry)
        try:
            cursor = wire.parse_cursor(raw)
        except ValueError as e:
            raise HttpError(400, f"failed to parse cursor: {e}") from None
        if await registry.get_config() is None:  # no network there: no etcd watch, no connection held
            raise HttpError(404, f"no network config at {registry.config_key}")
        revision, _ = await registry.current_revision()
        if cursor > revision:
            logger.info("watch from {}: cursor {} is beyond etcd's revision {}; sending a snapshot",
                        request.remote, cursor, revision)  # fmt: skip
            return await self._snapshot(registry)
        try:
            events, last = await self._events_after(registry, cursor)
        except WatchCompacted:
            logger.info("watch from {}: cursor {} was compacted away; sending a snapshot", request.remote, cursor)
            return await self._snapshot(registry)
        added = await self._expirations.fill(registry, [e.lease for e in events if e.kind == LeaseEvent.ADDED])
        timed = iter(added)
        events = [LeaseEvent(e.kind, next(timed)) if e.kind == LeaseEvent.ADDED else e for e in events]
        body = {"events": [wire.event_to_wire(e) for e in events], "snapshot": None, "cursor": str(last)}
        return await self._respond(registry, body, revision)

    async def _snapshot(self, registry: SubnetRegistry) -> web.Response:
        listing = await registry.list_leases()
        leases = await self._expirations.fill(registry, listing.leases, complete=True)
        body = {"events": None, "snapshot": [wire.lease_to_wire(lease) for lease in leases],
                "cursor": str(listing.revision)}  # fmt: skip
        return await self._respond(registry, body, listing.revision)

    async def _events_after(self, registry: SubnetRegistry, cursor: int) -> tuple[list[LeaseEvent], int]:
        """The events after `cursor` that etcd has or delivers within poll_seconds, and the cursor that
        follows them (the revision of the last one; garbage keys advance it too)."""
        items: asyncio.Queue[tuple[int, LeaseEvent | None] | BaseException] = asyncio.Queue()

        async def follow() -> None:
            try:
                queued = 0
                async for revision, event, _garbage in registry.watch_leases(cursor + 1):
                    items.put_nowait((revision, event))
                    queued += 1
                    if queued >= BATCH_MAX:
                        return  # an answer holds no more: a long history is not read into memory
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the request, which answers for it
                items.put_nowait(e)

        task = asyncio.ensure_future(follow())
        events: list[LeaseEvent] = []
        last = cursor
        try:
            deadline = self.options.poll_seconds
            while len(events) < BATCH_MAX:
                if self.stopping.is_set():
                    break
                getter = asyncio.ensure_future(items.get())
                stopper = asyncio.ensure_future(self.stopping.wait())
                done, _ = await asyncio.wait({getter, stopper}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if getter not in done:
                    getter.cancel()
                    break
                item = getter.result()
                if isinstance(item, BaseException):
                    if last > cursor:
                        break  # answer what we have; the next poll meets the error again
                    raise item
                revision, event = item
                if event is not None:
                    events.append(event)
                last = max(last, revision)
                deadline = BATCH_WINDOW
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return events, last


class _RefusalLog:
    """The log of refused (4xx) and failed (5xx: etcd unavailable) requests: anybody can cause them, so they
    must not flood the log. 404s (a network or lease that does not exist: what a probe or a typo asks for)
    go to DEBUG; the others at most BURST lines per PERIOD each for refusals and failures (403s and 5xx at
    WARNING, the rest at INFO), then DEBUG, with the count of those left out said once."""

    BURST = 20
    PERIOD = 60.0

    def __init__(self) -> None:
        self._since = {"refused": -self.PERIOD, "failed": -self.PERIOD}
        self._logged = {"refused": 0, "failed": 0}
        self._left_out = {"refused": 0, "failed": 0}

    def log(self, request: web.Request, error: HttpError) -> None:
        line = ("{} {} from {}: {} {}", request.method, clip(request.path), request.remote, error.status, error)
        if error.status == 404:
            logger.debug(*line)
            return
        kind = "failed" if error.status >= 500 else "refused"
        now = time.monotonic()
        if now - self._since[kind] >= self.PERIOD:
            if self._left_out[kind]:
                logger.info("{} more {} requests in the last {:.0f}s (logged at DEBUG)", self._left_out[kind], kind,
                            now - self._since[kind])  # fmt: skip
            self._since[kind], self._logged[kind], self._left_out[kind] = now, 0, 0
        if self._logged[kind] < self.BURST:
            self._logged[kind] += 1
            logger.log("WARNING" if error.status == 403 or error.status >= 500 else "INFO", *line)
        else:
            self._left_out[kind] += 1
            logger.debug(*line)


async def serve(registry_factory: Callable[[str], SubnetRegistry], prefix: str, options: ServerOptions,
                stop: asyncio.Event) -> int:  # fmt: skip
    try:
        ctx = server_ssl_context(options.tls)
        sock = listen_socket(options.listen)
    except (OSError, ValueError, ssl.SSLError) as e:
        logger.error("cannot listen on {}: {}", options.listen, e)
        return 1
    server = RemoteServer(registry_factory, prefix, options)
    limits = options.limits
    runner = web.AppRunner(
        server.app(), handle_signals=False, keepalive_timeout=limits.keepalive_seconds, **ANSWER_HOOK
    )
    await runner.setup()
    http = runner.server
    assert http is not None
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    connection_errors = quiet_connection_errors(loop, "the lease server", limits.log_every)
    listener = GuardedListener(http, sock, limits, "the lease server", ssl_context=ctx)
    listener.start()
    mode = "plain HTTP" if ctx is None else "TLS, client certificates required" if options.tls.cafile else "TLS"
    logger.info("serving flannel's remote API on {} ({}) for the leases under {}", options.listen, mode, prefix)
    if options.trust_any_client:
        logger.warning("--listen-trust-any-client: every client that reaches {} may acquire, renew and delete "
                       "the lease of ANY PublicIP", options.listen)  # fmt: skip
    elif options.mutual_tls:
        logger.info("a client may write only the leases of the IPv4 addresses in its certificate's subjectAltName")
    else:
        logger.info("a client may write only the leases of its source address (NATed clients: use mutual TLS)")
    sd_notify.ready(f"serving on {options.listen}")
    try:
        await stop.wait()
    finally:
        sd_notify.stopping("stopping")
        server.stopping.set()
        await listener.close()
        await runner.shutdown()
        await http.shutdown(2.0)  # the open connections: long polls answer at once (stopping), the rest close
        await runner.cleanup()
        await server.close()
        connection_errors.flush()
        loop.set_exception_handler(previous_handler)
    logger.info("server stopped")
    return 0


def run_server(agent_options: Any) -> int:
    """`up --listen`: serve until SIGTERM/SIGINT. `agent_options` is the agent's (AgentOptions): its etcd
    settings, its lease TTL, and listen/remote_tls."""
    options = ServerOptions(
        listen=agent_options.listen,
        tls=agent_options.remote_tls,
        ttl=agent_options.lease.ttl,
        subnet_len_rule=agent_options.effective_subnet_len_rule,
        trust_any_client=agent_options.listen_trust_any_client,
        # the opt-in for clients behind NAT: many of them share one source address, so no per-address cap
        limits=dataclasses.replace(SERVER_LIMITS, max_per_source=SERVER_LIMITS.max_connections)
        if agent_options.listen_trust_any_client
        else SERVER_LIMITS,
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(agent_options.registry_for_prefix, agent_options.etcd_prefix, options, stop)

    return asyncio.run(main())
