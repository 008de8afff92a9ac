"""The v2 lease source (--etcd-api v2) and the lease manager on it, against a real etcd 3.4 serving its v2
API (--enable-v2), on loopback, one prefix per test: the lease-safety properties of the v3 path, held
through v2's prevExist/prevIndex writes, key TTLs and index-based watch."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.config import parse_config
from flannel_ebpf.lab.etcd import EtcdServer
from flannel_ebpf.lab.faults import CuttableProxy
from flannel_ebpf.subnet.etcd_v2_store import (
    EtcdV2Error,
    EtcdV2Registry,
    EtcdV2Unavailable,
    WatchResync,
    node_expiration,
)
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions
from tests.test_subnet_etcd import OWN, RecordingSink, eventually, running
from tests.test_subnet_etcd import run as run_with_timeout

CONFIG = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}', "v0.5")
A = LeaseAttrs(IPv4Address("192.168.50.1"), "host-gw")
B = LeaseAttrs(IPv4Address("192.168.50.2"), "host-gw")


@pytest.fixture(scope="module")
def etcd2():
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian: etcd-server)")
    server = EtcdServer(extra_args=["--enable-v2"])
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def prefix():
    return f"/test-{uuid.uuid4().hex[:8]}/network"


def v2(etcd, method: str, key: str, **params: str) -> dict:
    """Another client (a flanneld v0.5, an operator's `etcdctl set`) writing to the v2 store."""
    url = f"{etcd.endpoint}/v2/keys{urllib.parse.quote(key)}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


_opened: list[EtcdV2Registry] = []


def registry(etcd, prefix, endpoint: str = "", **kw) -> EtcdV2Registry:
    reg = EtcdV2Registry([endpoint or etcd.endpoint], prefix, **kw)
    _opened.append(reg)
    return reg


def run(coro):
    """The test's coroutine, then every registry() it made closed (no HTTP session left open)."""

    async def closing():
        try:
            return await coro
        finally:
            while _opened:
                await _opened.pop().close()

    return run_with_timeout(closing())


def manager(etcd, prefix, attrs=A, **opts) -> LeaseManager:
    options = LeaseOptions(check_interval=0.5, retry_interval=0.1, **opts)
    return LeaseManager(CONFIG, attrs, registry(etcd, prefix), registry(etcd, prefix), options)


def test_create_is_create_only_and_races_have_one_winner(etcd2, prefix):
    async def body():
        regs = [registry(etcd2, prefix) for _ in range(5)]
        subnet = IPv4Network("10.5.7.0/24")
        attrs = [LeaseAttrs(IPv4Address(f"192.168.50.{i + 1}")) for i in range(5)]
        results = await asyncio.gather(*(r.create_lease(subnet, a, 60) for r, a in zip(regs, attrs, strict=True)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        stored = await regs[0].get_lease(subnet)
        assert stored.public_ip == winners[0].public_ip and stored.mod_revision == winners[0].mod_revision
        assert 55 < stored.expiration - time.time() <= 61
        node = v2(etcd2, "GET", f"{prefix}/subnets/10.5.7.0-24")["node"]
        assert 55 < node["ttl"] <= 60  # the lease TTL is the v2 key's own
        for r in regs:
            await r.close()

    run(body())


def test_updates_and_deletes_are_compare_and_swap_on_the_index(etcd2, prefix):
    async def body():
        reg = registry(etcd2, prefix)
        lease = await reg.create_lease(IPv4Network("10.5.8.0/24"), A, 60)
        renewed = await reg.update_lease(lease, A, 120)
        assert renewed is not None and renewed.mod_revision > lease.mod_revision
        assert renewed.expiration - time.time() > 110
        # Another host's write in between: our stale view must neither overwrite nor delete it.
        v2(etcd2, "PUT", f"{prefix}/subnets/10.5.8.0-24", value='{"PublicIP":"192.168.50.2"}', ttl="60")
        assert await reg.update_lease(renewed, A, 120) is None
        assert not await reg.delete_lease(renewed)
        assert (await reg.get_lease(lease.subnet)).public_ip == B.public_ip
        # Gone meanwhile: an update does not re-create it.
        current = await reg.get_lease(lease.subnet)
        v2(etcd2, "DELETE", f"{prefix}/subnets/10.5.8.0-24")
        assert await reg.update_lease(current, A, 60) is None
        assert await reg.get_lease(lease.subnet) is None
        await reg.close()

    run(body())


def test_value_is_flanneld_json_and_flanneld_v05_leases_are_read(etcd2, prefix):
    # flanneld v0.5.5 writes {"PublicIP": ...} (udp) or with BackendType/BackendData, under a 24 h TTL
    v2(etcd2, "PUT", f"{prefix}/subnets/10.5.3.0-24", value='{"PublicIP":"192.168.50.3"}', ttl="86400")

    async def body():
        m = manager(etcd2, prefix)
        lease = await m.acquire()
        raw = v2(etcd2, "GET", f"{prefix}/subnets/{lease.subnet.network_address}-24")["node"]["value"]
        assert json.loads(raw) == {"PublicIP": "192.168.50.1", "PublicIPv6": None, "BackendType": "host-gw"}
        listing = await registry(etcd2, prefix).list_leases()
        assert {str(x.public_ip) for x in listing.leases} == {"192.168.50.1", "192.168.50.3"}
        assert listing.revision >= lease.mod_revision

    run(body())


def test_acquire_reuses_own_lease_then_previous_subnet(etcd2, prefix):
    async def body():
        first = await manager(etcd2, prefix).acquire()
        again = await manager(etcd2, prefix).acquire()  # a restart: found by PublicIP
        assert again.subnet == first.subnet and again.mod_revision > first.mod_revision
        assert await registry(etcd2, prefix).delete_lease(again)
        previous = IPv4Network("10.5.200.0/24")
        got = await manager(etcd2, prefix).acquire(previous)  # lease gone: the subnet file's subnet
        assert got.subnet == previous

    run(body())


def test_previous_subnet_held_by_another_host_is_not_silently_replaced(etcd2, prefix):
    async def body():
        other = await manager(etcd2, prefix, attrs=B).acquire()
        m = manager(etcd2, prefix, attrs=A)
        task = asyncio.ensure_future(m.acquire(other.subnet))
        await eventually(lambda: m.problem is not None, what="conflict reported")
        assert str(other.subnet) in m.problem and "192.168.50.2" in m.problem
        assert not task.done()
        task.cancel()
        stored = await registry(etcd2, prefix).get_lease(other.subnet)
        assert stored.public_ip == B.public_ip and stored.mod_revision == other.mod_revision

    run(body())


def test_reservation_stays_a_reservation(etcd2, prefix):
    v2(etcd2, "PUT", f"{prefix}/subnets/10.5.9.0-24", value='{"PublicIP":"192.168.50.1"}')  # no TTL

    async def body():
        lease = await manager(etcd2, prefix).acquire()
        assert lease.subnet == IPv4Network("10.5.9.0/24")
        assert lease.is_reservation and lease.expiration is None
        node = v2(etcd2, "GET", f"{prefix}/subnets/10.5.9.0-24")["node"]
        assert "ttl" not in node and "expiration" not in node  # renewed without gaining a TTL

    run(body())


def test_renewal_extends_expiry_and_a_vanished_lease_is_recreated(etcd2, prefix):
    async def body():
        m = manager(etcd2, prefix, ttl=10)  # renews at half-life
        lease = await m.acquire()
        async with running(m.run_maintenance()):
            await eventually(lambda: m.lease.mod_revision != lease.mod_revision, 12, "a renewal")
            assert m.lease.expiration > lease.expiration
            v2(etcd2, "DELETE", f"{prefix}/subnets/{lease.subnet.network_address}-24")
            before = m.lease.mod_revision
            await eventually(lambda: m.lease.mod_revision > before, 5, "re-creation")
        stored = await registry(etcd2, prefix).get_lease(lease.subnet)
        assert stored is not None and stored.public_ip == A.public_ip and m.problem is None

    run(body())


def test_watch_sees_adds_expiries_deletes_and_skips_garbage(etcd2, prefix):
    async def body():
        m = manager(etcd2, prefix)
        await m.acquire(IPv4Network("10.5.250.0/24"))
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: sink.calls, what="initial sync")
            reg = registry(etcd2, prefix)
            expiring = await reg.create_lease(IPv4Network("10.5.77.0/24"), B, 2)
            for i in range(100, 104):
                v2(etcd2, "PUT", f"{prefix}/subnets/10.5.{i}.0-24", value=f'{{"PublicIP":"192.168.60.{i}"}}')
            v2(etcd2, "PUT", f"{prefix}/subnets/garbage", value="not a lease")
            v2(etcd2, "PUT", f"{prefix}/subnets/10.5.120.0-24", value="{broken json")
            await eventually(lambda: len(sink.peers) == 5, what="five peers")
            v2(etcd2, "DELETE", f"{prefix}/subnets/10.5.101.0-24")
            await eventually(lambda: expiring.subnet not in sink.peers and len(sink.peers) == 3, 15, "expiry, delete")
        assert ("remove", "10.5.77.0/24") in sink.calls  # the v2 `expire` action
        assert sorted(str(s) for s in sink.peers) == ["10.5.100.0/24", "10.5.102.0/24", "10.5.103.0/24"]

    run(body())


def test_watch_relists_when_its_index_was_cleared_from_etcd_history(etcd2, prefix):
    """Cut off while over 1,000 v2 events pass (etcd keeps 1,000): 401 "event index cleared" -> relist."""

    async def body():
        proxy = CuttableProxy("127.0.0.1", etcd2.client_port)
        await proxy.start()
        reg = registry(etcd2, prefix)
        gone = await reg.create_lease(IPv4Network("10.5.50.0/24"), B, 60)
        m = LeaseManager(
            CONFIG, A, registry(etcd2, prefix), registry(etcd2, prefix, proxy.endpoint, watch_poll=1.0),
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
            for i in range(1010):  # elsewhere in the store: only the history window moves
                await reg._request("PUT", f"{prefix}-noise/k", "readwrite", data={"value": str(i)})
            assert set(sink.peers) == {gone.subnet}
            proxy.restore()
            await eventually(lambda: set(sink.peers) == {IPv4Network("10.5.51.0/24")}, 20, "reconciled peers")
        assert m.relists == relists + 1
        assert ("remove", "10.5.50.0/24") not in sink.calls  # the removal came from the relist's sync
        await proxy.close()
        await reg.close()

    run(body())


def test_an_idle_watch_moves_its_index_with_the_store(etcd2, prefix):
    """Writes elsewhere move etcd's index; an idle poll resumes from there, so a later reconnect does not
    fall out of the 1,000-event history merely because nothing happened under subnets/."""

    async def body():
        reg = registry(etcd2, prefix, watch_poll=0.5)
        start, _ = await reg.current_revision()
        for i in range(5):
            v2(etcd2, "PUT", f"{prefix}-noise/k", value=str(i))
        items = reg.watch_leases(start + 1)
        index, event, garbage = await asyncio.wait_for(items.__anext__(), 5)
        assert event is None and garbage == "" and index >= start + 5
        await items.aclose()
        await reg.close()

    run(body())


def test_deleting_the_subnets_directory_makes_the_watch_relist(etcd2, prefix):
    async def body():
        reg = registry(etcd2, prefix)
        await reg.create_lease(IPv4Network("10.5.60.0/24"), B, 60)
        start, _ = await reg.current_revision()
        items = reg.watch_leases(start + 1)
        pending = asyncio.ensure_future(items.__anext__())
        await asyncio.sleep(0.3)
        v2(etcd2, "DELETE", f"{prefix}/subnets", recursive="true")
        with pytest.raises(WatchResync, match="subnets"):
            await asyncio.wait_for(pending, 5)
        await reg.close()

    run(body())


def test_one_agent_per_public_ip(etcd2, prefix):
    async def body():
        first = manager(etcd2, prefix, identity="hostA:1")
        lease = await first.acquire()
        key = f"{prefix}/flannel-ebpf/hosts/192.168.50.1"
        assert v2(etcd2, "GET", key)["node"]["value"] == "hostA:1"
        twin = manager(etcd2, prefix, identity="hostB:2")
        task = asyncio.ensure_future(twin.acquire())
        await eventually(lambda: twin.problem is not None, what="duplicate reported")
        assert "DUPLICATE PUBLIC IP" in twin.problem and "hostA:1" in twin.problem
        task.cancel()
        assert (await registry(etcd2, prefix).get_lease(lease.subnet)).mod_revision == lease.mod_revision
        # the claim is refreshed by compare-and-swap; the same agent restarting takes it over
        assert await first.leases.refresh_presence(first.presence_lease)
        again = manager(etcd2, prefix, identity="hostA:1")
        assert (await again.acquire()).subnet == lease.subnet
        assert not await first.leases.refresh_presence(first.presence_lease)  # taken over: no longer ours
        await again.release_presence()
        assert v2(etcd2, "GET", key).get("errorCode") == 100
        successor = manager(etcd2, prefix, identity="hostC:3")
        assert (await successor.acquire()).subnet == lease.subnet and successor.problem is None

    run(body())


def test_current_revision_is_the_v2_index_and_the_cluster_id(etcd2, prefix):
    async def body():
        reg = registry(etcd2, prefix)
        index, cluster = await reg.current_revision()
        lease = await reg.create_lease(IPv4Network("10.5.61.0/24"), A, 60)
        after, same = await reg.current_revision()
        assert cluster != 0 and same == cluster
        assert after >= lease.mod_revision > index
        await reg.close()

    run(body())


def test_an_etcd_without_the_v2_api_is_named(etcd):
    """The session's etcd runs without --enable-v2: one line saying what to do."""

    async def body():
        reg = EtcdV2Registry([etcd.endpoint], "/coreos.com/network")
        with pytest.raises(EtcdV2Error, match="--enable-v2"):
            await reg.get_config()
        await reg.close()

    run(body())


def test_an_unreachable_etcd_is_retryable():
    async def body():
        reg = EtcdV2Registry(["http://127.0.0.1:9"], "/coreos.com/network", timeout=1)
        with pytest.raises(EtcdV2Unavailable):
            await reg.get_config()
        await reg.close()

    run(body())


def test_node_expiration_reads_etcd_nanoseconds_and_falls_back_to_ttl():
    assert node_expiration({"expiration": "2030-01-02T03:04:05.123456789Z"}) == pytest.approx(1893553445.123456)
    assert node_expiration({"ttl": 30}, now=1000.0) == 1030.0
    assert node_expiration({}) is None
