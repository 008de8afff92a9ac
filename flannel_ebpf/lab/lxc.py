"""Real LXC containers on a lab host (Debian's `lxc`), as the juju charm's LXC hosts run them.

Every lxc-* command runs inside that namespace too: LXC reaches a container's monitor by an abstract
unix socket, and those belong to a network namespace.

The root file system is built once with mmdebstrap (minbase plus iproute2, iputils-ping and
isc-dhcp-client) from this machine's own apt sources into a cache directory, and copied per container;
nothing else is downloaded. A container is started inside a lab host's namespace (`ip netns exec <ns>
lxc-start ...`), so its veth's host end lands there, on the bridge its config names (the charm's
/etc/lxc/default.conf). It runs `sleep` as init: long enough for a test, never forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from .netns import ExecResult, Netns, run

ROOTFS_CACHE = Path(os.environ.get("FLANNEL_EBPF_LXC_ROOTFS", "/var/cache/flannel-ebpf-lab/lxc-rootfs"))
PACKAGES = ("iproute2", "iputils-ping", "isc-dhcp-client")
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
INIT_SECONDS = 900  # the containers' init (`sleep`) ends by itself after this


class LxcMissing(RuntimeError):
    """LXC or mmdebstrap is not installed (scripts/setup.sh installs them)."""


def missing_tools() -> str | None:
    for tool in ("lxc-start", "lxc-attach", "lxc-stop", "mmdebstrap", "dnsmasq"):
        if shutil.which(tool) is None:
            return tool
    return None


def _suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return "bookworm"


def ensure_rootfs(cache: Path = ROOTFS_CACHE) -> Path:
    """The cached root file system, built on first use (about 200 MB, from this machine's apt sources)."""
    done = cache / ".flannel-ebpf-complete"
    if done.exists():
        return cache
    if shutil.which("mmdebstrap") is None:
        raise LxcMissing("mmdebstrap is not installed (scripts/setup.sh installs it)")
    sources = next((s for s in APT_SOURCES if s.exists() and s.read_text().strip()), None)
    if sources is None:
        raise LxcMissing("no apt sources on this machine to build the containers' root file system from")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
        if done.exists():
            return cache
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        logger.info("building the LXC root file system in {} (once)", cache)
        run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}", _suite(), str(tmp),
             str(sources)], timeout=600)  # fmt: skip
        tmp.rename(cache)
        done.write_text("minbase + " + " ".join(PACKAGES) + "\n")
    return cache


@dataclass
class LxcContainer:
    name: str
    lxcpath: Path  # `-P`: where its directory (config, rootfs, log) lives
    ns: Netns  # the lab host it runs on
    started: bool = False

    @property
    def dir(self) -> Path:
        return self.lxcpath / self.name

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def log(self) -> Path:
        return self.dir / "lxc.log"

    def start(self) -> None:
        r = self.ns.exec(
            ["lxc-start", "-n", self.name, "-P", str(self.lxcpath), "-f", str(self.config), "-d", "-l", "INFO",
             "-o", str(self.log)],
            check=False,
            timeout=60,
        )  # fmt: skip
        self.started = True
        if not r.ok:
            raise RuntimeError(f"lxc-start {self.name} failed: {r.stderr.strip()}\n{self.log_tail()}")
        r = self.ns.exec(["lxc-wait", "-n", self.name, "-P", str(self.lxcpath), "-s", "RUNNING", "-t", "30"],
                         check=False, timeout=40)  # fmt: skip
        if not r.ok:
            raise RuntimeError(f"{self.name} is not running: {r.stderr.strip()}\n{self.log_tail()}")

    def attach(self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> ExecResult:
        return self.ns.exec(
            ["lxc-attach", "-n", self.name, "-P", str(self.lxcpath), "--clear-env",
             "--set-var", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--", *map(str, argv)],
            timeout=timeout,
            check=check,
        )  # fmt: skip

    def ipv4(self, dev: str = "eth0") -> str | None:
        out = self.attach(["ip", "-o", "-4", "addr", "show", "dev", dev]).stdout.split()
        return out[out.index("inet") + 1] if "inet" in out else None

    def mtu(self, dev: str = "eth0") -> int:
        out = self.attach(["ip", "-o", "link", "show", "dev", dev]).stdout.split()
        return int(out[out.index("mtu") + 1])

    def stop(self) -> None:
        if self.started:
            # lxc-* reach the container's monitor by an abstract socket: only from the namespace it runs in.
            self.ns.exec(["lxc-stop", "-n", self.name, "-P", str(self.lxcpath), "-k"], check=False, timeout=30)
            self.started = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no lxc log)"


def make_container(name: str, lxcpath: Path, ns: Netns, net_config: str, rootfs: Path | None = None) -> LxcContainer:
    """A container directory with a copy of the cached root file system and a config whose network part
    is `net_config` (the charm's /etc/lxc/default.conf: veth on the bridge, the overlay MTU)."""
    rootfs = rootfs or ensure_rootfs()
    c = LxcContainer(name, lxcpath, ns)
    c.dir.mkdir(parents=True, exist_ok=False)
    subprocess.run(["cp", "-a", "--reflink=auto", f"{rootfs}/.", str(c.dir / "rootfs")], check=True, timeout=300)
    c.config.write_text(
        f"lxc.uts.name = {name}\n"
        f"lxc.rootfs.path = dir:{c.dir / 'rootfs'}\n"
        "lxc.apparmor.profile = unconfined\n"
        "lxc.mount.auto = proc:mixed sys:ro\n"
        "lxc.tty.max = 0\n"
        "lxc.pty.max = 16\n"
        f"lxc.init.cmd = /bin/sleep {INIT_SECONDS}\n" + net_config
    )
    return c
