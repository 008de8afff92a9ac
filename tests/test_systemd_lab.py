"""systemd: the shipped unit and drop-in pass `systemd-analyze verify`, and a real agent in a namespace
lab tells a real NOTIFY_SOCKET READY=1 once it is ready and STOPPING=1 when told to stop, from its own
PID (what systemd checks with NotifyAccess=main)."""

from __future__ import annotations

import configparser
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from flannel_ebpf.lab.agent import REPO_ROOT, cli_command

UNIT_DIR = REPO_ROOT / "packaging" / "systemd"
UNIT = UNIT_DIR / "flannel-ebpf.service"
DROP_IN = UNIT_DIR / "flannel-ebpf.service.d" / "10-flanneld-env.conf"
SHIPPED_EXEC = "/opt/flannel-ebpf/bin/flannel-ebpf"


def read_unit(path: Path) -> configparser.RawConfigParser:
    # systemd units repeat keys (Environment=, After=): keep every value, one per line.
    parser = configparser.RawConfigParser(strict=False, interpolation=None, dict_type=_MultiDict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


class _MultiDict(dict):  # type: ignore[type-arg]
    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_unit_and_drop_in_verify(tmp_path: Path) -> None:
    unit = read_unit(UNIT)
    service, about = unit["Service"], unit["Unit"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["ExecStart"] == f"{SHIPPED_EXEC} up $FLANNEL_OPTIONS"
    assert int(service["LimitNOFILE"]) >= 8192  # well above the HTTP servers' connection caps
    assert {"network-online.target", "etcd.service"} <= set(about["After"].split())
    assert "network-online.target" in about["Wants"].split() and "docker.service" in about["Before"].split()
    env = read_unit(DROP_IN)["Service"]["Environment"].split("\n")
    assert any(e.startswith("FLANNELD_ETCD_ENDPOINTS=") for e in env) and all(e.startswith("FLANNELD_") for e in env)

    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make setup` installs systemd"
    # verify also checks that ExecStart's command exists: point the copies at this checkout's command.
    units = tmp_path / "units"
    shutil.copytree(UNIT_DIR, units)
    for path in (units / UNIT.name, units / DROP_IN.parent.name / DROP_IN.name):
        path.write_text(path.read_text().replace(SHIPPED_EXEC, cli_command()[0]))

    def verify() -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_COLOR": "0"}
        return subprocess.run(
            [analyze, "verify", str(units / UNIT.name)], capture_output=True, text=True, timeout=60, env=env
        )

    r = verify()
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr  # verify warns on stderr, exits 0
    # ... and it did read the drop-in: a bad key there is reported.
    bad = units / DROP_IN.parent.name / DROP_IN.name
    bad.write_text(bad.read_text() + "NoSuchKey=1\n")
    r = verify()
    assert "10-flanneld-env.conf" in r.stderr and "NoSuchKey" in r.stderr, r.stderr


def recv_with_pid(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """One datagram and the sender's PID (SCM_CREDENTIALS), as systemd reads its notify socket."""
    sock.settimeout(timeout)
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = 0
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", payload[:12])[0]
    return data.decode(), pid


@pytest.mark.lab
def test_agent_notifies_ready_and_stopping(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1, network_config={"Network": "10.9.0.0/16", "Backend": {"Type": "alloc"}})
    path = tmp_path / "notify"  # a path socket: reachable from the host's network namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        agent = lab.start_agent("h1", env={"NOTIFY_SOCKET": str(path)})
        assert agent.proc is not None
        agent_pid = agent.proc.pid
        started = time.monotonic()
        message, pid = recv_with_pid(sock, 30)
        lines = message.split("\n")
        assert lines[0] == "READY=1" and lines[1].startswith("STATUS=ready: subnet 10.9."), message
        assert pid == agent_pid  # the main PID itself, not a child
        # READY=1 is sent once the agent is ready: health agrees at once.
        r = agent.health()
        assert r.ok and r.stdout.startswith("ready "), r
        print(f"READY=1 {time.monotonic() - started:.2f}s after start: {message!r}")

        assert lab.stop_agent("h1") == 0
        message, pid = recv_with_pid(sock, 5)
        assert message.startswith("STOPPING=1"), message
        assert pid == agent_pid
