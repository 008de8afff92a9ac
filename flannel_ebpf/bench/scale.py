"""`make bench-scale`: the control plane and the data-path sync at cluster scale, on this machine.

Per backend, in a lab of its own (one host and a real etcd): N leases in flanneld's format are written
straight into etcd (flannel_ebpf.lab.leases: one key and one etcd lease per subnet, as N real flanneld
hosts would leave them), then one agent starts and must program all N peers. Measured:
- start to ready (process spawned -> its `ready:` log line, which comes after the first full sync),
  the agent's own listing and data-path sync times, and when every peer is in the kernel;
- one listing through the agent's registry code, timed on its own;
- the agent's memory (VmRSS, VmHWM);
- a burst of new leases written as fast as etcd takes them, until every one is in the kernel;
- a periodic relist (--subnet-relist-interval) at full size;
- the longest the agent's event loop was ever blocked (its own probe, loop_stall_max_ms in the state).

"In the kernel" is read from the kernel, not from the agent: the fl_peers map (udp), routes + FDB +
neighbours on flannel.1 (vxlan), routes via peers (host-gw). Writes bench/results/scale-<stamp>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flannel_ebpf.bench.runner import DEFAULT_OUT_DIR
from flannel_ebpf.datapath.maps import DatapathMapError, DatapathMaps
from flannel_ebpf.lab import leases as seeder
from flannel_ebpf.lab.lab import Lab
from flannel_ebpf.state import load as load_state

BACKENDS = ("udp", "vxlan", "host-gw")
NETWORK = IPv4Network("10.0.0.0/8")
SUBNET_LEN = 24
RELIST_INTERVAL = 8.0  # short, so that the bench sees one periodic relist at full size

_READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) .*\bready: subnet", re.MULTILINE)
_LISTED = re.compile(r"listed (\d+) peer lease\(s\) at revision \d+ in ([\d.]+) s")
_SYNCED = re.compile(r"synced (\d+) peer\(s\) into the data path in ([\d.]+) s")


@dataclass
class ScaleResult:
    backend: str
    leases: int
    burst: int
    ok: bool = True
    error: str = ""
    seed_seconds: float = 0.0  # writing the N leases into etcd (the load generator, not the agent)
    listing_seconds: float = 0.0  # one listing of N leases through the registry, on its own
    agent_listing_seconds: float = 0.0  # the agent's first listing (from its log)
    agent_sync_seconds: float = 0.0  # the agent's first data-path sync (from its log)
    start_to_ready: float = 0.0  # process spawned -> `ready:` logged
    start_to_kernel: float = 0.0  # process spawned -> all N peers seen in the kernel
    rss_mib: float = 0.0
    hwm_mib: float = 0.0
    burst_write_seconds: float = 0.0  # the burst's writes into etcd
    burst_programmed: float = 0.0  # first burst write -> every burst peer in the kernel
    burst_after_last_write: float = 0.0  # last burst write acknowledged -> every burst peer in the kernel
    relist_seconds: float = 0.0  # the agent's periodic relist at N + burst leases
    loop_stall_max_ms: float = 0.0
    loop_stalls: int = 0
    scrape_ms_median: float = 0.0  # GET /metrics at N + burst peers
    scrape_ms_max: float = 0.0
    scrape_loop_lateness_ms: float = 0.0  # the agent's loop lateness while scraped (upper bucket bound)
    notes: list[str] = field(default_factory=list)


def count_programmed(lab: Lab, host: str, backend: str) -> int:
    """How many peers the kernel holds for this backend (a vxlan peer needs its route, neighbour and FDB
    entry: the least of the three counts)."""
    if backend == "udp":
        try:
            with DatapathMaps(lab.pin_dir(host)) as maps:
                return len(maps.read_peers())
        except (DatapathMapError, OSError):
            return 0  # not loaded yet
    ns = lab.hosts[host].netns

    def lines(argv: Sequence[str], must: str = "") -> int:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        out = run.stdout if run.returncode == 0 else ""  # e.g. flannel.1 not created yet
        return sum(1 for line in out.splitlines() if line.strip() and must in line)

    if backend == "vxlan":
        return min(
            lines(["ip", "-n", ns, "-4", "route", "show", "dev", "flannel.1"]),
            lines(["ip", "-n", ns, "-4", "neigh", "show", "dev", "flannel.1"]),
            lines(["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"], must=" dst "),
        )
    return lines(["ip", "-n", ns, "-4", "route", "show", "root", str(NETWORK)], must=" via ")


def kernel_peers(lab: Lab, host: str, backend: str) -> dict[str, str]:
    """subnet -> the public IP the kernel sends that subnet's traffic to, for every complete peer entry
    (vxlan: route, neighbour and FDB entry all present). For exact checks, slower than count_programmed."""
    if backend == "udp":
        with DatapathMaps(lab.pin_dir(host)) as maps:
            return {str(subnet): str(ip) for subnet, ip in maps.read_peers().items()}
    ns = lab.hosts[host].netns

    def json_of(argv: Sequence[str]) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(
            subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout or "[]"
        )
        return listed

    if backend == "host-gw":
        routes = json_of(["ip", "-n", ns, "-j", "-4", "route", "show", "root", str(NETWORK)])
        return {r["dst"]: r["gateway"] for r in routes if "gateway" in r}
    routes = json_of(["ip", "-n", ns, "-j", "-4", "route", "show", "dev", "flannel.1"])
    neighbours = {
        n["dst"]: n.get("lladdr") for n in json_of(["ip", "-n", ns, "-j", "-4", "neigh", "show", "dev", "flannel.1"])
    }
    fdb = {
        f["mac"]: f["dst"] for f in json_of(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "flannel.1"]) if "dst" in f
    }
    out = {}
    for r in routes:
        mac = neighbours.get(r["dst"].split("/")[0])
        if mac in fdb:
            out[r["dst"]] = fdb[mac]
    return out


def expected_peers(start: int, count: int) -> dict[str, str]:
    """What kernel_peers() must show for seeded leases start..start+count-1."""
    return {
        str(seeder.peer_subnet(NETWORK, SUBNET_LEN, i)): str(seeder.peer_ip(i)) for i in range(start, start + count)
    }


def wait_programmed(lab: Lab, host: str, backend: str, want: int, timeout: float, poll: float = 0.02) -> float:
    """Seconds (monotonic clock) at which the kernel first held `want` peers; raises on timeout."""
    deadline = time.monotonic() + timeout
    have = -1
    while time.monotonic() < deadline:
        if not lab.agent_running(host):
            raise RuntimeError(f"the agent exited:\n{lab.agents[host].log_tail(20)}")
        have = count_programmed(lab, host, backend)
        if have >= want:
            return time.monotonic()
        time.sleep(poll)
    raise TimeoutError(f"{backend}: {have} of {want} peers in the kernel after {timeout:.0f} s")


def _seeder(lab: Lab, *args: str, timeout: float = 300.0) -> dict[str, Any]:
    assert lab.etcd_ns is not None
    argv = [sys.executable, "-m", "flannel_ebpf.lab.leases", *args]
    result = lab.etcd_ns.exec(argv, timeout=timeout)
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def seed(lab: Lab, backend: str, start: int, count: int) -> float:
    out = _seeder(lab, "seed", lab.etcd_endpoint, lab.etcd_prefix, str(NETWORK), str(SUBNET_LEN), backend,
                  str(start), str(count))  # fmt: skip
    return float(out["seconds"])


def remove(lab: Lab, start: int, count: int) -> float:
    out = _seeder(lab, "remove", lab.etcd_endpoint, lab.etcd_prefix, str(NETWORK), str(SUBNET_LEN), str(start),
                  str(count))  # fmt: skip
    return float(out["seconds"])


def time_listing(lab: Lab) -> float:
    return float(_seeder(lab, "list", lab.etcd_endpoint, lab.etcd_prefix)["seconds"])


def scale_lab(backend: str) -> Lab:
    """One host and etcd; the fake peers' addresses routed on-link in the host's namespace (host-gw
    accepts only directly reachable peers; nothing is ever sent to them)."""
    lab = Lab(1, network_config={"Network": str(NETWORK), "SubnetLen": SUBNET_LEN, "Backend": {"Type": backend}})
    lab.up()
    try:
        host = lab.hosts["h1"]
        lab.node(host).ip("route", "add", str(seeder.PEER_IP_RANGE), "dev", host.iface, "scope", "link")
    except BaseException:
        lab.close()
        raise
    return lab


#: the agent's health port in the bench (its namespace's loopback) and the scrapes measured there
METRICS_PORT = 9102
SCRAPES = 20
#: run inside the host's namespace: one warm-up scrape, then SCRAPES timed ones; the lateness histogram of
#: the agent's event loop before and after them (its buckets' cumulative counts)
_SCRAPER = r"""
import json, re, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
def get():
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()
def lateness(text):
    pat = r'flannel_ebpf_event_loop_lateness_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)'
    return {le: float(v) for le, v in re.findall(pat, text)}
before = lateness(get())
times = []
for _ in range(n):
    t = time.monotonic(); text = get(); times.append(time.monotonic() - t)
print(json.dumps({"times": times, "before": before, "after": lateness(text)}))
"""


def measure_scrapes(lab: Lab, count: int) -> tuple[float, float, float]:
    """GET /metrics `count` times from the host's namespace: (median ms, max ms, the upper bound in ms of
    the highest lateness bucket the agent's loop probe reached meanwhile)."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    out = lab.node(lab.hosts["h1"]).exec([sys.executable, "-c", _SCRAPER, url, str(count)], timeout=300).stdout
    doc = json.loads(out)
    times = sorted(doc["times"])
    before, after = doc["before"], doc["after"]
    reached = 0.0
    previous = 0.0
    for le in sorted(after, key=lambda b: float("inf") if b == "+Inf" else float(b)):
        grown = after[le] - before.get(le, 0.0)
        if grown > previous:  # readings fell into this bucket (cumulative counts grew past the lower one)
            reached = float("inf") if le == "+Inf" else float(le)
        previous = grown
    return times[len(times) // 2] * 1000, times[-1] * 1000, reached * 1000


def _memory(pid: int) -> tuple[float, float]:
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def _wait_log(lab: Lab, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(lab.agent_log("h1", last_run=True))
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"no {pattern.pattern!r} in the agent's log after {timeout:.0f} s")


def bench_backend(backend: str, leases: int, burst: int, say: Callable[[str], None]) -> ScaleResult:
    r = ScaleResult(backend, leases, burst)
    lab = scale_lab(backend)
    try:
        r.seed_seconds = seed(lab, backend, 0, leases)
        say(f"{backend}: {leases} leases written in {r.seed_seconds:.1f} s")
        r.listing_seconds = time_listing(lab)
        agent = lab.start_agent(
            "h1",
            ["--subnet-relist-interval", str(RELIST_INTERVAL), "--healthz-ip", "127.0.0.1", "--healthz-port",
             str(METRICS_PORT)],
        )  # fmt: skip
        began_mono, began_wall = time.monotonic(), agent.started_at
        r.start_to_kernel = wait_programmed(lab, "h1", backend, leases, timeout=120) - began_mono
        ready = _wait_log(lab, _READY, 60)
        stamp = dt.datetime.strptime(ready.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        r.start_to_ready = stamp - began_wall
        log = lab.agent_log("h1", last_run=True)
        if m := _LISTED.search(log):
            r.agent_listing_seconds = float(m.group(2))
        if m := _SYNCED.search(log):
            r.agent_sync_seconds = float(m.group(2))
        say(f"{backend}: ready {r.start_to_ready:.2f} s after start, all {leases} in the kernel after "
            f"{r.start_to_kernel:.2f} s")  # fmt: skip
        # The burst: written as fast as etcd takes them, programmed as they arrive.
        began = time.monotonic()
        r.burst_write_seconds = seed(lab, backend, leases, burst)
        written = time.monotonic()
        done = wait_programmed(lab, "h1", backend, leases + burst, timeout=120)
        r.burst_programmed = done - began
        r.burst_after_last_write = max(0.0, done - written)
        say(f"{backend}: burst of {burst} written in {r.burst_write_seconds:.2f} s, all in the kernel "
            f"{r.burst_programmed:.2f} s after the first write")  # fmt: skip
        # A periodic relist at full size (the agent runs with a short interval here).
        st = load_state(str(lab.hosts["h1"].state_dir))
        relists = st.relists if st else 0
        deadline = time.monotonic() + RELIST_INTERVAL * 3
        while time.monotonic() < deadline:
            st = load_state(str(lab.hosts["h1"].state_dir))
            if st is not None and st.relists > relists and st.last_listing_seconds:
                r.relist_seconds = st.last_listing_seconds
                break
            time.sleep(0.5)
        else:
            r.notes.append("no periodic relist seen")
        time.sleep(1.0)  # the state file is written at most every 0.5 s
        st = load_state(str(lab.hosts["h1"].state_dir))
        if st is not None:
            r.loop_stall_max_ms, r.loop_stalls = st.loop_stall_max_ms, st.loop_stalls
            r.rss_mib, r.hwm_mib = _memory(st.pid)
        say(f"{backend}: relist {r.relist_seconds:.2f} s, loop stall max {r.loop_stall_max_ms:.0f} ms, "
            f"RSS {r.rss_mib:.0f} MiB")  # fmt: skip
        r.scrape_ms_median, r.scrape_ms_max, r.scrape_loop_lateness_ms = measure_scrapes(lab, SCRAPES)
        say(
            f"{backend}: /metrics at {leases + burst} peers: median {r.scrape_ms_median:.1f} ms, max "
            f"{r.scrape_ms_max:.1f} ms; the loop meanwhile late by at most {r.scrape_loop_lateness_ms:.0f} ms"
        )
    except Exception as e:
        r.ok, r.error = False, f"{type(e).__name__}: {e}"
        say(f"{backend}: FAILED: {r.error}")
        say(lab.agents["h1"].log_tail(30) if "h1" in lab.agents else "")
    finally:
        lab.stop_agent("h1")
        lab.agent_down("h1")
        lab.close()
    return r


def render(results: Sequence[ScaleResult], meta: dict[str, Any]) -> str:
    def f(value: float, digits: int = 2) -> str:
        return f"{value:.{digits}f}"

    rows: list[tuple[str, Callable[[ScaleResult], str]]] = [
        ("leases in etcd (flanneld format)", lambda r: str(r.leases)),
        ("write them into etcd (load generator), s", lambda r: f(r.seed_seconds, 1)),
        ("one listing through the registry, s", lambda r: f(r.listing_seconds)),
        ("agent: first listing, s", lambda r: f(r.agent_listing_seconds)),
        ("agent: first sync into the data path, s", lambda r: f(r.agent_sync_seconds)),
        ("agent start to ready, s (goal < 2)", lambda r: f(r.start_to_ready)),
        ("agent start to all peers in the kernel, s", lambda r: f(r.start_to_kernel)),
        ("burst: leases", lambda r: str(r.burst)),
        ("burst: etcd writes took, s", lambda r: f(r.burst_write_seconds)),
        ("burst: first write to all in the kernel, s", lambda r: f(r.burst_programmed)),
        ("burst: last write to all in the kernel, s (goal < 1)", lambda r: f(r.burst_after_last_write)),
        ("periodic relist at full size, s", lambda r: f(r.relist_seconds)),
        ("longest event-loop stall, ms (goal < 100)", lambda r: f(r.loop_stall_max_ms, 0)),
        ("event-loop stalls > 100 ms", lambda r: str(r.loop_stalls)),
        ("agent memory RSS / peak, MiB", lambda r: f"{r.rss_mib:.0f} / {r.hwm_mib:.0f}"),
        (
            f"GET /metrics at N + burst peers, median / max of {SCRAPES}, ms (goal < 50)",
            lambda r: f"{r.scrape_ms_median:.1f} / {r.scrape_ms_max:.1f}",
        ),
        (
            "event loop late by at most, ms, while scraped (goal <= 20; bucket bound)",
            lambda r: f(r.scrape_loop_lateness_ms, 0),
        ),
    ]
    names = [r.backend for r in results]
    out = [f"# Scale bench {meta['date']}", "", f"{meta['machine']}", ""]
    out.append("| | " + " | ".join(names) + " |")
    out.append("|---|" + "---:|" * len(names))
    for label, get in rows:
        out.append(f"| {label} | " + " | ".join(get(r) if r.ok else "failed" for r in results) + " |")
    for r in results:
        for line in ([r.error] if r.error else []) + r.notes:
            out.append(f"\n- {r.backend}: {line}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_ebpf.bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=1_000)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, flush=True)

    results = [bench_backend(b, args.leases, args.burst, say) for b in args.backends.split(",")]
    now = dt.datetime.now(dt.UTC)
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: kernel {platform.release()}, {_cpus()} CPUs",
    }
    text = render(results, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scale-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    print(text)
    print(f"written: {stem}.md, {stem}.json")
    return 0 if all(r.ok for r in results) else 1


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
