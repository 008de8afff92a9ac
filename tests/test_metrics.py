"""/metrics without a lab: the agent collector over an agent's in-process state (a stand-in agent object with
real AgentState, DataPlane histogram and lease-manager counters), checked by Prometheus' own `promtool check
metrics`; refusal reasons become bounded labels; the lease server counts its requests by route and code
(in-process server on loopback against the real etcd) and serves them on its own /metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

import pytest

from flannel_ebpf import metrics
from flannel_ebpf.state import AgentState
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from tests.test_remote_api import prefix, server  # noqa: F401 (the fixture)
from tests.test_subnet_etcd import run

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed")


def stand_in_agent(peers: int = 3, refused: dict | None = None, phase: str = "ready"):
    """An object shaped as flannel_ebpf.agent.Agent is, as far as the collector reads it."""
    state = AgentState(pid=1, phase=phase, backend_type="vxlan", loop_stall_max_ms=12.5, loop_stalls=2)
    state.backend_status = {
        "type": "vxlan",
        "refused": {"10.5.9.0/24": {"public_ip": "192.168.1.9", "reason": "not directly reachable: via gateway"}},
        "skipped": {"10.5.8.0/24": {"public_ip": "192.168.1.8", "reason": "its BackendType is 'udp'"}},
    }
    leases = {
        IPv4Network(f"10.5.{i}.0/24"): Lease(
            IPv4Network(f"10.5.{i}.0/24"),
            LeaseAttrs(IPv4Address(f"192.168.1.{i}"), "vxlan" if i % 2 else "host-gw", {}),
            time.time() + 3600,
        )
        for i in range(1, peers + 1)
    }
    histogram = metrics.DurationHistogram()
    for seconds in (0.002, 0.03, 0.7):
        histogram.observe(seconds)
    manager = SimpleNamespace(
        lease=Lease(
            IPv4Network("10.5.100.0/24"), LeaseAttrs(IPv4Address("192.168.1.100"), "vxlan", {}), time.time() + 600
        ),
        renewals=4,
        etcd_errors=Counter({"watch": 2}),
        reconnects=2,
        watch_events=Counter({"added": 7, "removed": 1}),
        relists=3,
        relist_corrections=0,
        listing_seconds=0.01,
        problem="",
        peers=leases,
        peers_version=1,
        peers_refused=refused if refused is not None else {"outside-network": 1},
    )
    network = SimpleNamespace(
        name="",
        state=state,
        manager=manager,
        dataplane=SimpleNamespace(errors=1, sync_seconds=histogram),
        backend=None,
        readiness=lambda: (phase == "ready", phase),
    )
    return StandInAgent([network])


class StandInAgent:
    def __init__(self, networks: list) -> None:
        self.networks = networks


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_agent_metrics_have_the_documented_names_and_no_address_labels():
    agent = stand_in_agent()
    body, content_type = metrics.render(None, agent)
    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(body.decode())
    assert got['flannel_ebpf_ready{network=""}'] == 1
    assert got['flannel_ebpf_phase{network="",phase="ready"}'] == 1
    assert got['flannel_ebpf_phase{network="",phase="acquiring"}'] == 0
    assert got['flannel_ebpf_peers{backend="vxlan",network=""}'] == 2
    assert got['flannel_ebpf_peers{backend="host-gw",network=""}'] == 1
    assert got['flannel_ebpf_peers_refused{network="",reason="outside_network"}'] == 1
    assert got['flannel_ebpf_peers_refused{network="",reason="not_directly_reachable"}'] == 1
    assert got['flannel_ebpf_peers_refused{network="",reason="backend_type"}'] == 1
    assert 500 < got['flannel_ebpf_lease_ttl_seconds{network=""}'] <= 600
    assert got['flannel_ebpf_lease_renewals_total{network=""}'] == 4
    assert got['flannel_ebpf_etcd_errors_total{network="",operation="watch"}'] == 2
    assert got['flannel_ebpf_etcd_reconnects_total{network=""}'] == 2
    assert got['flannel_ebpf_watch_events_total{kind="added",network=""}'] == 7
    assert got['flannel_ebpf_relists_total{network=""}'] == 3
    assert got['flannel_ebpf_sync_duration_seconds_count{network=""}'] == 3
    assert got['flannel_ebpf_sync_duration_seconds_bucket{le="0.05",network=""}'] == 2
    assert got["flannel_ebpf_event_loop_stall_max_seconds"] == 0.0125
    assert got["flannel_ebpf_event_loop_stalls_total"] == 2
    assert got["flannel_ebpf_scrape_errors"] == 0
    # never a subnet or an address as a label value
    assert not re.search(r'="[^"]*\d+\.\d+\.\d+\.\d+', body.decode())


def test_openmetrics_when_asked():
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0", stand_in_agent())
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


def test_a_broken_network_is_counted_not_a_failed_scrape():
    agent = stand_in_agent()
    agent.networks[0].manager.peers = None  # unreadable
    got = samples(metrics.render(None, agent)[0].decode())
    assert got["flannel_ebpf_scrape_errors"] == 1
    assert got['flannel_ebpf_ready{network=""}'] == 1  # what came before the broken part is still there


def test_peer_counts_are_cached_until_the_peers_change():
    agent = stand_in_agent(peers=4)
    got = samples(metrics.render(None, agent)[0].decode())
    assert got['flannel_ebpf_peers{backend="vxlan",network=""}'] == 2
    manager = agent.networks[0].manager
    manager.peers = dict(list(manager.peers.items())[:1])  # same peers_version: the cached count stands
    assert samples(metrics.render(None, agent)[0].decode())['flannel_ebpf_peers{backend="vxlan",network=""}'] == 2
    manager.peers_version += 1
    got = samples(metrics.render(None, agent)[0].decode())
    assert got['flannel_ebpf_peers{backend="vxlan",network=""}'] == 1
    assert 'flannel_ebpf_peers{backend="host-gw",network=""}' not in got


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("not a subnet inside the overlay network", "outside_network"),
        ("duplicate PublicIP: it claims our own", "duplicate_public_ip"),
        ("its BackendType is 'udp', this host runs 'vxlan'", "backend_type"),
        ("its backend is vxlan, not udp", "backend_type"),
        ("its PublicIP 192.168.1.1 is our own", "own_public_ip"),
        ("its subnet overlaps this host's own lease 10.5.1.0/24", "overlaps_own_subnet"),
        ("kernel refused route 10.5.2.0/24: Invalid argument", "kernel_refused"),
        ("something new", "other"),
    ],
)
def test_refusal_reasons_become_bounded_labels(reason, kind):
    assert metrics.refusal_kind(reason) == kind


def test_duration_histogram_is_cumulative():
    h = metrics.DurationHistogram(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 2.0):
        h.observe(seconds)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.total == pytest.approx(2.65)


@needs_promtool
def test_promtool_finds_no_problem_in_a_scrape(tmp_path):
    body, _ = metrics.render(None, stand_in_agent())
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_lease_server_counts_requests_by_route_and_code(etcd, prefix):  # noqa: F811
    def count(text: str, route: str, method: str, code: str) -> float:
        key = f'flannel_ebpf_lease_api_requests_total{{code="{code}",method="{method}",route="{route}"}}'
        return samples(text).get(key, 0.0)

    async def go():
        async with server(etcd, prefix) as (http, base, _):
            async with http.get(base.replace("/v1/_", "/metrics")) as r:
                before = await r.text()
            for _ in range(3):
                async with http.get(f"{base}/config") as r:
                    assert r.status == 200
            async with http.get(f"{base}/leases/10.5.77.0-24") as r:
                assert r.status == 404
            async with http.get(base.replace("/v1/_", "/nothing-here")) as r:
                assert r.status == 404
            async with http.get(base.replace("/v1/_", "/metrics")) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                after = await r.text()
        return before, after

    before, after = run(go())
    assert count(after, "/v1/{network}/config", "GET", "200") - count(before, "/v1/{network}/config", "GET", "200") == 3
    route = "/v1/{network}/leases/{subnet}"
    assert count(after, route, "GET", "404") - count(before, route, "GET", "404") == 1
    assert count(after, "other", "GET", "404") - count(before, "other", "GET", "404") == 1
    assert "10.5.77" not in after  # the route's pattern, never the subnet asked for


def test_sync_histogram_is_filled_by_the_data_plane():
    from flannel_ebpf.network import DataPlane

    class Backend:
        def sync(self, peers):
            time.sleep(0.01)

    async def go():
        plane = DataPlane(Backend())  # type: ignore[arg-type]
        await plane.sync_peers([])
        await plane.sync_peers([])
        return plane.sync_seconds

    h = asyncio.run(go())
    assert h.count == 2 and h.total >= 0.02


def test_peer_backend_labels_are_bounded_whatever_lease_writers_name():
    agent = stand_in_agent(peers=0)
    manager = agent.networks[0].manager
    for i, name in enumerate(["made-up-1", "made-up-2", "vxlan", "x" * 32], start=1):
        subnet = IPv4Network(f"10.5.{i}.0/24")
        manager.peers[subnet] = Lease(subnet, LeaseAttrs(IPv4Address(f"192.168.1.{i}"), name, {}), time.time() + 60)
    manager.peers_version += 1
    got = {k: v for k, v in samples(metrics.render(None, agent)[0].decode()).items() if "flannel_ebpf_peers{" in k}
    assert got == {
        'flannel_ebpf_peers{backend="other",network=""}': 3,
        'flannel_ebpf_peers{backend="vxlan",network=""}': 1,
    }


def test_the_event_loop_lateness_is_a_histogram():
    agent = stand_in_agent()
    agent.loop_lateness = metrics.DurationHistogram(buckets=metrics.LATENESS_BUCKETS)
    for late in (0.0004, 0.0004, 0.015, 0.3):
        agent.loop_lateness.observe(late)
    got = samples(metrics.render(None, agent)[0].decode())
    assert got['flannel_ebpf_event_loop_lateness_seconds_bucket{le="0.001"}'] == 2
    assert got['flannel_ebpf_event_loop_lateness_seconds_bucket{le="0.02"}'] == 3
    assert got['flannel_ebpf_event_loop_lateness_seconds_bucket{le="0.5"}'] == 4
    assert got["flannel_ebpf_event_loop_lateness_seconds_count"] == 4
