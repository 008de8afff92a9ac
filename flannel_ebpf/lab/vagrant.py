"""The Vagrant multi-VM lab (vagrant/): nodes that run commands in a VM over `vagrant ssh`, and the checks and
bench of the namespace lab run across VMs.

A `VagrantNode` has the namespace lab's Node interface (`exec()`/`popen()`), so `traffic.ping_matrix`,
`traffic.iperf3_client`, `traffic.ping_rtts` and `IperfServer` work on VMs unchanged: a node is a VM, or a
network namespace (a "container") inside one. Commands go over ssh with the configuration `vagrant ssh-config`
prints (what `vagrant ssh` itself uses), through one shared connection per VM (ControlMaster): running
`vagrant ssh -c` per command would cost a Ruby start-up (1-2 s) each.

    python -m flannel_ebpf.lab.vagrant check [--vagrant-dir DIR]   # health on each VM, the container ping matrix
    python -m flannel_ebpf.lab.vagrant bench [--variants udp-xdp,udp-tc,vxlan,host-gw] [--seconds N]
        # each data path in turn (the lab switched to it): TCP/UDP/RTT/CPU between containers on two VMs
    python -m flannel_ebpf.lab.vagrant switch --variants vxlan      # the running lab to another data path
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from loguru import logger

from ..datapath import layout
from .netns import ExecResult, run
from .traffic import (
    CpuTimes,
    Endpoint,
    IperfServer,
    iperf3_bits_per_second,
    iperf3_client,
    parse_cpu_times,
    ping_matrix,
    ping_rtts,
)

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
AGENT = "/opt/flannel-ebpf/bin/flannel-ebpf"
CONTAINERS = ("c1", "c2")  # made by vagrant/provision.sh on every host VM


def default_prefix(vagrant_dir: Path) -> list[str]:
    """What vagrant and ssh run under: vagrant/lab-ns.sh (the namespaces of the libvirt session lab), unless
    FLANNEL_VAGRANT_DIRECT=1 (VirtualBox, or a system libvirt: run them as they are)."""
    return [] if os.environ.get("FLANNEL_VAGRANT_DIRECT") == "1" else [str(vagrant_dir / "lab-ns.sh")]


@dataclass
class VagrantNode:
    """A VM of the lab (or a network namespace `netns` inside it), commands run as root over ssh."""

    name: str  # a label for messages: "host1", "host1/c1"
    machine: str  # the vagrant machine
    ssh_config: Path
    control_dir: Path
    netns: str | None = None
    prefix: Sequence[str] = ()

    def wrap(self, argv: Sequence[str], env: Mapping[str, str] | None = None, tty: bool = False) -> list[str]:
        inner = [str(a) for a in argv]
        if self.netns:
            inner = ["ip", "netns", "exec", self.netns, *inner]
        if env:
            inner = ["env", *(f"{k}={v}" for k, v in env.items()), *inner]
        return [
            *self.prefix, "ssh", *(["-tt"] if tty else []), "-F", str(self.ssh_config), "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%n", "-o", "ControlPersist=120",
            self.machine, "--", "sudo", shlex.join(inner),
        ]  # fmt: skip

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,  # a VM has its own bpffs: nothing to share
    ) -> ExecResult:
        return run(self.wrap(argv, env), timeout=timeout, check=check, input=input, where=self.name)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> subprocess.Popen[bytes]:
        """A long-running command in the VM. `-tt` gives it a terminal, so that stopping the local ssh
        (by its PID) hangs up the remote command too."""
        wrapped = self.wrap(argv, env, tty=True)
        return subprocess.Popen(wrapped, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass
class VagrantLab:
    """The running machines of a vagrant/ directory, and nodes for them."""

    vagrant_dir: Path = VAGRANT_DIR
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flannel-ebpf-vagrant.")))
    prefix: Sequence[str] | None = None  # None: default_prefix()
    _running: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = default_prefix(self.vagrant_dir)

    def vagrant(self, *args: str, timeout: float = 120.0, check: bool = True) -> ExecResult:
        argv = [*(self.prefix or ()), "vagrant", *args]
        return run(argv, timeout=timeout, check=check, where=str(self.vagrant_dir), env=self._env())

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VAGRANT_CWD"] = str(self.vagrant_dir)
        return env

    def running(self) -> list[str]:
        """The machines vagrant reports as running, in the Vagrantfile's order (asked once: a Ruby start-up)."""
        if self._running is None:
            out = self.vagrant("status", "--machine-readable").stdout
            self._running = [f[1] for f in (line.split(",") for line in out.splitlines())
                             if len(f) >= 4 and f[2] == "state" and f[3] == "running"]  # fmt: skip
        return self._running

    def ssh_config(self) -> Path:
        path = self.workdir / "ssh-config"
        if not path.exists():
            path.write_text(self.vagrant("ssh-config", *self.running()).stdout)
        return path

    def node(self, machine: str, netns: str | None = None) -> VagrantNode:
        label = f"{machine}/{netns}" if netns else machine
        return VagrantNode(label, machine, self.ssh_config(), self.workdir, netns, tuple(self.prefix or ()))

    def hosts(self) -> list[str]:
        return [m for m in self.running() if re.fullmatch(r"host\d+", m)]

    def container_endpoints(self, hosts: Sequence[str]) -> list[Endpoint]:
        eps = []
        for h in hosts:
            for c in CONTAINERS:
                out = self.node(h, c).exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
                m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
                if m:
                    eps.append(Endpoint(f"{h}/{c}", self.node(h, c), m.group(1)))
        return eps

    def close(self) -> None:
        """Close the shared ssh connections (each by `ssh -O exit`) and remove the work directory."""
        cfg = self.workdir / "ssh-config"
        if cfg.exists():
            for m in self.running():
                argv = [
                    *(self.prefix or ()),
                    "ssh",
                    "-F",
                    str(cfg),
                    "-o",
                    f"ControlPath={self.workdir}/%n",
                    "-O",
                    "exit",
                    m,
                ]
                run(argv, check=False)
        for p in sorted(self.workdir.glob("*"), reverse=True):
            p.unlink(missing_ok=True)
        self.workdir.rmdir()


def check(lab: VagrantLab, count: int = 3) -> int:
    """`make vagrant-check`: the namespace lab's checks on VMs: `health` on each host VM, the ping matrix
    between every container of every host VM (the same `ping_matrix`)."""
    t0 = time.monotonic()
    hosts = lab.hosts()
    if not hosts:
        print("vagrant-check: no host VM is running (make vagrant-up)", file=sys.stderr)
        return 1
    bad = 0
    for h in hosts:
        r = lab.node(h).exec([AGENT, "health"], check=False)
        print(f"{h}: {(r.stdout.strip() or r.stderr.strip())}")
        bad += not r.ok
    eps = lab.container_endpoints(hosts)
    matrix = ping_matrix(eps, count=count, parallel=4)
    print(matrix.format())
    fails = matrix.failures()
    print(f"vagrant-check: {len(hosts)} hosts, {len(eps)} containers, {len(matrix.results) - len(fails)}/"
          f"{len(matrix.results)} pairs reachable, {bad} hosts not ready, {time.monotonic() - t0:.1f} s")  # fmt: skip
    return 0 if not fails and not bad else 1


@dataclass(frozen=True)
class Variant:
    """A data path the bench measures: the network config's backend, and the eBPF udp path's decap hook."""

    label: str
    backend: str  # udp | vxlan | host-gw
    udp_decap: str = "auto"  # auto | xdp | tc (udp only)


VARIANTS = {
    "udp-xdp": Variant("eBPF udp, XDP decap", "udp", "xdp"),
    "udp-tc": Variant("eBPF udp, tc decap", "udp", "tc"),
    "vxlan": Variant("vxlan (kernel)", "vxlan"),
    "host-gw": Variant("host-gw (kernel)", "host-gw"),
}
DECAP_PROGRAMS = (layout.PROG_DECAP_XDP, layout.PROG_DECAP_TC)


def switch(lab: VagrantLab, variant: Variant) -> None:
    """Turn the running lab to `variant` without rebuilding it: the network config in etcd, then on every host
    VM the agent restarted (`down` of the old data path first) and the containers made again from the new
    subnet.env (MTU). vagrant/provision.sh does both, the same steps as at `vagrant up`; it goes in on stdin,
    so the VMs' copy of the checkout (synced at `vagrant up`) need not be current."""
    script = (lab.vagrant_dir / "provision.sh").read_text()
    lab.node("etcd").exec(["bash", "-s", "net-config", variant.backend], input=script, timeout=60)
    for h in lab.hosts():
        lab.node(h).exec(["bash", "-s", "agent", variant.udp_decap], input=script, timeout=180)


def cpu_times(node: VagrantNode) -> CpuTimes:
    return parse_cpu_times(node.exec(["cat", "/proc/stat"]).stdout, f"{node.name}:/proc/stat")


def settle(vms: Sequence[VagrantNode], busy_below: float = 0.25, timeout: float = 90.0) -> float:
    """Wait until every VM is idle (busy CPU under `busy_below` of its CPUs over 3 s; an idle VM of the lab
    shows 6-7 % under TCG): a VM is slow right after a switch (the agent's start, JIT, the first
    connections), and its first runs measured a third of what the same path gave once it was idle. Both
    readings are taken by one remote command, so ssh's and sudo's own start stays out of the window.
    Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        idle = True
        for vm in vms:
            text = vm.exec(["sh", "-c", "head -1 /proc/stat; sleep 3; head -1 /proc/stat"]).stdout.splitlines()
            d = parse_cpu_times(text[1], vm.name) - parse_cpu_times(text[0], vm.name)
            idle = idle and d.busy < busy_below * (d.busy + d.idle)
        if idle:
            break
    return time.monotonic() - t0


def measure(lab: VagrantLab, seconds: float, rounds: int = 3) -> dict[str, float]:
    """TCP (1 and 4 streams: medians of `rounds`), 64-byte UDP, RTT and CPU per Gbit between a container of
    host1 and one of host2. CPU: both VMs' busy time (/proc/stat: the whole guest, softirqs included)
    during the 1-stream runs, per Gbit carried."""
    hosts = lab.hosts()
    src, dst = lab.container_endpoints(hosts[:1])[0], lab.container_endpoints(hosts[1:2])[0]
    vms = [lab.node(hosts[0]), lab.node(hosts[1])]
    out: dict[str, float] = {}
    with IperfServer(dst.node):
        out["settle_s"] = settle(vms)
        tcp1, busy, gbits = [], 0.0, 0.0
        for _ in range(rounds):
            before = [cpu_times(vm) for vm in vms]
            rep = iperf3_client(src.node, dst.ip, seconds)
            busy += sum((cpu_times(vm) - b).busy for vm, b in zip(vms, before, strict=True))
            tcp1.append(iperf3_bits_per_second(rep) / 1e9)
            gbits += float(rep["end"]["sum_received"]["bytes"]) * 8 / 1e9
        out["tcp1_gbps"] = statistics.median(tcp1)
        out["cpu_s_per_gbit"] = busy / gbits if gbits else float("nan")
        out["tcp4_gbps"] = statistics.median(
            iperf3_bits_per_second(iperf3_client(src.node, dst.ip, seconds, streams=4)) / 1e9 for _ in range(rounds)
        )
        rep = iperf3_client(src.node, dst.ip, seconds, udp=True, length=64, bitrate="0")
        end = rep["end"].get("sum_received") or rep["end"]["sum"]
        out["udp64_pps"] = (int(end["packets"]) - int(end.get("lost_packets", 0))) / float(end["seconds"])
    _, rtts = ping_rtts(src.node, dst.ip, count=200, interval=0.01)
    rtts.sort()
    if rtts:
        out["rtt_p50_ms"] = rtts[len(rtts) // 2]
        out["rtt_p99_ms"] = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    return out


def decap_note(lab: VagrantLab) -> str:
    """How the receiver (host2) decapsulates, from `status --json`: the decap program's hook on the lab NIC
    ("xdp native", "tc-ingress")."""
    r = lab.node(lab.hosts()[1]).exec([AGENT, "status", "--json"], check=False)
    try:
        programs = json.loads(r.stdout)["live"]["programs"]
    except (ValueError, KeyError, TypeError):
        return "status unreadable"
    hooks = [f"{p['hook']} {p.get('xdp_mode', '')}".strip() for p in programs if p["program"] in DECAP_PROGRAMS]
    return ", ".join(hooks) or "no decap program attached"


COLUMNS = (
    ("tcp1_gbps", "TCP 1 (Gbit/s)", "{:.2f}"),
    ("tcp4_gbps", "TCP 4 (Gbit/s)", "{:.2f}"),
    ("udp64_pps", "UDP 64 B (pkt/s)", "{:,.0f}"),
    ("rtt_p50_ms", "RTT p50 (ms)", "{:.3f}"),
    ("rtt_p99_ms", "RTT p99 (ms)", "{:.3f}"),
    ("cpu_s_per_gbit", "CPU (s/Gbit)", "{:.2f}"),
)


def bench(lab: VagrantLab, variants: Sequence[str], seconds: float = 5.0) -> int:
    """`make vagrant-bench`: each variant in turn (the lab switched to it), measured host1 -> host2; one
    table. The lab is left on the last variant."""
    if len(lab.hosts()) < 2:
        print("vagrant-bench: needs two host VMs", file=sys.stderr)
        return 1
    rows = []
    for name in variants:
        v = VARIANTS[name]
        t0 = time.monotonic()
        switch(lab, v)
        note = decap_note(lab) if v.backend == "udp" else ""
        m = measure(lab, seconds)
        label = f"{v.label} [{note}]" if note else v.label
        took = time.monotonic() - t0
        print(f"vagrant-bench: {label}: {took:.0f} s (switch, settle {m['settle_s']:.0f} s, measure)", flush=True)
        rows.append((label, m))
    print("| data path | " + " | ".join(c[1] for c in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for label, m in rows:
        cells = [fmt.format(m[k]) if k in m else "-" for k, _, fmt in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flannel_ebpf.lab.vagrant", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("check", "bench", "switch"))
    p.add_argument("--vagrant-dir", type=Path, default=VAGRANT_DIR)
    p.add_argument("--seconds", type=float, default=5.0, help="bench: seconds per iperf3 run")
    names = ", ".join(VARIANTS)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"bench: comma-separated data paths, in order; switch: the one ({names})")  # fmt: skip
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if a.command == "switch" and len(variants) != 1:
        p.error("switch: name one data path with --variants")
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    lab = VagrantLab(a.vagrant_dir)
    try:
        if a.command == "switch":
            switch(lab, VARIANTS[variants[0]])
            print(f"vagrant: the lab runs {VARIANTS[variants[0]].label}")
            return 0
        return check(lab) if a.command == "check" else bench(lab, variants, a.seconds)
    finally:
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
