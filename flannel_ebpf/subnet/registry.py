"""flannel's data in etcd v3: the network config and the subnet leases. Knows keys and JSON, no policy.

Every write is conditional (an etcd transaction): a lease is created only if its key does not exist, and
changed only if nobody touched it since we read it. So a host never overwrites another host's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc
from loguru import logger

from flannel_ebpf.subnet import etcd_v2
from flannel_ebpf.subnet.lease import (
    MAX_VALUE_BYTES,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseFormatError,
    parse_subnet_key,
)
from flannel_ebpf.subnet.store import (
    DEFAULT_PREFIX,
    Connection,
    EtcdPermissionError,
    EtcdStore,
    EtcdTLS,
    Listing,
    WatchCompacted,
    parse_endpoint,
)

#: Keys per range request when listing subnets/. One unpaginated range is a single gRPC message, and
#: gRPC refuses to receive more than 4 MiB: about 35,000 leases, or a few large values, would make every
#: listing fail forever. A page that is still too big is asked for again in smaller pieces. 500 keys are
#: parsed in ~20 ms between two awaits: the event loop is never held long.
LIST_PAGE_SIZE = 500


def grpc_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an etcd error (aetcd wraps it in its own exceptions), if any."""
    for e in (error, error.__cause__):
        code = getattr(e, "code", None)
        if callable(code):
            with contextlib.suppress(Exception):
                result = code()
                if isinstance(result, grpc.StatusCode):
                    return result
    return None


# What gRPC's TLS layer says, mapped to the cause an operator can fix. The client-certificate case shows
# up only after the handshake (TLS 1.3 sends the server's verdict later): the connection is torn down with
# an alert, which gRPC reports as a decryption failure.
_TLS_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
_TLS_CLIENT_CERT_REFUSED = ("TSI_DATA_CORRUPTED", "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA")
_TLS_NO_TLS = ("Handshake read failed", "WRONG_VERSION_NUMBER")


def tls_error_kind(error: BaseException) -> str:
    """'untrusted' (the server's certificate is not signed by our CA), 'client-cert' (the server refused our
    client certificate, or wanted one), 'no-tls' (the endpoint does not speak TLS), or '' (not a TLS fault)."""
    text = " ".join(str(part) for e in (error, error.__cause__) if e is not None for part in (e, grpc_code_details(e)))
    if any(m in text for m in _TLS_UNTRUSTED):
        return "untrusted"
    if any(m in text for m in _TLS_CLIENT_CERT_REFUSED):
        return "client-cert"
    if any(m in text for m in _TLS_NO_TLS):
        return "no-tls"
    return ""


def describe_tls_error(kind: str, endpoint: str, tls: EtcdTLS | None) -> str:
    """The cause of a TLS failure, naming the endpoint and the files involved."""
    tls = tls or EtcdTLS()
    if kind == "untrusted":
        if tls.cafile:
            return (f"etcd at {endpoint} presents a TLS certificate that is not signed by the CA in --etcd-cafile "
                    f"{tls.cafile} (certificate verify failed): give the CA that signed its certificate")  # fmt: skip
        return (f"etcd at {endpoint} presents a TLS certificate that none of the system's CAs trusts "
                "(certificate verify failed): give the CA that signed it with --etcd-cafile")  # fmt: skip
    if kind == "client-cert":
        if not tls.certfile:
            return (f"etcd at {endpoint} requires a TLS client certificate and none was given: set --etcd-certfile "
                    "and --etcd-keyfile")  # fmt: skip
        return (f"etcd at {endpoint} refused the TLS client certificate {tls.certfile} (not signed by a CA that "
                "etcd trusts: its --trusted-ca-file)")  # fmt: skip
    if kind == "no-tls":
        return (f"etcd at {endpoint} closed the connection during the TLS handshake: it does not speak TLS there "
                "(a plaintext etcd needs an http:// endpoint and no TLS files)")  # fmt: skip
    return f"TLS with etcd at {endpoint} failed"


def describe_etcd_error(error: BaseException) -> str:
    """One line saying what went wrong talking to etcd, for the operator."""
    if isinstance(error, EtcdPermissionError | LeaseFormatError | WatchCanceled) or getattr(error, "one_line", False):
        return str(error)
    code = grpc_code(error)
    text = str(error) or type(error).__name__
    kind = tls_error_kind(error)
    if kind == "untrusted":
        return f"etcd's TLS certificate is not trusted: check --etcd-cafile ({text})"
    if kind == "client-cert":
        return f"etcd refused our TLS client certificate or wants one: check --etcd-certfile/--etcd-keyfile ({text})"
    if kind == "no-tls":
        return f"etcd does not speak TLS on this https endpoint ({text})"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"etcd denied the request (permission denied: {text}); see docs/SECURITY.md for the role the agent needs"
    if code == grpc.StatusCode.INVALID_ARGUMENT and "auth" in text.lower():
        return f"etcd authentication failed ({text}): check --etcd-username/--etcd-password"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"etcd's answer is too big for one gRPC message ({text})"
    if isinstance(error, ETCD_UNAVAILABLE):
        return f"etcd unavailable ({text})"
    return f"etcd error ({code.name + ': ' if code else ''}{text})"


@contextlib.contextmanager
def _access(key: str, access: str) -> Iterator[None]:
    """Turn etcd's PERMISSION_DENIED into an EtcdPermissionError that names the key and the access."""
    try:
        yield
    except aetcd.exceptions.ClientError as e:
        if not isinstance(e, EtcdPermissionError) and grpc_code(e) == grpc.StatusCode.PERMISSION_DENIED:
            details = grpc_code_details(e)
            raise EtcdPermissionError(key, access, details) from e
        raise


def grpc_code_details(error: BaseException) -> str:
    for e in (error, error.__cause__):
        details = getattr(e, "details", None)
        if callable(details):
            with contextlib.suppress(Exception):
                return str(details() or "")
    return ""


# Errors that mean "etcd is not reachable right now": retried, never fatal. An expired auth token (etcd
# restarted) is one of them: the reconnect that follows authenticates again.
ETCD_UNAVAILABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    aetcd.exceptions.UnauthenticatedError,
    grpc.RpcError,
    OSError,
    asyncio.TimeoutError,
)
# What the agent's loops survive: the above, any other etcd error and a garbage value under our own key
# (all logged, backed off and retried: the data path must never go down because etcd said something odd).
ETCD_RETRYABLE = (*ETCD_UNAVAILABLE, aetcd.exceptions.ClientError, LeaseFormatError)

# Keepalive pings let a watch notice a dead etcd (or a cut network) instead of waiting forever (etcd
# refuses pings more often than every 5 s: --grpc-keepalive-min-time). gRPC's own reconnect back-off grows
# to 120 s by default: a channel that failed during an outage would keep failing for up to two minutes
# after etcd is back. Bounded to 1 s, it is never the slow part of a recovery (the agent also opens a new
# channel after each failure).
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1_000,
}
#: A watch stream silent for this long is asked for a progress report (etcd answers at once, even with
#: nothing to report); no answer within WATCH_PROGRESS_TIMEOUT means the stream is dead: reconnect.
WATCH_IDLE_SECONDS = 5.0
WATCH_PROGRESS_TIMEOUT = 3.0


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client, plus TLS (aetcd itself only opens plaintext channels)."""

    def __init__(self, host: str, port: int, tls: EtcdTLS | None, **kwargs: object) -> None:
        super().__init__(host=host, port=port, options=_CHANNEL_OPTIONS, **kwargs)
        self._tls = tls

    async def connect(self) -> None:
        if self._tls is None or self._connected.is_set():
            await super().connect()
            return

        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(self._tls.cafile),
            private_key=read(self._tls.keyfile),
            certificate_chain=read(self._tls.certfile),
        )
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", creds, options=self._options.items())
        if self._username is not None and self._password is not None:
            # As aetcd's own connect does on a plaintext channel: a token, sent as metadata on every call.
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class WatchCanceled(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """etcd canceled our watch for a reason other than a compaction (its reason is in the message):
    no more events will come on it, so the caller must relist and watch again."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"etcd canceled the watch ({reason or 'no reason given'})")
        self.reason = reason


class WatchStalled(aetcd.exceptions.ConnectionTimeoutError):  # type: ignore[misc]  # aetcd is untyped
    """The watch stream stopped answering (a dead connection that TCP has not noticed yet)."""


@dataclass
class _Connection(Connection):
    """A registry's etcd connection: the endpoint in use and its client (made on first use)."""

    client: _Client | None = None


class SubnetRegistry(EtcdStore[_Connection]):
    """flannel's keys under one prefix, on one etcd cluster (tries the endpoints in turn). A LeaseSource."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = DEFAULT_PREFIX,
        tls: EtcdTLS | None = None,
        username: str = "",
        password: str = "",
        timeout: float = 5.0,
        watch_idle: float = WATCH_IDLE_SECONDS,
        watch_progress_timeout: float = WATCH_PROGRESS_TIMEOUT,
    ) -> None:
        super().__init__(endpoints, prefix, tls, _Connection())
        self._auth = (username or None, password or None)
        self._timeout = timeout
        self.watch_idle = watch_idle
        self.watch_progress_timeout = watch_progress_timeout

    # --- connection ---

    def _new_client(self) -> _Client:
        host, port, _https = parse_endpoint(self.endpoint)
        tls = self.tls_for(self.endpoint)
        return _Client(host, port, tls, username=self._auth[0], password=self._auth[1], timeout=self._timeout)

    @property
    def client(self) -> _Client:
        if self._connection.client is None:
            self._connection.client = self._new_client()
        return self._connection.client

    async def close(self) -> None:
        if self._connection.client is not None:
            client, self._connection.client = self._connection.client, None
            try:
                await client.close()
            except Exception as e:  # closing a broken channel may fail; nothing to do about it
                logger.debug("closing etcd client: {}", e)

    # --- reads ---

    async def get_config(self) -> bytes | None:
        with _access(self.config_key, "read"):
            kv = await self.client.get(self.config_key.encode())
        return None if kv is None else kv.value

    async def v2_config_hint(self) -> str:
        """Ask etcd's v2 store for the config (in a thread: blocking HTTP, short timeout): the hint for a
        config written with `etcdctl set`, with the command that copies it to v3; "" when none has it."""
        # the endpoint that just answered first: it is the one most likely to answer this quickly too
        endpoints = [self.endpoint, *(e for e in self.endpoints if e != self.endpoint)]
        username, password = self._auth[0] or "", self._auth[1] or ""
        found = await asyncio.to_thread(
            etcd_v2.find_v2_config, endpoints, self.config_key, self._tls, username, password
        )
        return "" if found is None else etcd_v2.hint(found, self._tls, username)

    def _lease_from_kv(self, kv: aetcd.rtypes.KeyValue) -> Lease:
        """The lease a key holds, without its expiration (see _with_expiration)."""
        name = kv.key.decode(errors="replace")[len(self.subnets_prefix) :]
        subnet = parse_subnet_key(name)
        if len(kv.value) > MAX_VALUE_BYTES:  # said before even trying to decode it
            raise LeaseFormatError(f"value of {len(kv.value)} bytes is larger than the {MAX_VALUE_BYTES} accepted")
        attrs = LeaseAttrs.from_json(kv.value)
        return Lease(subnet, attrs, None, lease_id=kv.lease, mod_revision=kv.mod_revision)

    async def with_expiration(self, lease: Lease) -> Lease:
        """The lease with its expiration (one TTL request to etcd; a reservation as it is)."""
        return await self._with_expiration(lease)

    async def _with_expiration(self, lease: Lease) -> Lease:
        """The lease with its expiration: one TTL request to etcd. Only our own lease needs it (to renew
        in time); a listing never asks, which would cost one round trip per peer (10,000 at scale)."""
        if lease.is_reservation:
            return lease
        info = await self.client.get_lease_info(lease.lease_id, keys=False)
        return dataclasses.replace(lease, expiration=time.time() + max(info.TTL, 0))

    async def _range(
        self, start: bytes, end: bytes, limit: int, revision: int, keys_only: bool = False
    ) -> rpc.RangeResponse:
        """One Range request with a limit and a fixed revision (aetcd's get_prefix has neither)."""
        client = self.client
        await client.connect()
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only)
        try:
            return await client.kvstub.Range(request, timeout=self._timeout, metadata=client.metadata)
        except rpc.AioRpcError as e:
            if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE):
                raise  # handled by the listing: a smaller page, or a restart after a compaction
            aetcd.exceptions._handle_exception(e)
            raise  # not reached: _handle_exception always raises

    async def list_leases(self, page_size: int = LIST_PAGE_SIZE) -> Listing:
        """All leases, with the revision to watch from. Garbage keys and values are reported, not raised.

        Read in pages (range + limit, continuing after the last key), all at the revision of the first
        page, so the listing is one consistent snapshot however many keys there are. A page too big for
        one gRPC message is read again in smaller pieces; a single value too big for one is reported as
        garbage under its key. A compaction between pages starts the listing again.
        """
        with _access(self.subnets_prefix, "read"):
            for _attempt in range(3):
                try:
                    return await self._list_pages(page_size)
                except rpc.AioRpcError as e:
                    if e.code() != grpc.StatusCode.OUT_OF_RANGE:
                        raise
                    logger.info("listing {}: etcd compacted meanwhile; listing again", self.subnets_prefix)
            return await self._list_pages(page_size)

    async def _list_pages(self, page_size: int) -> Listing:
        prefix = self.subnets_prefix.encode()
        end = aetcd.utils.prefix_range_end(prefix)
        start, revision, limit = prefix, 0, page_size
        leases: list[Lease] = []
        garbage: list[tuple[str, str]] = []
        occupied: dict[IPv4Network, str] = {}
        while True:
            try:
                page = await self._range(start, end, limit, revision)
            except rpc.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if limit > 1:
                    limit = max(1, limit // 4)
                    continue
                # One value alone is too big to receive: name its key and step over it.
                keys = await self._range(start, end, 1, revision, keys_only=True)
                if not keys.kvs:
                    raise
                key = keys.kvs[0].key
                garbage.append((key.decode(errors="replace"), "value too big for one gRPC message (over 4 MiB)"))
                start, revision = key + b"\0", revision or keys.header.revision
                continue
            # An empty range still has a header; its revision is the store's current revision.
            revision = revision or page.header.revision
            for kv in page.kvs:
                key = kv.key.decode(errors="replace")
                try:
                    subnet = parse_subnet_key(key[len(self.subnets_prefix) :])
                except LeaseFormatError as e:
                    garbage.append((key, str(e)))
                    continue
                try:
                    leases.append(self._lease_from_kv(kv))
                except LeaseFormatError as e:
                    garbage.append((key, str(e)))
                    occupied[subnet] = str(e)
            if not page.more or not page.kvs:
                return Listing(leases, revision, garbage, occupied)
            start = page.kvs[-1].key + b"\0"
            limit = min(page_size, limit * 2)  # grow back after a page of big values

    async def get_lease(self, subnet: IPv4Network) -> Lease | None:
        with _access(self.lease_key(subnet), "read"):
            kv = await self.client.get(self.lease_key(subnet).encode())
        if kv is None:
            return None
        return await self._with_expiration(self._lease_from_kv(kv))

    async def current_revision(self) -> tuple[int, int]:
        """(revision, cluster_id) now: a revision lower than one seen before means etcd lost its data."""
        with _access(self.config_key, "read"):
            result = await self.client.get(self.config_key.encode())
            if result is None:  # no key: read the header through a range request instead
                rng = await self.client.get_prefix(self.config_key.encode())
                return rng.header.revision, rng.header.cluster_id
        return result.header.revision, result.header.cluster_id

    # --- writes (all conditional) --------------------------------------------------------------------------

    async def _grant(self, ttl: int | None) -> int:
        if not ttl:
            return 0  # a reservation: no etcd lease, never expires
        lease = await self.client.lease(ttl)
        lease_id: int = lease.id
        return lease_id

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        """Create the lease only if its key does not exist. None: somebody else holds it."""
        with _access(self.lease_key(subnet), "readwrite"):
            return await self._create_lease(subnet, attrs, ttl)

    async def _create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        key = self.lease_key(subnet).encode()
        lease_id = await self._grant(ttl)
        tx = self.client.transactions
        ok, responses = await self.client.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, attrs.to_json().encode(), lease=lease_id or None)],
            failure=[],
        )
        if not ok:
            if lease_id:
                await self.client.revoke_lease(lease_id)
            return None
        revision = responses[0].response_put.header.revision
        expiration = time.time() + ttl if ttl else None
        return Lease(subnet, attrs, expiration, lease_id=lease_id, mod_revision=revision)

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        """Rewrite our lease (new attrs, a fresh TTL) only if nobody changed it since `lease` was read.

        None: the key changed or vanished meanwhile; the caller re-reads and decides.
        A reservation (lease_id 0) stays a reservation: it gets no TTL.
        """
        with _access(self.lease_key(lease.subnet), "readwrite"):
            return await self._update_lease(lease, attrs, ttl)

    async def _update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        key = self.lease_key(lease.subnet).encode()
        lease_id = 0 if lease.is_reservation else await self._grant(ttl)
        tx = self.client.transactions
        ok, responses = await self.client.transaction(
            compare=[tx.mod(key) == lease.mod_revision, tx.version(key) > 0],
            success=[tx.put(key, attrs.to_json().encode(), lease=lease_id or None)],
            failure=[],
        )
        if not ok:
            if lease_id:
                await self.client.revoke_lease(lease_id)
            return None
        if lease.lease_id and lease.lease_id != lease_id:
            # The key moved to the new etcd lease; the old one would only linger until its TTL.
            try:
                await self.client.revoke_lease(lease.lease_id)
            except aetcd.exceptions.ClientError as e:
                logger.debug("revoking superseded etcd lease {:x}: {}", lease.lease_id, e)
        revision = responses[0].response_put.header.revision
        expiration = None if lease.is_reservation or not ttl else time.time() + ttl
        return Lease(lease.subnet, attrs, expiration, lease_id=lease_id, mod_revision=revision)

    async def delete_lease(self, lease: Lease) -> bool:
        """Delete our lease only if it is still the one we hold (same modification revision)."""
        with _access(self.lease_key(lease.subnet), "readwrite"):
            return await self._delete_lease(lease)

    async def _delete_lease(self, lease: Lease) -> bool:
        key = self.lease_key(lease.subnet).encode()
        tx = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[tx.mod(key) == lease.mod_revision], success=[tx.delete(key)], failure=[]
        )
        if ok and lease.lease_id:
            try:
                await self.client.revoke_lease(lease.lease_id)
            except aetcd.exceptions.ClientError as e:
                logger.debug("revoking etcd lease {:x}: {}", lease.lease_id, e)
        return bool(ok)

    # --- presence: one agent per PublicIP -----------------------------------------------------------------

    async def claim_presence(self, public_ip: IPv4Address, identity: str, ttl: int) -> tuple[int, str]:
        """Claim `public_ip` for this agent: (etcd lease id, "") on success, (0, holder) if another agent
        holds it. A claim left by an earlier run of this same agent (same identity) is taken over.
        Raises EtcdPermissionError (naming the key) when our etcd role does not cover it."""
        key = self.presence_key(public_ip).encode()
        lease_id = await self._grant(ttl)
        tx = self.client.transactions
        try:
            with _access(self.presence_key(public_ip), "readwrite"):
                ok, responses = await self.client.transaction(
                    compare=[tx.version(key) == 0],
                    success=[tx.put(key, identity.encode(), lease=lease_id)],
                    failure=[tx.get(key)],
                )
        except EtcdPermissionError:
            with contextlib.suppress(aetcd.exceptions.ClientError):
                await self.client.revoke_lease(lease_id)  # nothing is attached to it yet
            raise
        if ok:
            return lease_id, ""
        held = responses[0][0] if responses and responses[0] else None
        holder = held[0].decode(errors="replace") if held else ""
        if held and holder == identity:
            mod = held[1].mod_revision
            ok, _ = await self.client.transaction(
                compare=[tx.mod(key) == mod], success=[tx.put(key, identity.encode(), lease=lease_id)], failure=[]
            )
            if ok:
                return lease_id, ""
        await self.client.revoke_lease(lease_id)
        return 0, holder or "another agent"

    async def refresh_presence(self, lease_id: int) -> bool:
        """Keep the claim alive; False when its etcd lease has expired (the claim must be made again)."""
        reply = await self.client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    async def release_presence(self, lease_id: int) -> None:
        if lease_id:
            await self.client.revoke_lease(lease_id)

    # --- watch ---

    async def watch_leases(self, start_revision: int) -> AsyncIterator[tuple[int, LeaseEvent | None, str]]:
        """Yield (revision, event, garbage_reason) for every change under subnets/, from start_revision.

        Every event of every watch response is delivered (flanneld v0.20.2 kept only the first).
        A garbage key yields (revision, None, reason); a garbage value under a valid lease key yields
        (revision, REMOVED event for that subnet, reason).

        The watch is our own gRPC stream (aetcd's watcher ignores a `canceled` response, which leaves a
        watch that silently never delivers again). Raises WatchCompacted when start_revision is gone,
        WatchCanceled when etcd cancels the watch for any other reason, WatchStalled when the stream
        answers neither events nor a progress request in time, and etcd's connection errors when the
        stream breaks (with `hasleader` set, etcd also ends it when its member loses the cluster's
        leader). The caller resumes from the last revision, or relists.
        """
        client = self.client
        await client.connect()
        prefix = self.subnets_prefix.encode()
        requests: asyncio.Queue[rpc.WatchRequest | None] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[rpc.WatchRequest]:
            while (request := await requests.get()) is not None:
                yield request

        create = rpc.WatchCreateRequest(
            key=prefix, range_end=aetcd.utils.prefix_range_end(prefix), start_revision=start_revision
        )
        requests.put_nowait(rpc.WatchRequest(create_request=create))
        metadata = (*(client.metadata or ()), ("hasleader", "true"))
        call = rpc.WatchStub(client.channel).Watch(outgoing(), metadata=metadata)
        # Responses are read by a task of their own: cancelling a pending read() would cancel the call.
        responses: asyncio.Queue[rpc.WatchResponse | BaseException | None] = asyncio.Queue()

        async def reader() -> None:
            try:
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        responses.put_nowait(None)
                        return
                    responses.put_nowait(response)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer, which raises it
                responses.put_nowait(e)

        read_task = asyncio.ensure_future(reader())
        try:
            created, asked = False, False
            while True:
                wait = self._timeout if not created else self.watch_progress_timeout if asked else self.watch_idle
                try:
                    response = await asyncio.wait_for(responses.get(), wait)
                except TimeoutError:
                    if not created:
                        raise WatchStalled(f"etcd did not confirm the watch within {self._timeout:g}s") from None
                    if asked:
                        raise WatchStalled(
                            f"the watch stream is silent: no answer to a progress request within "
                            f"{self.watch_progress_timeout:g}s"
                        ) from None
                    requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                    asked = True
                    continue
                if response is None:
                    raise WatchStalled("etcd closed the watch stream")
                if isinstance(response, BaseException):
                    if isinstance(response, rpc.AioRpcError):
                        _raise_client_error(response)
                    raise response
                asked = False
                if response.compact_revision:
                    raise WatchCompacted(response.compact_revision)
                if response.canceled:
                    raise WatchCanceled(response.cancel_reason)
                if response.created:
                    created = True
                for event in response.events:
                    for item in await self._watch_item(event):
                        yield item
        finally:
            requests.put_nowait(None)
            read_task.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task

    async def _watch_item(self, event: rpc.Event) -> list[tuple[int, LeaseEvent | None, str]]:
        kv = event.kv
        revision = kv.mod_revision
        name = kv.key.decode(errors="replace")[len(self.subnets_prefix) :]
        try:
            subnet = parse_subnet_key(name)
        except LeaseFormatError as e:
            return [(revision, None, f"{kv.key.decode(errors='replace')}: {e}")]
        removed = LeaseEvent(LeaseEvent.REMOVED, Lease(subnet, _NO_ATTRS))
        if event.type == rpc.Event.DELETE:
            # A delete (or an expiry) carries no value: the peer is known by its subnet.
            return [(revision, removed, "")]
        try:
            lease = self._lease_from_kv(kv)
        except LeaseFormatError as e:
            # The key no longer describes a usable peer: whatever it held before is gone, exactly as a
            # relist would see it.
            return [(revision, removed, f"{kv.key.decode(errors='replace')}: {e}")]
        return [(revision, LeaseEvent(LeaseEvent.ADDED, lease), "")]


def _raise_client_error(error: rpc.AioRpcError) -> None:
    """aetcd's exception for a gRPC error (UNAVAILABLE -> ConnectionFailedError, ...), chained to it."""
    aetcd.exceptions._handle_exception(error)
    raise error


# Placeholder attributes for a removed lease (etcd does not send the old value on delete).
_NO_ATTRS = LeaseAttrs(public_ip=IPv4Address(0), backend_type="")
