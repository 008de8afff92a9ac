"""Issue 15, parts 2 and 3, against a real etcd on loopback: a watch stream that goes silent is noticed
(progress requests) and resumed; a watch that etcd cancels for a reason other than a compaction is noticed
and relisted; a periodic relist corrects whatever the watch's peers got wrong; the retry back-off is bounded,
so a recovery after an outage takes about one back-off, not tens of seconds."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from loguru import logger

from flannel_ebpf.lab.etcd import EtcdServer
from flannel_ebpf.lab.faults import CuttableProxy
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import Backoff, LeaseManager, LeaseOptions
from flannel_ebpf.subnet.registry import SubnetRegistry, WatchCanceled
from tests.test_subnet_etcd import CONFIG, OWN, A, RecordingSink, eventually, registry, run, running

PEER = LeaseAttrs(IPv4Address("192.168.50.7"), "host-gw")
NET1, NET2, NET3 = (IPv4Network(f"10.5.{i}.0/24") for i in (61, 62, 63))


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(sink)


def options(**kw) -> LeaseOptions:
    return LeaseOptions(**{"check_interval": 0.5, "retry_interval": 0.1, "retry_max": 0.5, **kw})


def test_backoff_is_capped_and_jittered():
    async def body():
        b = Backoff("test", first=0.01, limit=0.04)
        waits = []
        for _ in range(6):
            started = time.monotonic()
            await b.failed(OSError("down"))
            waits.append(time.monotonic() - started)
        assert b.delay == 0.04 and max(waits) < 0.04 + 0.03  # never above the cap (plus scheduling)
        assert min(waits[3:]) >= 0.04 * 0.8 - 0.002  # jitter takes at most 20% off
        b.succeeded()
        assert b.delay == 0.01

    run(body())


def test_backoff_reports_what_it_saw_not_the_time_until_the_next_try(logs):
    """A loop that retries only at its next interval must not report that wait as outage."""

    async def body():
        b = Backoff("test", first=0.01, limit=0.01)
        await b.failed(OSError("down"))
        await b.failed(OSError("down"))
        await asyncio.sleep(0.3)  # etcd back meanwhile; the loop's next try comes later
        b.succeeded()

    run(body())
    line = next(ln for ln in logs if "answers again" in ln)
    seen, ago = (float(x) for x in re.findall(r"over ([0-9.]+)s, the last ([0-9.]+)s ago", line)[0])
    assert "2 failed attempts" in line and seen < 0.2 and ago >= 0.25


def test_silent_watch_stream_is_noticed_and_resumed(etcd, prefix, logs):
    """A black hole between agent and etcd (connections open, nothing gets through): the watch asks for
    progress, gets no answer, reconnects; once the path is back the peer added meanwhile arrives."""

    async def body():
        proxy = CuttableProxy("127.0.0.1", etcd.client_port)
        await proxy.start()
        watcher = SubnetRegistry([proxy.endpoint], prefix, timeout=1.0, watch_idle=0.3, watch_progress_timeout=0.5)
        m = LeaseManager(CONFIG, A, registry(etcd, prefix), watcher, options())
        await m.acquire(OWN)
        sink = RecordingSink()
        try:
            async with running(m.run_watch(sink)):
                await eventually(lambda: sink.calls, what="initial sync")
                await asyncio.sleep(1.5)  # idle, progress requests answered: no reconnect
                assert not [line for line in logs if "silent" in line]
                proxy.stall()
                await registry(etcd, prefix).create_lease(NET1, PEER, 60)
                await eventually(lambda: any("silent" in line for line in logs), 5, "the silent stream noticed")
                assert NET1 not in sink.peers
                proxy.restore()
                restored = time.monotonic()
                try:
                    await eventually(lambda: NET1 in sink.peers, 10, "the peer added during the black hole")
                except AssertionError:
                    print("\n".join(["last log lines:", *logs[-25:]]))  # what the watch loop was doing
                    raise
                print(f"peer seen {time.monotonic() - restored:.2f}s after the path came back")
            assert m.relists == 1  # resumed from the last revision: no relist needed
        finally:
            await proxy.close()

    run(body())


class IdleBeforeFirstWatch(SubnetRegistry):
    """Stays idle past etcd's auth token TTL between its listing and its first watch (as an agent whose
    watch client did nothing else for longer than --auth-token-ttl): etcd then cancels that watch."""

    idle = 2.5

    async def watch_leases(self, start_revision):
        if self.idle:
            # Its last request (the agent's first listing may come from the other client) gets it a token,
            # which then lapses while it idles.
            await self.current_revision()
            await asyncio.sleep(self.idle)
            self.idle = 0
        async for item in super().watch_leases(start_revision):
            yield item


@pytest.fixture
def short_token_etcd() -> Iterator[EtcdServer]:
    """An etcd with auth on and auth tokens that expire after 1 s idle."""
    server = EtcdServer(name="flannel-ebpf-token", extra_args=["--auth-token-ttl", "1"])
    server.start()
    try:
        for args in (("user", "add", "root:r00t"), ("auth", "enable")):
            server.ctl(*args)
        yield server
    finally:
        server.close()


def test_watch_canceled_by_etcd_is_noticed_and_relisted(short_token_etcd, prefix, logs):
    etcd = short_token_etcd

    def reg(cls=SubnetRegistry):
        return cls([etcd.endpoint], prefix, username="root", password="r00t")

    async def body():
        # The bare registry: etcd's cancel is raised with etcd's reason (aetcd's watcher ignored it and
        # waited forever on a watch that would never deliver).
        bare = reg()
        listing = await bare.list_leases()
        await asyncio.sleep(2.5)
        with pytest.raises(WatchCanceled, match="invalid auth token"):
            async for _ in bare.watch_leases(listing.revision + 1):
                pass
        await bare.close()

        m = LeaseManager(CONFIG, A, reg(), reg(IdleBeforeFirstWatch), options())
        await m.acquire(OWN)
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: sink.calls, what="initial sync")
            await reg().create_lease(NET2, PEER, 60)  # while the first watch is being canceled
            await eventually(lambda: NET2 in sink.peers, 15, "the peer, after the relist")
            assert m.relists == 2
            await reg().create_lease(NET3, LeaseAttrs(IPv4Address("192.168.50.8"), "host-gw"), 60)
            await eventually(lambda: NET3 in sink.peers, 10, "a peer through the new watch")
        canceled = [line for line in logs if "etcd canceled the watch" in line]
        assert canceled and "invalid auth token" in canceled[0] and "relisting" in canceled[0]

    run(body())


def test_periodic_relist_reconciles_what_the_watch_got_wrong(etcd, prefix, logs):
    async def body():
        m = LeaseManager(CONFIG, A, registry(etcd, prefix), registry(etcd, prefix), options(relist_interval=0.5))
        await m.acquire(OWN)
        real = await registry(etcd, prefix).create_lease(NET1, PEER, 60)
        sink = RecordingSink()
        async with running(m.run_watch(sink)):
            await eventually(lambda: set(sink.peers) == {NET1}, what="initial sync")
            # The watch's view goes wrong (a missed delete and a missed put, as a lost event would leave it).
            m.peers.pop(NET1)
            m.peers[NET2] = real
            relists = m.relists
            await eventually(lambda: m.relists >= relists + 1, 3, "a periodic relist")
            assert set(m.peers) == {NET1} and set(sink.peers) == {NET1}
            assert m.relist_corrections == 2
            started, before = time.monotonic(), m.relists
            await asyncio.sleep(1.6)
            done = m.relists - before
        assert 2 <= done <= 4, f"{done} relists in {time.monotonic() - started:.1f}s at a 0.5 s interval"
        assert any("watch had missed 2 peer change(s)" in line for line in logs)
        assert sink.calls[-1] == ("sync", "10.5.61.0/24")  # each relist hands the data plane the full set

        quiet = LeaseManager(CONFIG, A, registry(etcd, prefix), registry(etcd, prefix), options(relist_interval=0))
        await quiet.acquire()
        async with running(quiet.run_watch(RecordingSink())):
            await asyncio.sleep(1.2)
        assert quiet.relists == 1  # 0 turns the periodic relist off

    run(body())


def test_recovery_after_an_outage_takes_one_bounded_backoff(etcd, prefix):
    """etcd stopped for 6 s: the back-off, capped at 0.5 s here (1 s by default), decides how soon the
    watch is back; a peer created right after etcd answers again is seen within about that."""

    async def body():
        m = LeaseManager(CONFIG, A, registry(etcd, prefix), registry(etcd, prefix), options())
        await m.acquire(OWN)
        sink = RecordingSink()
        async with running(m.run_watch(sink), m.run_maintenance()):
            await eventually(lambda: sink.calls, what="initial sync")
            etcd.stop()
            await asyncio.sleep(6)
            await asyncio.to_thread(etcd.start)
            back = time.monotonic()
            await registry(etcd, prefix).create_lease(NET1, PEER, 60)
            await eventually(lambda: NET1 in sink.peers, 10, "the new peer")
            seen = time.monotonic() - back
        print(f"new peer seen {seen:.2f}s after etcd answered again (back-off cap 0.5 s)")
        assert seen < 2.5

    run(body())
