"""The benchmark: one namespace lab, one backend after another, the same measurements for each.

    python -m flannel_ebpf.bench [--quick] [--out DIR] [--backends udp-tun,vxlan,...]

Lab: 2 hosts on one flat underlay (a veth per host into a bridge inside a switch namespace), etcd in a
namespace of its own, one container per host. For every overlay backend, container to container:
iperf3 TCP with 1 and 4 streams, iperf3 UDP with 64-byte payloads at an unlimited rate (packets/s that
arrive), ICMP echo round-trip times (p50/p99 of many pings at a short interval) and the CPU the TCP
1-stream run costs per gigabit. "none" measures the same between the two hosts' own underlay addresses,
with no agent running: the floor under every overlay.

Between backends the agents get SIGTERM, `flannel-ebpf down --release-lease` runs on every host, the
containers go, and whatever `down` left behind (a program on eth0, a device, a route, a pin) is removed
and reported, so that one backend's leftovers can never slow down or break the next. A backend that
fails (the agent does not start, no ping gets through, ...) is recorded with its error and the run goes
on; the lab is always closed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO, cast

from loguru import logger

from flannel_ebpf.bench.report import (
    BACKENDS,
    METRIC_KEYS,
    BackendResult,
    ReportFiles,
    RunMetadata,
    render_markdown,
    write_report,
)
from flannel_ebpf.lab.containers import BRIDGE, Container
from flannel_ebpf.lab.lab import Lab
from flannel_ebpf.lab.netns import Netns, delete_netns, run
from flannel_ebpf.lab.topology import Host
from flannel_ebpf.lab.traffic import (
    CpuTimes,
    iperf3_bits_per_second,
    iperf3_client,
    kernel_thread_pids,
    ping_rtts,
    process_cpu_seconds,
    read_cpu_times,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"
NETWORK = "10.5.0.0/16"
ETCD_PREFIX = "/coreos.com/network"
ROUTE_PROTOCOL = "102"  # flannel-ebpf's routes (netlink.routes.ROUTE_PROTOCOL); the bench must not import backends
IPERF_PORT = 5201
UDP_PAYLOAD = 64  # bytes of UDP payload: a small-packet rate, not a bandwidth
# Measured alongside the report's metrics, shown in its notes (BackendResult has no field for them).
MACHINE_CPU_KEY = "cpu_machine_s_per_gbit"
BACKGROUND_KEY = "cpu_background"


@dataclass(frozen=True)
class Durations:
    """How long each measurement runs. Every load is bounded by these (plus hard subprocess timeouts)."""

    tcp_seconds: float = 10.0  # each of the 1-stream and 4-stream runs
    udp_seconds: float = 8.0
    ping_count: int = 2000
    ping_interval: float = 0.001  # seconds between echo requests: a steady request/response stream
    idle_ping_count: int = 300
    idle_ping_interval: float = 0.01  # far enough apart that the CPUs go idle between them
    cpu_baseline_seconds: float = 2.0  # the machine's background CPU, measured before the TCP run
    ready_timeout: float = 60.0  # agents ready (bcc compiles the eBPF programs at start)
    # TCP is measured again in further rounds (every backend brought up anew each round) and the report
    # gives the median: on these 2-vCPU VMs one backend's TCP figure moved by up to 50% between two
    # bring-ups in a row, more than the differences between backends.
    rounds: int = 3
    ping_ready_timeout: float = 20.0  # first ping through the overlay after the agents are ready


DEFAULT_DURATIONS = Durations()
QUICK_DURATIONS = Durations(
    tcp_seconds=3, udp_seconds=3, ping_count=600, idle_ping_count=100, cpu_baseline_seconds=1, rounds=2
)


@dataclass(frozen=True)
class BackendSpec:
    """How to get one benchmark backend: the network config's Backend.Type and the agents' flags."""

    name: str
    backend_type: str | None  # None: no overlay, no agents
    agent_args: tuple[str, ...] = ()

    @property
    def overlay(self) -> bool:
        return self.backend_type is not None


SPECS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("udp-ebpf", "udp"),  # what a user gets: --udp-decap auto, --udp-delivery port
        BackendSpec("udp-ebpf-underlay", "udp", ("--udp-encap", "underlay")),
        BackendSpec("udp-ebpf-xdp", "udp", ("--udp-decap", "xdp")),
        BackendSpec("udp-ebpf-peer", "udp", ("--udp-delivery", "peer")),
        BackendSpec("udp-tun", "udp", ("--udp-datapath", "tun")),
        BackendSpec("vxlan", "vxlan"),
        BackendSpec("host-gw", "host-gw"),
        BackendSpec("none", None),
    )
}
assert tuple(SPECS) == BACKENDS, "the runner and the report must know the same backends"


@dataclass
class BenchOptions:
    backends: Sequence[str] = BACKENDS
    durations: Durations = DEFAULT_DURATIONS
    out_dir: Path = DEFAULT_OUT_DIR
    stem: str | None = None  # None: bench-<UTC timestamp> (bench-quick-... for --quick)
    quick: bool = False


@dataclass
class BenchRun:
    results: list[BackendResult]
    metadata: RunMetadata
    files: ReportFiles
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Endpoints:
    """Where the traffic of one backend runs: the client side and the server side, and the address the
    client sends to."""

    client: Netns
    server: Netns
    server_ip: str
    label: str


class Progress:
    """One line per step, with the time since the run started."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=self.stream, flush=True)


class BackendFailed(RuntimeError):
    """A backend could not be brought up or measured at all."""


# -------------------------------------------------------------------- the run


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchRun:
    """Measure every backend in `options.backends` in one lab, write the report, return it all."""
    say = progress or Progress()
    unknown = [b for b in options.backends if b not in SPECS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    d = options.durations
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    stem = options.stem or f"bench-{'quick-' if options.quick else ''}{stamp}"
    results: list[BackendResult] = []
    notes: list[str] = []
    machine_cpu: dict[str, str] = {}  # backend -> the whole-machine CPU figure, for the notes
    probes: dict[str, str] = {}  # what the eBPF agents found the kernel can do, for the report
    say(f"benchmark: {len(options.backends)} backends ({', '.join(options.backends)}); lab of 2 hosts")
    samples: dict[str, list[BackendResult]] = {name: [] for name in options.backends}
    orders: dict[int, list[str]] = {}
    lab = Lab(hosts=2, topology="flat")
    try:
        lab.up()
        for round_no in range(1, d.rounds + 1):
            order = round_order(options.backends, round_no, d.rounds)
            orders[round_no] = order
            say(f"round {round_no}: {', '.join(order)}")
            for i, name in enumerate(order, start=1):
                if round_no > 1 and not samples[name][0].ok:
                    continue  # failed in the full round: not retried
                spec = SPECS[name]
                tag = f"[{i}/{len(options.backends)}{f' round {round_no}' if round_no > 1 else ''}] {name}"
                index = (round_no - 1) * len(options.backends) + i

                def say_tagged(message: str, tag: str = tag) -> None:
                    say(f"{tag}: {message}")

                try:
                    result = _bench_backend(
                        lab, spec, d, index, notes, machine_cpu, say_tagged, probes, full=round_no == 1
                    )
                except Exception as e:  # one backend failing must never end the run
                    error = _one_line(e)
                    say(f"{tag}: FAILED: {error}")
                    logger.debug("{} failed", name, exc_info=True)
                    result = BackendResult(name=name, error=error)
                finally:
                    _teardown_backend(lab, spec, notes, say_tagged)
                samples[name].append(result)
    finally:
        lab.close()
    for name in options.backends:
        results.append(_median_of_rounds(samples[name], notes))
    meta = _metadata(options, d, notes, machine_cpu, probes, orders)
    files = write_report(results, meta, options.out_dir, stem)
    say(f"written: {files.markdown}, {files.json}, {files.png or '(no chart)'}")
    return BenchRun(results, meta, files, notes)


def _bench_backend(
    lab: Lab,
    spec: BackendSpec,
    d: Durations,
    index: int,
    notes: list[str],
    machine_cpu: dict[str, str],
    say: Callable[[str], None],
    probes: dict[str, str],
    full: bool = True,
) -> BackendResult:
    """One bring-up of one backend: every measurement (`full`), or TCP with 1 and 4 streams only."""
    endpoints = _bring_up(lab, spec, d, index, say)
    if spec.overlay:
        probes[f"start_to_ready {spec.name}"] = _start_to_ready(lab, say)
    if spec.backend_type == "udp" and "tun" not in spec.agent_args:
        probe = _wait_for_ebpf_delivery(lab, d.ping_ready_timeout, say)
        if probe:
            probes.setdefault("kernel_features", probe)
        if "underlay" in spec.agent_args:
            _check_route_on_the_underlay(lab, endpoints)
    values: dict[str, float | None] = {}
    failures: list[str] = []

    def measure(what: str, fn: Callable[[], dict[str, float | None]]) -> None:
        # A single measurement failing keeps the others: its numbers stay empty and a note says why.
        try:
            values.update(fn())
        except Exception as e:
            failures.append(f"{what}: {_one_line(e)}")
            say(f"{what}: failed: {_one_line(e)}")

    server = lab.iperf3_server(endpoints.server, IPERF_PORT)
    try:
        measure("TCP 1 stream", lambda: _tcp_with_cpu(lab, endpoints, d, say))
        measure("TCP 4 streams", lambda: _tcp4(lab, endpoints, d, say))
        if full:
            measure("UDP small packets", lambda: _udp_small(lab, endpoints, d, say))
    finally:
        server.stop()
    if full:
        measure("RTT", lambda: _rtt(endpoints, d, say))
    if not any(v is not None for v in values.values()):
        raise BackendFailed("; ".join(failures) or "no measurement succeeded")
    notes += [f"{spec.name}: {f}" for f in failures]
    if not full:
        values.pop(MACHINE_CPU_KEY, None)
        values.pop(BACKGROUND_KEY, None)
        return replace(BackendResult(name=spec.name), **cast(dict[str, Any], values))
    if spec.name == "udp-ebpf":  # after the measurements: each loader once more, on a restart
        for loader in ("elf", "bcc"):
            try:
                for host in lab.host_names:
                    lab.stop_agent(host)  # SIGTERM: the data path stays, the next agent adopts it
                lab.start_agents((*spec.agent_args, "--loader", loader))
                lab.wait_all_ready(d.ready_timeout)
                probes[f"start_to_ready udp-ebpf --loader {loader} (restart)"] = _start_to_ready(lab, say)
            except Exception as e:
                notes.append(f"udp-ebpf restart with --loader {loader}: {_one_line(e)}")
    machine, background = values.pop(MACHINE_CPU_KEY, None), values.pop(BACKGROUND_KEY, None)
    if machine is not None and background is not None:
        machine_cpu[spec.name] = f"{machine:.3f} s/Gbit (background {background:.2f} CPUs busy)"
    return replace(BackendResult(name=spec.name), **cast(dict[str, Any], values))


def round_order(backends: Sequence[str], round_no: int, rounds: int) -> list[str]:
    """The order of the backends in one round: rotated by an even share of the list each round, so that no
    backend is measured in the same position (first after the lab came up, right after a given other
    backend) in every round. Deterministic, so that a run can be repeated as it was."""
    if not backends:
        return []
    shift = ((round_no - 1) * len(backends) // max(rounds, 1)) % len(backends)
    return [*backends[shift:], *backends[:shift]]


def _median_of_rounds(rounds: list[BackendResult], notes: list[str]) -> BackendResult:
    """The first (full) round's result with each metric measured in several rounds replaced by the
    median of its values; every round's value stays in `rounds` (None where that round failed)."""
    first = rounds[0]
    if not first.ok or len(rounds) == 1:
        return first
    medians: dict[str, float] = {}
    per_round: dict[str, tuple[float | None, ...]] = {}
    for key in METRIC_KEYS:
        each = tuple(r.value(key) if r.ok else None for r in rounds)
        values = [v for v in each if v is not None]
        if len(values) > 1:
            medians[key] = statistics.median(values)
            per_round[key] = each
            notes.append(f"{first.name} {key} per round: " + ", ".join(f"{v:.3g}" for v in values))
    return replace(first, rounds=per_round, **cast(dict[str, Any], medians))


def _bring_up(lab: Lab, spec: BackendSpec, d: Durations, index: int, say: Callable[[str], None]) -> Endpoints:
    """Config, agents, containers, and one ping that gets through; the endpoints to measure between."""
    h1, h2 = (lab.hosts[n] for n in lab.host_names[:2])
    if not spec.overlay:
        say("no overlay: host to host over the underlay, no agents")
        endpoints = Endpoints(_netns(h1), _netns(h2), str(h2.underlay_ip), f"{h1.name} -> {h2.name}")
    else:
        config = {"Network": NETWORK, "Backend": {"Type": spec.backend_type}}
        say(f"config {json.dumps(config)}; agents {' '.join(spec.agent_args) or '(default flags)'}")
        lab.set_network_config(config)
        lab.start_agents(spec.agent_args)
        t0 = time.monotonic()
        ready = lab.wait_all_ready(d.ready_timeout)
        say(f"agents ready in {time.monotonic() - t0:.1f}s: " + "; ".join(f"{h} {r}" for h, r in ready.items()))
        # A fresh name per backend: the previous containers' host-side veths are never in the way.
        c1 = lab.add_container(h1, f"{h1.name}b{index}")
        c2 = lab.add_container(h2, f"{h2.name}b{index}")
        say(f"containers {c1} on {h1.name}, {c2} on {h2.name} (mtu {c1.mtu})")
        endpoints = Endpoints(c1.ns, c2.ns, str(c2.ip), f"{c1.name} -> {c2.name}")
    _wait_for_ping(endpoints, d.ping_ready_timeout)
    say(f"ping {endpoints.label} ok")
    return endpoints


_READY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) .*\bready: subnet", re.MULTILINE)
_LOADED_LINE = re.compile(r"programs loaded by the (\w+) loader in ([\d.]+)s")


def _start_to_ready(lab: Lab, say: Callable[[str], None]) -> str:
    """Per host, from the agent's start (process spawned) to its `ready:` log line, and for the eBPF udp
    path which loader loaded the programs and how long that took; as one line for the report."""
    parts = []
    for host in lab.host_names:
        agent, log = lab.agents[host], lab.agent_log(host, last_run=True)
        ready = _READY_LINE.search(log)
        if ready is None or not agent.started_at:
            parts.append(f"{host} ?")
            continue
        stamp = dt.datetime.strptime(ready.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        loaded = _LOADED_LINE.search(log)
        how = f" ({loaded.group(1)} loader: programs loaded in {float(loaded.group(2)):.3f} s)" if loaded else ""
        parts.append(f"{host} {stamp - agent.started_at:.2f} s{how}")
    line = "; ".join(parts)
    say(f"start to ready: {line}")
    return line


_KERNEL_PROBE = re.compile(r"kernel \S+: DECAP_L4_UDP .*")
_SETTLED = ("hand-off attached", "no bridge hand-off needed", "delivery: bridge", "delivery: peer")


def _wait_for_ebpf_delivery(lab: Lab, timeout: float, say: Callable[[str], None]) -> str | None:
    """The eBPF udp agents hook the container bridge once it exists (default delivery): measure only once
    that happened (a clsact added under traffic costs a packet). Returns what their kernel probe found."""
    deadline = time.monotonic() + timeout
    for host in lab.host_names[:2]:
        while not any(mark in lab.agent_log(host, last_run=True) for mark in _SETTLED):
            if time.monotonic() >= deadline:
                raise BackendFailed(f"the agent on {host} did not settle its container delivery in {timeout:.0f}s")
            time.sleep(0.2)
    probe = _KERNEL_PROBE.search(lab.agent_log(lab.host_names[0], last_run=True))
    if probe:
        say(probe.group(0))
    return probe.group(0) if probe else None


def _check_route_on_the_underlay(lab: Lab, e: Endpoints) -> None:
    """--udp-encap underlay measured only if it is in use: the peer container is routed out of the
    underlay interface itself (else the figures would be flannel0's under another name)."""
    client = lab.host(lab.host_names[0])
    found = lab.exec(client, ["ip", "-4", "-o", "route", "get", e.server_ip], check=False).stdout.split()
    device = found[found.index("dev") + 1] if "dev" in found else None
    if device != client.iface:
        raise BackendFailed(f"--udp-encap underlay: {e.server_ip} is routed out of {device}, not the underlay")


def _wait_for_ping(e: Endpoints, timeout: float) -> None:
    """The peers learn each other's leases through the etcd watch: allow them a moment."""
    deadline = time.monotonic() + timeout
    while True:
        summary, _ = ping_rtts(e.client, e.server_ip, count=1, interval=0.2, timeout=1)
        if summary.received:
            return
        if time.monotonic() >= deadline:
            raise BackendFailed(f"no ping {e.label} ({e.server_ip}) got through within {timeout:.0f}s")
        time.sleep(0.3)


# -------------------------------------------------------------------- measurements


def _iperf3(e: Endpoints, seconds: float, **kw: Any) -> dict[str, Any]:
    return iperf3_client(e.client, e.server_ip, seconds, port=IPERF_PORT, **kw)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far: the lab's own processes (see `_lab_cpu_pids`), the finished children of this
    process (the iperf3 client, once it exited), and the whole machine."""

    processes: float
    children: float
    machine: CpuTimes
    at: float  # time.monotonic()

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSample:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(process_cpu_seconds(pids), usage.ru_utime + usage.ru_stime, read_cpu_times(), time.monotonic())


def _lab_cpu_pids(lab: Lab) -> list[int]:
    """What a TCP run makes busy: every process inside the lab's namespaces (the iperf3 server, the
    agents and whatever they started, e.g. the userspace TUN path's proxy that forwards every packet) and
    the ksoftirqd threads (softirq work deferred off the senders). The iperf3 client is counted through
    RUSAGE_CHILDREN when it exits."""
    pids = set(kernel_thread_pids("ksoftirqd/"))
    etcd = lab.etcd_ns.name if lab.etcd_ns is not None else None  # the control plane: not per packet
    for name in lab.namespaces():
        if name != etcd:
            pids.update(Netns(name).pids())
    return sorted(pids)


def _tcp_with_cpu(lab: Lab, e: Endpoints, d: Durations, say: Callable[[str], None]) -> dict[str, float | None]:
    """TCP, 1 stream, and the CPU it costs per gigabit received.

    Primary figure: CPU time of the processes the run makes busy (`_lab_cpu_pids` + the client). This
    machine may run other work at the same time; those processes do not count. For comparison, the
    whole machine's busy time (/proc/stat), less its background rate measured just before, goes into the
    report's notes."""
    pids = _lab_cpu_pids(lab)
    idle_start = CpuSample.take(pids)
    time.sleep(d.cpu_baseline_seconds)
    before = CpuSample.take(pids)
    background_rate = (before.machine - idle_start.machine).busy / max(1e-6, before.at - idle_start.at)

    report = _iperf3(e, d.tcp_seconds, streams=1)
    after = CpuSample.take(pids)

    gbps = iperf3_bits_per_second(report) / 1e9
    gbits = float(report["end"]["sum_received"]["bytes"]) * 8 / 1e9
    if gbits <= 0:
        raise BackendFailed("the TCP run moved no data")
    lab_cpu = (after.processes - before.processes) + (after.children - before.children)
    machine_cpu = max(0.0, (after.machine - before.machine).busy - background_rate * (after.at - before.at))
    cpu_per_gbit = lab_cpu / gbits
    say(
        f"TCP 1 stream: {gbps:.2f} Gbit/s; CPU {lab_cpu:.2f} s for {gbits:.1f} Gbit = {cpu_per_gbit:.3f} s/Gbit "
        f"(whole machine: {machine_cpu / gbits:.3f} s/Gbit, background {background_rate:.2f} CPUs busy)"
    )
    return {
        "tcp1_gbps": gbps,
        "cpu_s_per_gbit": cpu_per_gbit,
        MACHINE_CPU_KEY: machine_cpu / gbits,
        BACKGROUND_KEY: background_rate,
    }


def _tcp4(lab: Lab, e: Endpoints, d: Durations, say: Callable[[str], None]) -> dict[str, float | None]:
    gbps = iperf3_bits_per_second(_iperf3(e, d.tcp_seconds, streams=4)) / 1e9
    say(f"TCP 4 streams: {gbps:.2f} Gbit/s")
    return {"tcp4_gbps": gbps}


def udp_received_pps(report: dict[str, Any]) -> float:
    """Packets per second that reached the iperf3 server (sent less lost, as the server counted them)."""
    end = report["end"]
    summary = end.get("sum_received") or end["sum"]
    packets = int(summary["packets"]) - int(summary.get("lost_packets", 0))
    seconds = float(summary.get("seconds") or end["sum"]["seconds"])
    if seconds <= 0:
        raise ValueError("iperf3 UDP report with no duration")
    return max(0, packets) / seconds


def _udp_small(lab: Lab, e: Endpoints, d: Durations, say: Callable[[str], None]) -> dict[str, float | None]:
    # -b 0: as fast as the sender can go; what arrives is what the path sustains.
    report = _iperf3(e, d.udp_seconds, udp=True, length=UDP_PAYLOAD, bitrate="0")
    pps = udp_received_pps(report)
    summary = report["end"].get("sum_received") or report["end"]["sum"]
    say(f"UDP {UDP_PAYLOAD}-byte: {pps:,.0f} packets/s received (lost {summary.get('lost_percent', 0):.1f}%)")
    return {"udp_small_pps": pps}


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _rtt(e: Endpoints, d: Durations, say: Callable[[str], None]) -> dict[str, float | None]:
    """Round trips twice: a steady stream (1 ms apart: the path itself), and pings far apart, between which
    the lab's CPUs go idle. On these VMs the idle figure is mostly the cost of waking cold CPUs and caches:
    it moved 4x with the spacing alone and ranked host-gw behind every overlay in one run."""

    def measure(count: int, interval: float, what: str) -> list[float]:
        _, rtts = ping_rtts(e.client, e.server_ip, count=count, interval=interval, timeout=1)
        if len(rtts) < max(2, count // 2):
            raise BackendFailed(f"only {len(rtts)} of {count} pings answered")
        say(f"RTT {what}, {len(rtts)} pings {interval * 1000:g} ms apart: p50 {percentile(rtts, 50):.3f} ms, "
            f"p99 {percentile(rtts, 99):.3f} ms (mean {statistics.fmean(rtts):.3f})")  # fmt: skip
        return rtts

    steady = measure(d.ping_count, d.ping_interval, "steady")
    idle = measure(d.idle_ping_count, d.idle_ping_interval, "idle")
    return {
        "rtt_p50_ms": percentile(steady, 50),
        "rtt_p99_ms": percentile(steady, 99),
        "rtt_idle_p50_ms": percentile(idle, 50),
    }


# -------------------------------------------------------------------- between backends


def _teardown_backend(lab: Lab, spec: BackendSpec, notes: list[str], say: Callable[[str], None]) -> None:
    """Agents off, `down --release-lease`, containers gone, and anything left behind removed (and noted:
    a leftover is a bug in `down` worth knowing about). Never raises."""
    for host in lab.host_names:
        try:
            if lab.agent_running(host):
                code = lab.stop_agent(host)
                if code not in (0, None):
                    notes.append(f"{spec.name}: agent on {host} exited {code} on SIGTERM")
            if lab.agent(host).ever_started and spec.overlay:
                r = lab.agent_down(host, ["--release-lease"])
                if not r.ok:
                    notes.append(f"{spec.name}: `down` on {host} exited {r.returncode}: {_one_line(r.stderr)}")
        except Exception as e:
            notes.append(f"{spec.name}: stopping {host}: {_one_line(e)}")
    for c in list(lab.containers):
        _remove_container(lab, c)
    leftovers: list[str] = []
    for name in lab.host_names:
        try:
            leftovers += _scrub_host(lab, lab.hosts[name])
        except Exception as e:
            leftovers.append(f"{name}: scrub failed: {_one_line(e)}")
    try:
        stale = lab.etcd_delete(f"{ETCD_PREFIX}/subnets/", prefix=True)
        if stale:
            leftovers.append(f"{stale} lease(s) still in etcd")
    except Exception as e:
        leftovers.append(f"etcd cleanup failed: {_one_line(e)}")
    if leftovers and spec.overlay:
        notes.append(f"{spec.name}: left behind after `down` (removed by the bench): {'; '.join(leftovers)}")
        say(f"cleaned up what `down` left: {'; '.join(leftovers)}")
    else:
        say("torn down")


def _remove_container(lab: Lab, c: Container) -> None:
    host_ns = _netns(c.host)
    # Deleting the host end removes the pair at once (a namespace's devices go asynchronously).
    host_ns.ip("link", "del", c.host_veth, check=False)
    delete_netns(c.netns)
    lab.containers.remove(c)


def _scrub_host(lab: Lab, host: Host) -> list[str]:
    """Remove whatever an overlay left in a host namespace (only inside the lab); say what it was."""
    ns = _netns(host)
    found: list[str] = []
    for dev in ("flannel0", "flannel.1", BRIDGE):
        if ns.ip("link", "show", dev, check=False).ok:
            if dev != BRIDGE:  # docker0 is the containers' bridge, not the agent's: expected
                found.append(f"{host.name}: device {dev}")
            ns.ip("link", "del", dev, check=False)
    link = json.loads(ns.ip("-j", "-d", "link", "show", host.iface).stdout or "[{}]")[0]
    if "xdp" in link:
        found.append(f"{host.name}: XDP program on {host.iface}")
        for mode in ("xdp", "xdpgeneric", "xdpdrv"):
            ns.ip("link", "set", "dev", host.iface, mode, "off", check=False)
    qdiscs = ns.exec(["tc", "qdisc", "show", "dev", host.iface], check=False).stdout
    if "clsact" in qdiscs:
        found.append(f"{host.name}: clsact qdisc on {host.iface}")
        ns.exec(["tc", "qdisc", "del", "dev", host.iface, "clsact"], check=False)
    routes = ns.ip("route", "show", "proto", ROUTE_PROTOCOL, check=False).stdout.strip()
    if routes:
        found.append(f"{host.name}: routes {routes.replace(chr(10), ', ')}")
        ns.ip("route", "flush", "proto", ROUTE_PROTOCOL, check=False)
    pins = lab.pin_dir(host)
    if pins.exists() and any(pins.iterdir()):
        found.append(f"{host.name}: pins in {pins}")
        shutil.rmtree(pins, ignore_errors=True)
    # `down` removes the subnet file; a stale one would address the next backend's containers wrongly.
    host.subnet_file.unlink(missing_ok=True)
    return found


# -------------------------------------------------------------------- helpers


def _netns(host: Host) -> Netns:
    assert isinstance(host.node, Netns)
    return host.node


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = str(e) if isinstance(e, str) else (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The last lines of a failure (e.g. an agent's log tail) say most; keep the first and the last.
    flat = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _iperf3_version() -> str:
    r = run(["iperf3", "--version"], check=False, timeout=10)
    return (r.stdout.splitlines() or ["?"])[0].strip()


def _metadata(
    options: BenchOptions,
    d: Durations,
    notes: list[str],
    machine_cpu: dict[str, str],
    probes: dict[str, str],
    orders: dict[int, list[str]],
) -> RunMetadata:
    extra = {
        "order": "; ".join(f"round {n}: {', '.join(order)}" for n, order in sorted(orders.items()))
        + " (round 1 measures everything, later rounds TCP only; the order rotates between rounds)",
        "mode": "quick" if options.quick else "default",
        "lab": "2 hosts (network namespaces) on one flat veth underlay bridge (MTU 1500), one container each; "
        "overlays measured container to container, 'none' host to host over the underlay, no agents",
        "iperf3": _iperf3_version(),
        "tcp": f"iperf3 TCP, {d.tcp_seconds:g} s per run, 1 and 4 streams, receiver's rate",
        "udp": f"iperf3 -u -l {UDP_PAYLOAD} -b 0 for {d.udp_seconds:g} s: packets/s the server received",
        "rtt": f"ICMP echo (ping), {d.ping_count} requests {d.ping_interval * 1000:g} ms apart (p50/p99), then "
        f"{d.idle_ping_count} requests {d.idle_ping_interval * 1000:g} ms apart (p50, idle): of the "
        "per-reply round-trip times",
        "cpu": "CPU seconds during the TCP 1-stream run, divided by the gigabits received; counted: every "
        "process in the lab's namespaces (iperf3 server, agents, the TUN path's proxy; all threads), the "
        "iperf3 client and the ksoftirqd threads (scheduler time from "
        "/proc/<pid>/task/*/schedstat and RUSAGE_CHILDREN; with tick accounting and no IRQ time accounting "
        "the softirq work of the network stack, eBPF programs included, is charged to the task it ran on). "
        "Other work on the machine is not counted",
        "cpu_whole_machine": "the same run by /proc/stat (all CPUs busy time less the background rate "
        f"measured over {d.cpu_baseline_seconds:g} s just before): "
        + ("; ".join(f"{k} {v}" for k, v in machine_cpu.items()) or "none measured"),
    }
    extra.update(probes)
    if notes:
        extra["notes"] = " | ".join(notes)
    return RunMetadata.current(**extra)


# -------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flannel_ebpf.bench",
        description="Benchmark flannel-ebpf's backends in a namespace lab (needs root).",
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (the run takes ~2 minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output directory ({DEFAULT_OUT_DIR})")
    parser.add_argument("--stem", default=None, help="file name stem (default bench-<UTC timestamp>)")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, in the order to run (default: {','.join(BACKENDS)})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="the lab's debug log on stderr")
    args = parser.parse_args(argv)

    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in SPECS]
    if unknown or not backends:
        parser.error(f"unknown backends {unknown}; choose among {','.join(BACKENDS)}")
    if os.geteuid() != 0:
        parser.error("the benchmark needs root (it builds network namespaces)")
    if shutil.which("iperf3") is None:
        parser.error("iperf3 is not installed (Debian: apt-get install iperf3)")
    options = BenchOptions(
        backends=backends,
        durations=QUICK_DURATIONS if args.quick else DEFAULT_DURATIONS,
        out_dir=args.out,
        stem=args.stem,
        quick=args.quick,
    )
    bench = run_bench(options)
    print()
    print(render_markdown(bench.results, bench.metadata))
    return 0 if any(r.ok for r in bench.results) else 1
