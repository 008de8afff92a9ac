"""The lease registry and manager against a real etcd server (on loopback, one prefix per test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.config import parse_config
from flannel_ebpf.lab.faults import CuttableProxy
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions, PeerSink
from flannel_ebpf.subnet.registry import SubnetRegistry

CONFIG = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}')
A = LeaseAttrs(IPv4Address("192.168.50.1"), "host-gw")
B = LeaseAttrs(IPv4Address("192.168.50.2"), "host-gw")
# A manager's own subnet, as from a subnet file, where a test then creates peers on fixed subnets: a random
# pick (among the first 100 free) would be one of them once in a hundred runs, and that create would fail.
OWN = IPv4Network("10.5.250.0/24")


@pytest.fixture
def prefix():
    return f"/test-{uuid.uuid4().hex[:8]}/network"


def registry(etcd, prefix) -> SubnetRegistry:
    return SubnetRegistry([etcd.endpoint], prefix)


def manager(etcd, prefix, attrs=A, **opts) -> LeaseManager:
    options = LeaseOptions(check_interval=0.5, retry_interval=0.1, **opts)
    return LeaseManager(CONFIG, attrs, registry(etcd, prefix), registry(etcd, prefix), options)


class RecordingSink(PeerSink):
    def __init__(self) -> None:
        self.peers: dict[IPv4Network, Lease] = {}
        self.calls: list[tuple[str, str]] = []

    async def sync_peers(self, peers):
        self.peers = {p.subnet: p for p in peers}
        self.calls.append(("sync", ",".join(sorted(str(p.subnet) for p in peers))))

    async def add_peer(self, lease):
        self.peers[lease.subnet] = lease
        self.calls.append(("add", str(lease.subnet)))

    async def remove_peer(self, lease):
        self.peers.pop(lease.subnet, None)
        self.calls.append(("remove", str(lease.subnet)))


async def eventually(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def running(*coros):
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@contextlib.asynccontextmanager
async def watching(etcd, prefix):
    """A manager holding a lease, its watch running into a RecordingSink, past the first listing."""
    m = manager(etcd, prefix)
    await m.acquire(OWN)
    sink = RecordingSink()
    async with running(m.run_watch(sink)):
        await eventually(lambda: sink.calls, what="initial sync")
        yield m, sink


def test_create_is_create_only_and_races_have_one_winner(etcd, prefix):
    async def body():
        regs = [registry(etcd, prefix) for _ in range(5)]
        subnet = IPv4Network("10.5.7.0/24")
        attrs = [LeaseAttrs(IPv4Address(f"192.168.50.{i + 1}")) for i in range(5)]
        results = await asyncio.gather(*(r.create_lease(subnet, a, 60) for r, a in zip(regs, attrs, strict=True)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        stored = await regs[0].get_lease(subnet)
        assert stored.public_ip == winners[0].public_ip
        assert 55 < stored.expiration - time.time() <= 61
        for r in regs:
            await r.close()

    run(body())


def test_value_in_etcd_is_flanneld_json(etcd, prefix):
    async def body():
        m = manager(etcd, prefix)
        lease = await m.acquire()
        raw = etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/{lease.subnet.network_address}-24")
        assert json.loads(raw) == {"PublicIP": "192.168.50.1", "PublicIPv6": None, "BackendType": "host-gw"}
        assert CONFIG.contains_subnet(lease.subnet)

    run(body())


def test_acquire_reuses_own_lease_then_previous_subnet(etcd, prefix):
    async def body():
        first = await manager(etcd, prefix).acquire()
        again = await manager(etcd, prefix).acquire()  # a restart: found by PublicIP
        assert again.subnet == first.subnet and again.mod_revision > first.mod_revision
        reg = registry(etcd, prefix)
        assert await reg.delete_lease(again)
        previous = IPv4Network("10.5.200.0/24")
        got = await manager(etcd, prefix).acquire(previous)  # lease gone: the subnet file's subnet
        assert got.subnet == previous

    run(body())


def test_previous_subnet_held_by_another_host_is_not_silently_replaced(etcd, prefix):
    async def body():
        other = await manager(etcd, prefix, attrs=B).acquire()
        m = manager(etcd, prefix, attrs=A)
        task = asyncio.ensure_future(m.acquire(other.subnet))
        await eventually(lambda: m.problem is not None, what="conflict reported")
        assert str(other.subnet) in m.problem and "192.168.50.2" in m.problem
        assert not task.done()  # still waiting, has not taken another subnet
        task.cancel()
        stored = await registry(etcd, prefix).get_lease(other.subnet)
        assert stored.public_ip == B.public_ip  # never overwritten
        moved = await manager(etcd, prefix, attrs=A, allow_subnet_change=True).acquire(other.subnet)
        assert moved.subnet != other.subnet

    run(body())


def test_reservation_stays_a_reservation(etcd, prefix):
    etcd.ctl("put", f"{prefix}/subnets/10.5.9.0-24", '{"PublicIP":"192.168.50.1"}')

    async def body():
        m = manager(etcd, prefix)
        lease = await m.acquire()
        assert lease.subnet == IPv4Network("10.5.9.0/24")
        assert lease.is_reservation and lease.expiration is None
        listing = await registry(etcd, prefix).list_leases()
        assert listing.leases[0].lease_id == 0

    run(body())


def test_renewal_extends_expiry_and_expiry_is_recovered(etcd, prefix):
    async def body():
        m = manager(etcd, prefix, ttl=10)  # renews at half-life (margin capped at ttl/2)
        lease = await m.acquire()
        async with running(m.run_maintenance()):
            await eventually(lambda: m.lease.mod_revision != lease.mod_revision, 12, "a renewal")
            assert m.lease.expiration > lease.expiration
            assert m.lease.lease_id != lease.lease_id
            # Our key vanishes (an expiry during an outage, a careless etcdctl del): re-created, same subnet.
            etcd.ctl("del", f"{prefix}/subnets/{lease.subnet.network_address}-24")
            await eventually(lambda: m.lease.mod_revision > lease.mod_revision + 2, 5, "re-creation")
        stored = await registry(etcd, prefix).get_lease(lease.subnet)
        assert stored is not None and stored.public_ip == A.public_ip and m.problem is None

    run(body())


def test_expired_peer_is_removed_by_the_watch(etcd, prefix):
    async def body():
        async with watching(etcd, prefix) as (_, sink):
            peer = await registry(etcd, prefix).create_lease(IPv4Network("10.5.77.0/24"), B, 2)
            await eventually(lambda: peer.subnet in sink.peers, what="peer added")
            await eventually(lambda: peer.subnet not in sink.peers, 15, "peer expired")
        assert ("remove", "10.5.77.0/24") in sink.calls

    run(body())


def test_watch_delivers_every_event_of_a_response_and_skips_garbage(etcd, prefix):
    async def body():
        async with watching(etcd, prefix) as (_, sink):
            # One transaction = one revision = several events in one watch response.
            client = registry(etcd, prefix).client
            puts = [
                client.transactions.put(
                    f"{prefix}/subnets/10.5.{i}.0-24".encode(), f'{{"PublicIP":"192.168.60.{i}"}}'.encode()
                )
                for i in range(100, 106)
            ]
            assert (await client.transaction(compare=[], success=puts, failure=[]))[0]
            etcd.ctl("put", f"{prefix}/subnets/garbage", "not a lease")
            etcd.ctl("put", f"{prefix}/subnets/10.5.120.0-24", "{broken json")
            await eventually(lambda: len(sink.peers) == 6, what="all six peers")
            etcd.ctl("del", f"{prefix}/subnets/10.5.101.0-24")
            await eventually(lambda: len(sink.peers) == 5, what="a removal")
        assert sorted(str(s) for s in sink.peers) == [f"10.5.{i}.0/24" for i in (100, 102, 103, 104, 105)]

    run(body())


def test_watch_resumes_after_compaction_by_relisting(etcd, prefix):
    """Cut off from etcd while peers change and etcd compacts: on reconnect the agent relists."""

    async def body():
        proxy = CuttableProxy("127.0.0.1", etcd.client_port)
        await proxy.start()
        reg = registry(etcd, prefix)
        gone = await reg.create_lease(IPv4Network("10.5.50.0/24"), B, 60)
        m = LeaseManager(
            CONFIG, A, registry(etcd, prefix), SubnetRegistry([proxy.endpoint], prefix),
            LeaseOptions(check_interval=0.5, retry_interval=0.1),
        )  # fmt: skip
        await m.acquire(OWN)
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: set(sink.peers) == {gone.subnet}, what="initial sync")
            relists = m.relists
            proxy.cut()
            await reg.delete_lease(gone)
            await reg.create_lease(IPv4Network("10.5.51.0/24"), LeaseAttrs(IPv4Address("192.168.50.3")), 60)
            revision, _ = await reg.current_revision()
            etcd.ctl("compact", str(revision))
            await asyncio.sleep(0.5)
            assert set(sink.peers) == {gone.subnet}  # still cut off: nothing seen yet
            proxy.restore()
            await eventually(lambda: set(sink.peers) == {IPv4Network("10.5.51.0/24")}, 15, "reconciled peers")
        assert m.relists == relists + 1  # resumed, hit the compaction, relisted once
        assert ("remove", "10.5.50.0/24") not in sink.calls  # the removal came from the relist's sync
        await proxy.close()

    run(body())


def test_duplicate_public_ip_is_never_a_peer(etcd, prefix):
    async def body():
        m = manager(etcd, prefix)
        await m.acquire(OWN)
        await registry(etcd, prefix).create_lease(IPv4Network("10.5.88.0/24"), A, 60)  # same PublicIP as us
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: sink.calls, what="initial sync")
        assert sink.peers == {}

    run(body())


def test_one_agent_per_public_ip(etcd, prefix):
    async def body():
        first = manager(etcd, prefix, identity="hostA:1")
        lease = await first.acquire()
        twin = manager(etcd, prefix, identity="hostB:2")  # another machine configured with the same IP
        task = asyncio.ensure_future(twin.acquire())
        await eventually(lambda: twin.problem is not None, what="duplicate reported")
        assert "DUPLICATE PUBLIC IP" in twin.problem and "hostA:1" in twin.problem
        assert not task.done()
        task.cancel()
        stored = await registry(etcd, prefix).get_lease(lease.subnet)
        assert stored.mod_revision == lease.mod_revision  # the twin never touched the lease
        # The same agent restarting (same identity, its claim still alive) is not a duplicate.
        again = await manager(etcd, prefix, identity="hostA:1").acquire()
        assert again.subnet == lease.subnet
        # Once that agent stops, the address is free for another.
        restarted = manager(etcd, prefix, identity="hostA:1")
        await restarted.acquire()
        await restarted.release_presence()
        successor = manager(etcd, prefix, identity="hostC:3")
        assert (await successor.acquire()).subnet == lease.subnet  # found by PublicIP, no duplicate reported
        assert successor.problem is None
        await successor.release_presence()

    run(body())


def test_leases_outside_the_network_are_never_peers(etcd, prefix):
    """`subnets/0.0.0.0-0` would become a default route on host-gw: it must never reach a backend."""
    for key in ("0.0.0.0-0", "1.2.3.0-24", "10.5.0.0-16", "10.0.0.0-8"):
        etcd.ctl("put", f"{prefix}/subnets/{key}", '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}')

    async def body():
        async with watching(etcd, prefix) as (_, sink):
            etcd.ctl("put", f"{prefix}/subnets/0.0.0.0-1", '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}')
            etcd.ctl("put", f"{prefix}/subnets/10.5.9.0-24", '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}')
            await eventually(lambda: sink.peers, what="the valid peer")
        assert list(sink.peers) == [IPv4Network("10.5.9.0/24")]

    run(body())


def test_garbage_under_our_own_key_is_survived(etcd, prefix):
    async def body():
        m = manager(etcd, prefix)
        lease = await m.acquire()
        etcd.ctl("put", f"{prefix}/subnets/{lease.subnet.network_address}-24", "{garbage")
        async with running(m.run_maintenance()) as (task,):
            await asyncio.sleep(2)  # several checks, each one reading the garbage
            assert not task.done()  # logged and retried, never a crash

    run(body())
