"""This host's lease and its view of the other hosts' leases. Control plane only: no packets here.

Three duties, each a loop the agent runs:
- acquire(): get a lease as flanneld would (own PublicIP's lease, else the previous subnet, else a random
  free one), but only ever through create-only or compare-revision transactions.
- run_maintenance(): renew before expiry, and check every few seconds that our key is still ours: re-create
  it (create-only) if it vanished (expiry during an outage, etcd data loss), report loudly and turn
  not-ready if another host holds it; never overwrite it.
- run_watch(): list + watch `<prefix>/subnets/`; every event of every response is handled; after an error
  resume from the last revision handled; if that revision was compacted, etcd canceled the watch, or etcd's
  revision went backwards (data loss), relist and hand the full set of peers to the data plane. Besides,
  every `relist_interval` a fresh listing is reconciled against the peers the watch built (as Calico
  Felix resyncs against its datastore): whatever a watch could miss is corrected within that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from loguru import logger

from flannel_ebpf.config import NetworkConfig
from flannel_ebpf.logs import clip
from flannel_ebpf.subnet.allocation import pick_subnet
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent
from flannel_ebpf.subnet.registry import ETCD_RETRYABLE, WatchCanceled, describe_etcd_error
from flannel_ebpf.subnet.store import EtcdPermissionError, LeaseSource, Listing, WatchCompacted

#: At most this many invalid keys are logged one by one per listing; the rest are counted in one line.
GARBAGE_LOG_LIMIT = 20
#: loops over every lease of a listing give the event loop a turn this often
YIELD_EVERY = 1000

# Why a lease under subnets/ is not a peer (the keys of `peers_refused` in the agent's status).
REFUSED_OUTSIDE = "outside-network"
REFUSED_LENGTH = "prefix-length"
REFUSED_OUR_IP = "our-public-ip"


def peer_refusal(lease: Lease, network: IPv4Network, subnet_len: int) -> str:
    """Why `lease` (not ours) may not be a peer: REFUSED_OUTSIDE or REFUSED_LENGTH ("" when it may).

    Every peer must be exactly a /SubnetLen inside the Network, as flanneld leases them. A lease of any
    other length would overlap the lease of another host: a /25 inside a peer's /24 wins every host's
    longest-prefix match, and the receiving side's source check would take its packets as coming from
    those addresses; a /23 would cover two hosts. Two distinct subnets of one length never overlap, so
    with this rule no accepted peer overlaps another, nor our own lease (which has that length too):
    whoever holds the right-length lease keeps it, whatever was written around it, earlier or later.
    In integers: ipaddress's subnet_of() costs 8 us, 80 ms of a blocked event loop per 10,000 leases."""
    subnet = lease.subnet
    first, size = int(subnet.network_address), 1 << (32 - subnet.prefixlen)
    low = int(network.network_address)
    if not (subnet.prefixlen > network.prefixlen and low <= first and first + size <= low + network.num_addresses):
        # e.g. a key `subnets/0.0.0.0-0`: as a route it would replace the host's default route.
        return REFUSED_OUTSIDE
    if subnet.prefixlen != subnet_len:
        return REFUSED_LENGTH
    return ""


def subnet_len_era_hint(config: NetworkConfig) -> str:
    """The line said (once) when a peer lease has the length the other flanneld era derives from this
    Network: the hosts disagree on the default SubnetLen, and only an explicit one makes them agree."""
    ours = "v0.5-v0.9 (etcd v2)" if config.subnet_len_rule == "v0.5" else "v0.10+ (v0.20.2)"
    theirs = "v0.10+ (v0.20.2)" if config.subnet_len_rule == "v0.5" else "v0.5-v0.9 (etcd v2)"
    return (
        f"SUBNETLEN MISMATCH: the config at Network {config.network} sets no SubnetLen; this agent applies "
        f"flanneld {ours}'s default /{config.subnet_len}, but a peer leases /{config.other_rule_subnet_len()}, "
        f"flanneld {theirs}'s default: hosts of both eras on one store never reach each other. Set SubnetLen "
        f'explicitly in the network config (e.g. "SubnetLen": {config.subnet_len}) and restart the hosts whose '
        "leases have the other length (or pick the rule with --subnet-len-rule)"
    )


@dataclass(frozen=True)
class LeaseOptions:
    ttl: int = 24 * 3600  # flannel's subnet TTL
    renew_margin: float = 3600.0  # renew when less than this is left (--subnet-lease-renew-margin)
    check_interval: float = 10.0  # how often our own key and etcd's revision are verified
    retry_interval: float = 1.0  # first back-off after an etcd error (doubles up to retry_max)
    #: the longest wait between two attempts while etcd fails (--etcd-retry-max): once etcd answers
    #: again, every loop is back within this (plus one request)
    retry_max: float = 1.0
    relist_interval: float = 300.0  # a full listing reconciled against the watch's peers (0: never)
    allow_subnet_change: bool = False  # take a new subnet when our previous one is held by another host
    identity: str = ""  # this agent's identity for the one-agent-per-PublicIP claim ("" = no claim)

    @property
    def presence_ttl(self) -> int:
        # Long enough to ride out a few missed checks, short enough that a dead agent's claim soon lapses.
        return max(15, int(self.check_interval * 3))

    @property
    def effective_margin(self) -> float:
        # A margin longer than the TTL would renew in a tight loop; short test TTLs renew at half-life.
        return min(self.renew_margin, self.ttl / 2)


class PeerSink:
    """Where the watch delivers peers: the agent's data-plane driver implements it."""

    async def sync_peers(self, peers: list[Lease]) -> None:
        raise NotImplementedError

    async def add_peer(self, lease: Lease) -> None:
        raise NotImplementedError

    async def remove_peer(self, lease: Lease) -> None:
        """`lease` is the peer's last known lease (a delete event carries no value)."""
        raise NotImplementedError


class Backoff:
    """Exponential back-off that logs an outage once (again only if the reason changes), and its end once.

    Each wait is jittered down by up to 20% so that many agents do not retry in lock-step."""

    def __init__(self, what: str, first: float, limit: float = 1.0) -> None:
        self.what, self.first, self.limit = what, min(first, limit), limit
        self.delay = first
        self.failing_since: float | None = None
        self.last_failure = 0.0
        self.failures = 0
        self.reason = ""  # what the current failure is, in one line (empty while things work)

    async def failed(self, error: BaseException) -> None:
        reason = describe_etcd_error(error)
        self.last_failure = time.monotonic()
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = self.last_failure
        if reason != self.reason:
            logger.warning("{}: {}; retrying", self.what, reason)
            self.reason = reason
        await asyncio.sleep(self.delay * random.uniform(0.8, 1.0))
        self.delay = min(self.delay * 2, self.limit)

    def succeeded(self) -> None:
        if self.failing_since is not None:
            # What was seen, not the outage: it ended somewhere after the last failure, and a loop that
            # retries only at its next interval would make "since the first failure" overstate it.
            logger.info(
                "{}: etcd answers again ({} failed attempts over {:.1f}s, the last {:.1f}s ago)",
                self.what,
                self.failures,
                self.last_failure - self.failing_since,
                time.monotonic() - self.last_failure,
            )
        self.failing_since = None
        self.failures = 0
        self.reason = ""
        self.delay = self.first


class LeaseManager:
    def __init__(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        lease_registry: LeaseSource,
        watch_registry: LeaseSource,
        options: LeaseOptions | None = None,
        on_change: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        self.config = config
        self.attrs = attrs
        self.leases = lease_registry  # acquire, renew, guard
        self.watcher = watch_registry  # its own connection, so a reconnect does not disturb the other
        self.options = options or LeaseOptions()
        self.lease: Lease | None = None
        self.problem: str | None = None  # set while the lease is in conflict: health turns not-ready
        self.peers: dict[IPv4Network, Lease] = {}
        self.peers_version = 0  # counts changes to `peers` (the agent rewrites its copy only then)
        self.last_revision = 0
        self.cluster_id = 0
        self.relists = 0
        self.relist_corrections = 0  # peers a periodic relist found that the watch had got wrong
        self._last_listing = 0.0  # time.monotonic() of the last listing
        self.presence_lease = 0
        self.acquire_error = ""  # why acquisition is failing right now (etcd's error), for health
        self.presence_denied = ""  # set while our etcd role does not cover the presence key
        self._garbage_logged: dict[str, str] = {}  # key -> reason already logged
        #: leases under subnets/ that are refused as peers right now: subnet -> (its lease, reason)
        self.refused: dict[IPv4Network, tuple[Lease, str]] = {}
        self._refusal_logged: dict[tuple[IPv4Network, IPv4Address], str] = {}  # (subnet, PublicIP) -> reason
        self._era_mismatch_said = False  # the SubnetLen-rule hint is said once
        # After etcd lost data, other agents need a few checks to re-create their leases: until then a
        # relist must not remove peers that are merely not back yet (that would cut working routes).
        self._keep_missing_until = 0.0
        self.listing_seconds = 0.0  # how long the last listing of all leases took
        # for /metrics (flannel_ebpf.metrics): what happened since the start
        self.renewals = 0
        self.etcd_errors: Counter[str] = Counter()  # by operation: acquire, maintain, watch
        self.reconnects = 0
        self.watch_events: Counter[str] = Counter()  # by kind: added, removed
        self._acquire_listing: Listing | None = None
        self._relist = asyncio.Event()
        self._check_now = asyncio.Event()
        self._on_change = on_change

    async def _changed(self) -> None:
        if self._on_change is not None:
            result = self._on_change()
            if asyncio.iscoroutine(result):
                await result

    def _set_problem(self, problem: str | None) -> None:
        if problem and problem != self.problem:
            logger.error("LEASE CONFLICT: {}", problem)
        elif not problem and self.problem:
            logger.info("lease conflict resolved: {}", self.lease.subnet if self.lease else "-")
        self.problem = problem

    def report_garbage(self, garbage: list[tuple[str, str]]) -> None:
        """Log invalid keys/values under subnets/ once each (not on every listing or attempt), and at
        most GARBAGE_LOG_LIMIT of them one by one: an etcd full of junk must not flood the log."""
        new = [(key, reason) for key, reason in garbage if self._garbage_logged.get(key) != reason]
        for key, reason in new[:GARBAGE_LOG_LIMIT]:
            # a key is anyone's bytes: a newline in it must not forge a log line, nor 1 MB of it flood one
            shown = key if key.isprintable() else repr(key)
            logger.warning("ignoring invalid lease {}: {}", clip(shown), clip(reason))
        if len(new) > GARBAGE_LOG_LIMIT:
            logger.warning("ignoring {} more invalid keys under {}", len(new) - GARBAGE_LOG_LIMIT,
                           self.leases.subnets_prefix)  # fmt: skip
        if len(self._garbage_logged) > 100_000:
            self._garbage_logged.clear()  # bounded memory; worst case some keys are logged again
        self._garbage_logged.update(new)

    # --- acquisition ---

    async def acquire(self, previous: IPv4Network | None = None) -> Lease:
        """Hold a lease, retrying through etcd outages and lost races. Raises OutOfSubnets."""
        backoff = Backoff("acquiring a lease", self.options.retry_interval, self.options.retry_max)
        idle = 0
        while True:
            try:
                lease = await self.acquire_once(previous)
            except ETCD_RETRYABLE as e:
                self.etcd_errors["acquire"] += 1
                self.reconnects += 1
                await self.leases.reconnect()
                self.acquire_error = describe_etcd_error(e)
                await self._changed()
                await backoff.failed(e)
                continue
            backoff.succeeded()
            self.acquire_error = ""
            if lease is not None:
                self.lease = lease
                await self._changed()
                return lease
            # Lost a race (or blocked): try again soon, then less and less often if it keeps happening.
            idle += 1
            await asyncio.sleep(min(random.uniform(0.05, 0.3) * 2 ** min(idle - 1, 8), self.options.check_interval))

    async def _claim_presence(self) -> bool:
        """One agent per PublicIP: two hosts sharing an address would fight over one lease.

        The claim lives outside flanneld's keys. Under an etcd role made for flanneld (config read,
        subnets/ read-write) it is refused: then the agent says so once, naming the key and the missing
        permission, and runs without this guard (as flanneld does) until the role covers it."""
        if not self.options.identity:
            return True
        try:
            lease_id, holder = await self.leases.claim_presence(
                self.attrs.public_ip, self.options.identity, self.options.presence_ttl
            )
        except EtcdPermissionError as e:
            if not self.presence_denied:
                logger.error("{}; running WITHOUT the one-agent-per-PublicIP guard until it is granted", e)
            self.presence_denied = str(e)
            self.presence_lease = 0
            return True
        if self.presence_denied:
            logger.info("the etcd role now covers {}: one-agent-per-PublicIP guard on",
                        self.leases.presence_key(self.attrs.public_ip))  # fmt: skip
            self.presence_denied = ""
        if lease_id:
            self.presence_lease = lease_id
            return True
        self.presence_lease = 0
        self._set_problem(
            f"DUPLICATE PUBLIC IP: {self.attrs.public_ip} is already used by another running agent ({holder}); "
            "two hosts with one PublicIP would share one lease. Give each host its own --public-ip"
        )
        await self._changed()
        return False

    async def _keep_previous(self, problem: str) -> Lease | None:
        """Our previous subnet cannot be had and we may not move: say why (not-ready), wait a check
        interval, and let the caller try again (None: no lease this attempt)."""
        self._set_problem(problem)
        await self._changed()
        await asyncio.sleep(self.options.check_interval)
        return None

    async def acquire_once(self, previous: IPv4Network | None) -> Lease | None:
        """One attempt of acquire(): the lease, or None when another host won the race for it (or when
        none may be taken now: a conflict or a duplicate PublicIP, said as `problem`, after waiting a
        check interval). Raises OutOfSubnets, and etcd's errors: nothing is retried here.

        acquire() repeats this until it holds a lease. The lease server (remote/server.py) calls it for
        a client inside that client's HTTP request: it must answer within the request (after a few lost
        races at most; an etcd error as 503) and leave the retrying to the client, not wait through an
        etcd outage as acquire() does."""
        if not self.presence_lease and not await self._claim_presence():
            await asyncio.sleep(self.options.check_interval)
            return None
        server_acquires: Callable[[LeaseAttrs], Awaitable[Lease | None]] | None = getattr(
            self.leases, "acquire_lease", None
        )
        if server_acquires is not None and (got := await server_acquires(self.attrs)) is not None:
            # a flanneld v0.5 lease server: it picks the subnet (its API has no create-only write of a
            # named subnet), so the subnet file's subnet is only compared
            if previous is not None and got.subnet != previous:
                logger.warning("the lease server gave us {}, not our previous subnet {} (the containers on "
                               "{} lose their connectivity)", got.subnet, previous, previous)  # fmt: skip
            logger.info("lease server gave us {} for {}", got.subnet, self.attrs.public_ip)
            self._set_problem(None)
            return got
        began = time.monotonic()
        listing = await self.leases.list_leases()
        self._acquire_listing, self.listing_seconds = listing, time.monotonic() - began
        self.report_garbage(listing.garbage)
        ttl = self.options.ttl
        mine = [lease for lease in listing.leases if lease.public_ip == self.attrs.public_ip]
        for lease in mine:
            if not self.config.contains_subnet(lease.subnet):
                logger.info(
                    "lease {} for {} does not fit the network config; deleting it", lease.subnet, lease.public_ip
                )
                await self.leases.delete_lease(lease)
                continue
            if previous and lease.subnet != previous and any(m.subnet == previous for m in mine):
                continue  # two leases with our IP: prefer the one our containers use
            got = await self.leases.update_lease(lease, self.attrs, ttl)
            if got:
                logger.info("found lease {} for {}, reusing it", got.subnet, self.attrs.public_ip)
                self._set_problem(None)
            return got
        taken = {lease.subnet: lease for lease in listing.leases if self._inside_network(lease)}
        # A lease key with a garbage value is nobody's peer, but its key exists: no lease can be created
        # there, so it counts as taken (else every attempt to create it would fail, forever).
        occupied = {s: why for s, why in listing.occupied.items() if s.subnet_of(self.config.network)}
        if previous is not None and previous in occupied:
            key = self.leases.lease_key(previous)
            if not self.options.allow_subnet_change:
                return await self._keep_previous(
                    f"subnet {previous} (from the subnet file, used by this host's containers) has an invalid "
                    f"value in etcd at {key} ({occupied[previous]}); not taking another subnet under running "
                    f"containers. Delete that key, or the subnet file, or pass --allow-subnet-change"
                )
            logger.warning("previous subnet {} has an invalid value at {}; taking another subnet", previous, key)
            previous = None
        if previous is not None:
            holder = taken.get(previous)
            if holder is None and self.config.contains_subnet(previous):
                got = await self.leases.create_lease(previous, self.attrs, ttl)
                if got:
                    logger.info("re-created previous subnet {} from the subnet file", previous)
                    self._set_problem(None)
                return got
            if holder is not None and not self.options.allow_subnet_change:
                return await self._keep_previous(
                    f"subnet {previous} (from the subnet file, used by this host's containers) is held by "
                    f"{holder.public_ip}; not taking another subnet under running containers. Remove the "
                    f"subnet file or pass --allow-subnet-change to take a new one"
                )
            if holder is None:
                logger.warning("previous subnet {} does not fit the network config; ignoring it", previous)
        subnet = pick_subnet(self.config, [*taken, *occupied])  # raises OutOfSubnets
        got = await self.leases.create_lease(subnet, self.attrs, ttl)
        if got:
            logger.info("allocated lease {} to {}", subnet, self.attrs.public_ip)
            self._set_problem(None)
        return got

    # --- renewal and guard ---

    def _seconds_until_renewal(self) -> float:
        """Seconds until the lease must be renewed (never negative)."""
        if self.lease is None or self.lease.expiration is None:
            return float("inf")
        return max(0.0, self.lease.expiration - self.options.effective_margin - time.time())

    async def run_maintenance(self) -> None:
        """Maintain the lease every check interval, or sooner when its renewal is due."""
        backoff = Backoff("lease maintenance", self.options.retry_interval, self.options.retry_max)
        while True:
            wait = min(self.options.check_interval, self._seconds_until_renewal())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), wait)
            self._check_now.clear()
            try:
                await self.maintain_once()
                backoff.succeeded()
            except ETCD_RETRYABLE as e:
                self.etcd_errors["maintain"] += 1
                self.reconnects += 1
                await self.leases.reconnect()
                await backoff.failed(e)

    async def maintain_once(self) -> None:
        """One round: notice etcd losing its data, keep our PublicIP's presence, then renew our lease,
        re-create it if it vanished, or report that another host holds it. Never overwrites another
        host's key."""
        assert self.lease is not None
        revision, cluster_id = await self.leases.current_revision()
        self._notice_etcd_reset(revision, cluster_id)
        if self.options.identity and not await self._keep_presence():
            return  # reported; the lease is left alone until the other agent is gone
        current = await self.leases.get_lease(self.lease.subnet)
        if current is None:
            await self._recreate_vanished_lease()
        elif current.public_ip != self.attrs.public_ip:
            self._report_lease_taken(current)
        elif await self._renew_lease(current):
            self._set_problem(None)
        else:
            return  # changed under us: decide on the next round
        await self._changed()

    def _notice_etcd_reset(self, revision: int, cluster_id: int) -> None:
        """A new cluster id or a revision going backwards: etcd lost its data or was replaced, relist."""
        if self.cluster_id and (cluster_id != self.cluster_id or revision < self.last_revision):
            logger.warning(
                "etcd lost its data or was replaced (cluster {:x} rev {} -> cluster {:x} rev {}); relisting",
                self.cluster_id, self.last_revision, cluster_id, revision,
            )  # fmt: skip
            self._grace_for_missing_peers()
            self.request_relist()
        self.cluster_id = cluster_id

    async def _keep_presence(self) -> bool:
        """Refresh our claim on the PublicIP, or claim it again; False while another agent holds it."""
        alive = bool(self.presence_lease) and await self.leases.refresh_presence(self.presence_lease)
        return alive or await self._claim_presence()

    async def _recreate_vanished_lease(self) -> None:
        assert self.lease is not None
        got = await self.leases.create_lease(self.lease.subnet, self.attrs, self.options.ttl)
        if got:
            logger.warning("lease {} had vanished from etcd (expired or lost); re-created it", got.subnet)
            self.lease = got
            self._set_problem(None)
            # Whatever removed our key (an expiry, etcd losing its data) may have hidden other changes
            # from the watch: a fresh listing costs little and makes the peers certain again.
            self._grace_for_missing_peers()
            self.request_relist()
        else:
            self._set_problem(f"lease {self.lease.subnet} vanished and was re-created by another host first")

    def _report_lease_taken(self, current: Lease) -> None:
        self._set_problem(
            f"subnet {current.subnet} is now held by {current.public_ip}, not by us ({self.attrs.public_ip}); "
            "keeping the data path as it is and not overwriting the other host's lease"
        )

    async def _renew_lease(self, current: Lease) -> bool:
        """Renew our lease when its renewal is due, or write our attributes when they changed; False when
        the key changed under us (the write is conditional on the version we read)."""
        due = current.expiration is not None and (current.expiration - time.time() < self.options.effective_margin)
        if not due and current.attrs == self.attrs:
            self.lease = current
            return True
        got = await self.leases.update_lease(current, self.attrs, self.options.ttl)
        if got is None:
            return False
        logger.debug("renewed lease {} until {}", got.subnet, time.ctime(got.expiration or 0))
        self.renewals += 1
        self.lease = got
        return True

    async def release_presence(self) -> None:
        """The agent stops: let another agent (a replacement host) claim our PublicIP at once."""
        if self.presence_lease:
            await self.leases.release_presence(self.presence_lease)
            self.presence_lease = 0

    # --- watch ---

    def request_relist(self) -> None:
        self._relist.set()

    def _grace_for_missing_peers(self) -> None:
        grace = max(5.0, 3 * self.options.check_interval)
        self._keep_missing_until = time.monotonic() + grace
        # A last listing once the grace is over removes the peers that really are gone.
        asyncio.get_running_loop().call_later(grace + 0.1, self.request_relist)

    def _is_own(self, lease: Lease) -> bool:
        return self.lease is not None and lease.subnet == self.lease.subnet

    async def _relist_timer(self) -> None:
        """Ask for a relist once `relist_interval` has passed since the last listing (of any cause)."""
        interval = self.options.relist_interval
        while True:
            due = self._last_listing + interval - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
                continue
            self._periodic = True
            self._relist.set()
            await asyncio.sleep(interval)  # not again before the next interval, even if etcd is down

    async def run_watch(self, sink: PeerSink) -> None:
        backoff = Backoff("watching subnets", self.options.retry_interval, self.options.retry_max)
        need_list = True
        self._periodic = False
        self._last_listing = time.monotonic()  # the first listing is not a periodic one
        timer = asyncio.ensure_future(self._relist_timer()) if self.options.relist_interval > 0 else None
        try:
            while True:
                try:
                    if need_list:
                        periodic, self._periodic = self._periodic, False
                        await self._relist_into(sink, periodic)
                        need_list = False
                        backoff.succeeded()
                    self._relist.clear()
                    watch_task = asyncio.ensure_future(self._follow(sink, backoff))
                    relist_task = asyncio.ensure_future(self._relist.wait())
                    try:
                        done, _ = await asyncio.wait({watch_task, relist_task}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in (watch_task, relist_task):
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError, Exception):
                                await task
                    if watch_task in done:
                        watch_task.result()  # re-raise what ended the watch
                    else:
                        need_list = True
                except WatchCompacted as e:
                    logger.warning("watch fell behind a compaction ({}); relisting and reconciling peers", e)
                    need_list = True
                except WatchCanceled as e:
                    # No more events would come on that watch (aetcd would have kept waiting on it forever).
                    logger.warning("{}; relisting and watching again", e)
                    need_list = True
                    self._periodic = False
                    self.reconnects += 1
                    await self.watcher.reconnect()
                    await backoff.failed(e)
                except ETCD_RETRYABLE as e:
                    self.etcd_errors["watch"] += 1
                    self.reconnects += 1
                    await self.watcher.reconnect()
                    await backoff.failed(e)
        finally:
            if timer is not None:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer

    async def _relist_into(self, sink: PeerSink, periodic: bool = False) -> None:
        began = time.monotonic()
        listing, self._acquire_listing = self._acquire_listing, None
        if listing is None or periodic:
            listing = await self.watcher.list_leases()
            self.listing_seconds = time.monotonic() - began
        # else: the listing the lease was acquired with, a consistent snapshot like any other (the watch
        # resumes after its revision): at 10,000 leases that saves a second listing at start, 0.4 s.
        self._last_listing = time.monotonic()
        self.report_garbage(listing.garbage)
        listed: dict[IPv4Network, Lease] = {}
        self.refused = {}
        for i, lease in enumerate(listing.leases):
            if self._accept_peer(lease):
                listed[lease.subnet] = lease
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                # 10,000 leases: give the loop a turn (the peers others read stay whole until replaced)
                await asyncio.sleep(0)
        previous, self.peers = self.peers, listed
        if time.monotonic() < self._keep_missing_until:
            kept = {subnet: lease for subnet, lease in previous.items() if subnet not in self.peers}
            if kept:
                logger.info("keeping {} peer(s) absent after etcd's data loss until they re-create their leases",
                            len(kept))  # fmt: skip
                self.peers.update(kept)
        self.last_revision = listing.revision
        self.relists += 1
        self.peers_version += 1
        if periodic:
            wrong = sorted(
                str(subnet) for subnet in previous.keys() | self.peers.keys()
                if (old := previous.get(subnet)) is None or (new := self.peers.get(subnet)) is None
                or old.attrs != new.attrs
            )  # fmt: skip
            if wrong:
                self.relist_corrections += len(wrong)
                logger.warning("periodic relist at revision {}: the watch had missed {} peer change(s): {}; "
                               "reconciling", listing.revision, len(wrong), ", ".join(wrong[:20]))  # fmt: skip
            else:
                logger.debug("periodic relist at revision {} in {:.2f} s: {} peer(s), as watched",
                             listing.revision, self.listing_seconds, len(self.peers))  # fmt: skip
        else:
            logger.info("listed {} peer lease(s) at revision {} in {:.2f} s", len(self.peers), listing.revision,
                        self.listing_seconds)  # fmt: skip
        await sink.sync_peers(list(self.peers.values()))
        await self._changed()

    def _inside_network(self, lease: Lease) -> bool:
        """A subnet strictly inside the overlay network (of any length: a candidate to skip when
        allocating). Anything else is garbage: never a peer, never a reason to skip a candidate."""
        return peer_refusal(lease, self.config.network, lease.subnet.prefixlen) != REFUSED_OUTSIDE

    @property
    def peers_refused(self) -> dict[str, int]:
        """How many leases in etcd are refused as peers now, by reason (for `status`)."""
        return dict(Counter(reason for _, reason in self.refused.values()))

    def _refuse(self, lease: Lease, reason: str) -> None:
        """Count the refusal of `lease` and log it once (again only if it changes)."""
        self.refused[lease.subnet] = (lease, reason)
        said = (lease.subnet, lease.public_ip)
        if self._refusal_logged.get(said) == reason:
            return
        if len(self._refusal_logged) > 100_000:
            self._refusal_logged.clear()  # bounded memory; worst case some leases are logged again
        self._refusal_logged[said] = reason
        if reason == REFUSED_OUR_IP:
            logger.error(
                "DUPLICATE PUBLIC IP: lease {} also claims our PublicIP {}: two hosts share one address; "
                "ignoring that lease", lease.subnet, lease.public_ip,
            )  # fmt: skip
        elif reason == REFUSED_LENGTH:
            logger.error("ignoring lease {} of {}: a /{} lease, the network {} leases /{} only (a lease of "
                         "another length would take over addresses of another host's subnet)", lease.subnet,
                         lease.public_ip, lease.subnet.prefixlen, self.config.network,
                         self.config.subnet_len)  # fmt: skip
            if not self._era_mismatch_said and lease.subnet.prefixlen == self.config.other_rule_subnet_len():
                self._era_mismatch_said = True
                logger.error("{}", subnet_len_era_hint(self.config))
        else:
            logger.error("ignoring lease {} of {}: not a subnet inside the overlay network {}",
                         lease.subnet, lease.public_ip, self.config.network)  # fmt: skip

    def _accept_peer(self, lease: Lease) -> bool:
        if self._is_own(lease):
            return False
        reason = peer_refusal(lease, self.config.network, self.config.subnet_len)
        if not reason and lease.public_ip == self.attrs.public_ip:
            reason = REFUSED_OUR_IP
        if reason:
            self._refuse(lease, reason)
            return False
        self.refused.pop(lease.subnet, None)
        return True

    async def _follow(self, sink: PeerSink, backoff: Backoff) -> None:
        async for revision, event, garbage in self.watcher.watch_leases(self.last_revision + 1):
            backoff.succeeded()
            if garbage:
                key, _, reason = garbage.partition(": ")
                self.report_garbage([(key, reason)])
            if event is not None:
                self.watch_events[event.kind] += 1
            if event is None:
                pass
            elif event.kind == LeaseEvent.REMOVED:
                if self.lease is not None and event.lease.subnet == self.lease.subnet:
                    logger.warning("our lease {} was deleted in etcd; re-creating it", event.lease.subnet)
                    self._check_now.set()
                elif (refused := self.refused.pop(event.lease.subnet, None)) is not None:
                    # nothing of it was programmed; written again, it is worth a line again
                    self._refusal_logged.pop((event.lease.subnet, refused[0].public_ip), None)
                elif (gone := self.peers.pop(event.lease.subnet, None)) is not None:
                    self.peers_version += 1
                    logger.info("peer {} ({}) left", gone.subnet, gone.public_ip)
                    await sink.remove_peer(gone)
            elif self._is_own(event.lease):
                if event.lease.public_ip != self.attrs.public_ip:
                    self._set_problem(f"subnet {event.lease.subnet} was overwritten by {event.lease.public_ip}")
            elif self._accept_peer(event.lease):
                old = self.peers.get(event.lease.subnet)
                self.peers[event.lease.subnet] = event.lease
                self.peers_version += 1
                if old is None or old.attrs != event.lease.attrs:
                    logger.info("peer {} at {} ({})", event.lease.subnet, event.lease.public_ip,
                                event.lease.attrs.backend_type)  # fmt: skip
                    await sink.add_peer(event.lease)
            elif (gone := self.peers.pop(event.lease.subnet, None)) is not None:
                # its new value is refused: a peer no more, as a relist would see it
                self.peers_version += 1
                await sink.remove_peer(gone)
            self.last_revision = max(self.last_revision, revision)
            await self._changed()
