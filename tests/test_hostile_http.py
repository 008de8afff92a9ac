"""Connection exhaustion on the two HTTP servers: the lease server (`up --listen`) and the agent's /healthz.

The lab test runs both for real in a host namespace, limited to 1024 descriptors (systemd's default soft
limit), and opens 1,100 slow-loris connections to each (a partial header every 2 s, reconnecting when cut)
for 25 s. Throughout, a normal request to each from another host is answered within 1 s, the agent keeps doing its work
(a peer lease added during the attack reaches the data path, its state file is rewritten), and neither
log grows by 100 KB. The framing that times requests is tested on its own.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flannel_ebpf.http_limits import PLAIN_TEXT, ConnectionLimits, RequestFraming, ThreadedHttpServer
from flannel_ebpf.lab.etcd import free_port
from tests.helpers import wait_for
from tests.test_agent_lab import HOSTGW, routes
from tests.test_remote_lab import Server

LEASE_PORT = 8888
HEALTHZ_PORT = 8471
SLOW_CONNECTIONS = 1100
ATTACK_SECONDS = 25.0
TRICKLE_SECONDS = 2.0

# Slow-loris: each connection sends a request line, then one more header line every `interval` seconds and
# never the empty line that ends the head; when the server closes it, it reconnects `interval` later.
ATTACK = r"""
import asyncio, json, resource, sys, time
duration, interval = float(sys.argv[1]), float(sys.argv[2])
targets = [(h, int(p), int(n)) for h, p, n in (t.split(",") for t in sys.argv[3:])]
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
stats = {f"{h}:{p}": {"connects": 0, "cut": 0, "failed": 0, "open": 0, "max_open": 0} for h, p, _ in targets}

async def slow(host, port, end, s):
    await asyncio.sleep(hash((host, port, id(s))) % 1000 / 1000)  # spread the first connects over 1 s
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, asyncio.TimeoutError):
            s["failed"] += 1
            await asyncio.sleep(interval)
            continue
        s["connects"] += 1
        s["open"] += 1
        s["max_open"] = max(s["max_open"], s["open"])
        try:
            writer.write(b"GET /v1/_/config HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < end:
                try:
                    data = await asyncio.wait_for(reader.read(1024), interval)
                except asyncio.TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
                    continue
                if not data:
                    s["cut"] += 1
                    break
        except OSError:
            s["cut"] += 1
        finally:
            s["open"] -= 1
            writer.close()
        await asyncio.sleep(interval)

async def main():
    end = time.monotonic() + duration
    await asyncio.gather(*(slow(h, p, end, stats[f"{h}:{p}"]) for h, p, n in targets for _ in range(n)))

asyncio.run(main())
print(json.dumps(stats))
"""

# A normal client: a GET to each URL every 0.5 s, one JSON line per answer.
PROBE = r"""
import json, sys, time, urllib.error, urllib.request
duration, urls = float(sys.argv[1]), sys.argv[2:]
end = time.monotonic() + duration
while time.monotonic() < end:
    for url in urls:
        began = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                status = r.status
                r.read()
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError as e:
            status = repr(e)
        print(json.dumps({"url": url, "status": status, "seconds": round(time.monotonic() - began, 3)}), flush=True)
    time.sleep(0.5)
"""


def limit_descriptors(pid: int, limit: int = 1024) -> None:
    """As systemd's default soft limit: the fix must hold without a LimitNOFILE."""
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.lab
def test_slow_loris_on_the_lease_server_and_healthz_leaves_both_answering(lab_factory):
    # h1 serves and attacks itself (one source address, as one attacking host); h2 is an honest client
    lab = lab_factory(2, network_config=HOSTGW)
    h1, h2 = lab.host("h1"), lab.host("h2")
    ip = str(h1.underlay_ip)
    server = Server(lab, "h1", ["--listen", f"{ip}:{LEASE_PORT}"])
    server.start()
    try:
        agent = lab.start_agent("h1", ["--healthz-ip", ip, "--healthz-port", str(HEALTHZ_PORT)])
        lab.wait_ready("h1", 30)
        for pid in (server.agent.proc.pid, agent.proc.pid):
            limit_descriptors(pid)
        logs: dict[str, Path] = {"lease server": server.log, "agent": h1.agent_log}
        sizes = {name: path.stat().st_size for name, path in logs.items()}
        state_file = h1.state_dir / "state.json"

        urls = [f"http://{ip}:{LEASE_PORT}/v1/_/config", f"http://{ip}:{HEALTHZ_PORT}/healthz"]
        targets = [f"{ip},{LEASE_PORT},{SLOW_CONNECTIONS}", f"{ip},{HEALTHZ_PORT},{SLOW_CONNECTIONS}"]
        attack = h1.popen([sys.executable, "-c", ATTACK, str(ATTACK_SECONDS), str(TRICKLE_SECONDS), *targets],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        probe = h2.popen([sys.executable, "-c", PROBE, str(ATTACK_SECONDS), *urls],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            began = time.monotonic()
            time.sleep(8)  # the attack is at full strength: every slot of both servers is taken
            state_mtime = state_file.stat().st_mtime
            lab.etcd_put("/coreos.com/network/subnets/10.5.202.0-24",
                         '{"PublicIP":"192.168.50.77","BackendType":"host-gw"}')  # fmt: skip
            wait_for(lambda: any(r["dst"] == "10.5.202.0/24" for r in routes(lab, "h1")), timeout=12,
                     what="a peer added during the attack in the data path")  # fmt: skip
            assert time.monotonic() - began < ATTACK_SECONDS
            wait_for(lambda: state_file.stat().st_mtime > state_mtime, timeout=10, what="the state file rewritten")
            attack_out, attack_err = attack.communicate(timeout=ATTACK_SECONDS + 30)
            probe_out, _ = probe.communicate(timeout=ATTACK_SECONDS + 30)
        finally:
            for proc in (attack, probe):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stats = json.loads(attack_out.decode().strip().splitlines()[-1]) if attack_out.strip() else attack_err
        print(f"attack: {stats}")
        drops = lab.exec("h1", ["nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops"], check=False)
        print(drops.stdout)
        answers = [json.loads(line) for line in probe_out.decode().splitlines()]
        slow = [a for a in answers if a["status"] != 200 or a["seconds"] >= 1.0]
        print(f"{len(answers)} normal requests, slowest {max((a['seconds'] for a in answers), default=None)} s")
        for target in (f"{ip}:{LEASE_PORT}", f"{ip}:{HEALTHZ_PORT}"):
            # the attack was real: more than every slot of the server opened and held
            assert stats[target]["connects"] >= SLOW_CONNECTIONS, stats
        assert len(answers) >= 2 * 20 and not slow, slow[:10]

        growth = {name: path.stat().st_size - sizes[name] for name, path in logs.items()}
        assert all(n < 100_000 for n in growth.values()), growth
        server_log = server.log.read_text()[sizes["lease server"] :]
        assert "Traceback" not in server_log and "Traceback" not in h1.agent_log.read_text()[sizes["agent"] :]
        # the cuts were said, in few lines (one per 10 s at most, per server)
        assert 1 <= server_log.count("the lease server (at most 512 connections)") <= ATTACK_SECONDS / 10 + 2
        agent_lines = h1.agent_log.read_text()[sizes["agent"] :].count("healthz (at most 256 connections)")
        assert 1 <= agent_lines <= ATTACK_SECONDS / 10 + 2
        assert agent.running and lab.agent("h1").health().stdout.startswith("ready")
        # the servers closed what they cut before taking more: never out of descriptors
        assert "accepts failed" not in server_log and "accepts failed" not in h1.agent_log.read_text()
    finally:
        server.stop()


def _connect(source: str, port: int, first_bytes: bytes) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(first_bytes)
    return sock


def test_a_flood_at_the_cap_replaces_its_own_connections_not_another_clients():
    # 8 slots, 6 per address: the honest client's request has waited longest when the flood fills the
    # last slot, yet the connection cut is the flood's, as the flood holds the most
    limits = ConnectionLimits(max_connections=8, max_per_source=6, request_seconds=30.0)
    port = free_port()
    server = ThreadedHttpServer("127.0.0.1", port, {"/x": lambda accept: (200, "ok\n", PLAIN_TEXT)}, limits, "t")
    server.start()
    socks: list[socket.socket] = []
    try:
        honest = _connect("127.0.0.3", port, b"GET /x HTTP/1.1\r\nHost: x\r\n")
        socks.append(honest)
        other = _connect("127.0.0.4", port, b"GET /x HTTP/1.1\r\n")
        socks.append(other)
        time.sleep(0.2)  # both accepted and waiting for the rest of their requests
        flood = [_connect("127.0.0.2", port, b"GET /x HTTP/1.1\r\n") for _ in range(6)]  # 8 of 8 slots
        socks.extend(flood)
        time.sleep(0.2)
        socks.append(_connect("127.0.0.2", port, b"GET /x HTTP/1.1\r\n"))  # over the per-address cap
        socks.append(_connect("127.0.0.5", port, b"GET /x HTTP/1.1\r\n"))  # over the cap: one must go
        time.sleep(0.2)
        cut = []
        for i, sock in enumerate(flood):
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    cut.append(i)
            except (TimeoutError, BlockingIOError):
                pass
            except ConnectionResetError:
                cut.append(i)
        assert cut == [0, 1], cut  # the flood's two oldest made room: one at its own cap, one at the server's
        for sock in (honest, other):
            sock.sendall(b"Host: x\r\n\r\n" if sock is other else b"\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200"), sock
    finally:
        for sock in socks:
            sock.close()
        server.stop()


# --- the framing that times requests -----------------------------------------------------------------


def feed_bytewise(framing: RequestFraming, data: bytes) -> list[bool]:
    states = []
    for i in range(len(data)):
        framing.feed(data[i : i + 1])
        states.append(framing.in_request)
    return states


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_framing_finds_the_end_of_each_request(split):
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    put = b"PUT /v1/_/leases/10.5.1.0-24 HTTP/1.1\r\nContent-Length: 5\r\n\r\n{...}"
    chunked = b"POST /v1/_/leases HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    lf_only = b"GET / HTTP/1.0\nHost: x\n\n"
    for request in (get, put, chunked, lf_only):
        framing = RequestFraming()
        if split == "whole":
            assert framing.feed(request) == 1
        else:
            states = feed_bytewise(framing, request)
            assert all(states[:-1]), request  # in the request until its very last byte
        assert not framing.in_request, request


def test_framing_counts_pipelined_requests_and_holds_a_partial_one():
    framing = RequestFraming()
    get = b"GET / HTTP/1.1\r\n\r\n"
    assert framing.feed(get + get + b"GET / HTTP/1.1\r\nX-Slow: 1\r\n") == 3
    assert framing.in_request  # the third has no end yet
    assert framing.feed(b"X-Slow: 1\r\n") == 0 and framing.in_request
    assert framing.feed(b"\r\n") == 0 and not framing.in_request
    # a body not yet complete keeps the request open; an empty chunked body ends at once
    assert framing.feed(b"PUT / HTTP/1.1\r\ncontent-length: 10\r\n\r\n12345") == 1 and framing.in_request
    framing.feed(b"67890")
    assert not framing.in_request
    framing.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert not framing.in_request


def test_framing_stops_buffering_an_endless_head():
    framing = RequestFraming()
    framing.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 200_000)
    framing.feed(b"\r\n\r\n")
    assert framing.in_request  # never ends by our count: the deadline cuts it (aiohttp refuses it anyway)


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_framing_follows_chunks_whose_data_looks_like_the_end(split):
    head = b"POST /v1/_/leases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    # the data of a 0x100-byte chunk holds a zero-size chunk and an empty line: still inside that chunk
    fake_end = b"100\r\n" + b"x\n0\r\n\r\n"
    framing = RequestFraming()
    if split == "whole":
        framing.feed(head + fake_end)
    else:
        feed_bytewise(framing, head + fake_end)
    assert framing.in_request
    framing.feed(b"y" * (0x100 - 8) + b"\r\n")
    assert framing.in_request  # the next chunk's size line has not come
    rest = b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
    states = feed_bytewise(framing, rest) if split == "bytewise" else [framing.feed(rest) >= 0]
    assert not framing.in_request and (split == "whole" or all(states[:-1]))


def test_framing_never_ends_a_malformed_chunked_body():
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    for body in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"1" + b" " * 5000 + b"\r\n"):
        framing = RequestFraming()
        framing.feed(head + body)
        assert framing.in_request, body
        framing.feed(b"\r\n0\r\n\r\n")
        assert framing.in_request, body  # only the deadline (or aiohttp's refusal) ends it
