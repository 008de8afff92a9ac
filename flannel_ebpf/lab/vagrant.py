"""The Vagrant multi-VM lab (vagrant/): nodes that run commands in a VM over `vagrant ssh`, and the checks and
bench of the namespace lab run across VMs.

A `VagrantNode` has the namespace lab's Node interface (`exec()`/`popen()`), so `traffic.ping_matrix`,
`traffic.iperf3_client`, `traffic.ping_rtts` and `IperfServer` work on VMs unchanged: a node is a VM, or a
network namespace (a "container") inside one. Commands go over ssh with the configuration `vagrant ssh-config`
prints (what `vagrant ssh` itself uses), through one shared connection per VM (ControlMaster): running
`vagrant ssh -c` per command would cost a Ruby start-up (1-2 s) each.

    python -m flannel_ebpf.lab.vagrant check [--vagrant-dir DIR]   # health on each VM, the container ping matrix
    python -m flannel_ebpf.lab.vagrant bench [--seconds N]          # TCP/UDP/RTT between containers on two VMs
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .netns import ExecResult, run
from .traffic import Endpoint, IperfServer, iperf3_bits_per_second, iperf3_client, ping_matrix, ping_rtts

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

    def wrap(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        inner = [str(a) for a in argv]
        if self.netns:
            inner = ["ip", "netns", "exec", self.netns, *inner]
        if env:
            inner = ["env", *(f"{k}={v}" for k, v in env.items()), *inner]
        return [
            *self.prefix, "ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
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
        wrapped = self.wrap(argv, env)
        wrapped.insert(1, "-tt")
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


def bench(lab: VagrantLab, seconds: float = 5.0) -> int:
    """`make vagrant-bench`: TCP (1 and 4 streams), small-packet UDP and RTT between a container of host1
    and one of host2, over whatever backend the lab runs (FLANNEL_VAGRANT_BACKEND at `vagrant up`)."""
    hosts = lab.hosts()
    if len(hosts) < 2:
        print("vagrant-bench: needs two host VMs", file=sys.stderr)
        return 1
    src, dst = lab.container_endpoints(hosts[:2])[0], lab.container_endpoints(hosts[1:2])[0]
    status = lab.node(hosts[0]).exec([AGENT, "health"], check=False).stdout.strip()
    rows: dict[str, str] = {}
    with IperfServer(dst.node):
        time.sleep(1.0)  # the ssh session and server start
        rows["TCP, 1 stream (Gbit/s)"] = f"{iperf3_bits_per_second(iperf3_client(src.node, dst.ip, seconds)) / 1e9:.2f}"
        rep = iperf3_client(src.node, dst.ip, seconds, streams=4)
        rows["TCP, 4 streams (Gbit/s)"] = f"{iperf3_bits_per_second(rep) / 1e9:.2f}"
        rep = iperf3_client(src.node, dst.ip, seconds, udp=True, length=64, bitrate="0")
        end = rep["end"].get("sum_received") or rep["end"]["sum"]
        pps = (int(end["packets"]) - int(end.get("lost_packets", 0))) / float(end["seconds"])
        rows["UDP, 64-byte payload (packets/s)"] = f"{pps:,.0f}"
    _, rtts = ping_rtts(src.node, dst.ip, count=200, interval=0.01)
    rtts.sort()
    if rtts:
        rows["RTT p50 (ms)"] = f"{rtts[len(rtts) // 2]:.3f}"
        rows["RTT p99 (ms)"] = f"{rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]:.3f}"
    print(f"vagrant-bench: {src.label} ({src.ip}) -> {dst.label} ({dst.ip}); {hosts[0]}: {status}")
    print("| metric | value |\n| --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flannel_ebpf.lab.vagrant", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("check", "bench"))
    p.add_argument("--vagrant-dir", type=Path, default=VAGRANT_DIR)
    p.add_argument("--seconds", type=float, default=5.0, help="bench: seconds per iperf3 run")
    a = p.parse_args(argv)
    lab = VagrantLab(a.vagrant_dir)
    try:
        return check(lab) if a.command == "check" else bench(lab, a.seconds)
    finally:
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
