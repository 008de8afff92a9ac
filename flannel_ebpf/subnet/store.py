"""What every lease store shares: the LeaseSource protocol and its types, and the plumbing of both etcd
stores (SubnetRegistry on the v3 API, EtcdV2Registry on the v2 keys API): endpoints tried in turn, the one
TLS decision per endpoint, flannel's keys under one prefix, views on other prefixes through one connection.
"""

from __future__ import annotations

import copy
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, Protocol, Self, TypeVar
from urllib.parse import urlparse

import aetcd.exceptions

from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, subnet_key

DEFAULT_PREFIX = "/coreos.com/network"


@dataclass(frozen=True)
class EtcdTLS:
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cafile or self.certfile or self.keyfile)


def parse_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """`http://10.0.0.1:2379` -> (host, port, is_https)."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    url = urlparse(endpoint)
    if not url.hostname:
        raise ValueError(f"not an etcd endpoint: {endpoint!r}")
    return url.hostname, url.port or 2379, url.scheme == "https"


def endpoint_tls(endpoint: str, tls: EtcdTLS | None) -> EtcdTLS | None:
    """The TLS settings every connection to `endpoint` uses (None: plaintext), given the --etcd-*file
    options: TLS for an https:// endpoint (the system's CAs when no file is given), and for any endpoint
    (http://, bare host:port) once a TLS file is given. Never a fall-back to plaintext. The one decision
    for the gRPC client, the v2 store and the v2 probe alike."""
    https = parse_endpoint(endpoint)[2]
    if tls is not None and tls.enabled:
        return tls
    return (tls or EtcdTLS()) if https else None


def base_url(endpoint: str, tls: EtcdTLS | None) -> str:
    """The URL etcd's HTTP (v2) API is reached at: https:// whenever the gRPC client would use TLS there."""
    host, port, _ = parse_endpoint(endpoint)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if endpoint_tls(endpoint, tls) is not None else 'http'}://{host}:{port}"


def ssl_context(tls: EtcdTLS | None) -> ssl.SSLContext | None:
    """The client TLS context of an HTTP connection to etcd (None: plaintext)."""
    if tls is None:
        return None
    context = ssl.create_default_context(cafile=tls.cafile or None)
    if tls.certfile:
        context.load_cert_chain(tls.certfile, tls.keyfile or None)
    return context


class EtcdPermissionError(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """etcd refused a request on `key` for lack of a permission (etcd auth is on and our role lacks it)."""

    def __init__(self, key: str, access: str, details: str = "") -> None:
        self.key, self.access = key, access
        super().__init__(
            f"etcd denies {access} access to {key} (permission denied{': ' + details if details else ''}); "
            f"grant this user's role {access} on it (see docs/SECURITY.md)"
        )


class WatchCompacted(Exception):
    """The revision a watch wanted to resume from was compacted away: relist."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Listing:
    leases: list[Lease]
    revision: int  # etcd's revision when the listing was taken: watch from revision + 1
    garbage: list[tuple[str, str]]  # (key, reason) of keys/values that are not valid leases
    #: subnets whose key is a valid lease key but whose value is garbage: nobody's peer, but the key
    #: exists, so nobody can create a lease there either (subnet -> reason)
    occupied: dict[IPv4Network, str] = field(default_factory=dict)


class LeaseSource(Protocol):
    """Where a network's config and leases come from: etcd (SubnetRegistry) or, with --remote, a lease
    server (flannel_ebpf.remote.client.RemoteRegistry). What the agent and its LeaseManager use of it."""

    endpoints: list[str]

    # --- what the agent names in its messages ---
    @property
    def endpoint(self) -> str: ...
    def tls_for(self, endpoint: str) -> EtcdTLS | None: ...
    @property
    def config_key(self) -> str: ...
    @property
    def subnets_prefix(self) -> str: ...
    def lease_key(self, subnet: IPv4Network) -> str: ...
    def presence_key(self, public_ip: IPv4Address) -> str: ...

    # --- connection ---
    async def reconnect(self) -> None: ...
    async def close(self) -> None: ...

    # --- config and leases ---
    async def get_config(self) -> bytes | None: ...
    async def list_leases(self) -> Listing: ...
    async def get_lease(self, subnet: IPv4Network) -> Lease | None: ...
    async def current_revision(self) -> tuple[int, int]: ...
    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None: ...
    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int | None) -> Lease | None: ...
    async def delete_lease(self, lease: Lease) -> bool: ...
    def watch_leases(self, start_revision: int) -> AsyncIterator[tuple[int, LeaseEvent | None, str]]: ...

    # --- one agent per PublicIP ---
    async def claim_presence(self, public_ip: IPv4Address, identity: str, ttl: int) -> tuple[int, str]: ...
    async def refresh_presence(self, lease_id: int) -> bool: ...
    async def release_presence(self, lease_id: int) -> None: ...

    # --- what the agent reports while it waits for the config, or while the source is cut off ---
    async def v2_config_hint(self) -> str:
        """While get_config() finds no config: the line saying that etcd's v2 store holds one (written the
        old way, `etcdctl set`) and how to copy it to v3; "" when there is none or nothing to look in.
        May raise: the agent keeps the hint it had."""
        ...

    @property
    def lost_reason(self) -> str:
        """Why the source is unreachable right now ("" while it answers, or where that is not tracked):
        while it is set, an agent that would be ready is not-ready `server-lost`."""
        ...


@dataclass
class Connection:
    """A store's link to etcd, shared by the store and its for_prefix() views: the endpoint in use."""

    endpoint_index: int = 0


ConnectionT = TypeVar("ConnectionT", bound=Connection)


class EtcdStore(Generic[ConnectionT]):
    """flannel's keys under one prefix on one etcd cluster, whichever API holds them: the endpoints are
    tried in turn (reconnect moves to the next), and views on other prefixes share the connection."""

    def __init__(self, endpoints: list[str], prefix: str, tls: EtcdTLS | None, connection: ConnectionT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self.endpoints = endpoints
        self.prefix = self.normal_prefix(prefix)
        self._tls = tls
        self._connection = connection

    @staticmethod
    def normal_prefix(prefix: str) -> str:
        return prefix.rstrip("/")

    # --- connection ---

    def for_prefix(self, prefix: str) -> Self:
        """The keys under another prefix, through this store's connection (the lease server's networks: a
        network costs no connection of its own, and one nobody asks for again costs nothing). A
        reconnect or close of either is one of both."""
        view = copy.copy(self)  # shallow: the connection is shared
        view.prefix = self.normal_prefix(prefix)
        return view

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._connection.endpoint_index]

    def tls_for(self, endpoint: str) -> EtcdTLS | None:
        """The TLS settings used for `endpoint` (None: plaintext). https:// never falls back to plaintext."""
        return endpoint_tls(endpoint, self._tls)

    @property
    def lost_reason(self) -> str:
        return ""  # not tracked: etcd's errors surface as the errors of the calls that meet them

    async def close(self) -> None:
        raise NotImplementedError

    async def reconnect(self) -> None:
        """Drop the current connection and move to the next endpoint (after a failure)."""
        await self.close()
        self._connection.endpoint_index = (self._connection.endpoint_index + 1) % len(self.endpoints)

    # --- keys ---

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    def lease_key(self, subnet: IPv4Network) -> str:
        return self.subnets_prefix + subnet_key(subnet)

    def presence_key(self, public_ip: IPv4Address) -> str:
        # Outside subnets/ and config: flanneld never reads it, so the shared schema is unchanged.
        return f"{self.prefix}/flannel-ebpf/hosts/{public_ip}"
