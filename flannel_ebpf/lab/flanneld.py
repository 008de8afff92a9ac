"""The real flanneld in the lab: flannel's own binaries (built from its tags, unchanged) run in a host
namespace beside flannel-ebpf agents, so mixed clusters are tested against the real thing.

The binaries live in `<repo>/../shared/flanneld/` (`flanneld-<version>.xz`, see BUILD.md there), or in
the directory `$FLANNEL_EBPF_FLANNELD_DIR` names. A missing binary raises `FlanneldMissing`: a test
that needs flanneld fails, it never skips.

What flanneld v0.20.2 does to a host (`--ip-masq=false`): it writes the subnet
file (temp + rename), sets the FORWARD policy to ACCEPT and adds the `FLANNEL-FWD` chain (unless
`--iptables-forward-rules=false`), creates flannel0 (udp, gone when it exits) or flannel.<VNI> (vxlan,
kept) and per-peer routes (kept). It writes nothing else to the file system when `--subnet-file` is
given. On SIGTERM it panics in its etcd watch (`index out of range`) and exits 2: flanneld's fault.
flanneld v0.5.5 (`version="v0.5.5"`) speaks only etcd's v2 API (a lab made with `etcd_api="v2"`); it takes
the same flags here (no `-iptables-forward-rules`), touches no iptables chain with `-ip-masq=false`, exits 0
on SIGTERM, and logs `Subnet added:` for each peer (its vxlan backend only for peers seen after its start:
those found at start become fdb entries without a line; it adds no per-peer route but answers the
kernel's L3 misses).
v0.5.5 in client/server mode: `Lab.start_flanneld_server` runs its `-listen` server (no host networking:
a client may run beside it; `wait_serving`), a client is `start_flanneld(..., ["-remote=ADDR:PORT"])`, and
with `-networks=a,b -subnet-dir=D` it writes `D/<name>.env` per network (`wait_networks_ready`).
All of it lives in the host's namespace (deleted with it) or the lab directory; `leftovers()` lists it,
`remove_iptables_rules()` removes the chains (e.g. before flannel-ebpf takes the host over).
"""

from __future__ import annotations

import lzma
import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from .agent import REPO_ROOT
from .process import HostProcess

FLANNELD_DIR_ENV = "FLANNEL_EBPF_FLANNELD_DIR"
DEFAULT_VERSION = "v0.20.2"
_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+$")
#: iptables chains flanneld makes (ip-masq: FLANNEL-POSTRTG in nat; forward rules: FLANNEL-FWD in filter)
FLANNEL_CHAINS = {"filter": ("FORWARD", "FLANNEL-FWD"), "nat": ("POSTROUTING", "FLANNEL-POSTRTG")}


class FlanneldMissing(RuntimeError):
    """The flanneld binary a test needs is not there: a setup error, reported as a failure."""


def flanneld_dir() -> Path:
    """Where the binaries are: `$FLANNEL_EBPF_FLANNELD_DIR`, else `<repo>/../shared/flanneld` (for a git
    worktree elsewhere, beside its main checkout if not beside the worktree)."""
    override = os.environ.get(FLANNELD_DIR_ENV, "")
    if override:
        return Path(override)
    beside = REPO_ROOT.parent / "shared" / "flanneld"
    main = _main_checkout(REPO_ROOT)
    if not beside.is_dir() and main is not None and (main.parent / "shared" / "flanneld").is_dir():
        return main.parent / "shared" / "flanneld"
    return beside


def _main_checkout(repo: Path) -> Path | None:
    """The main checkout of a linked git worktree (`.git` is then a file naming the worktree's git dir,
    whose `commondir` is the main `.git`); None for anything else."""
    try:
        line = (repo / ".git").read_text().strip()
        if not line.startswith("gitdir:"):
            return None
        gitdir = (repo / line.split(":", 1)[1].strip()).resolve()
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
    except OSError:
        return None
    return common.parent if common.name == ".git" else None


def find_flanneld(version: str = DEFAULT_VERSION, directory: Path | None = None) -> Path:
    """The archive (`flanneld-<version>.xz`) or the plain binary (`flanneld-<version>`) for `version`."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"flanneld version {version!r}: expected vX.Y.Z, e.g. {DEFAULT_VERSION}")
    base = directory if directory is not None else flanneld_dir()
    for name in (f"flanneld-{version}.xz", f"flanneld-{version}"):
        if (base / name).is_file():
            return base / name
    raise FlanneldMissing(
        f"flanneld {version} not found: no {base / f'flanneld-{version}.xz'} (nor an unpacked "
        f"flanneld-{version}). The interop tests need flannel's own binary: put the shared/flanneld "
        f"directory beside the checkout (see its BUILD.md), or point {FLANNELD_DIR_ENV} at it."
    )


def unpack_flanneld(version: str, dest_dir: Path, directory: Path | None = None) -> Path:
    """`flanneld-<version>` unpacked into `dest_dir` (once; reused afterwards), executable, and checked to
    print its version."""
    dest = dest_dir / f"flanneld-{version}"
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    src = find_flanneld(version, directory)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    try:
        opener = lzma.open if src.suffix == ".xz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
    except (OSError, lzma.LZMAError) as e:
        tmp.unlink(missing_ok=True)
        raise FlanneldMissing(f"cannot unpack {src}: {e}") from e
    tmp.chmod(0o755)
    tmp.rename(dest)
    r = subprocess.run([str(dest), "--version"], capture_output=True, text=True, timeout=10, check=False)
    printed = (r.stdout + r.stderr).strip()
    if version.lstrip("v") not in printed:
        dest.unlink(missing_ok=True)
        raise FlanneldMissing(f"{src} is not flanneld {version}: `--version` printed {printed[-200:]!r}")
    logger.debug("flanneld {} unpacked to {}", version, dest)
    return dest


@dataclass
class Flanneld(HostProcess):
    """flannel's flanneld on one lab host: its command line and, while it runs, its process. It writes the
    host's usual subnet file (`host.subnet_file`), so containers are added exactly as on an agent's host."""

    kind = "flanneld"

    binary: Path
    etcd_endpoint: str
    version: str = DEFAULT_VERSION
    etcd_prefix: str = "/coreos.com/network"
    verbosity: int = 2
    #: the subnet file's (inode, mtime) before the last start: ready = flanneld replaced it
    _file_before: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.host.dir / "flanneld.log"

    @property
    def subnet_file(self) -> Path:
        return self.host.subnet_file

    def flags(self, public_ip: str | None = None, forward_rules: bool | None = None) -> list[str]:
        """flanneld's flags, `-name=value` (Go's flag package; both versions take this form)."""
        flags = [
            f"-etcd-endpoints={self.etcd_endpoint}",
            f"-etcd-prefix={self.etcd_prefix}",
            f"-iface={self.host.iface}",
            f"-subnet-file={self.subnet_file}",
            "-ip-masq=false",
            f"-v={self.verbosity}",
        ]
        if public_ip is not None:
            flags.append(f"-public-ip={public_ip}")
        if forward_rules is not None:  # v0.20.2 only (v0.5.5 has no such flag)
            flags.append(f"-iptables-forward-rules={'true' if forward_rules else 'false'}")
        return flags

    def start(
        self,
        extra_args: Sequence[str] = (),
        public_ip: str | None = None,
        forward_rules: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._ensure_stopped()
        self._file_before = _identity(self.subnet_file)
        # flanneld reads FLANNELD_* from its environment too: none leak in from the test's.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        child_env.update(env or {})
        self._launch([str(self.binary), *self.flags(public_ip, forward_rules), *extra_args], child_env)

    def _started_label(self) -> str:
        return f"flanneld {self.version} on {self.host.name}"

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Until flanneld has (re)written the subnet file with its lease; returns FLANNEL_SUBNET. Fails
        early, with the log's tail, if flanneld exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("ready")
            now = _identity(self.subnet_file)
            if now is not None and now != self._file_before:
                subnet = _subnet_of(self.subnet_file)
                if subnet:
                    return subnet
            time.sleep(0.2)
        raise TimeoutError(f"flanneld on {self.host.name}: no subnet file after {timeout}s:\n{self.log_tail()}")

    def wait_networks_ready(self, subnet_dir: Path, networks: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
        """Multi-network mode (`-networks=a,b -subnet-dir=D`): until flanneld has written `D/<name>.env`
        for each network; returns each network's FLANNEL_SUBNET. Fails early, with the log's tail, if
        flanneld exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("ready")
            found = {name: _subnet_of(subnet_dir / f"{name}.env") for name in networks}
            if all(found.values()):
                return found
            time.sleep(0.2)
        raise TimeoutError(f"flanneld on {self.host.name}: no {subnet_dir}/*.env for all of {list(networks)} "
                           f"after {timeout}s:\n{self.log_tail()}")  # fmt: skip

    def wait_serving(self, listen: str, timeout: float = 30.0) -> None:
        """Server mode (`-listen=ADDR:PORT`): until flanneld logged `running as server` and answers HTTP on
        `listen` (any status: v0.5.5's server has no route that answers without a network's config)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("serving")
            if "running as server" in self.log_text(last_run=True):
                probe = self.host.exec(
                    ["curl", "-s", "-o", "/dev/null", "--max-time", "2", "-w", "%{http_code}",
                     f"http://{listen}/v1/_/config"], check=False, timeout=10,
                )  # fmt: skip
                if probe.stdout.strip() not in ("", "000"):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"flanneld on {self.host.name}: not serving {listen} after {timeout}s:\n{self.log_tail()}")

    def _check_alive(self, before: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.what} exited ({code}) before {before}:\n{self.log_tail()}")

    def leftovers(self) -> dict[str, list[str]]:
        """What flanneld made that is still on the host: its devices, its iptables chains, its files."""
        links = self.host.exec(["ip", "-o", "link", "show"], check=False).stdout
        devices = [m for m in re.findall(r"^\d+: ([^:@]+)", links, re.M) if m.startswith("flannel")]
        chains = []
        for table, (_, chain) in FLANNEL_CHAINS.items():
            if self.host.exec(["iptables", "-t", table, "-S", chain], check=False).ok:
                chains.append(f"{table}/{chain}")
        files = [str(p) for p in (self.subnet_file,) if p.exists()]
        return {"devices": devices, "iptables": chains, "files": files}

    def remove_iptables_rules(self) -> None:
        """Remove flanneld's chains and the jumps to them (it leaves them when it exits)."""
        if self.running:
            raise RuntimeError(f"flanneld on {self.host.name} still runs: it would add them again")
        for table, (parent, chain) in FLANNEL_CHAINS.items():
            rules = self.host.exec(["iptables", "-t", table, "-S", parent], check=False).stdout
            for rule in rules.splitlines():
                if rule.startswith(f"-A {parent} ") and f"-j {chain}" in rule:
                    self.host.exec(["iptables", "-t", table, "-D", *shlex.split(rule)[1:]], check=False)
            self.host.exec(["iptables", "-t", table, "-F", chain], check=False)
            self.host.exec(["iptables", "-t", table, "-X", chain], check=False)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _subnet_of(path: Path) -> str:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    m = re.search(r"^FLANNEL_SUBNET=(\S+)$", text, re.M)
    return m.group(1) if m and "FLANNEL_MTU=" in text else ""
