"""The lease server against one attacking client (a review of issue 25's fixes): the real server in a
process of its own on loopback, its log and memory watched, attacked with raw sockets. Every attack is
bounded in count and time; other sources than 127.0.0.1 are other loopback addresses (127.0.0.0/8)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from flannel_ebpf.lab.agent import cli_env
from flannel_ebpf.remote.server import HttpError, _RefusalLog
from tests.test_remote_api import free_port, prefix, server  # noqa: F401 (prefix: a fixture)
from tests.test_subnet_etcd import run

SERVER = """
import asyncio, signal, sys
from flannel_ebpf.logs import configure_logging
from flannel_ebpf.http_limits import ConnectionLimits
from flannel_ebpf.remote.server import ServerOptions, serve
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS
port, endpoint, prefix, max_connections, poll_seconds = sys.argv[1:6]
configure_logging("INFO")
limits = ConnectionLimits(max_connections=int(max_connections), request_seconds=2.0, keepalive_seconds=30.0)
options = ServerOptions(listen=f"127.0.0.1:{port}", tls=EtcdTLS(), ttl=600, poll_seconds=float(poll_seconds),
                        limits=limits)
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return await serve(lambda p: SubnetRegistry([endpoint], p), prefix, options, stop)
sys.exit(asyncio.run(main()))
"""
REQUEST_SECONDS = 2.0


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text(), re.M)
        assert match
        return int(match.group(1))

    def connect(self, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
        sock = socket.socket()
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        return sock

    def status(self, path: str = "/v1/_/config", source: str = "127.0.0.1") -> str:
        """The status line of one GET on a fresh connection from `source`, or what went wrong."""
        try:
            with self.connect(source, 3.0) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                return sock.recv(200).split(b"\r\n")[0].decode() or "closed"
        except OSError as e:
            return type(e).__name__


@contextlib.contextmanager
def running_server(etcd, prefix, tmp_path, max_connections=16, poll_seconds=25.0) -> Iterator[Server]:  # noqa: F811
    port = free_port()
    log_path = tmp_path / "server.log"
    args = [str(port), etcd.endpoint, prefix, str(max_connections), str(poll_seconds)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, *args], env=cli_env(), stdout=out, stderr=out)
    server = Server(port, proc, log_path)
    try:
        deadline = time.monotonic() + 20
        while "serving flannel's remote API" not in server.log():
            assert proc.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def long_poll(port: int, answers: list[tuple[float, int, bytes]]) -> None:
    """An innocent client: a snapshot, then a watch from its cursor (nothing happens: the poll period ends)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/_/leases")
    cursor = json.loads(conn.getresponse().read())["cursor"]
    began = time.monotonic()
    conn.request("GET", f"/v1/_/leases?next={cursor}")
    response = conn.getresponse()
    answers.append((time.monotonic() - began, response.status, response.read()))
    conn.close()


# --- a client hanging up in the middle of its body is its own problem ---


def test_a_client_dropping_its_body_does_not_break_other_clients_long_polls(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, poll_seconds=6.0) as server:
        answers: list[tuple[float, int, bytes]] = []
        poller = threading.Thread(target=long_poll, args=(server.port, answers))
        poller.start()
        time.sleep(1.0)
        head = b'POST /v1/_/leases HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"Pub'
        for _ in range(3):  # resets mid-body
            sock = server.connect()
            sock.sendall(head)
            time.sleep(0.2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # with SO_LINGER 0: a RST
        half_closed = server.connect()
        half_closed.sendall(head)
        half_closed.shutdown(socket.SHUT_WR)
        stalled = server.connect()
        stalled.sendall(head)  # the rest never comes: the server's deadline cuts it
        poller.join(20)
        half_closed.close()
        stalled.close()
        assert answers, "the long poll got no answer"
        seconds, status, body = answers[0]
        assert status == 200, (status, body, server.log()[-2000:])
        assert json.loads(body)["events"] == [] and seconds > 5.0, (seconds, body)
        assert "etcd unavailable" not in server.log(), server.log()[-2000:]
        assert server.status() == "HTTP/1.1 200 OK"


def test_failures_are_warnings_at_most_a_burst_a_minute(logs, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    refusals = _RefusalLog()
    request = SimpleNamespace(method="GET", path="/v1/_/leases", remote="192.0.2.1")
    for _ in range(100):
        refusals.log(request, HttpError(503, "etcd unavailable (x)"))
        refusals.log(request, HttpError(400, "bad cursor"))
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == _RefusalLog.BURST and all("503 etcd unavailable" in line for line in warnings)
    assert sum(line.startswith("INFO") for line in logs) == _RefusalLog.BURST  # the 400s have their own budget
    clock[0] += _RefusalLog.PERIOD
    refusals.log(request, HttpError(503, "etcd unavailable (x)"))
    assert f"INFO {100 - _RefusalLog.BURST} more failed requests in the last 60s (logged at DEBUG)" in logs


# --- chunked bodies: refused, and their framing followed chunk by chunk ---


def answer_or_close(sock: socket.socket, within: float) -> bytes:
    """The first bytes the server sends (b"" for a close), or b"STILL OPEN" after `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(200)
    except TimeoutError:
        return b"STILL OPEN"
    except OSError:
        return b""


def test_chunked_bodies_whose_data_looks_like_the_end_cannot_hold_connections(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, max_connections=4) as server:
        fake_end = b"100\r\nx\n0\r\n\r\n"  # a 256-byte chunk whose data begins like the last chunk
        held = []
        for _ in range(4):
            sock = server.connect()
            sock.sendall(b"POST /v1/_/leases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + fake_end)
            held.append(sock)
        began = time.monotonic()
        answers = [answer_or_close(sock, REQUEST_SECONDS + 2 - (time.monotonic() - began)) for sock in held]
        for sock in held:
            sock.close()
        assert all(a == b"" or a.startswith(b"HTTP/1.1 411") for a in answers), answers
        assert server.status() == "HTTP/1.1 200 OK"


# --- ?ttl= ---


@pytest.mark.parametrize(
    "ttl", ["%C2%B2", "%D9%A1%D9%A0%D9%A0", "%EF%BC%91%EF%BC%90"], ids=["superscript", "arabic", "fullwidth"]
)
def test_a_ttl_of_non_ascii_digits_is_a_400(etcd, prefix, ttl):  # noqa: F811
    lease = {"Subnet": "10.5.3.0/24", "Attrs": {"PublicIP": "192.168.60.7", "BackendType": "vxlan"},
             "Expiration": "0001-01-01T00:00:00Z"}  # fmt: skip

    async def main():
        async with server(etcd, prefix) as (http, base, _):
            async with http.put(f"{base}/leases/10.5.3.0-24?ttl={ttl}", json=lease) as r:
                text = await r.text()
                assert r.status == 400 and "ttl must be 10 to" in text, (r.status, text)
            assert etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/10.5.3.0-24").strip() == ""

    run(main())


# --- malformed requests: aiohttp's reports of them go through the safe log, counted ---


def test_200_malformed_requests_make_a_few_log_lines_and_no_traceback(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, max_connections=64) as server:
        before = len(server.log())
        for n in range(200):
            with server.connect() as sock:
                sock.sendall(b"X\r\n\r\n" if n % 2 else b"G\x1b[31mET\nFORGED / HTTP/1.1\r\n\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(200)
        assert server.status() == "HTTP/1.1 200 OK"
        time.sleep(0.3)
        grown = server.log()[before:]
        assert len(grown) < 10_000 and "Traceback" not in grown and "\x1b" not in grown, grown[:3000]
        assert "malformed HTTP requests (answered 400): 1 " in grown, grown[:3000]


# --- one host holding the connections: idle keep-alives, long polls, pipelining ---


def idle_keepalive(server: Server, source: str) -> socket.socket:
    """A connection that had one request answered and then says nothing (kept alive for 30 s)."""
    sock = server.connect(source)
    sock.sendall(b"GET /v1/_/config HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def test_idle_keepalive_connections_make_room_for_a_new_client(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, max_connections=16) as server:
        # the cap's worth of idle connections, 4 from each of 4 addresses (the cap per address is 4)
        held = [idle_keepalive(server, f"127.0.0.{2 + i % 4}") for i in range(16)]
        time.sleep(0.3)
        try:
            assert [server.status() for _ in range(3)] == ["HTTP/1.1 200 OK"] * 3
            time.sleep(REQUEST_SECONDS + 0.5)  # long idle: still no lock-out
            assert server.status() == "HTTP/1.1 200 OK"
        finally:
            for sock in held:
                sock.close()


def test_one_address_cannot_take_every_connection_with_long_polls(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, max_connections=16, poll_seconds=20.0) as server:
        held = []
        for _ in range(16):
            with contextlib.suppress(OSError):
                sock = server.connect("127.0.0.2")
                sock.sendall(b"GET /v1/_/leases?next=1 HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append(sock)
        try:
            # the server refuses the excess as it accepts them (a busy machine: give it time to reach them)
            still_open = list(held)
            deadline = time.monotonic() + 10
            while len(still_open) > 4 and time.monotonic() < deadline:
                still_open = [sock for sock in still_open if answer_or_close(sock, 0.05) == b"STILL OPEN"]
            assert len(still_open) <= 4, len(still_open)  # 16 // 8, at least 4
            assert server.status() == "HTTP/1.1 200 OK"
            assert server.status(source="127.0.0.3") == "HTTP/1.1 200 OK"
        finally:
            for sock in held:
                sock.close()


def test_a_watch_on_a_network_without_config_is_a_404_at_once(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path, poll_seconds=20.0) as server:
        began = time.monotonic()
        assert server.status("/v1/nosuchnet/leases?next=1") == "HTTP/1.1 404 Not Found"
        assert time.monotonic() - began < 2.0


def test_pipelined_requests_and_a_client_not_reading_cost_bounded_memory_and_time(etcd, prefix, tmp_path):  # noqa: F811
    with running_server(etcd, prefix, tmp_path) as server:
        assert server.status("/v1/_/leases") == "HTTP/1.1 200 OK"
        time.sleep(0.5)
        before = server.rss_kib()
        sock = server.connect(timeout=5.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads its answers
        blob = b"GET /v1/_/leases HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        sent, began = 0, time.monotonic()
        with contextlib.suppress(OSError):  # a timeout: the server reads no more; a reset: it cut us
            while sent < 4_000_000 and time.monotonic() - began < 20:
                sock.sendall(blob)
                sent += len(blob)
        stopped = time.monotonic()
        grown = server.rss_kib() - before
        # the server cuts the connection within its deadline once the client takes none of its answers
        closed_after = None
        sock.settimeout(0.5)
        while closed_after is None and time.monotonic() - stopped < REQUEST_SECONDS + 8:
            try:
                if not sock.recv(65536):
                    closed_after = time.monotonic() - stopped
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - stopped
        sock.close()
        grown = max(grown, server.rss_kib() - before)
        assert grown < 20 * 1024, f"RSS grew by {grown} KiB for {sent} bytes of pipelined requests"
        assert closed_after is not None, "a client that never reads still holds its connection"
        assert server.status() == "HTTP/1.1 200 OK"


def test_healthz_keeps_answering_with_its_connections_held_idle():
    from flannel_ebpf.http_limits import PLAIN_TEXT, ConnectionLimits, ThreadedHttpServer

    port = free_port()
    limits = ConnectionLimits(max_connections=8, request_seconds=2.0, keepalive_seconds=5.0)
    healthz = ThreadedHttpServer("127.0.0.1", port, {"/healthz": lambda _: (200, "ok\n", PLAIN_TEXT)}, limits, "h")
    healthz.start()
    probe = Server(port, None, Path("/dev/null"))  # type: ignore[arg-type]
    held = []
    try:
        for i in range(8):
            sock = probe.connect(f"127.0.0.{2 + i % 2}")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1000).startswith(b"HTTP/1.1 200")
            held.append(sock)
        time.sleep(0.2)
        assert [probe.status("/healthz") for _ in range(3)] == ["HTTP/1.1 200 OK"] * 3
    finally:
        for sock in held:
            sock.close()
        healthz.stop()


def test_a_watch_over_a_long_history_answers_it_in_batches_losing_nothing(etcd, prefix, monkeypatch):  # noqa: F811
    from flannel_ebpf.remote import server as server_module

    monkeypatch.setattr(server_module, "BATCH_MAX", 5)  # the follower stops after one answer's worth

    async def main():
        async with server(etcd, prefix) as (http, base, _):
            async with http.get(f"{base}/leases") as r:
                cursor = (await r.json())["cursor"]
            for i in range(1, 9):
                etcd.ctl("put", f"{prefix}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"192.168.60.{i}"}}')
            seen = []
            for expected in (5, 3):
                async with http.get(f"{base}/leases?next={cursor}") as r:
                    body = await r.json()
                assert len(body["events"]) == expected, body
                seen += [e["lease"]["Subnet"] for e in body["events"]]
                cursor = body["cursor"]
            assert seen == [f"10.5.{i}.0/24" for i in range(1, 9)]

    run(main())
