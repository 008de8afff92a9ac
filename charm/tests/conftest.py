"""Fixtures for the charm's tests: the charm's src/ on sys.path, a host laid out in a temporary directory
(the agent's real CLI behind /opt/flannel-ebpf's place, systemctl a recorder: no systemd runs in a test),
and a real etcd on loopback (tests/conftest.py's)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHARM_DIR = Path(__file__).resolve().parents[1]
REPO = CHARM_DIR.parent
sys.path.insert(0, str(CHARM_DIR / "src"))

from workload import Paths, Workload  # noqa: E402

# The loopback etcd of the package's tests: the same fixtures, not a second copy of them.
from tests.conftest import etcd, etcd_server  # noqa: E402, F401

#: `flannel-ebpf health`'s line for a ready agent with lxcbr0 recorded, as the lab test
#: (tests/test_charm_lxc_lab.py) gets it from a real agent.
READY_LINE = "ready lxcbr:10.10.16.1 subnet:10.10.16.1/24 mtu:1472"
SUBNET_ENV = "FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET=10.10.16.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"

CLI = f"PYTHONPATH={REPO} exec {sys.executable} -c 'import sys; from flannel_ebpf.cli import main; sys.exit(main())'"


@dataclass
class FakeHost:
    root: Path
    charm_dir: Path
    paths: Paths
    systemctl_log: Path

    def workload(self) -> Workload:
        return Workload(self.charm_dir, self.paths, systemctl=(str(self.root / "systemctl"),))

    def systemctl_calls(self) -> list[str]:
        return self.systemctl_log.read_text().splitlines() if self.systemctl_log.exists() else []

    def cli_calls(self) -> list[str]:
        """The `flannel-ebpf up|down|bridge` command lines the charm ran (recorded, not run)."""
        log = self.root / "cli.log"
        return log.read_text().splitlines() if log.exists() else []

    def agent_says(self, line: str, code: int = 0) -> None:
        """`flannel-ebpf health` answers `line` from now on (a state only a running agent can produce)."""
        (self.root / "health.out").write_text(line + "\n")
        (self.root / "health.rc").write_text(str(code))

    def lease(self, text: str = SUBNET_ENV) -> None:
        self.paths.subnet_file.parent.mkdir(parents=True, exist_ok=True)
        self.paths.subnet_file.write_text(text)


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    """The charm's view of a host, all under tmp_path, with FlannelEbpfCharm.make_workload pointing at it."""
    root = tmp_path
    charm_dir = root / "charm"
    (charm_dir / "wheels").mkdir(parents=True)
    (charm_dir / "files").mkdir()
    (charm_dir / "src").symlink_to(CHARM_DIR / "src")
    shutil.copy2(REPO / "packaging" / "systemd" / "flannel-ebpf.service", charm_dir / "files")
    # The wheel of the version installed in /opt/flannel-ebpf below: install() keeps that install.
    (charm_dir / "wheels" / "flannel_ebpf-0.1.0-py3-none-any.whl").write_bytes(b"")
    paths = Paths(
        venv=root / "opt" / "flannel-ebpf",
        systemd_dir=root / "etc" / "systemd" / "system",
        etc_dir=root / "etc" / "flannel-ebpf",
        state_dir=root / "run" / "flannel-ebpf",
        subnet_file=root / "run" / "flannel" / "subnet.env",
        cni_conf=root / "etc" / "cni" / "net.d" / "10-flannel.conflist",
        lxc_default_conf=root / "etc" / "lxc" / "default.conf",
        lxc_net_defaults=root / "etc" / "default" / "lxc-net",
        dnsmasq_lease_file=root / "var" / "lib" / "misc" / "flannel-ebpf-dnsmasq.leases",
    )
    _script(paths.python, f'PYTHONPATH={REPO} exec {sys.executable} "$@"')
    # The real CLI, except `health` once a test said what a running agent answers, and the commands that
    # change this namespace's links, routes or firewall (up, down, bridge): recorded, never run here (the
    # lab tests run them inside host namespaces).
    _script(
        paths.flannel_ebpf,
        f'if [ "$1" = health ] && [ -f {root}/health.out ]; then\n'
        f"  cat {root}/health.out; exit $(cat {root}/health.rc)\nfi\n"
        f'case "$1" in up|down|bridge) echo "$@" >> {root}/cli.log; echo "$1: not outside a lab namespace" >&2\n'
        f'  [ "$1" = down ]; exit $?;; esac\n'
        f'{CLI} "$@"',
    )
    log = root / "systemctl.log"
    _script(root / "systemctl", f'echo "$@" >> {log}')
    fake = FakeHost(root, charm_dir, paths, log)
    from charm import FlannelEbpfCharm

    monkeypatch.setattr(FlannelEbpfCharm, "make_workload", staticmethod(lambda _dir: fake.workload()))
    monkeypatch.setattr(FlannelEbpfCharm, "ready_wait", 0.0)
    yield fake
