"""Issue 15, parts 1 and 2: the real agents against a three-member etcd cluster (each member in a namespace
of its own on the underlay; every agent gets all three endpoints) and against one etcd that is stopped.

Under count-bounded ping floods between containers (udp eBPF with the default flags, vxlan, host-gw): the
leader is killed, then a follower, then two members (quorum lost), each brought back; a new host starts
while quorum is lost. Printed and asserted: pings lost, agents alive (same PIDs), leases renewed, no lease
lost, moved or duplicated, and how long after etcd answers again every old host and the new one see and
answer each other (goal 3 s; asserted with room for a loaded 2-core machine).

The quorum loss lasts QUORUM_LOSS_SECONDS (10 s; the issue names 20 s): nothing in the agents depends on
how long it lasts (their back-off is capped at --etcd-retry-max, 1 s), and the 20 s case is the single-etcd
test below. FLANNEL_EBPF_OUTAGE_SECONDS=300 runs that one with a five-minute outage (not in `make test`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from flannel_ebpf.lab.traffic import FloodCounter, PingResult
from tests.helpers import wait_delivery_settled, wait_for

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIGS = {
    "udp": {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}},
    "vxlan": {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}},
    "host-gw": {"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}},
}
# A short TTL so that leases are renewed (at half-life) during the scenario.
FLAGS = ["--lease-check-interval", "1", "--subnet-lease-ttl", "30"]
QUORUM_LOSS_SECONDS = 10.0
OUTAGE_SECONDS = float(os.environ.get("FLANNEL_EBPF_OUTAGE_SECONDS", "20"))
RECOVERY_BOUND = 10.0  # goal 3 s (printed); the bound only catches a regression to the old 12.5 s


def state(lab, host) -> dict[str, Any]:
    return json.loads((lab.host(host).state_dir / "state.json").read_text())


def subnet_of(lab, host) -> str:
    env = lab.subnet_env(host)
    return str(env.subnet.network) if env else ""


def knows(lab, host, subnet: str) -> bool:
    return any(p["subnet"] == subnet for p in state(lab, host)["peers"])


def leases_in_etcd(lab) -> dict[str, str]:
    """subnet -> PublicIP of every lease in etcd."""
    return {key.replace("-", "/"): value["PublicIP"] for key, value in lab.leases().items()}


def etcd_answers(lab, timeout: str = "1s") -> bool:
    try:
        lab.etcd.ctl("get", "--command-timeout", timeout, "no-such-key")
        return True
    except Exception:
        return False


def wait_etcd_back(lab, timeout: float = 30.0) -> float:
    """Poll etcd until a linearizable read succeeds (short timeouts: the moment matters); returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if etcd_answers(lab, "0.3s"):
            return time.monotonic()
    raise AssertionError(f"etcd does not answer after {timeout}s")


def agents_work(lab, hosts: list[str], since: float) -> None:
    """Each agent has rewritten its state (a lease check, every second) since `since` (time.time())."""
    wait_for(lambda: all(state(lab, h)["updated"] > since for h in hosts), 10, "every agent to check its lease")


def check_leases(lab, subnets_before: dict[str, str]) -> None:
    """One lease per host, each host's own (PublicIP), none lost, moved or duplicated."""
    leases = leases_in_etcd(lab)
    expected = {subnet_of(lab, h): str(lab.host(h).underlay_ip) for h in lab.host_names}
    assert leases == expected, f"etcd {leases} != hosts {expected}"
    assert len(set(leases.values())) == len(leases) == len(lab.host_names)
    for h, subnet in subnets_before.items():
        assert subnet_of(lab, h) == subnet, f"{h} moved from {subnet} to {subnet_of(lab, h)}"


def recovery(
    lab, backend: str, restarted: float, back: float, new: str, old: list[str], timeline: list[str]
) -> dict[str, float]:
    """From `back` (etcd answers again): the new host's lease, every old host knowing it, and all
    containers answering each other. Returns the figures (seconds after `back`)."""
    figures: dict[str, float] = {}
    timeline.append(f"  etcd answers {back - restarted:.2f}s after its restart")
    wait_for(lambda: lab.subnet_env(new) is not None, 30, f"{new}'s lease")
    figures["new host leased"] = time.monotonic() - back
    subnet = subnet_of(lab, new)
    wait_for(lambda: all(knows(lab, h, subnet) for h in old), 30, f"every old host to know {new}")
    figures["seen by every old host"] = time.monotonic() - back
    wait_for(lambda: all(knows(lab, new, subnet_of(lab, h)) for h in old), 30, f"{new} to know every old host")
    figures["new host sees all"] = time.monotonic() - back
    lab.wait_ready(new, 30)
    lab.add_container(new)
    if backend == "udp":
        wait_delivery_settled(lab)
    wait_for(lambda: lab.ping_matrix(count=1, interval=0.2, timeout=1).all_ok, 30, "all containers to answer")
    figures["all answer each other"] = time.monotonic() - back
    for what, seconds in figures.items():
        timeline.append(f"  +{seconds:5.2f}s after etcd answers again: {what}")
    return figures


def bring_up(lab_factory, backend: str, **kw: Any):
    lab = lab_factory(3, network_config=CONFIGS[backend], **kw)
    lab.start_agents(FLAGS)
    lab.wait_all_ready(90)
    for h in lab.host_names:
        lab.add_container(h)
    if backend == "udp":
        wait_delivery_settled(lab)
    subnets = {h: subnet_of(lab, h) for h in lab.host_names}
    wait_for(lambda: all(knows(lab, h, s) for h in subnets for o, s in subnets.items() if o != h), 20, "full mesh")
    return lab, subnets


def start_floods(lab) -> list[FloodCounter]:
    c1, c2, c3 = lab.containers[:3]
    return [FloodCounter(lab.node(c1), str(c2.ip)).start(), FloodCounter(lab.node(c3), str(c1.ip)).start()]


def stop_floods(floods: list[FloodCounter], timeline: list[str]) -> list[PingResult]:
    results = [f.stop() for f in floods]
    for r in results:
        timeline.append(f"  flood {r.src} -> {r.dst}: {r.sent - r.received} of {r.sent} pings lost")
    return results


def pings_lost(results: list[PingResult]) -> int:
    assert all(r.sent > 1000 for r in results), results
    return sum(r.sent - r.received for r in results)


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_etcd_cluster_member_faults_under_flood(lab_factory, backend):
    lab, subnets = bring_up(lab_factory, backend, etcd_members=3)
    cluster = lab.etcd
    old = list(lab.host_names)
    assert all(len(state(lab, h)["etcd_endpoints"]) == 3 for h in old)
    pids = {h: lab.agent(h).proc.pid for h in old}
    leases_before = {h: state(lab, h)["lease"] for h in old}
    timeline: list[str] = [f"{backend}, three etcd members:"]
    started = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"  {time.monotonic() - started:5.1f}s {what}")

    floods = start_floods(lab)
    try:
        leader = cluster.wait_leader()
        killed = time.time()
        cluster.kill(leader)
        note(f"killed the leader (member {leader + 1})")
        new_leader = cluster.wait_leader(other_than=leader)
        note(f"member {new_leader + 1} leads")
        agents_work(lab, old, killed)
        note("every agent checked its lease with two members")
        cluster.start(members=[leader])
        note(f"member {leader + 1} back")

        follower = next(i for i in range(3) if i != cluster.wait_leader())
        killed = time.time()
        cluster.kill(follower)
        note(f"killed a follower (member {follower + 1})")
        wait_for(lambda: etcd_answers(lab), 10, "two members to answer")
        agents_work(lab, old, killed)
        note("every agent checked its lease with two members")
        cluster.start(members=[follower])
        note(f"member {follower + 1} back")

        leader = cluster.wait_leader()
        down = [leader, next(i for i in range(3) if i != leader)]
        for i in down:
            cluster.kill(i)
        note(f"killed members {down[0] + 1} (leader) and {down[1] + 1}: quorum lost")
        assert not etcd_answers(lab)
        lab.add_host("h4")
        lab.start_agent("h4", FLAGS)  # joins while etcd cannot answer: it waits
        time.sleep(QUORUM_LOSS_SECONDS)  # the outage itself
        assert all(lab.agent_running(h) for h in old)
        restarted = time.monotonic()
        for i in down:
            cluster.members[i].start(wait=False)
        back = wait_etcd_back(lab)
        note("quorum back: etcd answers")
        figures = recovery(lab, backend, restarted, back, "h4", old, timeline)
    finally:
        flooded = stop_floods(floods, timeline)

    # Leases renewed through it all (TTL 30 s: renewed at half-life), none lost, moved or duplicated.
    wait_for(lambda: all(state(lab, h)["lease"]["mod_revision"] > leases_before[h]["mod_revision"] for h in old),
             20, "every old lease renewed")  # fmt: skip
    for h in old:
        before, after = leases_before[h], state(lab, h)["lease"]
        timeline.append(f"  {h} lease {subnets[h]} renewed: revision {before['mod_revision']} -> "
                        f"{after['mod_revision']}, +{after['expiration'] - before['expiration']:.0f}s")  # fmt: skip
    check_leases(lab, subnets)
    alive = {h: lab.agent(h).proc.pid for h in old}
    timeline.append(f"  agents alive: {sum(lab.agent_running(h) for h in lab.host_names)} of {len(lab.host_names)}")
    print("\n".join(timeline))
    assert alive == pids and lab.agent_running("h4")
    assert all(lab.agent(h).health().stdout.startswith("ready") for h in lab.host_names)
    assert pings_lost(flooded) == 0
    assert figures["all answer each other"] <= RECOVERY_BOUND + 5
    assert figures["seen by every old host"] - figures["new host leased"] <= RECOVERY_BOUND


def test_single_etcd_outage_recovery(lab_factory):
    """One etcd stopped for OUTAGE_SECONDS (20 s; FLANNEL_EBPF_OUTAGE_SECONDS=300 for the five-minute
    case) while a new host starts: once etcd answers again, all hosts see each other within seconds."""
    lab, subnets = bring_up(lab_factory, "host-gw")
    old = list(lab.host_names)
    pids = {h: lab.agent(h).proc.pid for h in old}
    timeline = [f"host-gw, one etcd stopped for {OUTAGE_SECONDS:.0f}s:"]
    floods = start_floods(lab)
    try:
        lab.stop_etcd()
        lab.add_host("h4")
        lab.start_agent("h4", FLAGS)
        time.sleep(OUTAGE_SECONDS)  # the outage itself
        restarted = time.monotonic()
        lab.etcd.start(wait=False)
        back = wait_etcd_back(lab)
        figures = recovery(lab, "host-gw", restarted, back, "h4", old, timeline)
    finally:
        flooded = stop_floods(floods, timeline)
    check_leases(lab, subnets)
    print("\n".join(timeline))
    assert {h: lab.agent(h).proc.pid for h in old} == pids
    assert pings_lost(flooded) == 0
    assert figures["seen by every old host"] <= RECOVERY_BOUND
    assert figures["all answer each other"] <= RECOVERY_BOUND + 5
