"""flannel-ebpf's client against the real flanneld v0.5.5 `-listen` server (on etcd's v2 API), both on
loopback: the server does no host networking in that mode. What v0.5's server is like: a watch request
waits for the next change without a time limit, and keeps an etcd watch for as long as that change does
not come, even after the client went away; its PUT is an unconditional write; it has no GET or DELETE
of one lease. So the client must acquire with POST, never abandon a poll, and ask nothing else."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from flannel_ebpf.lab.etcd import EtcdServer, free_port
from flannel_ebpf.lab.flanneld import unpack_flanneld
from flannel_ebpf.lab.netns import stop_process
from flannel_ebpf.remote import client as remote_client
from flannel_ebpf.remote.client import RemoteRegistry
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions
from tests.test_subnet_etcd import CONFIG, RecordingSink, eventually, run, running

PREFIX = "/coreos.com/network"
A = LeaseAttrs(IPv4Address("192.168.60.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"})
B = LeaseAttrs(IPv4Address("192.168.60.2"))  # udp: no BackendType on the wire


@pytest.fixture(scope="module")
def etcd_v2() -> Iterator[EtcdServer]:
    server = EtcdServer(extra_args=["--enable-v2"])
    server.start()
    try:
        yield server
    finally:
        server.close()


def v2(etcd: EtcdServer, key: str, value: str | None = None, method: str = "PUT") -> dict:
    """etcd's v2 keys API (what flanneld v0.5 reads and writes)."""
    data = None if value is None else f"value={value}".encode()
    request = urllib.request.Request(f"{etcd.endpoint}/v2/keys{key}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def store_watchers(etcd: EtcdServer) -> int:
    """How many v2 watches etcd holds (one per v0.5 server poll in flight, answered or abandoned)."""
    with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r"^etcd_debugging_store_watchers (\S+)$", text, re.M)
    assert found, "etcd's /metrics has no etcd_debugging_store_watchers"
    return int(float(found.group(1)))


class V05Server:
    """flanneld v0.5.5 `-listen` on loopback, its log in a file (it logs every request it answered)."""

    def __init__(self, binary: Path, etcd: EtcdServer, log: Path) -> None:
        self.port = free_port()
        self.log = log
        argv = [str(binary), f"-listen=127.0.0.1:{self.port}", f"-etcd-endpoints={etcd.endpoint}",
                f"-etcd-prefix={PREFIX}", "-v=1"]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 15
        while "running as server" not in log.read_text() or not self._answers():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/_/config", timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The requests it answered, as it logged them (`GET /v1/_/leases?next=12 - 200`)."""
        return re.findall(r"\] ((?:GET|PUT|POST|DELETE) \S+ - \d+)$", self.log.read_text(), re.M)

    def stop(self) -> None:
        stop_process(self.proc, 10.0, what="flanneld v0.5.5 server")


@pytest.fixture
def v05(etcd_v2, tmp_path) -> Iterator[V05Server]:
    v2(etcd_v2, f"{PREFIX}?recursive=true", method="DELETE")
    v2(etcd_v2, f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}))
    server = V05Server(unpack_flanneld("v0.5.5", tmp_path / "bin"), etcd_v2, tmp_path / "flanneld.log")
    try:
        yield server
    finally:
        server.stop()


def lease_in_etcd(etcd: EtcdServer, subnet: str) -> dict | None:
    node = v2(etcd, f"{PREFIX}/subnets/{subnet}", method="GET").get("node")
    return json.loads(node["value"]) if node else None


def test_a_client_of_a_v05_server_acquires_with_post_and_asks_nothing_v05_lacks(etcd_v2, v05):
    async def main():
        options = LeaseOptions(ttl=600, check_interval=0.2, retry_interval=0.1)
        config = RemoteRegistry(v05.address)
        assert await config.get_config() is not None and config.v05 and not config.periodic_relists
        await config.close()
        manager = LeaseManager(CONFIG, A, RemoteRegistry(v05.address), RemoteRegistry(v05.address), options)
        lease = await manager.acquire()
        # POST: v0.5's create-only acquisition, as its own client sends it (no trailing slash)
        assert v05.requests()[-1] == "POST /v1/_/leases - 200"
        assert lease.expiration is not None and lease.expiration - time.time() > 23 * 3600  # v0.5's 24 h
        assert lease_in_etcd(etcd_v2, f"{lease.subnet.network_address}-24")["PublicIP"] == "192.168.60.1"
        sink = RecordingSink()
        async with running(manager.run_watch(sink), manager.run_maintenance()):
            await eventually(lambda: manager.relists == 1, what="first listing")
            peer = next(s for s in ("10.5.90.0", "10.5.92.0") if IPv4Network(f"{s}/24") != lease.subnet)
            v2(etcd_v2, f"{PREFIX}/subnets/{peer}-24", json.dumps({"PublicIP": "192.168.60.30"}))
            await eventually(lambda: IPv4Network(f"{peer}/24") in sink.peers, what="watched peer")
            before = list(v05.requests())
            await asyncio.sleep(3.0)  # 15 lease checks: none may send a request
            assert v05.requests() == before, "lease checks sent requests to the v0.5 server"
            assert manager.renewals == 0 and manager.problem is None
            # the lease is removed (expired during an outage): written again, as it was
            v2(etcd_v2, f"{PREFIX}/subnets/{lease.subnet.network_address}-24", method="DELETE")
            await eventually(
                lambda: (lease_in_etcd(etcd_v2, f"{lease.subnet.network_address}-24") or {}).get("PublicIP")
                == "192.168.60.1", what="own lease written again",
            )  # fmt: skip
        sent = {re.sub(r"\?next=\d+", "?next=N", line.rsplit(" - ", 1)[0]) for line in v05.requests()}
        # only v0.5's own routes; no GET of one lease, no ?ttl=
        assert sent <= {"GET /v1/_/config", "POST /v1/_/leases", "GET /v1/_/leases", "GET /v1/_/leases?next=N",
                        f"PUT /v1/_/leases/{lease.subnet.network_address}-24"}, sent  # fmt: skip
        await manager.leases.close()
        await manager.watcher.close()

    run(main())


def test_polls_are_never_abandoned_and_silence_is_not_a_lost_server(etcd_v2, v05, monkeypatch):
    """v0.5's server keeps one etcd watch per poll in flight, answered or abandoned by the client: a
    client that gave up on a silent poll (or dropped it for a relist) left one more each time. With our
    own server's time limit cut to 1 s, a v0.5 server's silence of 6 s and three relists leave one watch,
    and the client stays ready."""
    monkeypatch.setattr(remote_client, "WATCH_TIMEOUT", 1.0)

    async def main():
        config = RemoteRegistry(v05.address)
        await config.get_config()
        await config.close()
        options = LeaseOptions(ttl=600, check_interval=0.5, retry_interval=0.1, relist_interval=0)
        manager = LeaseManager(CONFIG, B, RemoteRegistry(v05.address), RemoteRegistry(v05.address), options)
        lease = await manager.acquire()
        peer = next(s for s in ("10.5.91.0", "10.5.92.0") if IPv4Network(f"{s}/24") != lease.subnet)
        idle = store_watchers(etcd_v2)
        sink = RecordingSink()
        async with running(manager.run_watch(sink), manager.run_maintenance()):
            await eventually(lambda: store_watchers(etcd_v2) == idle + 1, what="one poll in flight")
            for _ in range(3):
                manager.request_relist()
                await asyncio.sleep(1.0)
            await asyncio.sleep(3.0)
            assert manager.relists == 4
            assert store_watchers(etcd_v2) == idle + 1, "a poll was abandoned on the v0.5 server"
            assert manager.watcher.lost_reason == "" and manager.leases.lost_reason == ""
            # the poll left behind by the relists was taken over: a change still arrives
            v2(etcd_v2, f"{PREFIX}/subnets/{peer}-24", json.dumps({"PublicIP": "192.168.60.31"}))
            await eventually(lambda: IPv4Network(f"{peer}/24") in sink.peers, what="watched peer")
            await eventually(lambda: store_watchers(etcd_v2) == idle + 1, what="one poll in flight again")
        await manager.leases.close()
        await manager.watcher.close()

    run(main())


def test_releasing_a_lease_on_a_v05_server_says_it_cannot(etcd_v2, v05):
    async def main():
        registry = RemoteRegistry(v05.address)
        await registry.get_config()
        lease = await registry.acquire_lease(B)
        assert lease is not None and lease.attrs == B
        stored = lease_in_etcd(etcd_v2, f"{lease.subnet.network_address}-24")
        assert stored == {"PublicIP": "192.168.60.2"}, stored  # udp: no BackendType, as v0.5 writes it
        with pytest.raises(remote_client.RemoteError, match="cannot release"):
            await registry.delete_lease(lease)
        await registry.close()

    run(main())
