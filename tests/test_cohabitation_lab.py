"""Living with other tools on the same host, through the real agent in a namespace lab with a real etcd.

Another tool's XDP program and tc filter (tests/foreign_progs.c, loaded with iproute2) sit on the
underlay; each drops one marked ping (IPv4 length 1000 for XDP, 1001 for tc), so the tests see that they
still run. Shown here:
- `up` with XDP decap refuses to replace the foreign XDP program (one line naming it); with tc decap it
  runs beside it, overlay traffic crosses both, and `down` (with and without a state file) leaves the
  foreign program, filter and clsact qdiscs untouched; `--xdp-replace-foreign` replaces it as asked;
- tc decap passes traffic that is not the overlay's on to filters after ours (TC_ACT_UNSPEC);
- a second `up` (and a `down`) while an agent runs is refused, naming its PID; a killed agent leaves no lock;
- `health` turns not-ready when our programs are gone, the heartbeat stops, or the agent dies.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from flannel_ebpf.lab.netns import Netns
from flannel_ebpf.loaders.attach import TC_PRIO
from tests.foreign import (
    TC_MARK_PING,
    XDP_MARK_PING,
    attach_foreign_tc,
    attach_foreign_xdp,
    compile_foreign,
    has_clsact,
    tc_filters,
    xdp_prog,
)
from tests.helpers import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.bpf]

UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
FOREIGN_TC_PREF = 100  # before ours (TC_PRIO): it must pass the rest on, as ours must


@pytest.fixture(scope="module")
def foreign_obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_foreign(tmp_path_factory.mktemp("foreign"))


def gets_through(lab, src: str, dst: str, size: int) -> bool:
    """One ping of `size` bytes of payload from host `src` to host `dst`'s underlay address."""
    return lab.ping(src, lab.host(dst), count=2, interval=0.2, timeout=1.0, size=size).received > 0


def wait_exit(lab, host: str, timeout: float = 90.0) -> int:
    proc = lab.agent(host).proc
    assert proc is not None
    return proc.wait(timeout)


def health(lab, host: str, *extra: str) -> str:
    a = lab.agent(host)
    return a.cli("health", "--state-dir", str(a.host.state_dir), *extra, timeout=20).stdout.strip()


def test_foreign_xdp_and_tc_survive_up_traffic_and_down(lab_factory, foreign_obj: Path) -> None:
    lab = lab_factory(2, network_config=UDP)
    h1: Netns = lab.node("h1")
    xdp = attach_foreign_xdp(h1, "eth0", foreign_obj)
    tc = attach_foreign_tc(h1, "eth0", foreign_obj, FOREIGN_TC_PREF)
    # Two more devices of that tool: an empty clsact, and one holding a u32 filter (no bpf at all).
    h1.ip("link", "add", "fx0", "type", "veth", "peer", "name", "fx1")
    h1.exec(["tc", "qdisc", "add", "dev", "fx0", "clsact"])
    h1.exec(["tc", "qdisc", "add", "dev", "fx1", "clsact"])
    h1.exec(["tc", "filter", "add", "dev", "fx1", "ingress", "prio", "10", "protocol", "ip", "u32",
             "match", "ip", "dst", "10.99.0.1/32", "flowid", "1:1"])  # fmt: skip
    u32 = tc_filters(h1, "fx1")
    assert u32 and all(f.prog_id == 0 for f in u32)

    def foreign_intact(when: str) -> None:
        assert xdp_prog(h1, "eth0") == xdp, f"{when}: the foreign XDP program changed"
        assert [f for f in tc_filters(h1, "eth0") if f.prog_name == "foreign_tc"] == [tc], f"{when}: tc filter"
        assert all(has_clsact(h1, dev) for dev in ("eth0", "fx0", "fx1")), f"{when}: a clsact qdisc went"
        assert tc_filters(h1, "fx1") == u32, f"{when}: the u32 filter went"
        assert not gets_through(lab, "h2", "h1", XDP_MARK_PING), f"{when}: foreign XDP no longer runs"
        assert not gets_through(lab, "h2", "h1", TC_MARK_PING), f"{when}: foreign tc filter no longer runs"
        assert gets_through(lab, "h2", "h1", 56), f"{when}: plain underlay traffic is lost"

    foreign_intact("before up")

    # XDP decap asked for: refused, one line naming the program that is there; nothing replaced.
    lab.start_agent("h1", ["--udp-decap", "xdp"])
    assert wait_exit(lab, "h1") == 1
    refusal = [line for line in lab.agent_log("h1").splitlines() if "foreign_xdp" in line]
    print("\n".join(refusal))
    assert len(refusal) == 1 and f"foreign_xdp (id {xdp.prog_id}" in refusal[0], refusal
    assert "--xdp-replace-foreign" in refusal[0] and "--udp-decap tc" in refusal[0]
    assert "not-ready" in health(lab, "h1")
    foreign_intact("after the refused up")

    # tc decap: runs beside both, the overlay crosses the foreign XDP program and filter.
    lab.start_agents(["--udp-decap", "tc", "--lease-check-interval", "1"])
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    matrix = lab.ping_matrix()
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()
    ours = [f for f in tc_filters(h1, "eth0") if f.prog_name == "flannel_tc_in"]
    assert len(ours) == 1 and ours[0].pref == TC_PRIO
    foreign_intact("with the agent up and traffic")

    # down with the state file, then again without one (as after a reboot): only ours goes.
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1").ok
    assert not [f for f in tc_filters(h1, "eth0") if f.prog_name == "flannel_tc_in"]
    foreign_intact("after down")
    assert not (lab.host("h1").state_dir / "state.json").exists()
    r = lab.agent_down("h1")
    assert r.ok, r.stderr
    assert "no state" in r.stderr
    foreign_intact("after down without a state file")

    # Asked to replace it: done, and said.
    lab.start_agent("h1", ["--udp-decap", "xdp", "--xdp-replace-foreign", "--lease-check-interval", "1"])
    lab.wait_ready("h1", 60)
    now = xdp_prog(h1, "eth0")
    assert now is not None and now.name == "flannel_xdp_in"
    assert "replacing another tool's XDP program foreign_xdp" in lab.agent_log("h1")
    assert lab.ping(lab.containers[1], lab.containers[0]).received == 3


def test_tc_decap_passes_other_traffic_to_filters_after_ours(lab_factory, foreign_obj: Path) -> None:
    lab = lab_factory(2, network_config=UDP)
    lab.start_agents(["--udp-decap", "tc", "--lease-check-interval", "1"])
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    h1: Netns = lab.node("h1")
    assert gets_through(lab, "h2", "h1", TC_MARK_PING)
    after = attach_foreign_tc(h1, "eth0", foreign_obj, TC_PRIO + 1)  # runs after ours
    prefs = sorted(f.pref for f in tc_filters(h1, "eth0"))
    assert prefs == [TC_PRIO, after.pref], prefs
    # Not the overlay's: ours passes it on, the next filter drops the marked one.
    assert not gets_through(lab, "h2", "h1", TC_MARK_PING), "a filter after ours never saw the packet"
    assert gets_through(lab, "h2", "h1", 56)
    # The overlay's: ours decapsulates it (the foreign filter does not see it, nor needs to).
    h1c, h2c = lab.containers
    assert lab.ping(h2c, h1c).received == 3
    assert lab.ping(h2c, h1c, size=TC_MARK_PING).received == 3
    # down: our filter goes; the clsact we created stays, since another tool's filter now uses it.
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1").ok
    assert [f.prog_name for f in tc_filters(h1, "eth0")] == ["foreign_tc"]
    assert has_clsact(h1, "eth0")
    assert not gets_through(lab, "h2", "h1", TC_MARK_PING)


def test_one_agent_per_state_dir(lab_factory) -> None:
    lab = lab_factory(1, network_config={"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}})
    lab.start_agent("h1")
    lab.wait_ready("h1", 60)
    agent = lab.agent("h1")
    assert agent.proc is not None
    pid = agent.proc.pid
    second = agent.cli("up", *agent.common_flags(), "--iface", agent.host.iface, timeout=60)
    print(second.stderr)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"an agent (pid {pid}) already runs" in lines[0], lines
    down = lab.agent_down("h1")
    assert down.returncode == 1 and f"pid {pid}" in down.stderr, down.stderr
    assert health(lab, "h1").startswith("ready")  # neither disturbed the running agent
    lab.kill_agent("h1")  # SIGKILL: the kernel drops its lock
    lab.start_agent("h1")
    lab.wait_ready("h1", 60)


def test_health_sees_programs_gone_a_stuck_agent_and_a_dead_one(lab_factory) -> None:
    lab = lab_factory(1, network_config=UDP)
    lab.start_agent("h1", ["--udp-decap", "tc"])
    lab.wait_ready("h1", 60)
    h1: Netns = lab.node("h1")
    assert health(lab, "h1").startswith("ready")

    # Someone removes our decap filter: not ready, naming it.
    h1.exec(["tc", "filter", "del", "dev", "eth0", "ingress", "prio", str(TC_PRIO)])
    out = health(lab, "h1")
    print(out)
    assert out.startswith("not-ready eBPF programs gone") and "flannel_tc_in (tc-ingress on eth0)" in out, out
    assert lab.stop_agent("h1") == 0
    lab.start_agent("h1", ["--udp-decap", "tc"])  # a restart attaches it again
    lab.wait_ready("h1", 60)

    # The agent hangs (SIGSTOP): its PID lives, but its heartbeat stops.
    proc = lab.agent("h1").proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "no heartbeat" in health(lab, "h1", "--resync-interval", "1"), timeout=30,
                 what="health to notice the stopped heartbeat")  # fmt: skip
        print(health(lab, "h1", "--resync-interval", "1"))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: health(lab, "h1", "--resync-interval", "1").startswith("ready"), timeout=20,
             what="ready again once it runs")  # fmt: skip

    # Killed: not ready, although the data path stays.
    lab.kill_agent("h1")
    out = health(lab, "h1")
    assert out.startswith(f"not-ready agent (pid {proc.pid}) is not running"), out
    assert any(f.prog_name == "flannel_tc_in" for f in tc_filters(h1, "eth0"))

    # down: the clsact we created on eth0, empty once ours is gone, goes too.
    assert lab.agent_down("h1").ok
    assert not has_clsact(h1, "eth0")
