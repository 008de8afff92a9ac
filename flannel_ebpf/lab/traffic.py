"""Traffic inside the lab: ping (parsed), a ping matrix, flood ping, iperf3. Every load is bounded in time
(ping's -w deadline, iperf3's -t, and a hard subprocess timeout above both)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from .netns import ExecResult, Node, stop_process

_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received(?:, \+(\d+) errors)?")
_RTT_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


@dataclass(frozen=True)
class PingResult:
    src: str
    dst: str
    sent: int
    received: int
    errors: int = 0
    rtt_min: float | None = None  # milliseconds
    rtt_avg: float | None = None
    rtt_max: float | None = None
    rtt_mdev: float | None = None
    output: str = field(default="", repr=False)

    @property
    def loss(self) -> float:
        """Lost fraction, 0.0 .. 1.0 (1.0 when nothing was sent)."""
        return 1.0 if self.sent == 0 else (self.sent - self.received) / self.sent

    @property
    def ok(self) -> bool:
        """Every probe answered."""
        return self.sent > 0 and self.received == self.sent

    @property
    def reachable(self) -> bool:
        return self.received > 0

    def __str__(self) -> str:
        rtt = f", rtt {self.rtt_avg:.3f} ms" if self.rtt_avg is not None else ""
        return f"{self.src} -> {self.dst}: {self.received}/{self.sent}{rtt}"


def parse_ping(output: str, src: str = "", dst: str = "") -> PingResult:
    """Parse iputils ping's summary; an unparsable output counts as nothing sent."""
    m = _SUMMARY_RE.search(output)
    if not m:
        return PingResult(src, dst, 0, 0, output=output)
    r = _RTT_RE.search(output)
    rtts: list[float | None] = [float(x) for x in r.groups()] if r else [None] * 4
    rtt_min, rtt_avg, rtt_max, rtt_mdev = rtts
    sent, received, errors = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return PingResult(src, dst, sent, received, errors, rtt_min, rtt_avg, rtt_max, rtt_mdev, output=output)


def ping(
    node: Node, dst: str, count: int = 3, interval: float = 0.2, timeout: float = 2.0, size: int | None = None
) -> PingResult:
    """`count` echo requests from inside `node`; waits at most count*interval + timeout seconds."""
    deadline = max(1, int(count * interval + timeout + 0.999))
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), "-w", str(deadline)]
    if size is not None:
        argv += ["-s", str(size)]
    res = node.exec([*argv, str(dst)], timeout=deadline + 10, check=False)
    return parse_ping(res.stdout + res.stderr, node.name, str(dst))


def flood_ping(node: Node, dst: str, seconds: float = 3.0, size: int = 56, df: bool = False) -> PingResult:
    """`ping -f` for `seconds` (root only; loss and rtt under load). df: forbid fragmentation."""
    deadline = max(1, int(seconds))
    argv = ["ping", "-n", "-q", "-f", "-w", str(deadline), "-s", str(size)]
    if df:
        argv += ["-M", "do"]
    res = node.exec([*argv, str(dst)], timeout=deadline + 10, check=False)
    return parse_ping(res.stdout + res.stderr, node.name, str(dst))


def count_flood(
    node: Node, dst: str, count: int = 1000, interval: float = 0.002, size: int = 56, deadline: float | None = None
) -> PingResult:
    """A count-bounded flood: echo requests `interval` apart until `count` are answered, so ping stops on an
    answer and no probe is still in flight when it exits (`ping -f -w` counts the probe in flight at its
    deadline as lost: off by one). Lost = sent - received, exactly, as long as replies take less than
    `interval`. `deadline` (default: twice the nominal time + 5 s) bounds a run that loses everything."""
    deadline = deadline or count * interval * 2 + 5
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", "-w", str(max(1, int(deadline)))]
    res = node.exec([*argv, "-s", str(size), str(dst)], timeout=deadline + 10, check=False)
    return parse_ping(res.stdout + res.stderr, node.name, str(dst))


def probe_flood(node: Node, dst: str, count: int = 1000, interval: float = 0.002, size: int = 56) -> PingResult:
    """Exactly `count` echo requests `interval` apart, then up to a second for the last answers: lost =
    sent - received, exactly. Unlike `count_flood` (whose -w deadline makes ping exit on the first ICMP
    error), an error answer (net unreachable while a route is missing) does not end it, so a step that
    breaks a path for a while is measured to its end. Bounded by a hard timeout of 3x the nominal time."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", "-s", str(size), str(dst)]
    res = node.exec(argv, timeout=count * interval * 3 + 15, check=False)
    return parse_ping(res.stdout + res.stderr, node.name, str(dst))


class FloodCounter:
    """Count-bounded floods back to back in a thread until `stop()`: the pings a fault loses, exactly (each
    flood ends on an answer; the gaps between floods, a few ms each, are not measured)."""

    def __init__(self, node: Node, dst: str, segment: int = 1000, interval: float = 0.002) -> None:
        self.node, self.dst, self.segment, self.interval = node, dst, segment, interval
        self.results: list[PingResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FloodCounter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(count_flood(self.node, self.dst, self.segment, self.interval))

    def stop(self) -> PingResult:
        """Let the flood under way finish, then sum them all."""
        self._stop.set()
        self._thread.join()
        return PingResult(
            self.node.name,
            self.dst,
            sum(r.sent for r in self.results),
            sum(r.received for r in self.results),
            sum(r.errors for r in self.results),
        )


@dataclass
class Endpoint:
    """One side of a ping: a label, the node to run in and the address others use to reach it."""

    label: str
    node: Node
    ip: str


@dataclass
class PingMatrix:
    endpoints: list[Endpoint]
    results: dict[tuple[str, str], PingResult]

    @property
    def all_ok(self) -> bool:
        return all(r.reachable for r in self.results.values())

    def failures(self) -> list[PingResult]:
        return [r for r in self.results.values() if not r.reachable]

    def format(self) -> str:
        """A table: rows are sources, columns destinations; ✓ with the average rtt, or ✗."""
        labels = [e.label for e in self.endpoints]
        width = max(12, *(len(x) for x in labels)) + 1
        lines = ["from \\ to".ljust(width) + "".join(lbl.ljust(width) for lbl in labels)]
        for src in labels:
            cells = []
            for dst in labels:
                r = self.results.get((src, dst))
                if r is None:
                    cells.append("-".ljust(width))
                elif r.reachable:
                    loss = f" {r.loss:.0%}" if r.loss else ""
                    cells.append(f"✓ {r.rtt_avg or 0:.3f}ms{loss}".ljust(width))
                else:
                    cells.append("✗".ljust(width))
            lines.append(src.ljust(width) + "".join(cells))
        return "\n".join(lines)


def ping_matrix(
    endpoints: Sequence[Endpoint],
    count: int = 3,
    interval: float = 0.2,
    timeout: float = 2.0,
    include_self: bool = False,
    parallel: int = 4,
) -> PingMatrix:
    pairs = [(s, d) for s in endpoints for d in endpoints if include_self or s.label != d.label]

    def one(pair: tuple[Endpoint, Endpoint]) -> PingResult:
        s, d = pair
        r = ping(s.node, d.ip, count, interval, timeout)
        return PingResult(s.label, d.label, r.sent, r.received, r.errors, r.rtt_min, r.rtt_avg, r.rtt_max,
                          r.rtt_mdev, r.output)  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = list(pool.map(one, pairs))
    return PingMatrix(list(endpoints), {(r.src, r.dst): r for r in results})


@dataclass
class IperfServer:
    """An iperf3 server inside a namespace, stopped by its own PID (never by name)."""

    node: Node
    port: int = 5201
    log_path: Path | None = None
    idle_timeout: int = 120  # the server exits by itself if a crashed lab forgets it
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> IperfServer:
        argv = ["iperf3", "-s", "-p", str(self.port), "--idle-timeout", str(self.idle_timeout)]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = self.node.popen(argv, stdout=out, stderr=out)
        finally:
            if not isinstance(out, int):
                out.close()
        time.sleep(0.3)  # let it bind before a client connects
        if self.proc.poll() is not None:
            raise RuntimeError(f"iperf3 server in {self.node.name} exited with {self.proc.returncode}")
        logger.debug("iperf3 server pid {} in {} port {}", self.proc.pid, self.node.name, self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
        self.proc = None

    def __enter__(self) -> IperfServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iperf3_client(
    node: Node,
    server_ip: str,
    seconds: float = 5.0,
    streams: int = 1,
    port: int = 5201,
    udp: bool = False,
    bitrate: str | None = None,
    length: int | None = None,
    reverse: bool = False,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Run an iperf3 client for `seconds`; returns iperf3's JSON report (raises if it fails)."""
    t = max(1, int(seconds))
    argv = ["iperf3", "-c", str(server_ip), "-p", str(port), "-t", str(t), "-P", str(streams), "-J",
            "--connect-timeout", "3000"]  # fmt: skip
    if udp:
        argv.append("-u")
    if bitrate:
        argv += ["-b", bitrate]
    if length:
        argv += ["-l", str(length)]
    if reverse:
        argv.append("-R")
    argv += list(extra)
    res: ExecResult = node.exec(argv, timeout=t + 20, check=False)
    try:
        report: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"iperf3 in {node.name}: no JSON report (exit {res.returncode}): {res.stderr}") from e
    if "error" in report:
        raise RuntimeError(f"iperf3 in {node.name}: {report['error']}")
    return report


def iperf3_bits_per_second(report: dict[str, Any]) -> float:
    """The receiver's throughput (TCP), or the sender's for UDP reports."""
    end = report.get("end", {})
    if "sum_received" in end:
        return float(end["sum_received"]["bits_per_second"])
    return float(end["sum"]["bits_per_second"])


# -------------------------------------------------------------------- benchmark helpers

_RTT_LINE_RE = re.compile(r"time[=<]([\d.]+) ms")


def ping_rtts(
    node: Node, dst: str, count: int = 100, interval: float = 0.01, timeout: float = 2.0, size: int | None = None
) -> tuple[PingResult, list[float]]:
    """`count` echo requests `interval` seconds apart (intervals under 0.2 s need root); returns the
    summary and every reply's round-trip time in milliseconds, in order. Bounded in time: on a busy
    machine requests go out later than `interval` apart, so the deadline allows twice the nominal time."""
    deadline = max(1, int(2 * count * interval + timeout + 0.999))
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), "-w", str(deadline)]
    if size is not None:
        argv += ["-s", str(size)]
    res = node.exec([*argv, str(dst)], timeout=deadline + 10, check=False)
    output = res.stdout + res.stderr
    rtts = [float(m.group(1)) for m in _RTT_LINE_RE.finditer(res.stdout)]
    return parse_ping(output, node.name, str(dst)), rtts


@dataclass(frozen=True)
class CpuTimes:
    """The whole machine's CPU time from /proc/stat (all CPUs summed), in seconds. Network namespaces
    share one kernel, so this counts every lab namespace, softirq work included (and anything else the
    machine runs at the same time)."""

    busy: float  # user + nice + system + irq + softirq + steal
    idle: float  # idle + iowait

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - other.busy, self.idle - other.idle)


def read_cpu_times(path: str | Path = "/proc/stat") -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat (in USER_HZ ticks) as seconds."""
    return parse_cpu_times(Path(path).read_text(), str(path))


def parse_cpu_times(proc_stat: str, where: str = "/proc/stat") -> CpuTimes:
    """`read_cpu_times` of a /proc/stat text (read on another machine: a VM of the Vagrant lab)."""
    hz = float(os.sysconf("SC_CLK_TCK"))  # USER_HZ: 100 on every Linux/x86 kernel
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
            ticks = [int(x) for x in fields[1:9]] + [0] * max(0, 9 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
            return CpuTimes((user + nice + system + irq + softirq + steal) / hz, (idle + iowait) / hz)
    raise RuntimeError(f"no aggregate cpu line in {where}")


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time so far of these processes, all their threads summed (scheduler nanoseconds from
    /proc/<pid>/task/*/schedstat). Without IRQ time accounting the kernel charges softirq work (most of a
    veth lab's network stack) to the task it ran on, so this includes it. A PID that is gone counts 0."""
    total_ns = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue
        for task in tasks:
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue  # the thread ended meanwhile
    return total_ns / 1e9


def kernel_thread_pids(name_prefix: str = "ksoftirqd/") -> list[int]:
    """PIDs of kernel threads by name, e.g. every CPU's ksoftirqd (softirq work deferred off a task)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith(name_prefix):
                pids.append(int(comm.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


class PairFloods:
    """One flood of `count` probes (`probe_flood`) per (source, destination) pair, all at once, each in a
    thread: the pings a step (a takeover, a hand-back) loses, per pair, exactly. `wait()` joins them."""

    def __init__(self, pairs: Sequence[tuple[str, Node, str]], count: int, interval: float) -> None:
        #: (label "src->dst", node to ping from, destination address)
        self.pairs = list(pairs)
        self.count, self.interval = count, interval
        self.results: dict[str, PingResult | BaseException] = {}
        self.ended: dict[str, float] = {}  # time.time() each flood ended
        self._threads: list[threading.Thread] = []

    def start(self) -> PairFloods:
        for label, node, dst in self.pairs:
            thread = threading.Thread(target=self._run, args=(label, node, dst), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _run(self, label: str, node: Node, dst: str) -> None:
        try:
            self.results[label] = probe_flood(node, dst, self.count, self.interval)
        except BaseException as e:  # handed to the caller by wait()
            self.results[label] = e
        self.ended[label] = time.time()

    def wait(self) -> dict[str, PingResult]:
        """Every flood's result (raises the first flood that failed to run)."""
        for thread in self._threads:
            thread.join(self.count * self.interval * 3 + 30)
        out: dict[str, PingResult] = {}
        for label, _node, _dst in self.pairs:
            r = self.results.get(label)
            if not isinstance(r, PingResult):
                raise RuntimeError(f"flood {label} did not finish: {r!r}")
            out[label] = r
        return out

    @staticmethod
    def lost(results: dict[str, PingResult]) -> dict[str, int]:
        return {label: r.sent - r.received for label, r in results.items()}
