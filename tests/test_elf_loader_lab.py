"""The loaders through the real agent in a namespace lab (all pairs and TCP per loader are in
test_udp_ebpf_lab.py): a loader switch (bcc -> elf, elf -> bcc) across agent
restarts under a ping flood that loses nothing; a wheel built from the tree, installed into a fresh venv
outside the checkout without system site-packages (so no bcc), running a two-host lab with the installed
command."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flannel_ebpf.loaders.elf import objects_problem
from tests.helpers import wait_delivery_settled

pytestmark = [
    pytest.mark.lab,
    pytest.mark.bpf,
    pytest.mark.skipif(objects_problem() is not None, reason=f"no usable objects: {objects_problem()}"),
]

UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
REPO = Path(__file__).resolve().parent.parent


def loader_in_use(lab, host) -> str | None:
    return lab.agent_status(host)["live"].get("loader")


def test_loader_switch_across_restarts_under_a_flood_loses_nothing(lab_factory):
    lab = lab_factory(2, network_config=UDP)
    lab.start_agent("h1", ["--loader", "bcc", "--lease-check-interval", "1"])
    lab.start_agent("h2", ["--loader", "elf", "--lease-check-interval", "1"])
    lab.wait_all_ready(90)
    for host in lab.host_names:
        lab.add_container(host)
    wait_delivery_settled(lab)
    assert (loader_in_use(lab, "h1"), loader_in_use(lab, "h2")) == ("bcc", "elf")
    peers_before = {h: lab.agent_status(h)["live"]["maps"]["peers"] for h in lab.host_names}
    h1c, h2c = lab.containers
    result: dict = {}
    flood = threading.Thread(target=lambda: result.setdefault("r", lab.flood_ping(h1c, h2c, seconds=14)))
    flood.start()
    try:
        time.sleep(1)
        # Each agent stops (SIGTERM: the data path stays) and comes back with the other loader, which adopts
        # the pinned maps and swaps its programs in.
        assert lab.stop_agent("h1") == 0 and lab.stop_agent("h2") == 0
        lab.start_agent("h1", ["--loader", "elf", "--lease-check-interval", "1"])
        lab.start_agent("h2", ["--loader", "bcc", "--lease-check-interval", "1"])
        lab.wait_all_ready(60)
    finally:
        flood.join()
    r = result["r"]
    print(f"loader switch under a ping flood: {r.sent - r.received} of {r.sent} lost")
    assert r.sent > 1000 and r.received == r.sent
    assert (loader_in_use(lab, "h1"), loader_in_use(lab, "h2")) == ("elf", "bcc")
    for host in lab.host_names:
        assert lab.agent_status(host)["live"]["maps"]["peers"] == peers_before[host]
        assert "adopt" in lab.agent_log(host, last_run=True).lower()
    wait_delivery_settled(lab)
    assert lab.ping(h2c, h1c).received == 3


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_installed_wheel_runs_the_udp_backend_without_bcc(lab_factory, tmp_path):
    """The wheel carries sources and objects; installed into a venv of its own (no system site-packages,
    so no bcc, and away from the checkout), its `flannel-ebpf` runs a two-host udp lab."""
    started = time.monotonic()
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], 300, cwd=tmp_path)
    wheel = next(wheels.glob("flannel_ebpf-*.whl"))
    venv = tmp_path / "venv"
    _run(["/usr/bin/python3", "-m", "venv", str(venv)], 120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], 300, env=env)
    python, command = str(venv / "bin" / "python"), str(venv / "bin" / "flannel-ebpf")
    probe = subprocess.run([python, "-c", "import bcc"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'bcc'" in probe.stderr
    where = _run(
        [python, "-c", "from flannel_ebpf.datapath import layout; from flannel_ebpf.loaders.elf import objects_problem;"
         " print(layout.BPF_SOURCE_DIR); print(objects_problem())"],
        30, env=env, cwd=tmp_path,
    ).stdout.split("\n")  # fmt: skip
    assert where[0].startswith(str(venv)) and where[0].endswith("flannel_ebpf/bpf") and where[1] == "None", where
    assert _run([command, "--version"], 30, env=env).stdout.strip() == "flannel-ebpf 0.1.0"
    print(f"wheel built and installed in {time.monotonic() - started:.0f}s")

    lab = lab_factory(2, network_config=UDP, agent_command=[command])
    lab.start_agent("h1", ["--loader", "elf"])
    lab.start_agent("h2")  # --loader auto: the installed objects are found
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    wait_delivery_settled(lab)
    matrix = lab.ping_matrix()
    assert matrix.all_ok, matrix.failures()
    for host in lab.host_names:
        assert loader_in_use(lab, host) == "elf"
        log = lab.agent_log(host)
        assert command in log and "programs loaded by the elf loader" in log
    print(f"installed wheel: two-host udp lab passed in {time.monotonic() - started:.0f}s")
