"""Issue 14 against a real etcd (loopback): hostile keys and values under subnets/ never crash, stall or
hijack the agent's control plane, and a listing of any size works."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from flannel_ebpf.subnet.manager import REFUSED_LENGTH, REFUSED_OUR_IP, REFUSED_OUTSIDE, peer_refusal
from tests.test_subnet_etcd import A, B, RecordingSink, eventually, manager, registry, run, running, watching


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/network"


HOSTGW_VALUE = '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}'


def test_deeply_nested_values_are_garbage_in_listing_and_watch(etcd, prefix):
    deep = "[" * 5000 + "]" * 5000
    etcd.ctl("put", f"{prefix}/subnets/10.5.30.0-24", input=deep)
    etcd.ctl("put", f"{prefix}/subnets/10.5.31.0-24",
             input='{"PublicIP":"192.168.50.9","BackendType":"host-gw","BackendData":' + deep + "}")  # fmt: skip
    etcd.ctl("put", f"{prefix}/subnets/10.5.32.0-24", HOSTGW_VALUE)

    async def body():
        listing = await registry(etcd, prefix).list_leases()  # used to raise RecursionError
        assert [lease.subnet for lease in listing.leases] == [IPv4Network("10.5.32.0/24")]
        assert {key.rsplit("/", 1)[1] for key, _ in listing.garbage} == {"10.5.30.0-24", "10.5.31.0-24"}
        assert all("deeper than" in reason for _, reason in listing.garbage)
        async with watching(etcd, prefix) as (_, sink):
            etcd.ctl("put", f"{prefix}/subnets/10.5.33.0-24", input=deep)
            etcd.ctl("put", f"{prefix}/subnets/10.5.34.0-24", HOSTGW_VALUE)
            await eventually(lambda: IPv4Network("10.5.34.0/24") in sink.peers, what="the peer after the garbage")
            assert set(sink.peers) == {IPv4Network("10.5.32.0/24"), IPv4Network("10.5.34.0/24")}

    run(body())


def test_non_canonical_keys_neither_hijack_nor_delete_a_peer(etcd, prefix):
    etcd.ctl("put", f"{prefix}/subnets/10.5.40.0-24", HOSTGW_VALUE)
    evil = '{"PublicIP":"192.168.66.66","BackendType":"host-gw"}'

    async def body():
        async with watching(etcd, prefix) as (_, sink):
            await eventually(lambda: IPv4Network("10.5.40.0/24") in sink.peers, what="the real peer")
            for alias in ("10.5.40.0-024", "x10.5.40.0-24", "10.5.40.0-24\n", "010.5.40.0-24"):
                etcd.ctl("put", f"{prefix}/subnets/{alias}", evil)  # a hijack through an alias...
            for alias in ("10.5.40.0-024", "x10.5.40.0-24", "10.5.40.0-24\n", "010.5.40.0-24"):
                etcd.ctl("del", f"{prefix}/subnets/{alias}")  # ...and a delete through one
            etcd.ctl("put", f"{prefix}/subnets/10.5.41.0-24", HOSTGW_VALUE)  # a marker: all above was seen
            await eventually(lambda: IPv4Network("10.5.41.0/24") in sink.peers, what="the marker peer")
            assert sink.peers[IPv4Network("10.5.40.0/24")].public_ip == IPv4Address("192.168.50.9")
            assert ("remove", "10.5.40.0/24") not in sink.calls
        listing = await registry(etcd, prefix).list_leases()
        assert len(listing.garbage) == 0  # the aliases are deleted again
        etcd.ctl("put", f"{prefix}/subnets/10.5.40.0-024", evil)
        listing = await registry(etcd, prefix).list_leases()
        assert [key for key, _ in listing.garbage] == [f"{prefix}/subnets/10.5.40.0-024"]
        held = {str(lease.subnet): str(lease.public_ip) for lease in listing.leases}
        assert held["10.5.40.0/24"] == "192.168.50.9" and "192.168.66.66" not in held.values()

    run(body())


def test_unusable_public_ips_are_never_peers(etcd, prefix):
    ips = ["255.255.255.255", "224.0.0.5", "0.0.0.0", "127.0.0.1", "240.1.2.3", "169.254.169.254"]
    for i, ip in enumerate(ips):
        etcd.ctl("put", f"{prefix}/subnets/10.5.{50 + i}.0-24", json.dumps({"PublicIP": ip, "BackendType": "host-gw"}))
    etcd.ctl("put", f"{prefix}/subnets/10.5.60.0-24", HOSTGW_VALUE)

    async def body():
        async with watching(etcd, prefix) as (_, sink):
            assert list(sink.peers) == [IPv4Network("10.5.60.0/24")]
            etcd.ctl("put", f"{prefix}/subnets/10.5.60.0-24", '{"PublicIP":"255.255.255.255","BackendType":"host-gw"}')
            # the peer's key now holds garbage: it is no longer a peer (as a relist would also see it)
            await eventually(lambda: not sink.peers, what="the peer gone with its usable PublicIP")

    run(body())


def test_a_wrong_backend_data_type_reaches_the_backend_only_as_that_peer(etcd, prefix):
    """The lease model keeps BackendData opaque (it is the backend's to judge): the VNI-type case is the
    vxlan backend's (see test_hostile_input), here the control plane must deliver both peers."""
    etcd.ctl("put", f"{prefix}/subnets/10.5.70.0-24",
             '{"PublicIP":"192.168.50.9","BackendType":"vxlan","BackendData":{"VNI":[1],"VtepMAC":7}}')  # fmt: skip
    etcd.ctl("put", f"{prefix}/subnets/10.5.71.0-24", HOSTGW_VALUE)

    async def body():
        async with watching(etcd, prefix) as (_, sink):
            assert set(sink.peers) == {IPv4Network("10.5.70.0/24"), IPv4Network("10.5.71.0/24")}

    run(body())


# --- 3. paging --------------------------------------------------------------------------------------------


def test_listing_with_values_too_big_for_one_grpc_message(etcd, prefix):
    """Five values of ~1 MiB (etcd accepts up to 1.5 MiB) exceed gRPC's 4 MiB: one unpaginated range fails
    forever. Paged, the valid leases are listed and each oversized value is reported under its key."""

    async def body():
        reg = registry(etcd, prefix)
        big = json.dumps({"PublicIP": "192.168.50.9", "pad": "x" * (1024 * 1024 - 100)})
        for i in range(5):
            await reg.client.put(f"{prefix}/subnets/10.5.{100 + i}.0-24".encode(), big.encode())
        for i in range(3):
            await reg.create_lease(IPv4Network(f"10.5.{110 + i}.0/24"), B, 60)
        started = time.monotonic()
        listing = await reg.list_leases()
        elapsed = time.monotonic() - started
        assert sorted(str(lease.subnet) for lease in listing.leases) == [f"10.5.{110 + i}.0/24" for i in range(3)]
        assert sorted(key.rsplit("/", 1)[1] for key, _ in listing.garbage) == [f"10.5.{100 + i}.0-24" for i in range(5)]
        assert all("larger than the 65536 accepted" in reason for _, reason in listing.garbage)
        assert elapsed < 10, f"listing took {elapsed:.1f}s"
        # and the agent's own acquisition and watch get through it too
        m = manager(etcd, prefix)
        lease = await asyncio.wait_for(m.acquire(), 15)
        assert lease.subnet not in {IPv4Network(f"10.5.{100 + i}.0/24") for i in range(5)}
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: len(sink.peers) == 3, what="the three peers")
        await reg.close()

    run(body())


def test_paged_listing_is_complete_and_consistent(etcd, prefix):
    async def body():
        reg = registry(etcd, prefix)
        client = reg.client
        tx = client.transactions
        puts = [
            tx.put(f"{prefix}/subnets/10.5.{i}.0-24".encode(), f'{{"PublicIP":"192.168.60.{i}"}}'.encode())
            for i in range(1, 61)
        ]
        assert (await client.transaction(compare=[], success=puts, failure=[]))[0]
        await client.put(f"{prefix}/subnetsX".encode(), b"outside the prefix")
        one_shot = await reg.list_leases()
        paged = await reg.list_leases(page_size=7)
        assert len(paged.leases) == 60 and not paged.garbage
        assert [lease.subnet for lease in paged.leases] == [lease.subnet for lease in one_shot.leases]
        assert paged.revision == one_shot.revision
        await reg.close()

    run(body())


# --- 5. the subnet file's subnet holds garbage in etcd --------------------------------------------------


def test_previous_subnet_with_garbage_value_backs_off_says_why_and_is_not_ready(etcd, prefix):
    previous = IPv4Network("10.5.200.0/24")
    key = f"{prefix}/subnets/10.5.200.0-24"
    etcd.ctl("put", key, "{garbage")

    async def body():
        m = manager(etcd, prefix)  # check_interval 0.5 s
        listings = 0
        original = m.leases.list_leases

        async def counting(*args, **kwargs):
            nonlocal listings
            listings += 1
            return await original(*args, **kwargs)

        m.leases.list_leases = counting  # type: ignore[method-assign]
        task = asyncio.ensure_future(m.acquire(previous))
        await eventually(lambda: m.problem is not None, 5, "the problem reported")
        assert key in m.problem and "invalid value" in m.problem and "--allow-subnet-change" in m.problem
        await asyncio.sleep(2.0)
        assert not task.done()
        assert listings <= 6, f"{listings} attempts in ~2 s: no back-off"  # every 0.5 s, not every 50-300 ms
        task.cancel()
        # with --allow-subnet-change it takes another subnet, never the garbage one
        moved = await manager(etcd, prefix, allow_subnet_change=True).acquire(previous)
        assert moved.subnet != previous
        assert etcd.ctl("get", "--print-value-only", key).strip() == "{garbage"  # never overwritten

    run(body())


def test_garbage_values_count_as_taken_subnets(etcd, prefix):
    """A /28 network has three /30 subnets: two hold garbage, so allocation must go for the third at
    once instead of trying the garbage ones again and again."""
    from flannel_ebpf.config import parse_config
    from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions

    for address in ("10.9.0.4", "10.9.0.8"):
        etcd.ctl("put", f"{prefix}/subnets/{address}-30", "[1, 2")
    config = parse_config('{"Network": "10.9.0.0/28", "Backend": {"Type": "host-gw"}}')

    async def once() -> None:
        m = LeaseManager(config, A, registry(etcd, prefix), registry(etcd, prefix),
                         LeaseOptions(check_interval=0.5, retry_interval=0.1))  # fmt: skip
        creates = 0
        original = m.leases.create_lease

        async def counting(*args, **kwargs):
            nonlocal creates
            creates += 1
            return await original(*args, **kwargs)

        m.leases.create_lease = counting  # type: ignore[method-assign]
        lease = await m.acquire()
        assert lease.subnet == IPv4Network("10.9.0.12/30") and creates == 1
        assert await m.leases.delete_lease(lease)

    async def body():
        for _ in range(5):  # allocation is random: without the rule, 5 tries would all win 1 time in 243
            await once()

    run(body())


def test_garbage_is_logged_once_not_on_every_attempt(etcd, prefix):
    from loguru import logger

    lines: list[str] = []
    sink_id = logger.add(lambda msg: lines.append(msg.record["message"]), level="WARNING")
    try:
        etcd.ctl("put", f"{prefix}/subnets/10.5.201.0-24", "{garbage")

        async def body():
            other = await registry(etcd, prefix).create_lease(IPv4Network("10.5.202.0/24"), B, 60)
            m = manager(etcd, prefix)
            task = asyncio.ensure_future(m.acquire(other.subnet))  # held by B: retried every check
            await asyncio.sleep(1.6)
            task.cancel()

        run(body())
    finally:
        logger.remove(sink_id)
    assert len([line for line in lines if "10.5.201.0-24" in line]) == 1


# --- nested leases (issue 25, item 7) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "reason"),
    [
        ("10.5.34.0/24", ""),
        ("10.5.34.0/25", REFUSED_LENGTH),  # inside a /24 lease: wins every longest-prefix match
        ("10.5.34.128/25", REFUSED_LENGTH),
        ("10.5.34.4/30", REFUSED_LENGTH),
        ("10.5.32.0/23", REFUSED_LENGTH),  # covers two /24 leases
        ("10.5.0.0/17", REFUSED_LENGTH),
        ("10.5.0.0/16", REFUSED_OUTSIDE),
        ("10.6.34.0/24", REFUSED_OUTSIDE),
    ],
)
def test_peer_refusal_rule(subnet, reason):
    lease = Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address("192.168.50.66"), "host-gw"))
    assert peer_refusal(lease, IPv4Network("10.5.0.0/16"), 24) == reason


def test_nested_leases_never_become_peers_counted_and_logged_once(etcd, prefix, logs):
    """A /25 inside a peer's /24 and a /23 over two peers (written before the agent lists, and while it
    watches) are refused: the /24s keep their subnets, the refusals are counted by reason and logged
    once each, and a refused lease's deletion takes it off the count."""
    evil = '{"PublicIP":"192.168.50.66","BackendType":"host-gw"}'
    victim = '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}'
    etcd.ctl("put", f"{prefix}/subnets/10.5.34.0-24", victim)
    etcd.ctl("put", f"{prefix}/subnets/10.5.34.0-25", evil)  # before the listing

    async def body():
        async with watching(etcd, prefix) as (m, sink):
            assert set(sink.peers) == {IPv4Network("10.5.34.0/24")}
            assert m.peers_refused == {REFUSED_LENGTH: 1}
            etcd.ctl("put", f"{prefix}/subnets/10.5.34.128-25", evil)  # while watching
            etcd.ctl("put", f"{prefix}/subnets/10.5.32.0-23", evil)
            etcd.ctl("put", f"{prefix}/subnets/10.5.35.0-24", victim)  # a marker: all above was seen
            await eventually(lambda: IPv4Network("10.5.35.0/24") in sink.peers, what="the marker peer")
            assert set(sink.peers) == {IPv4Network("10.5.34.0/24"), IPv4Network("10.5.35.0/24")}
            assert all(lease.public_ip == IPv4Address("192.168.50.9") for lease in sink.peers.values())
            assert m.peers_refused == {REFUSED_LENGTH: 3}
            m.request_relist()  # a relist (and its sync) sees the same, and logs nothing again
            relists = m.relists
            await eventually(lambda: m.relists > relists, what="a relist")
            assert m.peers_refused == {REFUSED_LENGTH: 3} and set(sink.peers) == set(m.peers)
            etcd.ctl("del", f"{prefix}/subnets/10.5.34.0-25")
            await eventually(lambda: m.peers_refused == {REFUSED_LENGTH: 2}, what="the deletion counted")
            assert IPv4Network("10.5.34.0/24") in sink.peers

    run(body())
    refused = [line for line in logs if "ignoring lease 10.5.3" in line]
    assert sorted(refused) == sorted(set(refused)) and len(refused) == 3, refused
    assert all("/24 only" in line for line in refused)


def test_a_peer_whose_value_turns_refused_is_removed(etcd, prefix):
    async def body():
        async with watching(etcd, prefix) as (m, sink):
            etcd.ctl("put", f"{prefix}/subnets/10.5.36.0-24", '{"PublicIP":"192.168.50.9","BackendType":"host-gw"}')
            await eventually(lambda: IPv4Network("10.5.36.0/24") in sink.peers, what="the peer")
            ours = f'{{"PublicIP":"{A.public_ip}","BackendType":"host-gw"}}'  # now claims our PublicIP
            etcd.ctl("put", f"{prefix}/subnets/10.5.36.0-24", ours)
            await eventually(lambda: not sink.peers, what="the peer removed")
            assert m.peers_refused == {REFUSED_OUR_IP: 1}

    run(body())
