"""Where the cycles go, per skb: `perf record -a -g` of TCP per backend, side by side.

    python -m flannel_ebpf.bench.profile [--backends host-gw,udp,vxlan] [--seconds N] [--streams N]

The same lab as `make bench` (runner.py brings each backend up and tears it down): 2 hosts on a veth
underlay, one container per host on docker0. Per backend, iperf3 TCP (one stream, or `--streams`) from the
container on h1 to the container on h2 runs for N seconds; inside that run `perf record -a -g` samples the whole machine
for N - 1.5 s (after 1 s of ramp-up, ending before iperf3 does). A sample counts when it was taken in
one of the two iperf3 processes or in network softirq work (`net_rx_action` / `net_tx_action` on its
call chain, whichever task it interrupted); the rest of the machine's work is left out and its share
reported. Each counted sample's period goes to its leaf symbol (self time, as `perf report
--no-children --sort sym`), and is divided by the skbs the sending container's eth0 transmitted while
perf recorded (its tx_packets: a GSO skb counts once; the ACKs that come back are charged to the data skbs
they answer). Without a hardware PMU (these VMs) perf samples `cpu-clock`: its period is nanoseconds,
turned into cycles at the CPU's nominal clock from /proc/cpuinfo.

Everything the measurement starts runs at nice 19 (the process renices itself first): the cycles an
skb costs do not depend on priority, and the machine may be busy with other work. Every perf data
file lives in a temporary directory removed at the end, also on failure; the lab is always closed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from flannel_ebpf.bench.runner import (
    DEFAULT_DURATIONS,
    DEFAULT_OUT_DIR,
    IPERF_PORT,
    SPECS,
    BackendSpec,
    Endpoints,
    Progress,
    _bring_up,
    _one_line,
    _teardown_backend,
    _wait_for_ebpf_delivery,
)
from flannel_ebpf.lab.lab import Lab
from flannel_ebpf.lab.netns import Netns, run

DEFAULT_BACKENDS = ("host-gw", "udp-ebpf", "vxlan")
ALIASES = {"udp": "udp-ebpf"}
REFERENCE = "host-gw"  # the "difference" column: subject minus reference
SUBJECT = "udp-ebpf"
LABELS = {"udp-ebpf": "udp eBPF"}
DEFAULT_SECONDS = 8
MAX_SECONDS = 8  # a shared machine: no measured run longer than this
MAX_STREAMS = 8
RAMP_UP_SECONDS = 1.0  # connection set up and past slow start before perf starts
TAIL_SECONDS = 0.5  # perf ends before iperf3 does
TOP_ROWS = 30
NET_SOFTIRQ = frozenset({"net_rx_action", "net_tx_action"})
NICE = ("nice", "-n", "19")
PERF = "perf"


# -------------------------------------------------------------------- perf script, parsed (pure)


@dataclass(frozen=True)
class Frame:
    symbol: str
    dso: str


@dataclass(frozen=True)
class Sample:
    """One sample of `perf script -F comm,pid,tid,cpu,time,period,event,ip,sym,dso`: the interrupted
    task, its period (in the event's unit) and the call chain, leaf first."""

    comm: str
    pid: int
    tid: int
    cpu: int
    time: float
    period: int
    event: str
    frames: tuple[Frame, ...]

    @property
    def leaf(self) -> str:
        return symbol_name(self.frames[0]) if self.frames else "[no call chain]"


PERF_SCRIPT_FIELDS = "comm,pid,tid,cpu,time,period,event,ip,sym,dso"
_HEADER = re.compile(
    r"^(?P<comm>\S.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<time>\d+\.\d+):"
    r"\s+(?P<period>\d+)\s+(?P<event>[^\s:]+)(?::\S*)?\s*$"
)
_FRAME = re.compile(r"^\s+(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")
_BPF_PROG = re.compile(r"^bpf_prog_[0-9a-f]{16}_(?P<name>.+)$")


def parse_perf_script(lines: Iterable[str]) -> Iterator[Sample]:
    """The samples of `perf script` output with call chains (one header line, then one line per frame,
    a blank line after each sample). Lines that fit neither shape are skipped."""
    header: re.Match[str] | None = None
    frames: list[Frame] = []

    def emit() -> Sample | None:
        if header is None:
            return None
        return Sample(
            comm=header["comm"],
            pid=int(header["pid"]),
            tid=int(header["tid"]),
            cpu=int(header["cpu"]),
            time=float(header["time"]),
            period=int(header["period"]),
            event=header["event"],
            frames=tuple(frames),
        )

    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if (sample := emit()) is not None:
                yield sample
            header, frames = None, []
            continue
        if (new := _HEADER.match(line.strip())) is not None:
            if (sample := emit()) is not None:  # a header with no blank line before it
                yield sample
            header, frames = new, []
        elif header is not None and (m := _FRAME.match(line)):
            frames.append(Frame(m["sym"], m["dso"]))
    if (sample := emit()) is not None:
        yield sample


def symbol_name(frame: Frame) -> str:
    """A frame's name as the table shows it: kernel symbols as they are, eBPF programs without their tag
    (it changes with every load), user space with its binary."""
    m = _BPF_PROG.match(frame.symbol)
    if m:
        return f"bpf_prog_{m['name']} [eBPF]"
    if frame.dso == "[kernel.kallsyms]" or frame.dso.startswith("bpf_prog_"):
        return frame.symbol
    return f"{frame.symbol} [{Path(frame.dso).name or 'unknown'}]"


def is_kernel(symbol: str) -> bool:
    return not symbol.endswith("]") or symbol.endswith("[eBPF]")


def cycles_per_unit(event: str, cpu_mhz: float) -> float:
    """How many CPU cycles one unit of a sample's period is: 1 for `cycles`, the clock in GHz for the
    software clocks whose period is nanoseconds."""
    if event.startswith("cycles") or event.startswith("cpu-cycles"):
        return 1.0
    if event in ("cpu-clock", "task-clock"):
        if cpu_mhz <= 0:
            raise ValueError("a clock event needs the CPU's clock to give cycles")
        return cpu_mhz / 1000.0
    raise ValueError(f"perf event {event!r}: neither cycles nor a clock")


def cpu_mhz(cpuinfo: str) -> float:
    """The first `cpu MHz` of /proc/cpuinfo (0 if none)."""
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@dataclass
class Aggregate:
    """Cycles per leaf symbol of the counted samples, and what was left out."""

    cycles: dict[str, float] = field(default_factory=dict)
    inclusive: dict[str, float] = field(default_factory=dict)  # each symbol with its callees
    callers: dict[str, dict[str, float]] = field(default_factory=dict)  # symbol -> its caller -> cycles
    counted_samples: int = 0
    excluded_samples: int = 0
    excluded_cycles: float = 0.0
    in_iperf3_cycles: float = 0.0  # counted in the iperf3 processes (the rest: softirq in other tasks)
    cpu_cycles: dict[int, float] = field(default_factory=dict)  # CPU -> cycles of all its samples
    cpu_idle_cycles: dict[int, float] = field(default_factory=dict)  # CPU -> the idle task's, outside softirq
    first_time: float | None = None
    last_time: float | None = None
    event: str = ""

    @property
    def total(self) -> float:
        return sum(self.cycles.values())

    @property
    def idle_cycles(self) -> float:
        """Of the excluded: the idle task outside softirq, on every CPU."""
        return sum(self.cpu_idle_cycles.values())

    @property
    def span(self) -> float:
        """Seconds from the first to the last sample of any task: how long perf recorded."""
        if self.first_time is None or self.last_time is None:
            return 0.0
        return self.last_time - self.first_time


def counts(sample: Sample, traffic_pids: frozenset[int]) -> bool:
    """The iperf3 processes' own samples, and network softirq work wherever it ran."""
    if sample.pid in traffic_pids:
        return True
    return any(f.symbol in NET_SOFTIRQ for f in sample.frames)


def aggregate(samples: Iterable[Sample], traffic_pids: frozenset[int], cpu_mhz: float) -> Aggregate:
    agg = Aggregate()
    cycles: defaultdict[str, float] = defaultdict(float)
    inclusive: defaultdict[str, float] = defaultdict(float)
    callers: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
    factors: dict[str, float] = {}
    cpu_cycles: defaultdict[int, float] = defaultdict(float)
    cpu_idle: defaultdict[int, float] = defaultdict(float)
    for s in samples:
        if s.event not in factors:
            factors[s.event] = cycles_per_unit(s.event, cpu_mhz)
            agg.event = agg.event or s.event
        c = s.period * factors[s.event]
        agg.first_time = s.time if agg.first_time is None else min(agg.first_time, s.time)
        agg.last_time = s.time if agg.last_time is None else max(agg.last_time, s.time)
        cpu_cycles[s.cpu] += c
        if counts(s, traffic_pids):
            cycles[s.leaf] += c
            names = [symbol_name(f) for f in s.frames]
            for name in set(names):
                inclusive[name] += c
            for callee, caller in set(itertools.pairwise(names)):  # recursion counted once
                callers[callee][caller] += c
            agg.counted_samples += 1
            if s.pid in traffic_pids:
                agg.in_iperf3_cycles += c
        else:
            agg.excluded_samples += 1
            agg.excluded_cycles += c
            if s.pid == 0:
                cpu_idle[s.cpu] += c
    agg.cycles = dict(cycles)
    agg.cpu_cycles = dict(cpu_cycles)
    agg.cpu_idle_cycles = {cpu: cpu_idle.get(cpu, 0.0) for cpu in cpu_cycles}
    agg.inclusive = dict(inclusive)
    agg.callers = {leaf: dict(by) for leaf, by in callers.items()}
    return agg


def skbs_in_window(packets: int, wall_seconds: float, span_seconds: float) -> float:
    """The skbs sent while perf recorded: the rate the counters gave between the reads around perf (which
    include perf's start and end) times the span of its samples."""
    if wall_seconds <= 0 or packets <= 0:
        raise ValueError(f"no skbs counted ({packets} in {wall_seconds:.3f} s)")
    return packets * min(span_seconds, wall_seconds) / wall_seconds


# -------------------------------------------------------------------- per skb, side by side (pure)


@dataclass
class BackendProfile:
    name: str
    gbps: float
    skbs: float  # sent by the client container's eth0 while perf recorded
    bytes_per_skb: float
    span_s: float
    event: str
    cycles_per_unit: float
    cycles_per_skb: dict[str, float]  # leaf symbol -> cycles / skb
    inclusive_per_skb: dict[str, float]  # symbol -> cycles / skb of the samples with it on their call chain
    main_caller: dict[str, tuple[str, float]]  # symbol -> (its most frequent caller, that caller's share)
    excluded_share: float  # of all samples' cycles: idle and other work on the machine
    idle_share: float  # of all samples' cycles: the idle task
    softirq_elsewhere_share: float  # of the counted cycles: network softirq run in other tasks
    cpu_busy: dict[int, float] = field(default_factory=dict)  # CPU -> share of its samples not idle
    error: str | None = None

    @classmethod
    def failed(cls, name: str, error: str) -> BackendProfile:
        return cls(name, 0.0, 0.0, 0.0, 0.0, "", 0.0, {}, {}, {}, 0.0, 0.0, 0.0, error=error)

    @property
    def total(self) -> float:
        return sum(self.cycles_per_skb.values())

    def part(self, which: Callable[[str], bool]) -> float:
        return sum(v for k, v in self.cycles_per_skb.items() if which(k))


def backend_profile(
    name: str, agg: Aggregate, packets: int, tx_bytes: int, wall_seconds: float, gbps: float, cpu_mhz: float
) -> BackendProfile:
    skbs = skbs_in_window(packets, wall_seconds, agg.span)
    all_cycles = agg.total + agg.excluded_cycles
    return BackendProfile(
        name=name,
        gbps=gbps,
        skbs=skbs,
        bytes_per_skb=tx_bytes / packets,
        span_s=agg.span,
        event=agg.event,
        cycles_per_unit=cycles_per_unit(agg.event, cpu_mhz) if agg.event else 0.0,
        cycles_per_skb={k: v / skbs for k, v in agg.cycles.items()},
        inclusive_per_skb={k: v / skbs for k, v in agg.inclusive.items()},
        main_caller={leaf: _main_caller(by) for leaf, by in agg.callers.items()},
        excluded_share=agg.excluded_cycles / all_cycles if all_cycles else 0.0,
        idle_share=agg.idle_cycles / all_cycles if all_cycles else 0.0,
        softirq_elsewhere_share=1 - agg.in_iperf3_cycles / agg.total if agg.total else 0.0,
        cpu_busy={cpu: 1 - agg.cpu_idle_cycles.get(cpu, 0.0) / c for cpu, c in sorted(agg.cpu_cycles.items()) if c > 0},
    )


def _main_caller(by_caller: dict[str, float]) -> tuple[str, float]:
    total = sum(by_caller.values())
    name, cycles = max(by_caller.items(), key=lambda kv: (kv[1], kv[0]))
    return name, cycles / total if total else 0.0


def column_order(names: Sequence[str]) -> list[str]:
    """The reference first, the subject second, the rest as given."""
    first = [n for n in (REFERENCE, SUBJECT) if n in names]
    return first + [n for n in names if n not in first]


@dataclass(frozen=True)
class Row:
    symbol: str
    values: dict[str, float]  # backend -> cycles/skb (0 where the symbol had no sample)
    difference: float | None  # subject - reference


def compare(
    profiles: Sequence[BackendProfile], top: int = TOP_ROWS, inclusive: bool = False, skip: frozenset[str] = frozenset()
) -> list[Row]:
    """The symbols whose cycles per skb (self, or `inclusive` of their callees) differ most between the
    subject and the reference (or, without both, between the largest and smallest column), largest
    difference first."""
    ok = [p for p in profiles if p.error is None]
    by_name = {p.name: p for p in ok}

    def table(p: BackendProfile) -> dict[str, float]:
        return p.inclusive_per_skb if inclusive else p.cycles_per_skb

    symbols = sorted({s for p in ok for s in table(p)} - skip)
    rows = []
    for sym in symbols:
        values = {p.name: table(p).get(sym, 0.0) for p in ok}
        diff = values[SUBJECT] - values[REFERENCE] if SUBJECT in by_name and REFERENCE in by_name else None
        rows.append(Row(sym, values, diff))

    def key(r: Row) -> float:
        if r.difference is not None:
            return abs(r.difference)
        return max(r.values.values()) - min(r.values.values()) if r.values else 0.0

    rows.sort(key=lambda r: (-key(r), r.symbol))
    return rows[:top]


def totals(profiles: Sequence[BackendProfile]) -> list[Row]:
    ok = [p for p in profiles if p.error is None]
    have_diff = {SUBJECT, REFERENCE} <= {p.name for p in ok}
    parts: list[tuple[str, Callable[[BackendProfile], float]]] = [
        ("**all counted** (cycles/skb)", lambda p: p.total),
        ("kernel, eBPF included", lambda p: p.part(is_kernel)),
        ("of which eBPF programs", lambda p: p.part(lambda s: s.endswith("[eBPF]"))),
        ("user space (iperf3)", lambda p: p.part(lambda s: not is_kernel(s))),
        ("all counted, cycles per KiB sent", lambda p: p.total / p.bytes_per_skb * 1024),
    ]
    rows = []
    for label, fn in parts:
        values = {p.name: fn(p) for p in ok}
        rows.append(Row(label, values, values[SUBJECT] - values[REFERENCE] if have_diff else None))
    return rows


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f}"


def _signed(v: float | None) -> str:
    return "" if v is None else f"{v:+,.0f}"


# Stages of the path, each with its callees: where a difference in the self-time table comes from.
STAGES = (
    "tcp_sendmsg",
    "__ip_queue_xmit",
    "__dev_queue_xmit",
    "__qdisc_run",
    "sch_direct_xmit",
    "validate_xmit_skb",
    "__skb_gso_segment",
    "skb_segment",
    "tc_run",
    "skb_do_redirect",
    "ip_route_output_flow",
    "ip_route_output_key_hash_rcu",
    "neigh_resolve_output",
    "dev_hard_start_xmit",
    "veth_xmit",
    "__netif_receive_skb_core",
    "br_handle_frame",
    "ip_rcv",
    "ip_forward",
    "nf_hook_slow",
    "udp_rcv",
    "tcp_v4_rcv",
    "tcp_recvmsg",
    "net_rx_action",
)


def caller_chain(profile: BackendProfile, symbol: str, depth: int) -> str:
    """`symbol`'s most frequent caller, that one's, ... `depth` levels up, with each step's share."""
    steps: list[str] = []
    seen = {symbol}
    while len(steps) < depth and symbol in profile.main_caller:
        symbol, share = profile.main_caller[symbol]
        if symbol in seen:
            break
        seen.add(symbol)
        steps.append(f"{symbol} {share:.0%}")
    return " < ".join(steps)


def _caller_cell(row: Row, profiles: Sequence[BackendProfile], depth: int) -> str:
    """Where a row's function was called from: in the subject where it ran there, else where it cost
    most."""
    ranked = sorted(profiles, key=lambda p: (p.name != SUBJECT, -p.inclusive_per_skb.get(row.symbol, 0.0)))
    for p in ranked:
        if row.symbol in p.main_caller:
            return f"{caller_chain(p, row.symbol, depth)} ({LABELS.get(p.name, p.name)})"
    return ""


def _streams(n: int) -> str:
    return f"{n} stream" + ("s" if n != 1 else "")


def _cpus_busy(p: BackendProfile) -> str:
    return ", ".join(f"{share:.0%}" for _, share in sorted(p.cpu_busy.items()))


def render_markdown(
    profiles: Sequence[BackendProfile], meta: dict[str, str], top: int = TOP_ROWS, streams: int = 1
) -> str:
    names = column_order([p.name for p in profiles])
    ordered = sorted(profiles, key=lambda p: names.index(p.name))
    ok = [p for p in ordered if p.error is None]
    cols = [p.name for p in ok]
    diff_label = f"difference ({LABELS.get(SUBJECT, SUBJECT)} - {REFERENCE})"
    out = ["# Where the cycles go, per skb", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", f"| backend | TCP {_streams(streams)} (Gbit/s) | skbs in the window | bytes per skb | perf window (s) |"
            " idle (of all samples) | other tasks, left out | counted softirq that ran in other tasks |"
            " each CPU busy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in ordered:
        if p.error is not None:
            out.append(f"| {LABELS.get(p.name, p.name)} | failed: {p.error} | | | | | | | |")
            continue
        out.append(
            f"| {LABELS.get(p.name, p.name)} | {p.gbps:.2f} | {p.skbs:,.0f} | {p.bytes_per_skb:,.0f} | "
            f"{p.span_s:.2f} | {p.idle_share:.0%} | {p.excluded_share - p.idle_share:.0%} | "
            f"{p.softirq_elsewhere_share:.0%} | {_cpus_busy(p)} |"
        )
    if not ok:
        return "\n".join(out) + "\n"

    def table(title: str, rows: Sequence[Row], caller_depth: int) -> None:
        """`caller_depth` > 0: a column with where each function was called from, that many levels up."""
        callers = caller_depth > 0
        header = [title, *(LABELS.get(c, c) for c in cols), diff_label, *(["called from"] if callers else [])]
        out.extend(
            ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(cols) + 1) + ("---|" if callers else "")]
        )
        known = _all_symbols(ok)
        for row in rows:
            cells = [_num(row.values.get(c)) for c in cols]
            extra = ""
            if callers:
                extra = f" {_caller_cell(row, ok, caller_depth)} |" if row.symbol in known else " |"
            out.append(f"| {row.symbol} | " + " | ".join(cells) + f" | {_signed(row.difference)} |" + extra)

    table("function (self cycles per skb)", [*totals(ok), *compare(ok, top)], caller_depth=1)
    out.append("")
    out.append(
        f"The {top} functions whose self cycles per skb differ most (by the difference column), after the totals; "
        "0 where a function had no sample. Self time only: a function's callees have rows of their own."
    )
    staged = [r for r in compare(ok, top=sys.maxsize, inclusive=True) if r.symbol in STAGES]
    staged.sort(key=lambda r: STAGES.index(r.symbol))
    table("stage, with its callees (cycles per skb)", staged, caller_depth=3)
    out.append("")
    out.append(
        "The same samples, each counted once under every function on its call chain: the cost of a stage of "
        "the path with everything it called (stages nest, so the rows do not add up)."
    )
    return "\n".join(out) + "\n"


def _all_symbols(profiles: Sequence[BackendProfile]) -> set[str]:
    return {s for p in profiles for s in p.inclusive_per_skb}


def report_json(profiles: Sequence[BackendProfile], meta: dict[str, str]) -> dict[str, Any]:
    return {"meta": dict(meta), "backends": [asdict(p) for p in profiles]}


# -------------------------------------------------------------------- the measurement (root, a lab)


@dataclass
class ProfileOptions:
    backends: Sequence[str] = DEFAULT_BACKENDS
    seconds: int = DEFAULT_SECONDS
    streams: int = 1
    out_dir: Path = DEFAULT_OUT_DIR
    stem: str | None = None


def _tx_counters(ns: Netns, dev: str = "eth0") -> tuple[int, int, float]:
    """tx_packets, tx_bytes of a device in a namespace (`ip netns exec` mounts that namespace's sysfs),
    and when they were read."""
    stats = f"/sys/class/net/{dev}/statistics"
    r = ns.exec(["cat", f"{stats}/tx_packets", f"{stats}/tx_bytes"], timeout=10)
    packets, nbytes = (int(x) for x in r.stdout.split())
    return packets, nbytes, time.monotonic()


def _perf_script(data: Path, traffic_pids: frozenset[int], mhz: float) -> Aggregate:
    argv = [*NICE, PERF, "script", "-i", str(data), "-F", PERF_SCRIPT_FIELDS]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        try:
            agg = aggregate(parse_perf_script(proc.stdout), traffic_pids, mhz)
        finally:
            proc.stdout.close()
            proc.wait(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"perf script exited {proc.returncode}")
    return agg


def profile_backend(
    lab: Lab,
    spec: BackendSpec,
    seconds: int,
    streams: int,
    index: int,
    workdir: Path,
    mhz: float,
    say: Callable[[str], None],
) -> BackendProfile:
    """Bring the backend up (the bench's way), `streams` TCP streams under `perf record -a -g`, and the
    cycles per skb of every leaf symbol. The perf data file is deleted before returning."""
    endpoints: Endpoints = _bring_up(lab, spec, DEFAULT_DURATIONS, index, say)
    if spec.backend_type == "udp":
        _wait_for_ebpf_delivery(lab, DEFAULT_DURATIONS.ping_ready_timeout, say)
    data = workdir / f"perf-{spec.name}.data"
    window = seconds - RAMP_UP_SECONDS - TAIL_SECONDS
    server = lab.iperf3_server(endpoints.server, IPERF_PORT)
    try:
        assert server.proc is not None
        argv = [*NICE, "iperf3", "-c", endpoints.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                "-P", str(streams), "--connect-timeout", "3000"]  # fmt: skip
        client = endpoints.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(RAMP_UP_SECONDS)
            p0, b0, t0 = _tx_counters(endpoints.client)
            perf = [*NICE, PERF, "record", "-a", "-g", "-q", "-o", str(data), "--", "sleep", f"{window:.2f}"]
            rec = run(perf, check=False, timeout=window + 60)
            p1, b1, t1 = _tx_counters(endpoints.client)
            out, err = client.communicate(timeout=seconds + 30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
        if not rec.ok:
            raise RuntimeError(f"perf record exited {rec.returncode}: {_one_line(rec.stderr)}")
        report = json.loads(out.decode() or "{}")
        if client.returncode != 0 or "error" in report:
            raise RuntimeError(f"iperf3: {report.get('error') or _one_line(err.decode())}")
        gbps = float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
        pids = frozenset({client.pid, server.proc.pid})
    finally:
        server.stop()
    say(f"TCP {_streams(streams)} {gbps:.2f} Gbit/s; {p1 - p0:,} skbs in {t1 - t0:.2f} s; reading the profile")
    try:
        agg = _perf_script(data, pids, mhz)
    finally:
        data.unlink(missing_ok=True)
    prof = backend_profile(spec.name, agg, p1 - p0, b1 - b0, t1 - t0, gbps, mhz)
    say(f"{prof.total:,.0f} cycles per skb counted ({agg.counted_samples:,} samples, {prof.skbs:,.0f} skbs)")
    return prof


def run_profile(options: ProfileOptions, say: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    say = say or Progress()
    seconds = min(options.seconds, MAX_SECONDS)
    if seconds - RAMP_UP_SECONDS - TAIL_SECONDS < 0.5:
        raise ValueError(f"--seconds {options.seconds}: too short for a perf window")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    stem = options.stem or f"profile-{stamp}"
    mhz = cpu_mhz(Path("/proc/cpuinfo").read_text())
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    profiles: list[BackendProfile] = []
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="flannel-ebpf-profile-"))
    lab = Lab(hosts=2, topology="flat")
    try:
        lab.up()
        for index, name in enumerate(options.backends, start=1):
            spec = SPECS[name]

            def say_tagged(message: str, tag: str = f"[{index}/{len(options.backends)}] {name}") -> None:
                say(f"{tag}: {message}")

            try:
                profiles.append(profile_backend(lab, spec, seconds, options.streams, index, workdir, mhz, say_tagged))
            except Exception as e:  # one backend failing keeps the others
                say_tagged(f"FAILED: {_one_line(e)}")
                logger.debug("{} failed", name, exc_info=True)
                profiles.append(BackendProfile.failed(name, _one_line(e)))
            finally:
                _teardown_backend(lab, spec, notes, say_tagged)
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
    events = sorted({p.event for p in profiles if p.event})
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "lab": "make bench's: 2 hosts (namespaces) on a veth underlay (MTU 1500), one container each on docker0, "
        "default agent flags",
        "load": f"iperf3 TCP, {_streams(options.streams)}, container h1 -> container h2, {seconds:g} s; "
        "everything at nice 19",
        "perf": f"`perf record -a -g` for {seconds - RAMP_UP_SECONDS - TAIL_SECONDS:g} s from {RAMP_UP_SECONDS:g} s "
        f"into the run; event {', '.join(events) or '?'}"
        + (f" (no PMU: ns turned into cycles at {mhz:g} MHz)" if "cpu-clock" in events else ""),
        "counted": "samples in the iperf3 client and server, and network softirq work (net_rx_action / "
        "net_tx_action on the call chain) in any task; self time per leaf symbol",
        "per skb": "divided by the skbs the client container's eth0 sent in the perf window (tx_packets; a GSO "
        "skb counts once; the returning ACKs are charged to the data skbs)",
        "load average": f"{' '.join(load_before)} before, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
        "after (a busy machine: other work shares the 2 CPUs)",
    }
    if notes:
        meta["notes"] = " | ".join(notes)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    md, js = options.out_dir / f"{stem}.md", options.out_dir / f"{stem}.json"
    md.write_text(render_markdown(profiles, meta, streams=options.streams))
    js.write_text(json.dumps(report_json(profiles, meta), indent=2) + "\n")
    say(f"written: {md}, {js}")
    return md, js


# -------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flannel_ebpf.bench.profile",
        description="perf profile of TCP container to container per backend, cycles per skb side by side (needs root).",
    )
    parser.add_argument(
        "--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated (udp = udp-ebpf; default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=int, default=DEFAULT_SECONDS, help=f"the iperf3 run per backend (at most {MAX_SECONDS:g})"
    )
    parser.add_argument(
        "--streams", type=int, default=1, help=f"parallel TCP streams (iperf3 -P, 1 to {MAX_STREAMS}; default 1)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output directory (%(default)s)")
    parser.add_argument("--stem", default=None, help="file name stem (default profile-<UTC timestamp>)")
    parser.add_argument("-v", "--verbose", action="store_true", help="the lab's debug log on stderr")
    args = parser.parse_args(argv)

    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    backends = [ALIASES.get(b.strip(), b.strip()) for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in SPECS or not SPECS[b].overlay]
    if bad or not backends:
        parser.error(f"unknown backends {bad}; choose among udp, {', '.join(n for n, s in SPECS.items() if s.overlay)}")
    if not 3 <= args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be between 3 and {MAX_SECONDS:g}")
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be between 1 and {MAX_STREAMS}")
    if os.geteuid() != 0:
        parser.error("the profile needs root (network namespaces, perf -a)")
    for tool in (PERF, "iperf3"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install linux-perf iperf3)")
    os.nice(19)  # the lab, the agents and the iperf3 server inherit it; the measured commands say it again
    md, _ = run_profile(ProfileOptions(backends, args.seconds, args.streams, args.out, args.stem))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
