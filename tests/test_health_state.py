"""`health` and the state dir's single-instance lock, against the real /proc and real processes (no
namespace lab): a dead agent, a reused PID, a stale heartbeat, a reboot; one lock holder at a time, and
none left behind by a killed holder. The lab versions (real agents) are in test_cohabitation_lab.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flannel_ebpf import state as state_file
from flannel_ebpf.cli import agent_options, build_parser, main
from flannel_ebpf.lab.agent import cli_env


def ready_state(state_dir: Path, **fields: object) -> state_file.AgentState:
    """The state a ready agent in this very process would write (alloc: no data path to check)."""
    st = state_file.AgentState(
        pid=os.getpid(), phase="ready", network="10.5.0.0/16", subnet="10.5.34.0/24", mtu=1500, backend_type="alloc"
    )
    st.iface = {"name": "eth0", "index": 2, "address": "192.168.50.11", "public_ip": "192.168.50.11", "mtu": 1500}
    state_file.save(str(state_dir), st)
    if fields:  # as found on disk, e.g. an old heartbeat: written as is, not through save()
        path = Path(state_file.path(str(state_dir)))
        raw = json.loads(path.read_text())
        raw.update(fields)
        path.write_text(json.dumps(raw))
    return st


def health(state_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["health", "--state-dir", str(state_dir), *args])
    return code, capsys.readouterr().out.strip()


def test_xdp_replace_foreign_flag_and_its_environment_variable() -> None:
    assert build_parser({}).parse_args(["up"]).xdp_replace_foreign is False
    assert build_parser({}).parse_args(["up", "--xdp-replace-foreign"]).xdp_replace_foreign is True
    env = {"FLANNELD_XDP_REPLACE_FOREIGN": "true"}
    assert build_parser(env).parse_args(["up"]).xdp_replace_foreign is True
    assert build_parser(env).parse_args(["up", "--xdp-replace-foreign=false"]).xdp_replace_foreign is False
    agent_options(build_parser(env).parse_args(["up"]))  # still a valid set of options


def test_heartbeat_constant_matches_the_agent() -> None:
    from flannel_ebpf import network

    assert state_file.AGENT_HEARTBEAT_SECONDS == network.HEARTBEAT_SECONDS
    assert state_file.heartbeat_limit(10.0) == 30.0 and state_file.heartbeat_limit(1.0) == 15.0


def test_the_agent_records_who_it_is(tmp_path: Path) -> None:
    st = ready_state(tmp_path)
    loaded = state_file.load(str(tmp_path))
    assert loaded is not None
    assert loaded.pid_start == state_file.process_start_time(os.getpid()) == st.pid_start > 0
    assert loaded.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert state_file.agent_gone(loaded) is None


def test_health_ready_then_stale_heartbeat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ready_state(tmp_path)
    code, out = health(tmp_path, capsys)
    assert (code, out) == (0, "ready eth0 subnet:10.5.34.0/24 mtu:1500")
    ready_state(tmp_path, updated=time.time() - 40)  # default limit: 3 x 10 s resync
    code, out = health(tmp_path, capsys)
    assert code == 1 and out.startswith("not-ready no heartbeat") and "for 40s" in out, out
    code, out = health(tmp_path, capsys, "--resync-interval", "20")  # 3 x 20 s: still fresh
    assert code == 0, out


def test_health_dead_agent_and_reboot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "flannel-ebpf"])
    started = state_file.process_start_time(child.pid)
    ready_state(tmp_path, pid=child.pid, pid_start=started)
    try:
        code, out = health(tmp_path, capsys)
        assert code == 0, out
    finally:
        child.kill()
        child.wait()
    code, out = health(tmp_path, capsys)
    assert code == 1 and out == f"not-ready agent (pid {child.pid}) is not running; last phase ready", out
    ready_state(tmp_path, boot_id="00000000-0000-0000-0000-000000000000")
    code, out = health(tmp_path, capsys)
    assert code == 1 and "ran before this host rebooted" in out, out


# Runs as PID 1 of a PID namespace of its own: an "agent" writes its state and dies, and its PID is
# handed to a new process (ns_last_pid) whose command line also says flannel, as after a crash and
# a busy host. The old check (the PID lives and its command line says "flannel") took it for the agent.
PID_REUSE = r"""
import json, os, subprocess, sys, time
from flannel_ebpf import state
from flannel_ebpf.cli import main
state_dir = sys.argv[1]
argv = [sys.executable, "-c", "import time; time.sleep(30)", "flannel-ebpf", "up"]
agent = subprocess.Popen(argv)
st = state.AgentState(pid=agent.pid, phase="ready", subnet="10.5.34.0/24", mtu=1472, backend_type="alloc")
st.pid_start, st.boot_id = state.process_start_time(agent.pid), state.boot_id()
state.save(state_dir, st)
agent.kill(); agent.wait()
time.sleep(0.1)  # start times count clock ticks: the next process starts at another one
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(agent.pid - 1))
other = subprocess.Popen(argv)
for _ in range(100):  # until it runs its own command line
    with open(f"/proc/{other.pid}/cmdline", "rb") as f:
        if b"flannel" in f.read():
            break
    time.sleep(0.05)
try:
    print(json.dumps({"same_pid": other.pid == agent.pid, "old_check": state.pid_alive(agent.pid)}), flush=True)
    sys.exit(main(["health", "--state-dir", state_dir]))
finally:
    other.kill(); other.wait()
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_health_sees_a_reused_pid(tmp_path: Path) -> None:
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_REUSE, str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, (r.stdout, r.stderr)
    facts = json.loads(lines[0])
    assert facts == {"same_pid": True, "old_check": True}, facts  # a real reuse, that fooled the old check
    assert r.returncode == 1
    assert "not running: that PID belongs to another process now" in lines[1], lines[1]


def test_one_lock_holder_at_a_time_and_none_after_a_crash(tmp_path: Path) -> None:
    with state_file.InstanceLock.acquire(str(tmp_path), "up"):
        with pytest.raises(state_file.AlreadyRunning, match=f"an agent \\(pid {os.getpid()}\\) already runs"):
            state_file.InstanceLock.acquire(str(tmp_path), "down")
        # Another process sees the same (flock is per open file, so this is the real cross-process case).
        code = (
            "import sys; from flannel_ebpf import state\n"
            "try:\n    state.InstanceLock.acquire(sys.argv[1])\nexcept state.AlreadyRunning as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                           timeout=30, env=cli_env())  # fmt: skip
        assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout, (r.stdout, r.stderr)
    # Released: taken again. A holder killed with SIGKILL leaves no stale lock.
    state_file.InstanceLock.acquire(str(tmp_path)).release()
    with subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flannel_ebpf import state\n"
         "lock = state.InstanceLock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=cli_env(),
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(state_file.AlreadyRunning, match=f"pid {holder.pid}"):
                state_file.InstanceLock.acquire(str(tmp_path))
        finally:
            holder.send_signal(signal.SIGKILL)  # the with's exit waits for it and closes its pipe
    state_file.InstanceLock.acquire(str(tmp_path)).release()
