"""`make charm`'s archive: its layout as juju reads it, and the install hook's offline install from it.

The archive is built as `make charm` builds it (charm/build_charm.py, from a wheel of this checkout), then
unpacked and installed from with the charm's own Workload.install: a fresh venv, pip from its wheel,
`--no-index` (hosts have no internet), the agent's CLI runs afterwards.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import CHARM_DIR, REPO
from workload import Paths, Workload


@pytest.fixture(scope="module")
def built_charm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("charm-build")
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        check=True,
        cwd=tmp,
        capture_output=True,
    )
    out = tmp / "flannel-ebpf_amd64.charm"
    subprocess.run(
        [sys.executable, str(CHARM_DIR / "build_charm.py"), "--dist", str(dist), "--out", str(out)], check=True
    )
    yield out


def test_archive_has_the_charm_layout(built_charm: Path) -> None:
    with zipfile.ZipFile(built_charm) as z:
        names = set(z.namelist())
        mode = {n: z.getinfo(n).external_attr >> 16 for n in names}
        for executable in ("dispatch", "health", "src/charm.py"):
            assert mode[executable] & stat.S_IXUSR, f"{executable} is not executable"
        for src in ("src/charm.py", "src/bridge.py", "src/settings.py", "src/workload.py", "src/etcd_seed.py"):
            assert src in names
        assert "files/flannel-ebpf.service" in names
        assert z.read("files/flannel-ebpf.service") == (REPO / "packaging/systemd/flannel-ebpf.service").read_bytes()
        assert any(n.startswith("venv/ops/") for n in names), "ops is not vendored"
        wheels = {n.split("/", 1)[1] for n in names if n.startswith("wheels/")}
        assert any(w.startswith("flannel_ebpf-0.1.0-") for w in wheels)
        assert any(w.startswith("pip-") for w in wheels)
        for cp in ("cp310", "cp311", "cp312"):  # ubuntu 22.04, Debian 12, ubuntu 24.04
            assert any(w.startswith("grpcio-") and f"-{cp}-" in w for w in wheels), f"no grpcio wheel for {cp}"
        metadata = yaml.safe_load(z.read("metadata.yaml"))
        assert metadata["name"] == "flannel-ebpf" and metadata["subordinate"] is True
        assert set(metadata["requires"]) == {"db", "docker-host", "host", "network", "cni"}
        assert yaml.safe_load(z.read("config.yaml"))["options"]["network"]["default"] == "10.10.0.0/16"
        assert "health" in yaml.safe_load(z.read("actions.yaml"))
        manifest = yaml.safe_load(z.read("manifest.yaml"))
        assert manifest["bases"][0]["architectures"] == ["amd64"]
        assert b"./src/charm.py" in z.read("dispatch")


def test_install_hook_installs_offline_from_the_archive(
    built_charm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    charm_dir = tmp_path / "charm"
    with zipfile.ZipFile(built_charm) as z:
        z.extractall(charm_dir)
    # The hosts' python3 (here Debian's, not a development interpreter that may come first on PATH).
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PYTHONPATH"):
        monkeypatch.delenv(var, raising=False)
    log = tmp_path / "systemctl.log"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    systemctl.chmod(0o755)
    paths = Paths(venv=tmp_path / "opt" / "flannel-ebpf", systemd_dir=tmp_path / "systemd")
    workload = Workload(charm_dir, paths, systemctl=(str(systemctl),))
    assert workload.install() == "0.1.0"
    assert workload.installed_version() == "0.1.0"
    assert (paths.systemd_dir / "flannel-ebpf.service").exists()
    # The installed agent runs: its CLI, and its health (no agent here) in its own words.
    r = subprocess.run([paths.flannel_ebpf, "health", "--state-dir", str(tmp_path / "state")], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stdout.startswith("not-ready no agent state in"), r.stderr
    # The agent's etcd client came with it: the leader's config seeding runs with the agent's Python.
    r = subprocess.run([paths.python, "-c", "import aetcd, grpc, pyroute2, flannel_ebpf.subnet.registry"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # A second install keeps what is there.
    before = paths.flannel_ebpf.stat().st_mtime_ns
    workload.install()
    assert paths.flannel_ebpf.stat().st_mtime_ns == before
