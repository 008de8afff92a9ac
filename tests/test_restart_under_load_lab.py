"""Restart under load on every backend.

Two hosts, one container each, a real etcd. While a count-bounded ping flood (`ping -c 5000 -i 0.002`, one
run for the whole window) and a 12 s iperf3 TCP stream (`-i 0.2`) run from host A's container to host B's,
host A's agent is killed with SIGKILL 2 s in and restarted one second later with the same arguments, then,
once it is ready, host B's agent likewise. So each restart, its program load and swap (udp eBPF: the
restarted agent adopts the pinned maps and replaces the attached programs in place) and its first resync
happen while traffic flows. Asserted, for udp eBPF (default options), vxlan and host-gw:

- not one ping lost (a count-bounded flood ends on an answer, so no probe in flight is counted), and the
  flood lasted past both restarts;
- the TCP stream never stalls for more than 1 s (no run of 0.2 s intervals moving less than 1% of the
  fastest interval adds up to more than 1 s), and iperf3 completes;
- both agents ready again, both before the window closes;
- the restarted agents adopted the data path instead of rebuilding it. udp eBPF: it logs the pinned peer
  it adopted, its maps are the very same kernel objects, its programs new ones, swapped in place (`tc
  monitor` sees `replaced filter` on flannel0 egress and eth0 ingress, no deletion). vxlan: it adopts its
  device. vxlan and host-gw: the first resync had nothing to change. Every backend: `ip monitor`, `bridge
  monitor fdb` and `tc monitor` in both hosts for the whole window see no deletion of the peer's route,
  neighbour or FDB entry, of anything on a flannel device, or of any tc filter or qdisc.

Not covered, by design: the udp backend's userspace TUN path (`--udp-datapath tun`). There the agent
process itself carries every packet, so a kill -9 necessarily stops traffic until the new process runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flannel_ebpf.lab.netns import stop_process
from flannel_ebpf.lab.traffic import PingResult, count_flood
from tests.helpers import logged_at, pinned_map_ids, wait_delivery_settled, wait_for

pytestmark = pytest.mark.lab

NETWORK = "10.5.0.0/16"
IPERF_SECONDS = 12  # the traffic window
INTERVAL = 0.2  # iperf3 report interval (-i)
KILL_A_AT = 2.0  # seconds into the window
DOWN_FOR = 1.0  # between a kill and the restart
MAX_STALL = 1.0  # seconds of (near) zero throughput allowed
PING_INTERVAL = 0.002
# One count-bounded flood for the whole window, no gap: at most one probe per PING_INTERVAL, so it lasts
# at least until both restarts are done (checked; on a busy machine ping paces itself slower).
PING_COUNT = int((IPERF_SECONDS - 2) / PING_INTERVAL)
NEAR_ZERO = 0.01  # an interval moving less than this share of the fastest one is a stall


def config(backend: str) -> dict[str, Any]:
    return {"Network": NETWORK, "Backend": {"Type": backend}}


def bring_up(lab_factory, backend: str):
    lab = lab_factory(2, network_config=config(backend))
    lab.start_agents()  # default options: what a restart repeats
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    if backend == "udp":
        wait_delivery_settled(lab)
    a, b = lab.containers
    wait_for(lambda: lab.ping(a, b, count=1, timeout=1).ok, 20, "container A to answer container B")
    return lab


def longest_stall(intervals: list[dict[str, Any]]) -> tuple[float, int]:
    """(seconds, intervals) of the longest run of consecutive intervals moving (near) nothing."""
    sums = [i["sum"] for i in intervals]
    fastest = max(s["bytes"] for s in sums)
    longest = run = 0.0
    longest_n = run_n = 0
    for s in sums:
        if s["bytes"] < NEAR_ZERO * fastest:
            run += s["seconds"]
            run_n += 1
            if run > longest:
                longest, longest_n = run, run_n
        else:
            run, run_n = 0.0, 0
    return longest, longest_n


def program_ids(lab, host) -> dict[str, int]:
    return {str(p["hook"]): p["prog_id"] for p in lab.agent_status(host)["live"]["programs"]}


class Monitor:
    """`ip monitor`, `bridge monitor fdb` and `tc monitor` inside a host's namespace for the traffic window:
    every link, address, route, neighbour, FDB, qdisc and filter change, stopped by PID."""

    def __init__(self, lab, host) -> None:
        self.node = lab.node(host)
        self.path = lab.host(host).dir / "monitor.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Monitor:
        with open(self.path, "wb") as out:
            for argv in (["ip", "-oneline", "monitor", "link", "address", "route", "neigh"],
                         ["bridge", "-oneline", "monitor", "fdb"], ["tc", "monitor"]):  # fmt: skip
                self.procs.append(self.node.popen(argv, stdout=out, stderr=out))
        wait_for(lambda: all(self._subscribed(p) for p in self.procs), 10, f"monitors in {self.node.name}")
        return self

    def _subscribed(self, proc: subprocess.Popen[bytes]) -> bool:
        """One of its rtnetlink sockets has joined multicast groups: events reach it from now on."""
        assert proc.poll() is None, f"{proc.args} exited: {self.path.read_text()}"
        try:
            fds = Path(f"/proc/{proc.pid}/fd")
            inodes = {os.readlink(fd)[len("socket:[") : -1] for fd in fds.iterdir()}
            rows = [line.split() for line in Path(f"/proc/{proc.pid}/net/netlink").read_text().splitlines()[1:]]
        except FileNotFoundError:
            return False
        # sk Eth(0: NETLINK_ROUTE) Pid Groups Rmem Wmem Dump Locks Drops Inode
        return any(r[1] == "0" and int(r[3], 16) != 0 and r[9] in inodes for r in rows)

    def stop(self) -> list[str]:
        for p in self.procs:
            stop_process(p, 5)
        return self.path.read_text(errors="replace").splitlines() if self.path.exists() else []


_TC_EVENT_RE = re.compile(r"^(?:added |replaced |deleted )?(?:filter|qdisc) ")


def overlay_events(events: list[str], peer: str) -> list[str]:
    """The events that touch the overlay: the route, neighbour or FDB entry of the peer subnet `peer`;
    anything on a flannel device (flannel0, flannel.1: the Network's route, udp eBPF's encap filter); any
    tc filter or qdisc (udp eBPF's decap on eth0, its hand-off on docker0). IPv6 link-local noise (the
    devices' own addresses settling) is left out."""
    marks = (peer, peer.split("/")[0] + " ", "flannel", NETWORK)
    return [e for e in events if "fe80::" not in e and (_TC_EVENT_RE.match(e) or any(m in e for m in marks))]


def test_longest_stall_counts_runs_of_near_zero_intervals():
    def report(*gbits: float) -> list[dict[str, Any]]:
        return [{"sum": {"bytes": int(g * 1e9 / 8 * INTERVAL), "seconds": INTERVAL}} for g in gbits]

    assert longest_stall(report(10, 9, 11, 10)) == (0.0, 0)
    assert longest_stall(report(10, 0.5, 10, 0.05, 0, 0, 10, 0, 10)) == (pytest.approx(0.6), 3)
    stalled = longest_stall(report(10, 0, 0, 0, 0, 0, 0.05, 0, 0, 0, 0, 0))  # mostly stalled: 2.2 s
    assert stalled == (pytest.approx(2.2), 11) and stalled[0] > MAX_STALL


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_restart_under_load(lab_factory, backend):
    lab = bring_up(lab_factory, backend)
    a, b = lab.containers
    hosts = lab.host_names
    subnet = {h: str(lab.subnet_env(h).subnet.network) for h in hosts}
    peer = {"h1": subnet["h2"], "h2": subnet["h1"]}
    if backend == "udp":
        maps_before = {h: pinned_map_ids(lab, h) for h in hosts}
        progs_before = {h: program_ids(lab, h) for h in hosts}
    server = lab.iperf3_server(b)
    monitors = {h: Monitor(lab, h) for h in hosts}
    results: dict[str, Any] = {}
    done: dict[str, float] = {}
    threads: list[threading.Thread] = []

    def background(name: str, fn: Any) -> None:
        def run() -> None:
            try:
                results[name] = fn()
            except BaseException as e:  # handed to the test's thread
                results[name] = e
            done[name] = time.time()

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    marks: list[tuple[float, str]] = []  # (time.time(), what): the window's timeline
    ready: dict[str, float] = {}  # time.time() at which each restarted agent had the data path in hand
    try:
        for m in monitors.values():
            m.start()
        opened = time.time()  # wall clock: compared with the agents' log lines

        def note(what: str, at: float | None = None) -> None:
            marks.append((at or time.time(), what))

        background("ping", lambda: count_flood(lab.node(a), str(b.ip), PING_COUNT, PING_INTERVAL))
        background("iperf3", lambda: lab.iperf3(a, b, seconds=IPERF_SECONDS, extra=["-i", str(INTERVAL)]))
        time.sleep(KILL_A_AT)  # fixed: places the first kill inside the traffic window
        for host in hosts:
            lab.kill_agent(host)
            note(f"kill -9 of {host}'s agent")
            time.sleep(DOWN_FOR)  # fixed: the restart lands inside the window too
            agent = lab.start_agent(host)  # the same (default) arguments
            note(f"{host}'s agent restarted")
            lab.wait_ready(host, 30)
            note(f"{host}: health says ready")
            ready[host] = logged_at(lab, host, " ready: subnet ") or time.time()
            note(f"{host} ready, {ready[host] - agent.started_at:.2f}s after its restart (its log)", ready[host])
            if backend == "udp":
                wait_delivery_settled(lab)
                handoff = logged_at(lab, host, "hand-off attached") or time.time()
                note(f"{host}'s bridge hand-off attached (its log)", handoff)
                ready[host] = max(ready[host], handoff)
    finally:
        for thread in threads:
            thread.join(IPERF_SECONDS * 3 + 30)
        events = {h: m.stop() for h, m in monitors.items()}
        server.stop()
    marks.extend((at, f"{name} done") for name, at in done.items())
    timeline = [f"{backend}:"] + [f"  {at - opened:5.2f}s {what}" for at, what in sorted(marks)]
    pings, report = results.get("ping"), results.get("iperf3")
    assert isinstance(pings, PingResult), f"the ping flood failed: {pings!r}"
    assert isinstance(report, dict), f"iperf3 failed: {report!r}"
    timeline.append(f"  pings: {pings.sent - pings.received} of {pings.sent} lost")
    intervals = report["intervals"]
    stall, stalled = longest_stall(intervals)
    per_interval = [round(i["sum"]["bits_per_second"] / 1e9, 1) for i in intervals]
    gbits = report["end"]["sum_received"]["bits_per_second"] / 1e9
    timeline.append(f"  iperf3 {gbits:.2f} Gbit/s, longest stall {stall:.2f}s ({stalled} intervals)")
    timeline.append(f"  Gbit/s per {INTERVAL}s: {per_interval}")
    touched = {h: overlay_events(events[h], peer[h]) for h in hosts}
    flapped = {h: [e for e in touched[h] if e.lower().startswith("deleted")] for h in hosts}
    for h in hosts:
        timeline.append(f"  {h}: {len(events[h])} kernel events in the window, {len(touched[h])} on the overlay")
        timeline += [f"    {e}" for e in touched[h]]
    print("\n".join(timeline))

    # Both restarts, with their program swap and first resync, landed inside the traffic window, and the
    # flood covered all of it.
    ready_at = max(ready.values()) - opened
    assert ready_at < IPERF_SECONDS, f"the restarts took until {ready_at:.1f}s, past the {IPERF_SECONDS}s window"
    assert done["ping"] - opened > ready_at, "the ping flood ended before the restarts did"
    assert pings.received == pings.sent, f"{pings.sent - pings.received} of {pings.sent} pings lost"
    assert pings.sent >= PING_COUNT, pings
    assert len(intervals) >= IPERF_SECONDS / INTERVAL - 1, f"iperf3 ended early: {len(intervals)} intervals"
    assert stall <= MAX_STALL, f"the TCP stream stalled {stall:.2f}s: {per_interval}"
    assert report["end"]["sum_received"]["bytes"] > 0
    for host in hosts:
        assert lab.agent_running(host)
        assert lab.agent(host).health().stdout.startswith("ready")

    # The restarted agents adopted the data path instead of rebuilding it: nothing of the overlay was
    # deleted from the kernel in the window, and the peer's route is there.
    logs = {h: lab.agent_log(h, last_run=True) for h in hosts}
    for h in hosts:
        assert not flapped[h], f"{h}: overlay state deleted during the restart: {flapped[h]}"
        route = lab.exec(h, ["ip", "route", "show", peer[h] if backend != "udp" else NETWORK]).stdout
        assert route.strip(), f"{h}: no route to the peer"
        if backend == "udp":
            assert re.search(r"\b1 pinned peers adopted", logs[h]), f"{h} did not adopt its peer map"
            assert pinned_map_ids(lab, h) == maps_before[h], f"{h}'s maps were re-created"
            after = program_ids(lab, h)
            assert after.keys() == progs_before[h].keys()
            assert all(after[k] != progs_before[h][k] for k in after), f"{h}: programs not swapped: {after}"
            # ... in place, while traffic flowed (one RTM_NEWTFILTER with NLM_F_REPLACE each: no gap).
            for hook in ("dev flannel0 egress", "dev eth0 ingress"):
                assert any(e.startswith(f"replaced filter {hook}") for e in touched[h]), f"{h}: no swap on {hook}"
        else:
            # The first resync found the kernel right: a sync logs only when it changes something.
            assert f"{backend}: sync:" not in logs[h], f"{h}'s first resync changed the kernel:\n{logs[h]}"
            if backend == "vxlan":
                assert "vxlan: adopting existing flannel.1" in logs[h]
