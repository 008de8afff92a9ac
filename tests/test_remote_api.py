"""Client/server mode's API (flanneld v0.5's `remote/`) against a real etcd: the server in-process on
loopback, requests as a v0.5 flanneld client sends them, and the agent's lease manager over RemoteRegistry."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import aiohttp
import pytest

from flannel_ebpf.remote import wire
from flannel_ebpf.remote.client import RemoteRegistry
from flannel_ebpf.remote.server import ServerOptions, serve
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS
from tests.test_subnet_etcd import CONFIG, RecordingSink, eventually, run, running

A = LeaseAttrs(IPv4Address("192.168.60.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"})
B = LeaseAttrs(IPv4Address("192.168.60.2"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:02"})


@pytest.fixture
def prefix(etcd):
    p = f"/test-{uuid.uuid4().hex[:8]}/network"
    etcd.ctl("put", f"{p}/config", '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def server(etcd, prefix, poll_seconds=2.0, subnet_len_rule="v0.20"):
    port = free_port()
    stop = asyncio.Event()
    # these tests are about the API: every client here is 127.0.0.1 (identity: tests/test_remote_identity.py)
    options = ServerOptions(
        listen=f"127.0.0.1:{port}",
        tls=EtcdTLS(),
        ttl=600,
        poll_seconds=poll_seconds,
        trust_any_client=True,
        subnet_len_rule=subnet_len_rule,
    )
    task = asyncio.ensure_future(serve(lambda p: SubnetRegistry([etcd.endpoint], p), prefix, options, stop))
    base = f"http://127.0.0.1:{port}/v1/_"
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/config"):
                    break
            await asyncio.sleep(0.05)
        try:
            yield http, base, f"127.0.0.1:{port}"
        finally:
            stop.set()
            assert await task == 0


async def get_json(http, url, status=200):
    async with http.get(url) as r:
        assert r.status == status, await r.text()
        return await r.json() if status == 200 else await r.text()


def test_config_acquire_renew_as_a_v05_client_sends_them(etcd, prefix):
    async def main():
        async with server(etcd, prefix) as (http, base, _):
            config = await get_json(http, f"{base}/config")
            assert config["Network"] == "10.5.0.0/16" and config["SubnetLen"] == 24
            assert (config["SubnetMin"], config["SubnetMax"], config["Backend"]) == (
                "10.5.1.0", "10.5.255.0", {"Type": "vxlan"})  # fmt: skip
            # AcquireLease: POST .../leases/ with LeaseAttrs; a second POST for the same IP gets the same lease
            attrs = {"PublicIP": "192.168.60.7", "BackendType": "vxlan", "BackendData": {"VNI": 1}}
            async with http.post(f"{base}/leases/", json=attrs) as r:
                assert r.status == 200, await r.text()
                lease = await r.json()
            async with http.post(f"{base}/leases/", json=attrs) as r:
                assert (await r.json())["Subnet"] == lease["Subnet"]
            assert lease["Attrs"]["PublicIP"] == "192.168.60.7" and lease["Expiration"] > "2000"
            key = lease["Subnet"].replace("/", "-")
            stored = etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/{key}").strip()
            assert '"PublicIP":"192.168.60.7"' in stored and '"BackendType":"vxlan"' in stored
            # RenewLease: PUT .../leases/<key> with the Lease; another host's PUT of that subnet is refused
            async with http.put(f"{base}/leases/{key}", json=lease) as r:
                assert r.status == 200 and (await r.json())["Expiration"] >= lease["Expiration"]
            thief = {**lease, "Attrs": {"PublicIP": "192.168.60.8", "BackendType": "vxlan"}}
            async with http.put(f"{base}/leases/{key}", json=thief) as r:
                assert r.status == 409 and "held by 192.168.60.7" in await r.text()
            assert "192.168.60.7" in etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/{key}")
            other = next(s for s in ("10.5.3.0/24", "10.5.4.0/24") if s != lease["Subnet"])  # not the URL's
            async with http.put(f"{base}/leases/{key}", json={**lease, "Subnet": other}) as r:
                assert r.status == 400
            async with http.put(f"{base}/leases/10.6.0.0-24", json={**lease, "Subnet": "10.6.0.0/24"}) as r:
                assert r.status == 400 and "does not fit" in await r.text()

    run(main())


def test_the_server_fills_in_subnet_len_by_its_era_rule(etcd, prefix):
    """A /23 Network without SubnetLen: flanneld v0.5 leases /24s, v0.20 /25s; the server says which."""
    etcd.ctl("put", f"{prefix}/config", '{"Network": "10.7.0.0/23"}')

    async def main():
        for rule, expected in (("v0.5", 24), ("v0.20", 25)):
            async with server(etcd, prefix, subnet_len_rule=rule) as (http, base, _):
                assert (await get_json(http, f"{base}/config"))["SubnetLen"] == expected, rule

    run(main())


def test_watch_cursor_events_long_poll_and_snapshots(etcd, prefix):
    async def main():
        async with server(etcd, prefix, poll_seconds=1.0) as (http, base, _):
            etcd.ctl("put", f"{prefix}/subnets/10.5.7.0-24", '{"PublicIP":"192.168.60.9"}')
            first = await get_json(http, f"{base}/leases")  # no cursor: the snapshot
            assert [lease["Subnet"] for lease in first["snapshot"]] == ["10.5.7.0/24"]
            cursor = first["cursor"]
            assert isinstance(cursor, str) and cursor.isdigit()
            # nothing new: an empty answer after the poll time, same cursor
            idle = await get_json(http, f"{base}/leases?next={cursor}")
            assert (idle["events"], idle["snapshot"], idle["cursor"]) == ([], None, cursor)

            # a long poll is answered by the next change
            async def later():
                await asyncio.sleep(0.3)
                await asyncio.to_thread(
                    etcd.ctl, "put", f"{prefix}/subnets/10.5.8.0-24", '{"PublicIP":"192.168.60.10"}'
                )

            waiter = asyncio.ensure_future(later())
            got = await get_json(http, f"{base}/leases?next={cursor}")
            await waiter
            assert [(e["type"], e["lease"]["Subnet"]) for e in got["events"]] == [("added", "10.5.8.0/24")]
            assert got["events"][0]["lease"]["Attrs"]["PublicIP"] == "192.168.60.10"
            # changes made while nobody watched: resuming from the old cursor gets every one, in order
            etcd.ctl("del", f"{prefix}/subnets/10.5.7.0-24")
            etcd.ctl("put", f"{prefix}/subnets/10.5.9.0-24", '{"PublicIP":"192.168.60.11"}')
            missed = await get_json(http, f"{base}/leases?next={got['cursor']}")
            assert [(e["type"], e["lease"]["Subnet"]) for e in missed["events"]] == [
                ("removed", "10.5.7.0/24"), ("added", "10.5.9.0/24")]  # fmt: skip
            # the same old cursor again (a client that lost the answer): the same events again
            again = await get_json(http, f"{base}/leases?next={got['cursor']}")
            assert again["events"] == missed["events"] and again["cursor"] == missed["cursor"]
            # a cursor etcd compacted away, or one beyond etcd's revision: a full snapshot instead
            revision = int(missed["cursor"])
            etcd.ctl("put", f"{prefix}/x", "1")
            etcd.ctl("compact", str(revision + 1))
            old = await get_json(http, f"{base}/leases?next={got['cursor']}")
            assert sorted(lease["Subnet"] for lease in old["snapshot"]) == ["10.5.8.0/24", "10.5.9.0/24"]
            future = await get_json(http, f"{base}/leases?next={revision + 10**6}")
            assert future["snapshot"] is not None and int(future["cursor"]) >= revision
            await get_json(http, f"{base}/leases?next=abc", status=400)

    run(main())


def test_lease_manager_over_the_remote_registry(etcd, prefix):
    """The agent's own lease logic through the server: acquire (previous subnet kept), watch peers,
    renew, re-create a vanished lease; and a subnet taken meanwhile by another host is never overwritten."""

    async def main():
        async with server(etcd, prefix) as (_, _base, address):
            options = LeaseOptions(ttl=60, check_interval=0.3, retry_interval=0.1)

            def manager(attrs):
                return LeaseManager(CONFIG, attrs, RemoteRegistry(address), RemoteRegistry(address), options)

            a, b = manager(A), manager(B)
            lease_a = await a.acquire(IPv4Network("10.5.77.0/24"))
            assert lease_a.subnet == IPv4Network("10.5.77.0/24") and lease_a.expiration is not None
            lease_b = await b.acquire(IPv4Network("10.5.78.0/24"))  # never the fixed 10.5.90.0/24 below
            sink = RecordingSink()
            async with running(a.run_watch(sink), a.run_maintenance()):
                await eventually(lambda: lease_b.subnet in sink.peers, what="peer B listed")
                assert sink.peers[lease_b.subnet].attrs == B
                etcd.ctl("put", f"{prefix}/subnets/10.5.90.0-24", '{"PublicIP":"192.168.60.30"}')
                await eventually(lambda: IPv4Network("10.5.90.0/24") in sink.peers, what="watched peer")
                etcd.ctl("del", f"{prefix}/subnets/10.5.90.0-24")
                await eventually(lambda: IPv4Network("10.5.90.0/24") not in sink.peers, what="peer removed")
                # our key vanishes (expiry during an outage): re-created, create-only
                etcd.ctl("del", f"{prefix}/subnets/10.5.77.0-24")
                await eventually(lambda: "192.168.60.1" in etcd.ctl("get", f"{prefix}/subnets/10.5.77.0-24"),
                                 what="lease re-created")  # fmt: skip
                # another host takes it meanwhile: reported, never overwritten
                etcd.ctl("put", f"{prefix}/subnets/10.5.77.0-24", '{"PublicIP":"192.168.60.99"}')
                await eventually(lambda: a.problem is not None, what="conflict reported")
                await asyncio.sleep(1.0)
                assert "192.168.60.99" in etcd.ctl("get", f"{prefix}/subnets/10.5.77.0-24")
            for m in (a, b):
                await m.leases.close()
                await m.watcher.close()

    run(main())


def test_client_reports_a_lost_server_and_resumes(etcd, prefix):
    async def main():
        port = free_port()
        reg = RemoteRegistry(f"127.0.0.1:{port}")
        with pytest.raises(Exception, match="unreachable"):
            await reg.get_config()
        assert "unreachable" in reg.lost_reason
        async with server(etcd, prefix) as (_, _base, address):
            reg2 = RemoteRegistry(address)
            assert await reg2.get_config() is not None and reg2.lost_reason == ""
            await reg2.close()
        await reg.close()

    run(main())


def test_listings_and_watches_carry_real_expirations_and_backend_type_as_stored(etcd, prefix):
    """As flanneld v0.5's server: each lease's expiry (not Go's zero time), and BackendType only when
    the stored value has one (a udp lease has none)."""

    async def main():
        async with server(etcd, prefix, poll_seconds=1.0) as (http, base, _):
            first = await get_json(http, f"{base}/leases")
            udp = {"Subnet": "10.5.4.0/24", "Attrs": {"PublicIP": "192.168.60.4"}, "Expiration": wire.ZERO_TIME}

            async def later():
                await asyncio.sleep(0.3)
                async with http.put(f"{base}/leases/10.5.4.0-24?ttl=600", json=udp) as r:
                    assert r.status == 200, await r.text()

            writer = asyncio.ensure_future(later())
            watched = await get_json(http, f"{base}/leases?next={first['cursor']}")
            await writer
            snapshot = await get_json(http, f"{base}/leases")
            for lease in (watched["events"][0]["lease"], snapshot["snapshot"][0]):
                assert lease["Attrs"] == {"PublicIP": "192.168.60.4"}, lease
                left = wire.parse_time(lease["Expiration"]) - time.time()
                assert 590 < left <= 601, lease

    run(main())
