"""The lease server against hostile or broken input (issue 25: 3, 5, 6, 10): big bodies are refused before
they are read and stall nobody, a garbage lease value in etcd costs its key only, requests for networks
that do not exist leave nothing behind, and a time without a zone is a 400 (and no crash in a client)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from flannel_ebpf.lab.agent import cli_command, cli_env
from flannel_ebpf.remote import wire
from flannel_ebpf.remote.client import RemoteError, RemoteRegistry
from flannel_ebpf.remote.server import HttpError, _RefusalLog
from flannel_ebpf.subnet.lease import LeaseFormatError
from flannel_ebpf.subnet.store import EtcdTLS
from tests.test_remote_api import free_port, get_json, prefix, server  # noqa: F401 (prefix: a fixture)
from tests.test_subnet_etcd import run

BIG = 16 * 1024 * 1024
LEASE = {"Subnet": "10.5.3.0/24", "Attrs": {"PublicIP": "192.168.60.7", "BackendType": "vxlan"},
         "Expiration": wire.ZERO_TIME}  # fmt: skip

# --- 3: bodies over 64 KiB ---


async def _status_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


def test_body_announced_over_64k_is_refused_413_before_any_of_it_is_sent(etcd, prefix):  # noqa: F811
    async def main():
        async with server(etcd, prefix) as (_, _, address):
            host, port = address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            began = time.monotonic()
            writer.write(f"PUT /v1/_/leases/10.5.3.0-24 HTTP/1.1\r\nHost: {address}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n".encode())  # fmt: skip
            await writer.drain()
            status = await _status_line(reader)  # no byte of the body was sent: only a refusal can come
            elapsed = time.monotonic() - began
            rest = await asyncio.wait_for(reader.read(4096), 5)
            writer.close()
            assert status.startswith(b"HTTP/1.1 413"), status
            assert b"larger than the 65536 accepted" in rest and b"Connection: close" in rest, rest
            assert elapsed < 0.5, f"413 after {elapsed:.3f}s"

    run(main())


async def _timed_gets(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        began = time.monotonic()
        async with http.get(url) as r:
            assert r.status == 200
            await r.read()
        latencies.append(time.monotonic() - began)
        await asyncio.sleep(0.005)
    return latencies


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_16mib_post_is_refused_fast_and_a_concurrent_get_is_not_delayed(etcd, prefix, chunked):  # noqa: F811
    # The issue measured 7.2 s for the refusal and 6.7 s for the GET; idle, both take a few milliseconds.
    # The margins leave room for a loaded test machine and still catch a stall of the event loop.
    body = b"[" * BIG

    async def chunks():
        for i in range(0, BIG, 1 << 20):
            yield body[i : i + (1 << 20)]

    async def main():
        async with server(etcd, prefix) as (http, base, _):
            await get_json(http, f"{base}/config")
            stop = asyncio.Event()
            getter = asyncio.ensure_future(_timed_gets(http, f"{base}/config", stop))
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as poster:
                began = time.monotonic()
                async with poster.post(f"{base}/leases", data=chunks() if chunked else body,
                                       headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                    status, text = r.status, await r.text()
                refused_in = time.monotonic() - began
            await asyncio.sleep(0.2)
            stop.set()
            latencies = await getter
            if chunked:  # no Content-Length: refused before a byte of it is read
                assert status == 411, text
                assert "needs a Content-Length" in text and text.count("\n") == 1, text
            else:
                assert status == 413, text
                assert "larger than the 65536" in text and text.count("\n") == 1, text
            assert refused_in < 0.5, f"a 16 MiB POST refused after {refused_in:.3f}s"
            assert len(latencies) >= 5 and max(latencies) < 0.3, f"concurrent GETs took up to {max(latencies):.3f}s"

    run(main())


def test_a_lease_body_under_the_limit_still_works(etcd, prefix):  # noqa: F811
    async def main():
        async with server(etcd, prefix) as (http, base, _):
            padded = {**LEASE, "Attrs": {**LEASE["Attrs"], "BackendData": {"pad": "x" * 60_000}}}
            async with http.put(f"{base}/leases/10.5.3.0-24", json=padded) as r:
                assert r.status == 200, await r.text()

    run(main())


# --- 5: a garbage lease value in etcd ---


def test_a_garbage_lease_value_costs_that_key_only(etcd, prefix):  # noqa: F811
    async def main():
        garbage_key = f"{prefix}/subnets/10.5.99.0-24"
        etcd.ctl("put", garbage_key, '{"PublicIP":"127.0.0.1"}')
        async with server(etcd, prefix, poll_seconds=20.0) as (http, base, address):
            listing = await get_json(http, f"{base}/leases")  # the snapshot skips it
            assert listing["snapshot"] == []
            # Another client's long poll, from now on: it must go on through what follows
            poll = asyncio.ensure_future(get_json(http, f"{base}/leases?next={listing['cursor']}"))
            await asyncio.sleep(0.5)
            # The lease GET says what is wrong, as a 4xx; so does the client's get_lease
            async with http.get(f"{base}/leases/10.5.99.0-24") as r:
                text = await r.text()
                assert r.status == 422, text
            assert garbage_key in text and "loopback" in text and text.count("\n") == 1, text
            client = RemoteRegistry(address)
            try:
                with pytest.raises(LeaseFormatError, match="loopback"):
                    await client.get_lease(IPv4Network("10.5.99.0/24"))
                assert client.lost_reason == ""
            finally:
                await client.close()
            # A write to that key is a conflict: it exists and is nobody's lease
            taken = {**LEASE, "Subnet": "10.5.99.0/24"}
            async with http.put(f"{base}/leases/10.5.99.0-24", json=taken) as r:
                assert r.status == 409 and "not a valid lease" in await r.text()
            async with http.delete(f"{base}/leases/10.5.99.0-24?PublicIP=192.168.60.7") as r:
                assert r.status == 409
            assert '"127.0.0.1"' in etcd.ctl("get", "--print-value-only", garbage_key)
            assert not poll.done()
            # The long poll gets the next real event, and the server still answers everyone
            await asyncio.to_thread(etcd.ctl, "put", f"{prefix}/subnets/10.5.98.0-24", '{"PublicIP":"192.168.60.9"}')
            got = await asyncio.wait_for(poll, 5)
            assert [(e["type"], e["lease"]["Subnet"]) for e in got["events"]] == [("added", "10.5.98.0/24")]
            await get_json(http, f"{base}/config")
            async with http.put(f"{base}/leases/10.5.3.0-24", json=LEASE) as r:
                assert r.status == 200, await r.text()

    run(main())


# --- 6: networks that do not exist ---


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


async def _get_many(url_of, count: int, parallel: int = 8) -> dict[int, int]:
    statuses: dict[int, int] = {}

    async def worker(http: aiohttp.ClientSession, numbers: range) -> None:
        for n in numbers:
            async with http.get(url_of(n)) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http, range(i, count, parallel)) for i in range(parallel)))
    return statuses


def test_requests_for_unknown_networks_cost_no_memory_and_no_info_lines(etcd, prefix, tmp_path):  # noqa: F811
    port = free_port()
    log = tmp_path / "server.log"
    command = [*cli_command(), "up", "--listen", f"127.0.0.1:{port}", "--etcd-endpoints", etcd.endpoint,
               "--etcd-prefix", prefix]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "serving flannel's remote API" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}/v1"
        # warm up: the allocator, aiohttp's and gRPC's caches, a first etcd connection
        assert run(_get_many(lambda n: f"{base}/warm{n}/config", 2000)) == {404: 2000}
        before = _rss_kib(proc.pid)
        lines_before = log.read_text().count("\n")
        assert run(_get_many(lambda n: f"{base}/x{n}/config", 10_000)) == {404: 10_000}
        grown = _rss_kib(proc.pid) - before
        assert grown < 5 * 1024, f"RSS grew by {grown} KiB over 10,000 requests for unknown networks"
        assert log.read_text().count("\n") - lines_before < 10, log.read_text()[-2000:]
        # the default network is served as before, and a named one that exists too
        etcd.ctl("put", f"{prefix}/blue/config", '{"Network": "10.6.0.0/16"}')
        assert run(_get_many(lambda n: f"{base}/{'_' if n % 2 else 'blue'}/config", 10)) == {200: 10}
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_refusals_are_not_logged_at_info_one_per_request(logs, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    refusals = _RefusalLog()
    request = SimpleNamespace(method="PUT", path="/v1/_/leases/x", remote="192.0.2.1")
    for _ in range(100):
        refusals.log(request, HttpError(404, "no such network"))
        refusals.log(request, HttpError(400, "bad subnet"))
    info = [line for line in logs if line.startswith("INFO")]
    assert len(info) == _RefusalLog.BURST and all("400 bad subnet" in line for line in info)
    assert sum(line.startswith("DEBUG") for line in logs) == 200 - _RefusalLog.BURST
    clock[0] += _RefusalLog.PERIOD
    refusals.log(request, HttpError(400, "bad subnet"))
    assert logs[-2] == f"INFO {100 - _RefusalLog.BURST} more refused requests in the last 60s (logged at DEBUG)"
    assert logs[-1].startswith("INFO PUT /v1/_/leases/x from 192.0.2.1: 400")


# --- 10: a time without a zone ---


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00", "2026-05-01T10:00:00.5", "2026-05-01"])
def test_a_time_without_a_zone_is_a_lease_format_error(text):
    with pytest.raises(LeaseFormatError, match="no time zone"):
        wire.parse_time(text)
    with pytest.raises(LeaseFormatError):
        wire.lease_from_wire({**LEASE, "Expiration": text})


def test_times_with_a_zone_still_parse():
    assert wire.parse_time(wire.ZERO_TIME) is None
    assert wire.parse_time("0001-01-01T00:00:00+14:00") is None
    assert wire.parse_time("2026-05-01T10:00:00.123456789Z") == pytest.approx(1777629600.123456)
    assert wire.parse_time("2026-05-01T12:00:00+02:00") == 1777629600.0


def test_put_with_a_zoneless_expiration_is_a_400_of_one_line(etcd, prefix):  # noqa: F811
    async def main():
        async with server(etcd, prefix) as (http, base, _):
            bad = {**LEASE, "Expiration": "0001-01-01T00:00:00"}
            async with http.put(f"{base}/leases/10.5.3.0-24", json=bad) as r:
                text = await r.text()
                assert r.status == 400, text
            assert "no time zone" in text and text.count("\n") == 1, text

    run(main())


def test_a_client_survives_a_zoneless_expiration_from_a_server():
    """A server that sends such a time: every read is a bad answer (an error, or a garbage entry), no
    crash; the server still counts as reachable."""
    bad = {**LEASE, "Expiration": "0001-01-01T00:00:00"}

    async def lease(request: web.Request) -> web.Response:
        return web.json_response(bad)

    async def leases(request: web.Request) -> web.Response:
        if "next" in request.query:
            return web.json_response({"events": [{"type": "added", "lease": bad}], "snapshot": None, "cursor": "8"})
        return web.json_response({"events": None, "snapshot": [bad], "cursor": "7"})

    async def main():
        app = web.Application()
        app.router.add_get("/v1/_/leases/{subnet}", lease)
        app.router.add_put("/v1/_/leases/{subnet}", lease)
        app.router.add_get("/v1/_/leases", leases)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = RemoteRegistry(f"127.0.0.1:{port}", tls=EtcdTLS())
        try:
            with pytest.raises(RemoteError, match="bad lease: Expiration has no time zone"):
                await client.get_lease(IPv4Network("10.5.3.0/24"))
            with pytest.raises(RemoteError, match="bad lease: Expiration has no time zone"):
                await client.create_lease(IPv4Network("10.5.3.0/24"), wire.attrs_from_wire(LEASE["Attrs"]), 60)
            listing = await client.list_leases()
            assert listing.leases == [] and listing.revision == 7
            assert len(listing.garbage) == 1 and "no time zone" in listing.garbage[0][1]
            watch = client.watch_leases(8)
            revision, event, garbage = await anext(watch)
            await watch.aclose()
            assert (revision, event) == (8, None) and "no time zone" in garbage
            assert client.lost_reason == ""
        finally:
            await client.close()
            await runner.cleanup()

    run(main())
