"""`make soak`: an hour of churn on one backend, in a namespace lab.

Six hosts (one container each) on a three-member etcd cluster; every ordered pair of containers pings
in count-bounded floods (each flood ends on an answer, so sent - received is exactly what was lost) for
the whole run, while a seeded random schedule, printed at the start and replayable with `--seed`:

- kills an agent with SIGKILL and restarts it (same arguments) after a hold of 1-5 s;
- stops one etcd member (SIGTERM or SIGKILL) for 5-20 s: quorum kept;
- once, stops two members for 15 s: quorum lost;
- once, removes a host (SIGTERM, then `down --release-lease`) and later adds a new one.

The agents run with `--subnet-lease-ttl 60` (renewed at half-life, every 30 s) and `--ip-masq`. The two
first hosts are never killed or removed: their agents live the whole run, so their memory is measured
over all of it. Every `--check-every` seconds (60) and at the end it records, and at the end asserts:

- pings lost: none on any pair (a pair with a removed or not yet added host does not flood);
- each agent process's RSS within 10% of its value once it has run for the warm-up (5 minutes; a third
  of the run for runs under 15 minutes), open fds and threads flat (at most FD_SLACK / THREAD_SLACK more
  than then);
- nothing left of the removed host: its pins, routes, flannel devices and iptables chains in its own
  namespace; routes, nexthops, neighbours, FDB entries and eBPF peer/member entries for it on the
  others; its subnet and presence keys and the etcd leases they had.

Writes `soak-<backend>-<stamp>.{md,json}` under --out (bench/results/). Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger

from flannel_ebpf.bench.runner import DEFAULT_OUT_DIR
from flannel_ebpf.lab.traffic import count_flood

BACKENDS = ("udp", "vxlan")
NETWORK = "10.5.0.0/16"
INITIAL_HOSTS = ("h1", "h2", "h3", "h4", "h5", "h6")
NEW_HOST = "h7"
STABLE_HOSTS = ("h1", "h2")  # never killed or removed: their agents live the whole run
ETCD_MEMBERS = 3
LEASE_TTL = 60
AGENT_FLAGS = (
    "--subnet-lease-ttl", str(LEASE_TTL),
    "--subnet-lease-renew-margin", "1",  # minutes; longer than TTL/2, so renewals come at half-life
    "--lease-check-interval", "2",
    "--ip-masq",
)  # fmt: skip
QUORUM_LOSS_SECONDS = 15.0
RSS_TOLERANCE = 0.10
FD_SLACK = 8  # gRPC reconnects and short-lived sockets (iptables, netlink) come and go
THREAD_SLACK = 4  # the asyncio default executor starts its threads lazily
LEFTOVER_GRACE = 30.0  # seconds after `down --release-lease` until nothing of the removed host may remain
PING_INTERVAL = 0.04  # 25 pings a second per pair: 30 pairs keep 2 cores far from busy
SEGMENT_SECONDS = 10.0  # one flood (ping process) per pair lasts this long


# ------------------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Event:
    """One fault, planned `at` seconds after the floods start."""

    at: float
    kind: str  # agent-kill, etcd-stop, quorum-loss, host-remove, host-add
    target: str  # a host name, or etcd member numbers ("2", "1+3")
    hold: float = 0.0  # seconds down before the restart
    signal: str = ""  # etcd: TERM or KILL (of every member it stops)

    def describe(self) -> str:
        what = {
            "agent-kill": f"kill -9 the agent on {self.target}, restart it after {self.hold:.1f} s",
            "etcd-stop": f"SIG{self.signal} etcd member {self.target}, start it after {self.hold:.1f} s",
            "quorum-loss": f"SIG{self.signal} etcd members {self.target} (quorum lost), start them after "
            f"{self.hold:.0f} s",
            "host-remove": f"remove {self.target}: SIGTERM its agent, `down --release-lease`",
            "host-add": f"add {self.target}: start its agent and a container, flood to and from it",
        }[self.kind]
        return f"{self.at:7.1f}s  {what}"


#: planning estimates of how long each kind takes beyond its hold (agent ready, etcd answering, ...)
_EXTRA = {"agent-kill": 6.0, "etcd-stop": 3.0, "quorum-loss": 6.0, "host-remove": 5.0, "host-add": 20.0}


def make_schedule(seed: int, duration: float) -> list[Event]:
    """The faults of a run of `duration` seconds: the same seed and duration give the same list.

    Every run has at least one agent kill, one single-member etcd stop, one quorum loss, one host
    removal and, after it, one host addition; the time left is filled with more agent kills and member
    stops. Nothing happens in the first `head` seconds or the last `tail` (the final check sees a lab
    that had time to settle)."""
    rng = random.Random(seed)
    short = duration < 600
    head, tail = (10.0, 25.0) if short else (30.0, 90.0)
    gap_lo, gap_hi = (3.0, 8.0) if short else (15.0, 45.0)
    end = duration - tail
    removed = rng.choice([h for h in INITIAL_HOSTS if h not in STABLE_HOSTS])
    alive = [h for h in INITIAL_HOSTS if h not in STABLE_HOSTS]  # agents the schedule may kill
    required = ["agent-kill", "etcd-stop", "quorum-loss", "host-remove"]
    rng.shuffle(required)
    add_after: int | None = None  # events still to come between the removal and the addition
    members = list(range(1, ETCD_MEMBERS + 1))
    holds = {"agent-kill": 5.0, "etcd-stop": 20.0, "quorum-loss": QUORUM_LOSS_SECONDS}  # the longest

    def estimate(kind: str) -> float:
        return holds.get(kind, 0.0) + _EXTRA[kind] + (gap_lo + gap_hi) / 2

    events: list[Event] = []
    t = head
    while True:
        owed = [*required, *(["agent-kill", "host-add"] if "host-remove" in required else [])]
        owed += ["host-add"] if add_after is not None else []
        if add_after == 0:
            kind = "host-add"
        elif required and (
            t + estimate("etcd-stop") + sum(estimate(k) for k in owed) >= end  # no room for a filler first
            or rng.random() < len(required) * estimate("etcd-stop") / max(1.0, end - t)
        ):
            kind = required.pop(0)  # its turn (spread over the run)
        elif not owed and t + estimate("etcd-stop") > end:
            break
        else:
            kind = rng.choice(["agent-kill", "etcd-stop"])
        if add_after is not None:
            add_after = None if kind == "host-add" else add_after - 1
        at = round(t, 1)
        if kind == "agent-kill":
            event = Event(at, kind, rng.choice(alive), hold=round(rng.uniform(1.0, 5.0), 1))
        elif kind == "etcd-stop":
            event = Event(at, kind, str(rng.choice(members)), round(rng.uniform(5.0, 20.0), 1),
                          rng.choice(["TERM", "KILL"]))  # fmt: skip
        elif kind == "quorum-loss":
            pair = sorted(rng.sample(members, 2))
            event = Event(at, kind, "+".join(map(str, pair)), QUORUM_LOSS_SECONDS, rng.choice(["TERM", "KILL"]))
        elif kind == "host-remove":
            event = Event(at, kind, removed)
            alive.remove(removed)
            add_after = 1  # one more fault while the host is gone, then the new one joins
        else:
            event = Event(at, kind, NEW_HOST)
            alive.append(NEW_HOST)
        if not owed and t + event.hold + _EXTRA[kind] > end:
            break  # a filler that would run into the quiet tail
        events.append(event)
        t += event.hold + _EXTRA[kind] + rng.uniform(gap_lo, gap_hi)
    return events


def warmup_seconds(duration: float) -> float:
    """How long an agent process runs before its RSS, fds and threads become its baseline."""
    return 300.0 if duration >= 900 else duration / 3


# ------------------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Segment:
    """One count-bounded flood of one pair."""

    src: str
    dst: str
    started: float  # seconds after the floods started
    ended: float
    sent: int
    received: int

    @property
    def lost(self) -> int:
        return self.sent - self.received


class PairFlood:
    """Floods from one container to another, back to back, until stopped (the flood under way ends)."""

    def __init__(self, src: Any, dst: Any, t0: float, out: list[Segment], lock: threading.Lock) -> None:
        self.src, self.dst, self.t0, self.out, self.lock = src, dst, t0, out, lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"flood-{src.name}-{dst.name}")

    def start(self) -> PairFlood:
        self._thread.start()
        return self

    def _run(self) -> None:
        count = int(SEGMENT_SECONDS / PING_INTERVAL)
        while not self._stop.is_set():
            began = time.monotonic() - self.t0
            r = count_flood(self.src.ns, str(self.dst.ip), count, PING_INTERVAL,
                            deadline=3 * SEGMENT_SECONDS + 10)  # fmt: skip
            seg = Segment(self.src.host.name, self.dst.host.name, round(began, 2),
                          round(time.monotonic() - self.t0, 2), r.sent, r.received)  # fmt: skip
            with self.lock:
                self.out.append(seg)

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()


# ----------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class ProcSample:
    at: float
    host: str
    pid: int
    rss_kib: int
    fds: int
    threads: int


def read_proc(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS KiB, open fds, threads) of a process; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(values["VmRSS"].split()[0]), fds, int(values["Threads"])


@dataclass
class Removed:
    """What the removed host had, to look for afterwards."""

    host: str
    subnet: str
    public_ip: str
    vtep_mac: str
    lease_ids: list[int]
    removed_at: float  # seconds after the floods started
    clean_after: float | None = None  # seconds from the removal until nothing was left
    left_at_first: list[str] = field(default_factory=list)  # what the first look after `down` still found


@dataclass
class Report:
    backend: str
    seed: int
    minutes: float
    check_every: float
    schedule: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)  # as run: planned, started, took, notes
    checks: list[dict[str, Any]] = field(default_factory=list)  # one per check: loss, procs, etcd, leftovers
    procs: list[ProcSample] = field(default_factory=list)
    pairs: dict[str, dict[str, int]] = field(default_factory=dict)  # "h1->h2": sent, lost
    removed: Removed | None = None
    lease_writes: dict[str, int] = field(default_factory=dict)  # host -> etcd version of its subnet key
    warmup: float = 0.0  # seconds an agent process runs before its baseline sample
    started_at: dict[str, float] = field(default_factory=dict)  # agent pid -> when it started (s after t0)
    violations: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


# ------------------------------------------------------------------------------------------- the run


class Soak:
    """One run; `lab_factory(hosts, **kw)` returns a Lab that is up (its owner closes it)."""

    def __init__(
        self,
        lab_factory: Callable[..., Any],
        backend: str,
        minutes: float,
        seed: int,
        check_every: float = 60.0,
        say: Callable[[str], None] = print,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
        self.lab_factory, self.backend, self.seed = lab_factory, backend, seed
        self.duration = minutes * 60.0
        self.check_every = check_every
        self.say = say
        self.schedule = make_schedule(seed, self.duration)
        self.warmup = warmup_seconds(self.duration)
        self.report = Report(backend, seed, minutes, check_every, [asdict(e) for e in self.schedule])
        self.lab: Any = None
        self.t0 = 0.0
        self.lock = threading.Lock()
        self.segments: list[Segment] = []
        self.floods: dict[tuple[str, str], PairFlood] = {}
        self.live: list[str] = list(INITIAL_HOSTS)  # hosts whose agent is meant to run and whose pairs flood
        self.started_at: dict[int, float] = {}  # agent pid -> seconds after t0 it started (negative: before)
        self._stop_sampler = threading.Event()

    # -------------------------------------------------------------------------- helpers

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, message: str) -> None:
        self.say(f"[{self.now():7.1f}s] {message}" if self.t0 else message)

    def _track_pid(self, host: str) -> None:
        proc = self.lab.agent(host).proc
        if proc is not None:
            self.started_at[proc.pid] = self.now() if self.t0 else -1.0

    def _state(self, host: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.lab.host(host).state_dir / "state.json").read_text())
        return state

    def _subnet(self, host: str) -> str:
        env = self.lab.subnet_env(host)
        return str(env.subnet.network) if env else ""

    def _knows_all(self, hosts: Sequence[str]) -> bool:
        subnets = {h: self._subnet(h) for h in hosts}
        try:
            return all(
                {s for o, s in subnets.items() if o != h} <= {p["subnet"] for p in self._state(h)["peers"]}
                for h in hosts
            )
        except (OSError, ValueError, KeyError):
            return False

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if predicate():
                return time.monotonic() - began
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    def _hooked(self, host: str) -> bool:
        """udp eBPF: the container bridge is hooked (adding its clsact qdisc under traffic drops a packet
        in the kernel: floods start only after it)."""
        if self.backend != "udp":
            return True
        log = self.lab.agent_log(host, last_run=True)
        return "hand-off attached" in log or "no bridge hand-off needed" in log

    def _container(self, host: str) -> Any:
        return self.lab.containers_of(host)[0]

    def _start_pair(self, src: str, dst: str) -> None:
        flood = PairFlood(self._container(src), self._container(dst), self.t0, self.segments, self.lock)
        self.floods[(src, dst)] = flood.start()

    def _stop_pairs(self, host: str) -> None:
        pairs = [p for p in self.floods if host in p]
        for p in pairs:
            self.floods[p].stop()
        for p in pairs:
            self.floods.pop(p).join()

    # -------------------------------------------------------------------------- set-up

    def bring_up(self) -> None:
        config = {"Network": NETWORK, "Backend": {"Type": self.backend}}
        self.lab = self.lab_factory(list(INITIAL_HOSTS), network_config=config, etcd_members=ETCD_MEMBERS)
        self.lab.start_agents(list(AGENT_FLAGS))
        self.lab.wait_all_ready(120)
        for h in INITIAL_HOSTS:
            self._track_pid(h)
            self.lab.add_container(h)
        self._wait(lambda: all(self._hooked(h) for h in INITIAL_HOSTS), 30, "container bridges hooked")
        self._wait(lambda: self._knows_all(INITIAL_HOSTS), 60, "a full mesh")
        self._wait(lambda: self.lab.ping_matrix(count=1, interval=0.2, timeout=1).all_ok, 60, "every pair answering")

    # -------------------------------------------------------------------------- events

    def run_event(self, event: Event) -> dict[str, Any]:
        began = self.now()
        self.note(f"event: {event.describe().strip()}")
        notes = getattr(self, f"_do_{event.kind.replace('-', '_')}")(event)
        took = self.now() - began
        self.note(f"  done in {took:.1f}s{': ' + notes if notes else ''}")
        return {**asdict(event), "started": round(began, 1), "took": round(took, 1), "notes": notes}

    def _do_agent_kill(self, event: Event) -> str:
        h = event.target
        code = self.lab.kill_agent(h)
        time.sleep(event.hold)
        self.lab.start_agent(h, list(AGENT_FLAGS))
        self._track_pid(h)
        ready = self._wait(lambda: self.lab.agent(h).health().stdout.startswith("ready"), 90, f"{h} ready")
        return f"exit {code}; ready {ready:.1f}s after the restart"

    def _etcd_members(self, target: str) -> list[Any]:
        return [self.lab.etcd.members[int(i) - 1] for i in target.split("+")]

    def _stop_members(self, members: list[Any], sig: str) -> None:
        for m in members:
            m.kill() if sig == "KILL" else m.stop()

    def _start_members(self, members: list[Any]) -> float:
        began = time.monotonic()
        for m in members:
            m.start(wait=False)
        for m in members:
            m.wait_ready(60)
        return time.monotonic() - began

    def _do_etcd_stop(self, event: Event) -> str:
        members = self._etcd_members(event.target)
        began = time.monotonic()
        self._stop_members(members, event.signal)
        try:  # a stopped leader costs an election first
            answered = f"etcd answered {self._wait(self.lab.etcd.answers, 15, 'two members to answer'):.1f}s after"
        finally:
            time.sleep(max(0.0, event.hold - (time.monotonic() - began)))
            back = self._start_members(members)
        return f"{answered}; member healthy {back:.1f}s after its start"

    def _do_quorum_loss(self, event: Event) -> str:
        members = self._etcd_members(event.target)
        self._stop_members(members, event.signal)
        time.sleep(0.5)
        lost = not self.lab.etcd.answers()
        time.sleep(max(0.0, event.hold - 0.5))
        back = self._start_members(members)
        answers = self._wait(self.lab.etcd.answers, 30, "etcd answering again")
        if not lost:
            raise RuntimeError(f"etcd still answered with members {event.target} stopped")
        return f"quorum lost; members healthy {back:.1f}s after their start, etcd answered {answers:.1f}s later"

    def _do_host_remove(self, event: Event) -> str:
        h = event.target
        with self.lock:
            self.live.remove(h)
        self._stop_pairs(h)
        state = self._state(h)
        subnet = self._subnet(h)
        public_ip = str(self.lab.host(h).underlay_ip)
        vtep_mac = ""
        lease_value = self.lab.leases().get(subnet.replace("/", "-"), {})
        if isinstance(lease_value, dict):
            vtep_mac = str((lease_value.get("BackendData") or {}).get("VtepMAC", ""))
        lease_ids = [self._key_lease(self._subnet_key(subnet)), self._key_lease(self._presence_key(public_ip))]
        lease_ids = [i for i in lease_ids if i] or [int(state.get("lease", {}).get("lease_id", 0))]
        code = self.lab.stop_agent(h)
        down = self.lab.agent_down(h, ["--release-lease"])
        removed = Removed(h, subnet, public_ip, vtep_mac, lease_ids, round(self.now(), 1))
        self.report.removed = removed
        downed = time.monotonic()
        removed.left_at_first = self.leftovers(removed)
        try:
            if removed.left_at_first:
                self._wait(lambda: not self.leftovers(removed), LEFTOVER_GRACE, f"nothing left of {h}")
            removed.clean_after = round(time.monotonic() - downed, 1)
        except RuntimeError:
            self.report.violations.append(
                f"{h} removed at {removed.removed_at}s, {LEFTOVER_GRACE:.0f}s later still: {self.leftovers(removed)}"
            )
        return (
            f"agent exit {code}; down exit {down.returncode}; subnet {subnet}, etcd leases "
            f"{', '.join(f'{i:x}' for i in lease_ids)}; nothing left after {removed.clean_after}s"
        )

    def _do_host_add(self, event: Event) -> str:
        h = event.target
        self.lab.add_host(h)
        # Not the removed host's subnet: everything of the new host on it would count as left of the removed one.
        held = {self._subnet(o) for o in self.live} | {self.report.removed.subnet if self.report.removed else ""}
        self.lab.pin_subnet(h, NETWORK, held)
        self.lab.start_agent(h, list(AGENT_FLAGS))
        self._track_pid(h)
        self.lab.wait_ready(h, 90)
        self.lab.add_container(h)
        peers = [*self.live, h]
        self._wait(lambda: self._hooked(h), 30, f"{h}'s container bridge hooked")
        seen = self._wait(lambda: self._knows_all(peers), 60, f"{h} and every host knowing each other")
        mine = [c for c in self.lab.containers if c.host.name in peers]
        self._wait(lambda: self.lab.ping_matrix(count=1, interval=0.2, timeout=1, containers=mine).all_ok,
                   60, "every pair answering")  # fmt: skip
        with self.lock:
            self.live.append(h)
        for other in peers[:-1]:
            self._start_pair(h, other)
            self._start_pair(other, h)
        return f"subnet {self._subnet(h)}; full mesh {seen:.1f}s after ready"

    # -------------------------------------------------------------------------- etcd reads

    def _subnet_key(self, subnet: str) -> str:
        return f"{self.lab.etcd_prefix}/subnets/{subnet.replace('/', '-')}"

    def _presence_key(self, public_ip: str) -> str:
        return f"{self.lab.etcd_prefix}/flannel-ebpf/hosts/{public_ip}"

    def _key_info(self, key: str) -> dict[str, Any] | None:
        kvs = json.loads(self.lab.etcd.ctl("get", key, "-w", "json", "--command-timeout", "3s")).get("kvs") or []
        return kvs[0] if kvs else None

    def _key_lease(self, key: str) -> int:
        info = self._key_info(key)
        return int(info.get("lease", 0)) if info else 0

    def _lease_alive(self, lease_id: int) -> bool:
        out = json.loads(self.lab.etcd.ctl("lease", "timetolive", f"{lease_id:x}", "-w", "json"))
        return int(out.get("ttl", -1)) > 0

    def etcd_leases(self) -> int:
        out = json.loads(self.lab.etcd.ctl("lease", "list", "-w", "json", "--command-timeout", "3s"))
        return len(out.get("leases") or [])

    # -------------------------------------------------------------------------- leftovers

    def _json(self, host: str, argv: list[str]) -> list[dict[str, Any]]:
        r = self.lab.exec(host, argv, check=False)
        if not r.ok or not r.stdout.strip():
            return []
        listed: list[dict[str, Any]] = json.loads(r.stdout)
        return listed

    def leftovers(self, removed: Removed) -> list[str]:
        """Everything that still names the removed host (empty: nothing left)."""
        found: list[str] = []
        h, subnet = removed.host, removed.subnet
        vtep_ip = str(IPv4Network(subnet).network_address) if subnet else ""
        # its own namespace
        pin_dir = self.lab.pin_dir(h)
        if pin_dir.exists():
            found.append(f"{h}: pin dir {pin_dir} ({', '.join(sorted(p.name for p in pin_dir.iterdir()))})")
        if self._json(h, ["ip", "-j", "route", "show", "proto", "102"]):
            found.append(f"{h}: its own proto-102 routes")
        links = {link["ifname"] for link in self._json(h, ["ip", "-j", "link", "show"])}
        found += [f"{h}: device {d}" for d in ("flannel0", "flannel.1") if d in links]
        for table in ("filter", "nat"):
            rules = self.lab.exec(h, ["iptables", "-w", "-t", table, "-S"], check=False).stdout
            found += [f"{h}: iptables -t {table}: {line}" for line in rules.splitlines() if "FLANNEL" in line]
        # the others' kernels
        with self.lock:
            others = list(self.live)
        for o in others:
            for r in self._json(o, ["ip", "-j", "route", "show"]):
                if r.get("dst") == subnet:
                    found.append(f"{o}: route {r}")
            for nh in self._json(o, ["ip", "-j", "nexthop", "show"]):
                if nh.get("gateway") in (vtep_ip, removed.public_ip):
                    found.append(f"{o}: nexthop {nh}")
            for n in self._json(o, ["ip", "-j", "neigh", "show"]):
                if n.get("dst") == vtep_ip or (removed.vtep_mac and n.get("lladdr") == removed.vtep_mac):
                    found.append(f"{o}: neighbour {n}")
            for f in self._json(o, ["bridge", "-j", "fdb", "show"]):
                if f.get("dst") == removed.public_ip or (removed.vtep_mac and f.get("mac") == removed.vtep_mac):
                    found.append(f"{o}: fdb {f}")
            if self.backend == "udp":
                found += self._bpf_leftovers(o, removed)
        # etcd
        with contextlib.suppress(RuntimeError):
            if self._key_info(self._subnet_key(subnet)):
                found.append(f"etcd: {self._subnet_key(subnet)}")
            if self._key_info(self._presence_key(removed.public_ip)):
                found.append(f"etcd: {self._presence_key(removed.public_ip)}")
            found += [f"etcd: lease {i:x} alive" for i in removed.lease_ids if self._lease_alive(i)]
        return found

    def _bpf_leftovers(self, host: str, removed: Removed) -> list[str]:
        from flannel_ebpf.datapath.maps import DatapathMapError, DatapathMaps

        try:
            with DatapathMaps(self.lab.pin_dir(host)) as maps:
                peers, members = maps.read_peers(), maps.read_members()
        except (DatapathMapError, OSError) as e:
            return [f"{host}: cannot read its pinned maps: {e}"]
        found = [f"{host}: fl_peers {s} -> {ip}" for s, ip in peers.items() if str(s) == removed.subnet]
        found += [f"{host}: fl_members {ip}" for ip in members if ip == IPv4Address(removed.public_ip)]
        return found

    # -------------------------------------------------------------------------- checks

    def check(self, final: bool = False) -> None:
        """One round of measurements (every check_every seconds, and at the end)."""
        at = round(self.now(), 1)
        with self.lock:
            live = list(self.live)
            segments = list(self.segments)
        previous = self.report.checks[-1]["at"] if self.report.checks else 0.0
        window = [s for s in segments if previous < s.ended <= at]
        entry: dict[str, Any] = {
            "at": at,
            "final": final,
            "pings_sent": sum(s.sent for s in window),
            "pings_lost": sum(s.lost for s in window),
            "lossy_pairs": sorted({f"{s.src}->{s.dst}" for s in window if s.lost}),
            "procs": {},
        }
        for h in live:
            proc = self.lab.agent(h).proc
            got = read_proc(proc.pid) if proc is not None else None
            if got is None:
                entry["procs"][h] = None
                continue
            sample = ProcSample(at, h, proc.pid, *got)
            self.report.procs.append(sample)
            entry["procs"][h] = {"pid": proc.pid, "rss_kib": got[0], "fds": got[1], "threads": got[2]}
        try:
            entry["etcd_leases"] = self.etcd_leases()
            entry["subnet_keys"] = len(self.lab.leases())
        except RuntimeError:
            entry["etcd_leases"] = entry["subnet_keys"] = None  # etcd has no quorum right now
        removed = self.report.removed
        if removed is not None and at - removed.removed_at >= LEFTOVER_GRACE:
            entry["leftovers"] = self.leftovers(removed)
        self.report.checks.append(entry)
        procs = " ".join(
            f"{h}={p['rss_kib'] / 1024:.1f}M/{p['fds']}fd/{p['threads']}t" if p else f"{h}=(restarting)"
            for h, p in entry["procs"].items()
        )
        self.note(f"check: {entry['pings_lost']} of {entry['pings_sent']} pings lost; etcd leases "
                  f"{entry['etcd_leases']}; {procs}")  # fmt: skip

    def _sampler(self) -> None:
        n = 1
        # the check due when the run ends is the final one (after the floods have stopped)
        while n * self.check_every < self.duration - 1 and not self._stop_sampler.wait(
            max(0.0, n * self.check_every - self.now())
        ):
            try:
                self.check()
            except Exception as e:  # a failed measurement is reported, it never ends the run
                self.report.violations.append(f"check at {self.now():.0f}s failed: {type(e).__name__}: {e}")
            n += 1

    def evaluate(self) -> None:
        """Turn the measurements into violations."""
        r = self.report
        for seg in self.segments:
            key = f"{seg.src}->{seg.dst}"
            pair = r.pairs.setdefault(key, {"sent": 0, "lost": 0, "floods": 0})
            pair["sent"] += seg.sent
            pair["lost"] += seg.lost
            pair["floods"] += 1
            if seg.lost:
                overlapping = [e["kind"] + " " + e["target"] for e in r.events
                               if e["started"] <= seg.ended and e["started"] + e["took"] >= seg.started]  # fmt: skip
                r.violations.append(
                    f"{seg.lost} of {seg.sent} pings lost {key} between {seg.started:.1f}s and {seg.ended:.1f}s "
                    f"(events then: {', '.join(overlapping) or 'none'})"
                )
            if seg.sent == 0:
                r.violations.append(f"a flood {key} at {seg.started:.1f}s sent nothing (could not run ping?)")
        with self.lock:
            live = list(self.live)
        for h in live:
            if not any(k.startswith(f"{h}->") for k in r.pairs):
                r.violations.append(f"{h} never flooded")
        by_pid: dict[int, list[ProcSample]] = {}
        for p in r.procs:
            by_pid.setdefault(p.pid, []).append(p)
        for pid, samples in by_pid.items():
            started = self.started_at.get(pid, -1.0)
            base = next((s for s in samples if s.at - started >= self.warmup), None)
            if base is None:
                continue
            for s in samples:
                if s.at <= base.at:
                    continue
                if abs(s.rss_kib - base.rss_kib) > RSS_TOLERANCE * base.rss_kib:
                    r.violations.append(
                        f"{s.host} agent {pid}: RSS {s.rss_kib} KiB at {s.at:.0f}s, "
                        f"{(s.rss_kib / base.rss_kib - 1):+.1%} of {base.rss_kib} KiB at {base.at:.0f}s"
                    )
                if s.fds > base.fds + FD_SLACK:
                    r.violations.append(
                        f"{s.host} agent {pid}: {s.fds} fds at {s.at:.0f}s, {base.fds} at {base.at:.0f}s"
                    )
                if s.threads > base.threads + THREAD_SLACK:
                    r.violations.append(
                        f"{s.host} agent {pid}: {s.threads} threads at {s.at:.0f}s, {base.threads} at {base.at:.0f}s"
                    )
        for c in r.checks:
            if c.get("leftovers"):
                r.violations.append(
                    f"at {c['at']:.0f}s, left of {r.removed.host if r.removed else '?'}: {c['leftovers']}"
                )
            for h, p in c["procs"].items():
                if p is None and c["final"]:
                    r.violations.append(f"{h}: no agent running at the end")
        if r.removed is None:
            r.violations.append("no host was removed (the schedule always removes one)")

    def final_state(self) -> None:
        with self.lock:
            live = list(self.live)
        for h in live:
            health = self.lab.agent(h).health().stdout.strip()
            if not health.startswith("ready"):
                self.report.violations.append(f"{h} not ready at the end: {health}")
        if not self._knows_all(live):
            self.report.violations.append(f"the live hosts {live} do not all know each other at the end")
        expected = {self._subnet(h).replace("/", "-") for h in live}
        keys = set(self.lab.leases())
        if keys != expected:
            self.report.violations.append(f"subnet keys at the end {sorted(keys)} != live hosts' {sorted(expected)}")
        for h in live:
            info = self._key_info(self._subnet_key(self._subnet(h)))
            self.report.lease_writes[h] = int(info.get("version", 0)) if info else 0

    # -------------------------------------------------------------------------- the whole run

    def run(self) -> Report:
        self.say(f"soak: {self.backend}, {self.duration / 60:g} min, seed {self.seed} (replay: --seed {self.seed})")
        self.say(f"agent flags: {' '.join(AGENT_FLAGS)}; baseline after {self.warmup:.0f}s of each agent's life")
        self.say("schedule:\n" + "\n".join(e.describe() for e in self.schedule))
        self.bring_up()
        self.t0 = time.monotonic()
        for h in INITIAL_HOSTS:
            self._track_pid(h)
        self.started_at = {pid: 0.0 for pid in self.started_at}  # started before t0: count from t0
        for src in INITIAL_HOSTS:
            for dst in INITIAL_HOSTS:
                if src != dst:
                    self._start_pair(src, dst)
        sampler = threading.Thread(target=self._sampler, daemon=True, name="soak-sampler")
        sampler.start()
        try:
            for event in self.schedule:
                time.sleep(max(0.0, event.at - self.now()))
                try:
                    self.report.events.append(self.run_event(event))
                except Exception as e:
                    self.report.violations.append(f"event {event.describe().strip()} failed: {type(e).__name__}: {e}")
                    self.report.events.append({**asdict(event), "started": round(self.now(), 1), "took": 0,
                                               "notes": f"FAILED: {e}"})  # fmt: skip
                    logger.error("soak event {} failed: {}: {}", event.kind, type(e).__name__, e)
            time.sleep(max(0.0, self.duration - self.now()))
        finally:
            self._stop_sampler.set()
            sampler.join()
            for flood in self.floods.values():
                flood.stop()
            for flood in self.floods.values():
                flood.join()
        self.check(final=True)
        self.report.warmup = self.warmup
        self.report.started_at = {str(pid): at for pid, at in self.started_at.items()}
        self.final_state()
        self.evaluate()
        return self.report


# ------------------------------------------------------------------------------------------- report


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def render(report: Report) -> str:
    r = report
    sent = sum(p["sent"] for p in r.pairs.values())
    lost = sum(p["lost"] for p in r.pairs.values())
    out = [
        f"# Soak: {r.backend}, {r.minutes:g} minutes, seed {r.seed}",
        "",
        f"{r.meta.get('date', '')}; {r.meta.get('machine', '')}. Replay: "
        f"`python -m flannel_ebpf.bench.soak --backend {r.backend} --minutes {r.minutes:g} --seed {r.seed}`.",
        "",
        f"**{'PASS' if r.ok else 'FAIL'}**: {lost} of {sent} pings lost over {len(r.pairs)} pairs; "
        f"{len(r.events)} events; {len(r.violations)} violations.",
        "",
        "## Events",
        "",
        "| planned | started | took | event | notes |",
        "|---:|---:|---:|---|---|",
    ]
    for e in r.events:
        ev = Event(e["at"], e["kind"], e["target"], e["hold"], e["signal"])
        out.append(f"| {e['at']:.0f} s | {e['started']:.0f} s | {e['took']:.1f} s | "
                   f"{ev.describe().split('s  ', 1)[1]} | {e['notes']} |")  # fmt: skip
    out += ["", "## Checks", "", "| at | pings sent | lost | etcd leases | subnet keys | leftovers |",
            "|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for c in r.checks:
        left = "-" if "leftovers" not in c else ("none" if not c["leftovers"] else f"{len(c['leftovers'])}")
        out.append(f"| {c['at']:.0f} s{' (end)' if c['final'] else ''} | {c['pings_sent']} | {c['pings_lost']} | "
                   f"{c['etcd_leases']} | {c['subnet_keys']} | {left} |")  # fmt: skip
    out += ["", "## Agents (RSS MiB / open fds / threads, per process)", ""]
    by_pid: dict[int, list[ProcSample]] = {}
    for p in r.procs:
        by_pid.setdefault(p.pid, []).append(p)
    out += ["| host | pid | samples | first | baseline | last | RSS vs baseline | fds max | threads max |",
            "|---|---:|---:|---|---|---|---:|---:|---:|"]  # fmt: skip
    for pid, ss in sorted(by_pid.items(), key=lambda kv: (kv[1][0].host, kv[1][0].at)):
        first, last = ss[0], ss[-1]
        base = next((s for s in ss if s.at - r.started_at.get(str(pid), 0.0) >= r.warmup), None)
        later = [s for s in ss if base is not None and s.at > base.at]
        dev = max((abs(s.rss_kib / base.rss_kib - 1) for s in later), default=None) if base else None

        def cell(s: ProcSample | None) -> str:
            return f"{s.at:.0f} s: {_mib(s.rss_kib)} / {s.fds} / {s.threads}" if s else "(ran too short)"

        out.append(
            f"| {first.host} | {pid} | {len(ss)} | {cell(first)} | {cell(base)} | {cell(last)} | "
            f"{'-' if dev is None else f'{dev:.1%}'} | {max(s.fds for s in ss)} | {max(s.threads for s in ss)} |"
        )
    if r.removed is not None:
        rm = r.removed
        out += ["", "## Removed host", "",
                f"{rm.host} (subnet {rm.subnet}, {rm.public_ip}{', VTEP ' + rm.vtep_mac if rm.vtep_mac else ''}) "
                f"removed at {rm.removed_at:.0f} s; nothing of it left after "
                f"{'never' if rm.clean_after is None else f'{rm.clean_after:.1f} s'}."]  # fmt: skip
        if rm.left_at_first:
            out += ["", "Still there at the first look after `down`:", ""]
            out += [f"- {x}" for x in rm.left_at_first]
    if r.lease_writes:
        out += ["", "Writes of each live host's subnet key (etcd version; renewals every 30 s): "
                + ", ".join(f"{h} {v}" for h, v in sorted(r.lease_writes.items())) + "."]  # fmt: skip
    hosts = sorted({k.split("->")[0] for k in r.pairs} | {k.split("->")[1] for k in r.pairs})
    out += ["", "## Pings per pair (lost in parentheses)", "", "| from \\ to | " + " | ".join(hosts) + " |",
            "|---|" + "---:|" * len(hosts)]  # fmt: skip
    for src in hosts:
        cells = []
        for dst in hosts:
            pair = r.pairs.get(f"{src}->{dst}")
            cells.append("" if pair is None else f"{pair['sent']}" + (f" ({pair['lost']})" if pair["lost"] else ""))
        out.append(f"| {src} | " + " | ".join(cells) + " |")
    out += ["", "## Violations", ""]
    out += [f"- {v}" for v in r.violations] or ["none"]
    return "\n".join(out) + "\n"


def write_report(report: Report, out_dir: Path) -> Path:
    now = dt.datetime.now(dt.UTC)
    report.meta.setdefault("date", now.strftime("%Y-%m-%d %H:%M UTC"))
    report.meta.setdefault("machine", f"{platform.node()}: kernel {platform.release()}, {os.cpu_count()} CPUs")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"soak-{report.backend}-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(render(report))
    data = asdict(report)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return stem


@contextlib.contextmanager
def _own_labs() -> Iterator[Callable[..., Any]]:
    from flannel_ebpf.lab.lab import Lab

    labs: list[Any] = []

    def make(hosts: Any, **kw: Any) -> Any:
        lab = Lab(hosts, **kw)
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_ebpf.bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="udp")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="replay a run's schedule (default: a new seed)")
    parser.add_argument("--check-every", type=float, default=60.0, help="seconds between checks (60)")
    parser.add_argument("--schedule-only", action="store_true", help="print the schedule and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    if args.schedule_only:
        print("\n".join(e.describe() for e in make_schedule(seed, args.minutes * 60)))
        return 0
    with _own_labs() as factory:
        soak = Soak(factory, args.backend, args.minutes, seed, args.check_every, say=lambda m: print(m, flush=True))
        report = soak.run()
    stem = write_report(report, args.out)
    print(render(report))
    print(f"written: {stem}.md, {stem}.json")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
