"""Network namespaces and running commands inside them.

Everything the lab creates lives in namespaces whose names start with a per-lab prefix (`fl` + 4 hex
digits, e.g. `fl3a9c-h1`). The root namespace is only ever used to *name* namespaces (`ip netns add/del`)
and to run `ip -n <ns> ...`, which operates inside <ns>; no device, address, route or firewall rule is ever
created there.

"What a host is" (a Host in topology.py) is kept apart from "how a command reaches it" (a `Node`): here a
network namespace on this machine; later, e.g., a Vagrant VM reached over ssh with the same interface.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from loguru import logger

PREFIX_RE = re.compile(r"^fl[0-9a-f]{4}$")
# A namespace (or pin directory suffix) that belongs to some lab: `<prefix>-<anything>`.
LAB_NAME_RE = re.compile(r"^(fl[0-9a-f]{4})-[A-Za-z0-9._-]+$")
BPFFS = Path("/sys/fs/bpf")
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15  # usable characters of a Linux interface name

# Runs argv inside a namespace like `ip netns exec` (a private mount namespace whose /sys describes the
# network namespace, so tools reading /sys/class/net see its devices), but keeps the ROOT bpffs at
# /sys/fs/bpf. `ip netns exec` remounts /sys and so hides bpffs: an agent would then pin into a bpffs
# instance of its own that vanishes when it exits, and a restarted agent could not adopt its maps.
# `unshare` (without --fork), the shell's last step and `nsenter --net` (without --fork) all exec, so
# the PID Popen returns is the command's own.
_BPFFS_WRAPPER = r"""
set -e
b=$1; ns=$2; shift 2
mount --bind /sys/fs/bpf "$b"
nsenter --net="/run/netns/$ns" -- mount -t sysfs sysfs /sys
mount --bind "$b" /sys/fs/bpf
umount "$b"
exec nsenter --net="/run/netns/$ns" -- "$@"
"""


class CommandError(RuntimeError):
    """A command run by the lab failed (non-zero exit or timeout)."""

    def __init__(self, result: ExecResult, why: str = "") -> None:
        self.result = result
        msg = why or f"exit {result.returncode}"
        detail = (result.stderr.strip() or result.stdout.strip())[-2000:]
        where = f" in {result.where}" if result.where else ""
        super().__init__(f"`{shlex.join(result.argv)}`{where} failed ({msg}): {detail}")


@dataclass(frozen=True)
class ExecResult:
    argv: list[str]
    returncode: int  # -1 on timeout
    stdout: str
    stderr: str
    where: str = ""  # the namespace (or node) it ran in, for messages
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    where: str = "",
) -> ExecResult:
    """Run a command to completion, bounded in time, capturing text output."""
    argv = [str(a) for a in argv]
    try:
        p = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
        res = ExecResult(argv, p.returncode, p.stdout, p.stderr, where)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        res = ExecResult(argv, -1, out, err, where, timed_out=True)
    if check and not res.ok:
        raise CommandError(res, f"timed out after {timeout}s" if res.timed_out else "")
    return res


class Node(Protocol):
    """Something commands can be run on: a namespace here, a VM elsewhere."""

    name: str

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> ExecResult: ...

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> subprocess.Popen[bytes]: ...


@dataclass
class Netns:
    """A named network namespace on this machine (`/run/netns/<name>`)."""

    name: str
    # A directory the bpffs wrapper may use as a temporary mount point (a private mount, never seen
    # outside the command's own mount namespace). Needed only for share_bpffs=True.
    scratch_dir: Path | None = None

    def wrap(self, argv: Sequence[str], *, share_bpffs: bool = False) -> list[str]:
        """The command line that runs argv inside this namespace."""
        argv = [str(a) for a in argv]
        if not share_bpffs:
            return ["ip", "netns", "exec", self.name, *argv]
        if self.scratch_dir is None:
            raise ValueError(f"netns {self.name}: share_bpffs needs a scratch_dir")
        mnt = self.scratch_dir / f".bpffs-{self.name}"
        mnt.mkdir(parents=True, exist_ok=True)
        return [
            "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", _BPFFS_WRAPPER, "sh", str(mnt), self.name, *argv,
        ]  # fmt: skip

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> ExecResult:
        return run(
            self.wrap(argv, share_bpffs=share_bpffs),
            timeout=timeout,
            check=check,
            input=input,
            env=env,
            where=self.name,
        )

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        env: Mapping[str, str] | None = None,
        share_bpffs: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running command inside the namespace. Every wrapper step `exec`s, so the
        returned PID is the command's own and signals reach it directly. A session of its own keeps a
        terminal's Ctrl-C from racing our orderly shutdown."""
        return subprocess.Popen(
            self.wrap(argv, share_bpffs=share_bpffs),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )

    def ip(self, *args: str, check: bool = True, timeout: float = 15.0) -> ExecResult:
        """`ip -n <ns> ...`: iproute2 switches into the namespace itself."""
        return run(["ip", "-n", self.name, *args], check=check, timeout=timeout, where=self.name)

    def sysctl(self, key: str, value: str) -> None:
        # Network sysctls are per namespace: this never changes the root namespace's.
        self.exec(["sysctl", "-q", "-w", f"{key}={value}"])

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def pids(self) -> list[int]:
        r = run(["ip", "netns", "pids", self.name], check=False, timeout=10)
        return [int(x) for x in r.stdout.split() if x.isdigit()]

    def __str__(self) -> str:
        return self.name


def new_prefix() -> str:
    """A fresh lab prefix no existing namespace uses."""
    used = {m.group(1) for n in list_netns() if (m := LAB_NAME_RE.match(n))}
    while True:
        p = "fl" + secrets.token_hex(2)
        if p not in used:
            return p


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"lab prefix {prefix!r} must be `fl` + 4 lowercase hex digits")
    return prefix


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list` prints `name (id: N)`)."""
    r = run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def create_netns(name: str, scratch_dir: Path | None = None) -> Netns:
    if not LAB_NAME_RE.match(name):
        raise ValueError(f"refusing to create namespace {name!r}: not a lab name (`fl????-...`)")
    run(["ip", "netns", "add", name], timeout=10)
    ns = Netns(name, scratch_dir)
    ns.ip("link", "set", "lo", "up")
    return ns


def stop_process(
    proc: subprocess.Popen[bytes], grace: float, sig: signal.Signals = signal.SIGTERM, what: str = ""
) -> int | None:
    """Stop a process the lab started: `sig`, then SIGKILL if it is still there after `grace` seconds.
    Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            if what:
                logger.warning("{} ignored {} for {}s: SIGKILL", what, sig.name, grace)
            proc.kill()
            proc.wait(10)
    return proc.returncode


def kill_pids(pids: Sequence[int], why: str, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: only for PIDs the lab started (or that live in one
    of the lab's own namespaces, i.e. were started by the lab's processes)."""
    alive: list[int] = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            logger.debug("{}: SIGTERM pid {} ({})", why, pid, cmd.strip()[:120])
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        time.sleep(0.1)
    for pid in alive:
        logger.warning("{}: pid {} ignored SIGTERM, SIGKILL", why, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def delete_netns(name: str) -> None:
    """Delete one lab namespace, first ending any process still inside it (a process keeps the
    namespace alive, anonymously, after its name is gone)."""
    if not LAB_NAME_RE.match(name):
        raise ValueError(f"refusing to delete namespace {name!r}: not a lab name")
    ns = Netns(name)
    if not ns.exists():
        return
    pids = ns.pids()
    if pids:
        kill_pids(pids, f"netns {name}")
    r = run(["ip", "netns", "del", name], check=False, timeout=10)
    if not r.ok and ns.exists():
        logger.warning("could not delete netns {}: {}", name, r.stderr.strip())


def veth_between(a: Netns, a_name: str, b: Netns, b_name: str, mtu: int | None = None) -> None:
    """A veth pair with one end in each namespace, created INSIDE `a` (never in the root namespace)."""
    for n in (a_name, b_name):
        if len(n) > IFNAMSIZ:
            raise ValueError(f"interface name {n!r} longer than {IFNAMSIZ} characters")
    a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    if mtu is not None:
        a.ip("link", "set", a_name, "mtu", str(mtu))
        b.ip("link", "set", b_name, "mtu", str(mtu))
