"""Issue 25 item 9 end to end: a lease server and an agent started by the CLI, in a namespace lab, keep
each log record on one line of bounded size whatever a request path or a key under subnets/ holds."""

from __future__ import annotations

import sys

import pytest

from flannel_ebpf.logs import VALUE_LIMIT
from tests.helpers import wait_for
from tests.test_remote_lab import Server

pytestmark = pytest.mark.lab

ALLOC = {"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}
PORT = 8888
# A record line: timestamp, level, then a message of two values cut to VALUE_LIMIT and some words.
SHORT_LINE = 3 * VALUE_LIMIT

# Puts the key read from stdin (too long for etcdctl's argv) with a plain lease value.
PUT_KEY = """
import asyncio, sys
import aetcd

async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        await client.put(sys.stdin.read().encode(), b'{"PublicIP":"192.168.50.9","BackendType":"alloc"}')

asyncio.run(main())
"""


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_a_request_path_forges_no_log_line_and_is_cut(lab_factory):
    lab = lab_factory(1, network_config=ALLOC)
    server = Server(lab, "h1", ["--listen", f"127.0.0.1:{PORT}"])
    server.start()
    try:
        base = f"http://127.0.0.1:{PORT}/v1/_/leases"
        for path in ("10.5.1.0-24%0aFORGED%20line", "10.5.1.0-24%0d%0aFORGED%1b%5b2K", "10.5.1.0-24&" + "z" * 6000):
            status = lab.exec("h1", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/{path}"])
            assert status.stdout.strip() == "400", (path[:40], status.stdout)
        wait_for(lambda: server.log.read_text().count("from 127.0.0.1: 400") == 3, what="the three requests logged")
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert not [line for line in lines_of(log) if line.startswith("FORGED")], log
    assert "leases/10.5.1.0-24\\nFORGED line from 127.0.0.1: 400" in log
    assert "leases/10.5.1.0-24\\r\\nFORGED\\x1b[2K from 127.0.0.1: 400" in log
    longest = max(lines_of(log), key=len)
    assert len(longest) < SHORT_LINE, longest[:200]


def test_a_1mb_key_under_subnets_makes_no_long_log_line(lab_factory):
    lab = lab_factory(1, network_config=ALLOC)
    lab.start_agent("h1")
    lab.wait_ready("h1", 30)
    key = "/coreos.com/network/subnets/10.5.9.0-24\nFORGED line " + "k" * 1_000_000
    lab.node("h1").exec([sys.executable, "-c", PUT_KEY, lab.etcd_endpoint.split("//")[1]], input=key)
    wait_for(lambda: "ignoring invalid lease" in lab.agent_log("h1"), timeout=20, what="the agent seeing the key")
    log = lab.agent_log("h1")
    assert not [line for line in lines_of(log) if line.startswith("FORGED")], log[-2000:]
    garbage = [line for line in lines_of(log) if "ignoring invalid lease" in line]
    assert len(garbage) == 1 and "10.5.9.0-24\\nFORGED line kkk" in garbage[0], garbage[0][:400]
    longest = max(lines_of(log), key=len)
    assert len(longest) < SHORT_LINE, longest[:200]
    assert lab.agent("h1").health().stdout.startswith("ready")
