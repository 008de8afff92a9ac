"""A live flanneld host taken over by flannel-ebpf and handed back, under load.

Three hosts run flannel's own flanneld v0.20.2 (`../shared/flanneld/`), one container each. While every
container floods every other (`PING_COUNT` probes `PING_INTERVAL` apart per pair, all six pairs at once,
an ICMP error not ending a flood), h1 is taken over as a systemd unit swap does it: flanneld gets
SIGTERM, then `flannel-ebpf` starts with flanneld's very flags (`Lab.takeover`). Then, under a fresh
flood, it is handed back: the agent gets SIGTERM, `flannel-ebpf down --keep-datapath` (the lease stays),
flanneld starts again with its flags (`Lab.hand_back`). Then it is taken over once more. h2 and h3 run
flanneld throughout, so the taken-over host talks to flanneld hosts the whole time (on udp: its eBPF
path to their TUN path).

Asserted per backend and step: h1 keeps its subnet and its lease (the lease's value is the same: vxlan's
VtepMAC too, so no peer reprograms anything), every pair answers after each step, and
- vxlan: the agent adopts flanneld's flannel.1 (same MAC, same ifindex) and flanneld adopts it back; not
  one ping lost in any step, and no peer route deleted (`ip monitor route` in h1 for each step);
- host-gw: the agent replaces flanneld's routes in place by proto 102 ones, flanneld adopts them back;
  not one ping lost, no peer route deleted;
- udp: the overlapping order of docs/MIGRATING.md. Takeover: the agent starts beside flanneld and
  attaches to flanneld's flannel0 once its maps are filled; flanneld's exit deletes that TUN and the
  agent's guard makes flannel0 again (the gap is printed: the guard's own figure and its log line
  against flanneld's exit). Hand-back: flanneld starts beside the stopped agent's data path (its TUN is
  then flannel1) and `down --keep-datapath` moves the Network's route onto it in place. Each pair loses
  at most what fits in `UDP_GAP_GOAL` (100 ms) plus the probes in flight.

The measured numbers (per pair, per step) are printed in one table per backend.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from flannel_ebpf.lab.netns import stop_process
from flannel_ebpf.lab.traffic import PairFloods
from tests.flanneld_helpers import NETWORK, subnet_of
from tests.helpers import backends_from_env, logged_at, wait_for

pytestmark = pytest.mark.lab

VERSION = "v0.20.2"
TAKEN = "h1"
PING_INTERVAL = 0.01  # 100 probes a second per pair, six pairs
PING_COUNT = 1500  # >= 15 s per step: the takeover or hand-back and its settling fit inside
LEAD = 1.5  # seconds of flood before the step starts
#: probes in flight when the path breaks (sent, not yet answered) may be lost on top of the gap
IN_FLIGHT_SLACK = 3
UDP_GAP_GOAL = 0.1  # seconds without an encap on udp: the aim of the overlapping order
_GUARD_RE = re.compile(r"flannel0 was deleted: made again .* in ([\d.]+) ms")


def start_flanneld_cluster(lab, backend: str) -> dict[str, str]:
    """flanneld on every host, one after the other (each ready before the next starts, so that its watch
    sees each new lease in a response of its own: DESIGN.md §1), a container each, and every pair
    answering. Returns {host: subnet}."""
    for h in lab.host_names:
        lab.start_flanneld(h, VERSION)
        lab.wait_ready(h, 60)
    for h in lab.host_names:
        lab.add_container(h)
    wait_full_mesh(lab, "flanneld everywhere")
    return {h: subnet_of(lab, h) for h in lab.host_names}


def wait_full_mesh(lab, phase: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        matrix = lab.ping_matrix(count=2, interval=0.1, timeout=1.0)
        if matrix.all_ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{phase}: not every pair answers\n{matrix.format()}")
        time.sleep(1)


def pairs(lab) -> list[tuple[str, object, str]]:
    return [
        (f"{a.name}->{b.name}", a.ns, str(b.ip)) for a in lab.containers for b in lab.containers if a.name != b.name
    ]


class RouteMonitor:
    """`ip monitor route` in a host's namespace for a step: the route deletions it saw, stopped by PID."""

    def __init__(self, lab, host: str) -> None:
        self.path = lab.host(host).dir / f"route-monitor-{time.monotonic_ns()}.log"
        with open(self.path, "wb") as out:
            self.proc: subprocess.Popen[bytes] = lab.node(host).popen(
                ["ip", "-oneline", "monitor", "route"], stdout=out, stderr=out
            )
        time.sleep(0.3)  # subscribed before the step starts

    def deletions(self, subnets: set[str]) -> list[str]:
        stop_process(self.proc, 5)
        lines = self.path.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith("Deleted") and any(s in line for s in subnets)]


def run_step(
    lab, what: str, step, count: int = PING_COUNT, interval: float = PING_INTERVAL
) -> tuple[dict[str, int], float, object]:
    """The floods, `LEAD` seconds, then `step()` (returns when the host is ready again); returns the pings
    lost per pair, how long the step took and what `step()` returned."""
    floods = PairFloods(pairs(lab), count, interval).start()
    time.sleep(LEAD)
    began = time.time()
    outcome = step()
    ready = time.time()
    results = floods.wait()
    late = [label for label, ended in floods.ended.items() if ended < ready]
    assert not late, f"{what}: floods ended before the step was over: {late}: {[str(r) for r in results.values()]}"
    return PairFloods.lost(results), ready - began, outcome


def flannel1(lab, host: str) -> dict:
    return json.loads(lab.exec(host, ["ip", "-j", "link", "show", "flannel.1"]).stdout)[0]


def routes_to(lab, host: str, subnets: set[str]) -> dict[str, dict]:
    routes = json.loads(lab.exec(host, ["ip", "-j", "-4", "route", "show"]).stdout)
    return {r["dst"]: r for r in routes if r.get("dst") in subnets}


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp"])
def test_takeover_and_hand_back_under_load(lab_factory, backend):
    lab = lab_factory(3, network_config={"Network": NETWORK, "Backend": {"Type": backend}})
    subnets = start_flanneld_cluster(lab, backend)
    peers = {s for h, s in subnets.items() if h != TAKEN}
    leases = lab.leases()
    if backend == "vxlan":
        device = flannel1(lab, TAKEN)
    table = [f"{backend}: pings lost per pair ({PING_COUNT} probes {PING_INTERVAL * 1000:.0f} ms apart)"]

    def take_over(phase: str) -> None:
        """flannel-ebpf takes h1 over under the floods. The first time from a flanneld on flannel0 (udp:
        the guard makes flannel0 again when flanneld's goes); after a hand-back, from a flanneld whose TUN
        is flannel1 (udp: the Network's route moves onto the agent's flannel0 once its encap is on)."""
        monitor = RouteMonitor(lab, TAKEN)
        first = phase == "takeover"

        def takeover():
            done = lab.takeover(TAKEN, overlap=backend == "udp")
            lab.wait_ready(TAKEN, 60)
            if backend == "udp":  # flannel0 the agent's, and the bridge hand-off on
                if first:
                    wait_for(lambda: _GUARD_RE.search(lab.agent_log(TAKEN, last_run=True)), 30, "flannel0 again")
                settled = ("hand-off attached", "no bridge hand-off needed")
                wait_for(lambda: any(s in lab.agent_log(TAKEN, last_run=True) for s in settled), 30, "h1's hand-off")
            return done

        lost, took, done = run_step(lab, phase, takeover)
        deleted = monitor.deletions(peers)
        table.append(f"  {phase} ({took:.1f}s, flanneld exited {done.flanneld_exit}): {lost}")
        assert subnet_of(lab, TAKEN) == subnets[TAKEN], f"{phase}: h1 renumbered"
        assert lab.leases() == leases, f"{phase} changed a lease"
        log = lab.agent_log(TAKEN, last_run=True)
        if backend == "udp":
            if first:
                # The gap: flanneld's exit deletes its flannel0; the agent's guard makes flannel0 again with
                # the encap on it. Seen by the lab (the guard's log line against flanneld's reaped exit,
                # which the kernel's deletion precedes) and by the guard itself (event to encap attached).
                restored = logged_at(lab, TAKEN, "flannel0 was deleted: made again")
                assert restored is not None, log
                guard_ms = float(_GUARD_RE.search(log).group(1))
                gap = restored - done.flanneld_stopped_at
                table.append(
                    f"  udp: flanneld reaped -> flannel0 back with encap (agent log) {gap * 1000:+.0f} ms; "
                    f"guard: deletion seen -> encap attached {guard_ms:.1f} ms; agent ready "
                    f"{done.flanneld_stopped_at - lab.agent(TAKEN).started_at:.1f}s before flanneld's SIGTERM"
                )
            route = lab.exec(TAKEN, ["ip", "route", "show", NETWORK]).stdout
            assert "dev flannel0 proto 102" in route, route
            assert lab.agent_status(TAKEN)["backend_status"]["datapath"] == "ebpf"
            allowed = int(UDP_GAP_GOAL / PING_INTERVAL) + IN_FLIGHT_SLACK
            assert max(lost.values()) <= allowed, f"udp {phase} lost {lost}: more than {UDP_GAP_GOAL * 1000:.0f} ms"
        else:
            assert not deleted, f"{backend}: peer routes deleted during the {phase}: {deleted}"
            assert all(v == 0 for v in lost.values()), f"{backend} {phase} lost pings: {lost}"
            routes = routes_to(lab, TAKEN, peers)
            assert set(routes) == peers and all(r.get("protocol") == "102" for r in routes.values()), routes
        if backend == "vxlan":
            assert "vxlan: adopting existing flannel.1" in log, log
            now = flannel1(lab, TAKEN)
            assert (now["ifindex"], now["address"]) == (device["ifindex"], device["address"]), (device, now)
        wait_full_mesh(lab, f"after the {phase}")

    take_over("takeover")

    # ---- hand-back
    monitor = RouteMonitor(lab, TAKEN)

    def hand_back():
        down, fd = lab.hand_back(TAKEN, overlap=backend == "udp")
        assert down.ok, down.stderr
        fd.wait_ready(60)
        return down

    lost, took, down = run_step(lab, "hand-back", hand_back)
    deleted = monitor.deletions(peers)
    table.append(f"  hand-back ({took:.1f}s): {lost}")
    assert lab.runs_flanneld(TAKEN) and not lab.agent_running(TAKEN)
    assert subnet_of(lab, TAKEN) == subnets[TAKEN], "the hand-back renumbered h1"
    assert lab.leases() == leases, "the hand-back changed a lease"
    if backend == "udp":
        # flanneld started beside the stopped agent's data path (its TUN is flannel1); `down` moved the
        # Network's route onto it in place, then removed the eBPF path.
        assert re.search(r"route 10\.5\.0\.0/16 moved to flannel\d+", down.stderr), down.stderr
        allowed = int(UDP_GAP_GOAL / PING_INTERVAL) + IN_FLIGHT_SLACK
        assert max(lost.values()) <= allowed, f"udp hand-back lost {lost}: more than {UDP_GAP_GOAL * 1000:.0f} ms"
    else:
        assert not deleted, f"{backend}: peer routes deleted during the hand-back: {deleted}"
        assert all(v == 0 for v in lost.values()), f"{backend} hand-back lost pings: {lost}"
    if backend == "vxlan":
        now = flannel1(lab, TAKEN)
        assert (now["ifindex"], now["address"]) == (device["ifindex"], device["address"]), (device, now)
    wait_full_mesh(lab, "after the hand-back")

    take_over("takeover again")
    print("\n" + "\n".join(table))


# ------------------------------------------------------------------ part 2: a rolling migration

ROLL_HOSTS = 6
ROLL_BACK = ("h2", "h5")  # handed back to flanneld after all six were migrated
ROLL_INTERVAL = 0.05  # 20 probes a second per pair, 30 pairs: the load a 2-core machine shared with others takes
ROLL_COUNT = 200  # >= 10 s per step
# udp eBPF, the path whose takeover overlaps flanneld's, in `make test` (CI's time is bounded: each backend
# takes about 1.6 minutes); FLANNEL_EBPF_ROLL_BACKENDS=udp,vxlan adds vxlan.
ROLL_BACKENDS = backends_from_env("FLANNEL_EBPF_ROLL_BACKENDS")


def step_table(steps: list[tuple[str, dict[str, int]]], labels: list[str]) -> str:
    """Pings lost per pair (rows) per step (columns)."""
    head = "pair".ljust(12) + "".join(name.rjust(10) for name, _ in steps)
    rows = [label.ljust(12) + "".join(str(lost[label]).rjust(10) for _, lost in steps) for label in labels]
    return "\n".join([head, *rows])


@pytest.mark.parametrize("backend", ROLL_BACKENDS)
def test_rolling_migration_of_a_six_host_cluster(lab_factory, backend):
    """Six flanneld hosts, one container each, all 30 pairs flooding during every step: each host in turn
    is taken over by flannel-ebpf, then two are handed back to flanneld. Each step loses nothing on
    vxlan; on udp only the pairs of the host being switched may lose, within the bounds of part 1."""
    lab = lab_factory(ROLL_HOSTS, network_config={"Network": NETWORK, "Backend": {"Type": backend}})
    subnets = start_flanneld_cluster(lab, backend)
    leases = lab.leases()
    labels = [label for label, _node, _dst in pairs(lab)]
    steps: list[tuple[str, dict[str, int]]] = []
    problems: list[str] = []
    udp_bound = int(UDP_GAP_GOAL / ROLL_INTERVAL) + IN_FLIGHT_SLACK if backend == "udp" else 0

    def check(name: str, host: str, lost: dict[str, int], bound: int) -> None:
        for label, n in lost.items():
            involved = label.startswith(f"{host}c") or f">{host}c" in label
            limit = bound if involved else 0
            if n > limit:
                problems.append(f"{name}: {label} lost {n} (allowed {limit})")

    for host in lab.host_names:

        def takeover(host=host):
            lab.takeover(host, overlap=backend == "udp")
            lab.wait_ready(host, 60)
            if backend == "udp":
                settled = ("hand-off attached", "no bridge hand-off needed")
                wait_for(lambda: any(s in lab.agent_log(host, last_run=True) for s in settled), 30, "hand-off")
                wait_for(lambda: _GUARD_RE.search(lab.agent_log(host, last_run=True)), 30, "flannel0 made again")

        lost, _took, _ = run_step(lab, f"takeover of {host}", takeover, ROLL_COUNT, ROLL_INTERVAL)
        steps.append((f"ebpf:{host}", lost))
        check(f"takeover of {host}", host, lost, udp_bound)

    for host in ROLL_BACK:

        def hand_back(host=host):
            down, fd = lab.hand_back(host, overlap=backend == "udp")
            assert down.ok, down.stderr
            fd.wait_ready(60)

        lost, _took, _ = run_step(lab, f"hand-back of {host}", hand_back, ROLL_COUNT, ROLL_INTERVAL)
        steps.append((f"back:{host}", lost))
        check(f"hand-back of {host}", host, lost, udp_bound)

    print(f"\n{backend}: pings lost per pair per step ({ROLL_COUNT} probes {ROLL_INTERVAL * 1000:.0f} ms apart)")
    print(step_table(steps, labels))
    totals = {name: sum(lost.values()) for name, lost in steps}
    print(f"{backend}: lost per step, all pairs: {totals}")
    assert {h: subnet_of(lab, h) for h in lab.host_names} == subnets, "a host was renumbered"
    assert lab.leases() == leases, "a lease changed during the migration"
    assert [h for h in lab.host_names if lab.runs_flanneld(h)] == list(ROLL_BACK)
    assert all(lab.agent_running(h) for h in lab.host_names if h not in ROLL_BACK)
    matrix = lab.ping_matrix(count=3, interval=0.1, timeout=1.0)
    assert len(matrix.results) == ROLL_HOSTS * (ROLL_HOSTS - 1) and matrix.all_ok, matrix.format()
    assert not problems, "\n".join(problems)
