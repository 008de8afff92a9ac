"""The host side of the charm: install flannel-ebpf offline, run it as the packaged systemd unit, ask it.

Everything the charm changes on the host goes through this class, with its paths in `Paths` (the tests
point them at a temporary directory and `systemctl` at a recorder: no systemd runs in a test).
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bridge
from settings import EtcdData, TlsFiles, render_dropin

SERVICE = "flannel-ebpf.service"
DNSMASQ_SERVICE = "flannel-ebpf-dnsmasq.service"


@dataclass(frozen=True)
class Paths:
    venv: Path = Path("/opt/flannel-ebpf")  # the packaged unit's ExecStart: /opt/flannel-ebpf/bin/flannel-ebpf
    systemd_dir: Path = Path("/etc/systemd/system")
    etc_dir: Path = Path("/etc/flannel-ebpf")
    state_dir: Path = Path("/run/flannel-ebpf")
    subnet_file: Path = Path("/run/flannel/subnet.env")
    cni_conf: Path = Path("/etc/cni/net.d/10-flannel.conflist")
    lxc_default_conf: Path = Path("/etc/lxc/default.conf")
    lxc_net_defaults: Path = Path("/etc/default/lxc-net")
    dnsmasq_lease_file: Path = Path("/var/lib/misc/flannel-ebpf-dnsmasq.leases")

    @property
    def flannel_ebpf(self) -> Path:
        return self.venv / "bin" / "flannel-ebpf"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def dropin(self) -> Path:
        return self.systemd_dir / f"{SERVICE}.d" / "20-juju.conf"

    def dnsmasq_conf(self, name: str) -> Path:
        return self.etc_dir / f"dnsmasq-{name}.conf"


class WorkloadError(RuntimeError):
    """A step on the host failed (the message becomes the blocked status)."""


@dataclass
class Workload:
    charm_dir: Path
    paths: Paths = field(default_factory=Paths)
    systemctl: Sequence[str] = ("systemctl",)
    timeout: float = 120.0

    # ------------------------------------------------------------ running commands

    def _run(self, argv: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(a) for a in argv], capture_output=True, text=True, timeout=timeout or self.timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WorkloadError(f"{Path(str(argv[0])).name}: {e}") from None

    def _check(self, argv: Sequence[str], what: str, timeout: float | None = None) -> str:
        r = self._run(argv, timeout)
        if r.returncode != 0:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise WorkloadError(f"{what} failed: {detail[-1] if detail else f'exit {r.returncode}'}")
        return r.stdout

    def _systemctl(self, *args: str) -> None:
        self._check([*self.systemctl, *args], f"systemctl {' '.join(args)}")

    # ------------------------------------------------------------ install

    def shipped_wheel(self) -> Path:
        found = sorted(glob.glob(str(self.charm_dir / "wheels" / "flannel_ebpf-*.whl")))
        if not found:
            raise WorkloadError(f"no flannel-ebpf wheel in {self.charm_dir / 'wheels'} (build with `make charm`)")
        return Path(found[-1])

    def installed_version(self) -> str | None:
        if not self.paths.flannel_ebpf.exists():
            return None
        r = self._run([self.paths.python, "-c", "import importlib.metadata as m; print(m.version('flannel-ebpf'))"])
        return r.stdout.strip() if r.returncode == 0 else None

    def install(self) -> str:
        """flannel-ebpf from the wheel inside the charm, with its dependencies' wheels (no index: hosts
        have no internet), into /opt/flannel-ebpf; then the packaged unit. Idempotent."""
        wheel = self.shipped_wheel()
        version = wheel.name.split("-")[1]
        if self.installed_version() != version:
            if not self.paths.python.exists():
                # --without-pip: Ubuntu's python3 lacks ensurepip unless python3-venv is installed; pip
                # comes from its wheel in the charm (a wheel runs as `python pip.whl/pip`).
                self._check(["python3", "-m", "venv", "--without-pip", self.paths.venv], "creating the venv")
            pip = sorted(glob.glob(str(self.charm_dir / "wheels" / "pip-*.whl")))
            if not pip:
                raise WorkloadError("no pip wheel in the charm (build with `make charm`)")
            self._check(
                [self.paths.python, f"{pip[-1]}/pip", "install", "--no-index", "--disable-pip-version-check",
                 "--find-links", self.charm_dir / "wheels", "--upgrade", wheel],
                "installing flannel-ebpf",
                timeout=600,
            )  # fmt: skip
        unit = self.charm_dir / "files" / SERVICE
        bridge.write_if_changed(self.paths.systemd_dir / SERVICE, unit.read_text())
        self._systemctl("daemon-reload")
        return version

    # ------------------------------------------------------------ configuration and service

    def write_etcd_tls(self, etcd: EtcdData) -> TlsFiles | None:
        """The etcd charm's client certificate, key and CA as files the agent reads (key: 0600)."""
        if not etcd.tls:
            return None
        d = self.paths.etc_dir
        files = TlsFiles(str(d / "etcd-ca.pem"), str(d / "etcd-client.pem"), str(d / "etcd-client-key.pem"))
        for path, text, mode in (
            (files.ca, etcd.ca, 0o644),
            (files.cert, etcd.cert, 0o644),
            (files.key, etcd.key, 0o600),
        ):
            bridge.write_if_changed(Path(path), text if text.endswith("\n") else text + "\n", mode)
        return files

    def write_environment(self, env: Mapping[str, str]) -> bool:
        """The unit's drop-in; True when it changed (the agent then needs a restart)."""
        changed = bridge.write_if_changed(self.paths.dropin, render_dropin(env))
        if changed:
            self._systemctl("daemon-reload")
        return changed

    def start(self, restart: bool) -> None:
        self._systemctl("enable", SERVICE)
        self._systemctl("restart" if restart else "start", SERVICE)

    def stop(self, remove_datapath: bool = False) -> None:
        """The agent and dnsmasq stopped. The data path stays (containers keep talking to the peers they
        know) unless `remove_datapath` (the unit is going away): then `flannel-ebpf down` removes it."""
        self._run([*self.systemctl, "disable", "--now", DNSMASQ_SERVICE])
        self._run([*self.systemctl, "disable", "--now", SERVICE])
        if remove_datapath and self.paths.flannel_ebpf.exists():
            self._run([self.paths.flannel_ebpf, "down", "--state-dir", self.paths.state_dir])

    def seed_network_config(self, etcd: EtcdData, tls: TlsFiles | None, prefix: str, config: dict) -> dict:
        """etcd_seed.py with the agent's Python: the config put when absent, else what etcd holds."""
        argv = [self.paths.python, self.charm_dir / "src" / "etcd_seed.py", "--endpoints", ",".join(etcd.endpoints),
                "--prefix", prefix, "--config", json.dumps(config)]  # fmt: skip
        if tls is not None:
            argv += ["--cafile", tls.ca, "--certfile", tls.cert, "--keyfile", tls.key]
        r = self._run(argv, timeout=60)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"result": "error", "error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"}

    def health(self) -> tuple[int, str]:
        """`flannel-ebpf health`: (exit code, its line)."""
        if not self.paths.flannel_ebpf.exists():
            return 1, "not-ready flannel-ebpf is not installed"
        r = self._run([self.paths.flannel_ebpf, "health", "--state-dir", self.paths.state_dir], timeout=30)
        return r.returncode, (r.stdout.strip() or r.stderr.strip())

    def subnet_env(self) -> bridge.Lease | None:
        try:
            return bridge.Lease.from_subnet_env(self.paths.subnet_file.read_text())
        except (OSError, bridge.LeaseError):
            return None

    # ------------------------------------------------------------ what containers need

    def write_cni_config(self) -> str:
        """`flannel-ebpf cni-config -o <file>`: the conflist Kubernetes' kubelet reads."""
        self._check(
            [self.paths.flannel_ebpf, "cni-config", "--subnet-file", self.paths.subnet_file, "-o", self.paths.cni_conf],
            "flannel-ebpf cni-config",
        )
        return self.paths.cni_conf.name

    def configure_lxc(self, name: str) -> str:
        """lxcbr0 from the lease (bridge.apply_lxc_bridge, as the lab runs it), dnsmasq for the containers'
        DHCP as a systemd unit, LXC's defaults pointing new containers at the bridge. Returns the summary."""
        self.paths.dnsmasq_lease_file.parent.mkdir(parents=True, exist_ok=True)
        result = bridge.apply_lxc_bridge(
            [str(self.paths.flannel_ebpf)],
            subnet_file=str(self.paths.subnet_file),
            state_dir=str(self.paths.state_dir),
            dnsmasq_conf_path=str(self.paths.dnsmasq_conf(name)),
            lease_file=str(self.paths.dnsmasq_lease_file),
            bridge=name,
        )
        bridge.write_if_changed(self.paths.lxc_default_conf, bridge.lxc_default_conf(name, result.lease.mtu))
        bridge.write_if_changed(self.paths.lxc_net_defaults, bridge.lxc_net_defaults())
        unit = (
            "[Unit]\nDescription=DHCP for the LXC containers on the flannel bridge\n"
            f"After={SERVICE}\nRequires={SERVICE}\n\n[Service]\n"
            f"ExecStart={shutil.which('dnsmasq') or '/usr/sbin/dnsmasq'} --keep-in-foreground "
            f"--conf-file={self.paths.dnsmasq_conf(name)}\nRestart=on-failure\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        )
        unit_changed = bridge.write_if_changed(self.paths.systemd_dir / DNSMASQ_SERVICE, unit)
        if unit_changed:
            self._systemctl("daemon-reload")
        self._systemctl("enable", DNSMASQ_SERVICE)
        self._systemctl("restart" if (unit_changed or result.dnsmasq_changed) else "start", DNSMASQ_SERVICE)
        return result.bridge_summary
