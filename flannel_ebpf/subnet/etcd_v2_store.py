"""flannel's data in etcd's v2 keys API, as flanneld v0.5 keeps it: a LeaseSource beside SubnetRegistry (v3).

`--etcd-api v2`. The same keys (`<prefix>/config`, `<prefix>/subnets/10.5.34.0-24`), the same JSON, but in
etcd's v2 store (etcd 3.4/3.5 with `--enable-v2`; 3.6 has no v2 API), over HTTP(S) with aiohttp.

v2 has no transactions; its conditional writes give the same guarantees as the v3 path's:
- a lease is created with `prevExist=false` (fails if any key is there), renewed and changed only with
  `prevIndex=<the modifiedIndex we read>`, deleted only with `prevIndex`: never another host's key;
- a lease's TTL is the key's own `ttl` (a renewal writes a fresh one); no TTL is a reservation;
- the revision is v2's index: a listing's `X-Etcd-Index`, an event's `modifiedIndex`; the watch is a long
  poll `?wait=true&recursive=true&waitIndex=<last + 1>`; etcd keeps 1,000 events, and one older than that
  (errorCode 401, "event index cleared") raises WatchCompacted: the manager relists;
- the cluster's identity is the `X-Etcd-Cluster-Id` header; an index going backwards is data loss.
Reads are `quorum=true` (linearizable, as the v3 client's): a lagging member never hides a lease.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from urllib.parse import quote

import aetcd.exceptions
import aiohttp
from loguru import logger

from flannel_ebpf.logs import clip
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
    base_url,
    ssl_context,
)

#: A long poll that brings no event within this is asked again from the index etcd was at (a dead TCP
#: connection would otherwise hold the watch forever; a new request on a cut network fails at once).
WATCH_POLL_SECONDS = 10.0
#: The largest answer read. A listing of 10,000 leases is ~2 MB; beyond this the store holds junk.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: answers bigger than this are parsed in a thread: the event loop is never held long
THREAD_PARSE_BYTES = 1024 * 1024

# etcd v2's error codes (etcd/error): the ones the store acts on
KEY_NOT_FOUND = 100
COMPARE_FAILED = 101
NOT_A_FILE = 102
KEY_EXISTS = 105
UNAUTHORIZED = 110
EVENT_INDEX_CLEARED = 401

_REMOVED_ACTIONS = {"delete", "expire", "compareAndDelete"}
_FRACTION = re.compile(r"(\.\d{6})\d+")


class EtcdV2Error(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """etcd's v2 API refused a request, or answered something that is not its API (one line)."""

    one_line = True

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdV2Unavailable(aetcd.exceptions.ConnectionFailedError):  # type: ignore[misc]  # aetcd is untyped
    """etcd's v2 API could not be reached (retried, as any etcd outage)."""


class WatchResync(WatchCompacted):
    """The v2 watch cannot go on from where it is (its index is older than etcd's 1,000 kept events, or the
    subnets directory itself was removed): relist."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(index)
        self.why = why

    def __str__(self) -> str:
        return self.why


@dataclass(frozen=True)
class Answer:
    status: int
    doc: dict[str, Any]
    index: int  # X-Etcd-Index: the store's index when etcd answered
    cluster_id: int  # X-Etcd-Cluster-Id

    @property
    def error_code(self) -> int:
        code = self.doc.get("errorCode", 0)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0

    @property
    def node(self) -> dict[str, Any]:
        node = self.doc.get("node")
        return node if isinstance(node, dict) else {}


@dataclass
class _Claim:
    """A presence claim held through the v2 API: the key, and the index our last write gave it."""

    key: str
    identity: str
    index: int
    ttl: int


@dataclass
class _V2Connection(Connection):
    """The HTTP session of a store and of its for_prefix() views: the endpoint in use, one session."""

    session: aiohttp.ClientSession | None = None
    claims: dict[int, _Claim] = field(default_factory=dict)


def header_int(headers: Any, name: str, base: int = 10) -> int:
    try:
        return int(headers.get(name, "") or "0", base)
    except ValueError:
        return 0


def node_index(node: dict[str, Any]) -> int:
    value = node.get("modifiedIndex")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LeaseFormatError(f"etcd node without a modifiedIndex: {clip(repr(value))}")
    return value


def node_expiration(node: dict[str, Any], now: float | None = None) -> float | None:
    """The Unix time a v2 node expires (its `expiration`, RFC 3339 with nanoseconds; else `ttl` from now);
    None for a node without a TTL."""
    raw = node.get("expiration")
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(_FRACTION.sub(r"\1", raw)).timestamp()
        except ValueError:
            pass
    ttl = node.get("ttl")
    if isinstance(ttl, int) and not isinstance(ttl, bool):
        return (time.time() if now is None else now) + ttl
    return None


def has_ttl(node: dict[str, Any]) -> bool:
    return node.get("expiration") is not None or node.get("ttl") is not None


class EtcdV2Registry(EtcdStore[_V2Connection]):
    """flannel's keys under one prefix in etcd's v2 store (tries the endpoints in turn). A LeaseSource."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = DEFAULT_PREFIX,
        tls: EtcdTLS | None = None,
        username: str = "",
        password: str = "",
        timeout: float = 5.0,
        watch_poll: float = WATCH_POLL_SECONDS,
    ) -> None:
        super().__init__(endpoints, prefix, tls, _V2Connection())
        self._auth = aiohttp.BasicAuth(username, password) if username else None
        self._timeout = timeout
        self.watch_poll = watch_poll
        self._tokens = itertools.count(1)

    # --- connection ---

    @staticmethod
    def normal_prefix(prefix: str) -> str:
        # v2 keys are paths from the root: flanneld v0.5 joins `coreos.com/network` as `/coreos.com/network`
        return "/" + prefix.strip("/")

    def _session(self) -> aiohttp.ClientSession:
        if self._connection.session is None or self._connection.session.closed:
            tls = self.tls_for(self.endpoint)
            context = ssl_context(tls)
            connector = aiohttp.TCPConnector(ssl=context if context is not None else False, limit=16)
            self._connection.session = aiohttp.ClientSession(connector=connector, auth=self._auth)
        return self._connection.session

    async def close(self) -> None:
        if self._connection.session is not None:
            session, self._connection.session = self._connection.session, None
            try:
                await session.close()
            except Exception as e:  # closing a broken session may fail; nothing to do about it
                logger.debug("closing the etcd v2 session: {}", e)

    # --- keys ---

    @property
    def subnets_dir(self) -> str:
        return f"{self.prefix}/subnets"

    def _url(self, key: str) -> str:
        return f"{base_url(self.endpoint, self._tls)}/v2/keys{quote(key)}"

    # --- HTTP ---

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        chunks, size = [], 0
        while chunk := await response.content.read(1 << 16):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise EtcdV2Error(f"etcd's answer for {response.url.path} is larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, response: aiohttp.ClientResponse, body: bytes, key: str, access: str,
                      expected: frozenset[int] | set[int]) -> Answer:  # fmt: skip
        """The answer to a request on `key`; raises for anything but success or an `expected` error code."""
        try:
            doc = json.loads(body) if len(body) < THREAD_PARSE_BYTES else await asyncio.to_thread(json.loads, body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            if response.status == 404:
                # etcd without --enable-v2 answers its HTTP mux's plain 404 for every /v2/keys path
                raise EtcdV2Error(
                    f"etcd at {self.endpoint} does not serve the v2 API (404 on /v2/keys): start etcd 3.4/3.5 with "
                    "--enable-v2 (etcd 3.6 has no v2 API), or run with --etcd-api v3"
                )
            text = body[:200].decode(errors="replace").strip()
            raise EtcdV2Error(f"etcd at {self.endpoint} answered {response.status} for {key}: {clip(text)}")
        answer = Answer(
            response.status,
            doc,
            header_int(response.headers, "X-Etcd-Index") or _int(doc.get("index")),
            header_int(response.headers, "X-Etcd-Cluster-Id", 16),
        )
        if 200 <= response.status < 300 and not answer.error_code:
            return answer
        if answer.error_code in expected:
            return answer
        message = str(doc.get("message") or f"HTTP {response.status}")
        cause = str(doc.get("cause") or "")
        if answer.error_code == UNAUTHORIZED or response.status in (401, 403):
            raise EtcdPermissionError(key, access, clip(message))
        raise EtcdV2Error(
            f"etcd v2 refused {access} of {key}: {clip(message)}{' (' + clip(cause) + ')' if cause else ''} "
            f"[errorCode {answer.error_code}]",
            answer.error_code,
        )

    async def _request(
        self,
        method: str,
        key: str,
        access: str,
        params: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
        expected: frozenset[int] | set[int] = frozenset(),
    ) -> Answer:
        url = self._url(key)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session().request(method, url, params=params, data=data) as response:
                    body = await self._read_body(response)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise EtcdV2Unavailable(f"{method} {url}: {clip(str(e) or type(e).__name__)}") from e
        return await self._answer(response, body, key, access, expected)

    async def _get(self, key: str, access: str = "read", **params: str) -> Answer:
        return await self._request("GET", key, access, {"quorum": "true", **params}, expected={KEY_NOT_FOUND})

    # --- reads ---

    async def get_config(self) -> bytes | None:
        answer = await self._get(self.config_key)
        if answer.error_code == KEY_NOT_FOUND:
            return None
        value = answer.node.get("value")
        if answer.node.get("dir") or not isinstance(value, str):
            raise EtcdV2Error(f"{self.config_key} in etcd's v2 store is a directory, not the network config")
        return value.encode()

    async def v2_config_hint(self) -> str:
        return ""  # this source reads the v2 store itself

    def _lease_from_node(self, node: dict[str, Any]) -> Lease:
        key = node.get("key")
        if not isinstance(key, str) or not key.startswith(self.subnets_prefix):
            raise LeaseFormatError(f"not a key under {self.subnets_prefix}: {clip(repr(key))}")
        subnet = parse_subnet_key(key[len(self.subnets_prefix) :])
        if node.get("dir"):
            raise LeaseFormatError("a directory, not a lease")
        value = node.get("value")
        if not isinstance(value, str):
            raise LeaseFormatError("no value")
        if len(value) > MAX_VALUE_BYTES:  # characters: bytes are at least as many
            raise LeaseFormatError(f"value of {len(value)} characters is larger than the {MAX_VALUE_BYTES} accepted")
        attrs = LeaseAttrs.from_json(value)
        # lease_id: 0 marks a reservation (no TTL), as in the v3 path; the v2 key carries its TTL itself
        return Lease(subnet, attrs, node_expiration(node), lease_id=int(has_ttl(node)), mod_revision=node_index(node))

    async def list_leases(self) -> Listing:
        """All leases (one recursive GET), with the index to watch from. Garbage is reported, not raised."""
        answer = await self._get(self.subnets_dir, recursive="true")
        leases: list[Lease] = []
        garbage: list[tuple[str, str]] = []
        occupied: dict[IPv4Network, str] = {}
        if answer.error_code == KEY_NOT_FOUND:
            return Listing(leases, answer.index, garbage, occupied)
        node = answer.node
        if not node.get("dir"):
            garbage.append((self.subnets_dir, "a key, not a directory of leases"))
            return Listing(leases, answer.index, garbage, occupied)
        children = node.get("nodes") or []
        for i, child in enumerate(children if isinstance(children, list) else []):
            if i % 1000 == 999:
                await asyncio.sleep(0)
            key = child.get("key") if isinstance(child, dict) else None
            if not isinstance(key, str):
                garbage.append((self.subnets_prefix + "?", "a node without a key"))
                continue
            try:
                subnet = parse_subnet_key(key[len(self.subnets_prefix) :])
            except LeaseFormatError as e:
                garbage.append((key, str(e)))
                continue
            try:
                leases.append(self._lease_from_node(child))
            except LeaseFormatError as e:
                garbage.append((key, str(e)))
                occupied[subnet] = str(e)
        return Listing(leases, answer.index, garbage, occupied)

    async def get_lease(self, subnet: IPv4Network) -> Lease | None:
        answer = await self._get(self.lease_key(subnet))
        if answer.error_code == KEY_NOT_FOUND:
            return None
        return self._lease_from_node(answer.node)

    async def current_revision(self) -> tuple[int, int]:
        """(v2 index, cluster id) now: an index lower than one seen before means etcd lost its data."""
        answer = await self._get(self.config_key)
        return answer.index, answer.cluster_id

    # --- writes (all conditional) ---

    def _written(self, answer: Answer, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease:
        node = answer.node
        expiration = node_expiration(node) if has_ttl(node) else (time.time() + ttl if ttl else None)
        return Lease(subnet, attrs, expiration, lease_id=int(bool(ttl)), mod_revision=node_index(node))

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        """Create the lease only if its key does not exist (`prevExist=false`). None: somebody holds it."""
        data = {"value": attrs.to_json(), "prevExist": "false", **({"ttl": str(int(ttl))} if ttl else {})}
        answer = await self._request("PUT", self.lease_key(subnet), "readwrite", data=data, expected={KEY_EXISTS})
        if answer.error_code == KEY_EXISTS:
            return None
        return self._written(answer, subnet, attrs, ttl)

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int | None) -> Lease | None:
        """Rewrite our lease (new attrs, a fresh TTL) only if its index is still the one we read (`prevIndex`).
        None: it changed or vanished meanwhile. A reservation stays one: written without a TTL."""
        ttl = None if lease.is_reservation else ttl
        data = {
            "value": attrs.to_json(),
            "prevIndex": str(lease.mod_revision),
            **({"ttl": str(int(ttl))} if ttl else {}),
        }
        answer = await self._request(
            "PUT", self.lease_key(lease.subnet), "readwrite", data=data, expected={KEY_NOT_FOUND, COMPARE_FAILED}
        )
        if answer.error_code:
            return None
        return self._written(answer, lease.subnet, attrs, ttl)

    async def delete_lease(self, lease: Lease) -> bool:
        """Delete our lease only if it is still the one we hold (same modifiedIndex)."""
        answer = await self._request(
            "DELETE", self.lease_key(lease.subnet), "readwrite", params={"prevIndex": str(lease.mod_revision)},
            expected={KEY_NOT_FOUND, COMPARE_FAILED},
        )  # fmt: skip
        return not answer.error_code

    # --- presence: one agent per PublicIP ---

    async def claim_presence(self, public_ip: IPv4Address, identity: str, ttl: int) -> tuple[int, str]:
        """Claim `public_ip` (a key with a TTL, created with prevExist=false): (token, "") on success, (0,
        holder) when another agent holds it. A claim of an earlier run of this agent is taken over (CAS)."""
        key = self.presence_key(public_ip)
        holder = ""
        for _attempt in range(3):
            data = {"value": identity, "ttl": str(ttl), "prevExist": "false"}
            answer = await self._request("PUT", key, "readwrite", data=data, expected={KEY_EXISTS})
            if not answer.error_code:
                return self._hold(key, identity, node_index(answer.node), ttl), ""
            held = await self._get(key, "readwrite")
            if held.error_code == KEY_NOT_FOUND:
                continue  # it expired between the two requests: create it again
            value = held.node.get("value")
            holder = value if isinstance(value, str) else ""
            if holder != identity:
                return 0, clip(holder) or "another agent"
            data = {"value": identity, "ttl": str(ttl), "prevIndex": str(node_index(held.node))}
            answer = await self._request("PUT", key, "readwrite", data=data, expected={KEY_NOT_FOUND, COMPARE_FAILED})
            if not answer.error_code:
                return self._hold(key, identity, node_index(answer.node), ttl), ""
        return 0, clip(holder) or "another agent"

    def _hold(self, key: str, identity: str, index: int, ttl: int) -> int:
        token = next(self._tokens)
        self._connection.claims[token] = _Claim(key, identity, index, ttl)
        return token

    async def refresh_presence(self, lease_id: int) -> bool:
        """Keep the claim alive (CAS on the index our last write gave it); False when it is gone or changed."""
        claim = self._connection.claims.get(lease_id)
        if claim is None:
            return False
        data = {"value": claim.identity, "ttl": str(claim.ttl), "prevIndex": str(claim.index)}
        answer = await self._request("PUT", claim.key, "readwrite", data=data, expected={KEY_NOT_FOUND, COMPARE_FAILED})
        if answer.error_code:
            self._connection.claims.pop(lease_id, None)
            return False
        claim.index = node_index(answer.node)
        return True

    async def release_presence(self, lease_id: int) -> None:
        claim = self._connection.claims.pop(lease_id, None)
        if claim is not None:
            await self._request(
                "DELETE", claim.key, "readwrite", params={"prevIndex": str(claim.index)},
                expected={KEY_NOT_FOUND, COMPARE_FAILED},
            )  # fmt: skip

    # --- watch ---

    async def watch_leases(self, start_revision: int) -> AsyncIterator[tuple[int, LeaseEvent | None, str]]:
        """Yield (index, event, garbage_reason) for every change under subnets/ from index start_revision:
        one long poll per event (`wait=true&waitIndex=`), each asked from the index after the last event.

        A poll with no event within `watch_poll` is asked again from the index etcd was at when it began
        (no event up to there concerned subnets/): yielded as (index, None, "") so that a later resume
        starts there. Raises WatchResync (a WatchCompacted) when the index is older than etcd's history,
        and EtcdV2Unavailable when etcd cannot be reached."""
        index = start_revision
        params = {"wait": "true", "recursive": "true"}
        url = self._url(self.subnets_dir)
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._session().get(url, params={**params, "waitIndex": str(index)})
                try:
                    async with asyncio.timeout(self.watch_poll):
                        body = await self._read_body(response)
                except TimeoutError:
                    response.close()  # the poll still waits on etcd's side: this connection is done
                    began = header_int(response.headers, "X-Etcd-Index") if response.status == 200 else 0
                    if began >= index:
                        index = began + 1
                        yield began, None, ""
                    continue
                finally:
                    response.release()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise EtcdV2Unavailable(f"watching {url}: {clip(str(e) or type(e).__name__)}") from e
            if response.status == 200 and not body:
                raise EtcdV2Unavailable(f"watching {url}: etcd ended the poll without an event")
            answer = await self._answer(response, body, self.subnets_dir, "read", {EVENT_INDEX_CLEARED})
            if answer.error_code == EVENT_INDEX_CLEARED:
                raise WatchResync(
                    answer.index, f"the watch's index {index} is older than the events etcd keeps (event index "
                    f"cleared; etcd at {answer.index})",
                )  # fmt: skip
            for item in self._watch_items(answer):
                yield item
                index = max(index, item[0] + 1)

    def _watch_items(self, answer: Answer) -> list[tuple[int, LeaseEvent | None, str]]:
        node, action = answer.node, answer.doc.get("action")
        revision = node_index(node)
        key = node.get("key")
        if not isinstance(key, str):
            return [(revision, None, f"{self.subnets_prefix}?: an event without a key")]
        if key.rstrip("/") == self.subnets_dir:
            # the directory itself (`etcdctl rm -r`, a TTL on it): whatever it held may be gone
            raise WatchResync(revision, f"{self.subnets_dir} itself had a '{clip(str(action))}' event")
        try:
            subnet = parse_subnet_key(key[len(self.subnets_prefix) :]) if key.startswith(self.subnets_prefix) else None
        except LeaseFormatError as e:
            return [(revision, None, f"{key}: {e}")]
        if subnet is None:
            return [(revision, None, "")]
        removed = LeaseEvent(LeaseEvent.REMOVED, Lease(subnet, LeaseAttrs(public_ip=IPv4Address(0), backend_type="")))
        if action in _REMOVED_ACTIONS:
            return [(revision, removed, "")]
        try:
            lease = self._lease_from_node(node)
        except LeaseFormatError as e:
            return [(revision, removed, f"{key}: {e}")]
        return [(revision, LeaseEvent(LeaseEvent.ADDED, lease), "")]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
