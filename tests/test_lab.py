"""The namespace lab itself, without the real agent: underlay, etcd, containers, processes, cleanup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from flannel_ebpf.lab import agent as agent_mod
from flannel_ebpf.lab.cleanup import cleanup, find_leftovers
from flannel_ebpf.lab.containers import SubnetEnv
from flannel_ebpf.lab.netns import BPFFS, list_netns, run
from flannel_ebpf.lab.traffic import parse_ping

pytestmark = pytest.mark.lab


def _root_view() -> tuple[str, str, str]:
    """The root namespace's links, addresses and routes (the lab must never change them)."""

    def names(out: str) -> str:
        # `ip -o link` counters and flags change by themselves; interface names and addresses do not.
        return "\n".join(sorted(line.split(":")[1].split("@")[0].strip() for line in out.splitlines()))

    links = names(run(["ip", "-o", "link", "show"]).stdout)
    addrs = "\n".join(sorted(" ".join(line.split()[1:4]) for line in run(["ip", "-o", "addr"]).stdout.splitlines()))
    routes = run(["ip", "route", "show", "table", "all"]).stdout
    return links, addrs, "\n".join(sorted(routes.splitlines()))


# ------------------------------------------------------------------ pure helpers


def test_parse_ping_summary_and_failure():
    ok = parse_ping(
        "--- 10.5.2.2 ping statistics ---\n3 packets transmitted, 3 received, 0% packet loss, time 402ms\n"
        "rtt min/avg/max/mdev = 0.052/0.065/0.074/0.009 ms\n"
    )
    assert (ok.sent, ok.received, ok.ok, ok.rtt_avg, ok.loss) == (3, 3, True, 0.065, 0.0)
    bad = parse_ping("3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2041ms\n")
    assert (bad.sent, bad.received, bad.errors, bad.reachable, bad.rtt_avg) == (3, 0, 3, False, None)
    assert parse_ping("ping: connect: Network is unreachable\n").sent == 0


def test_subnet_env_round_trip():
    env = SubnetEnv.parse(SubnetEnv.render("10.5.0.0/16", "10.5.34.1/24", 1472, True))
    assert str(env.subnet) == "10.5.34.1/24" and str(env.subnet.network) == "10.5.34.0/24"
    assert (env.mtu, env.ipmasq, str(env.network)) == (1472, True, "10.5.0.0/16")
    with pytest.raises(ValueError):
        SubnetEnv.parse("FLANNEL_SUBNET=10.5.34.1/24\n")


# ------------------------------------------------------------------ underlay


def test_flat_underlay_hosts_reach_each_other_and_root_is_untouched(lab_factory):
    before = _root_view()
    lab = lab_factory(3, with_etcd=False)
    assert set(lab.namespaces()) == {f"{lab.prefix}-{n}" for n in ("sw", "h1", "h2", "h3")}
    for h in lab.hosts.values():
        assert h.segment.name == "a"
        assert h.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        assert f"inet {h.underlay}" in h.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    matrix = lab.underlay_ping_matrix()
    assert matrix.all_ok, matrix.format()
    assert len(matrix.results) == 6
    lab.close()
    assert _root_view() == before


def test_routed_underlay_goes_through_the_router(lab_factory):
    lab = lab_factory(3, topology="routed", with_etcd=False)
    h1, h3 = lab.hosts["h1"], lab.hosts["h3"]
    assert [h.segment.name for h in lab.hosts.values()] == ["a", "a", "b"]
    assert str(h3.underlay_ip) == "192.168.51.13"
    matrix = lab.underlay_ping_matrix()
    assert matrix.all_ok, matrix.format()
    # Not on one L2 segment: h1 reaches h3 via the router (what host-gw must refuse).
    route = h1.exec(["ip", "route", "get", str(h3.underlay_ip)]).stdout
    assert "via 192.168.50.1" in route
    hops = lab.exec(h1, ["ping", "-n", "-c", "1", "-W", "2", str(h3.underlay_ip)]).stdout
    assert "ttl=63" in hops  # one router decremented it
    # No default route anywhere: traffic the lab did not plan for has nowhere to go.
    assert "default" not in h1.exec(["ip", "route"]).stdout


# ------------------------------------------------------------------ etcd


def test_etcd_in_the_lab_answers_from_every_segment(lab_factory):
    lab = lab_factory(2, topology="routed", network_config={"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
    assert lab.etcd_endpoint == "http://192.168.50.2:2379"
    assert json.loads(lab.etcd_get("/coreos.com/network/config"))["Backend"]["Type"] == "vxlan"
    for h in lab.hosts.values():  # h2 is behind the router
        r = h.exec(["etcdctl", "--endpoints", lab.etcd_endpoint, "endpoint", "health"], env={**os.environ,
                   "ETCDCTL_API": "3"}, timeout=20)  # fmt: skip
        assert "is healthy" in r.stdout + r.stderr

    lab.etcd_put("/coreos.com/network/subnets/10.5.9.0-24", "-garbage {")  # a value etcdctl could take as a flag
    lab.etcd_put("/coreos.com/network/subnets/10.5.8.0-24", '{"PublicIP":"192.168.50.99"}')
    assert lab.leases() == {"10.5.9.0-24": "-garbage {", "10.5.8.0-24": {"PublicIP": "192.168.50.99"}}
    assert lab.etcd_delete("/coreos.com/network/subnets/10.5.9.0-24") == 1

    lab.restart_etcd()  # data survives a restart
    assert lab.etcd_get("/coreos.com/network/subnets/10.5.8.0-24") is not None
    lab.wipe_etcd()  # ... not a wipe
    assert lab.etcd_get_prefix("/") == {}
    lab.stop_etcd()
    with pytest.raises(RuntimeError):
        lab.etcd_get("/coreos.com/network/config")
    lab.start_etcd()
    lab.set_network_config('{"Network": "10.6.0.0/16"}')
    assert lab.etcd_get("/coreos.com/network/config") == '{"Network": "10.6.0.0/16"}'


# ------------------------------------------------------------------ containers


def test_containers_from_hand_written_subnet_files_reach_across_hosts(lab_factory):
    lab = lab_factory(2, with_etcd=False)
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    lab.write_subnet_env(h1, "10.5.0.0/16", "10.5.1.1/24", mtu=1450)
    lab.write_subnet_env(h2, "10.5.0.0/16", "10.5.2.1/24", mtu=1450)
    c1, c2 = lab.add_container(h1), lab.add_container(h1)
    c3 = lab.add_container(h2)
    assert [str(c.ip) for c in (c1, c2, c3)] == ["10.5.1.2", "10.5.1.3", "10.5.2.2"]
    assert (c1.name, c3.name) == ("h1c1", "h2c1")

    # As Docker with --bip/--mtu: bridge holds the gateway, container has MTU and a default route.
    assert "inet 10.5.1.1/24" in h1.exec(["ip", "-o", "-4", "addr", "show", "dev", "docker0"]).stdout
    assert "mtu 1450" in c1.exec(["ip", "link", "show", "eth0"]).stdout
    assert "default via 10.5.1.1 dev eth0" in c1.exec(["ip", "route"]).stdout

    # Same host works through the bridge alone; across hosts needs routes (what host-gw adds).
    assert lab.ping(c1, c2).ok
    assert not lab.ping(c1, c3, count=1, timeout=1).reachable
    h1.node.ip("route", "add", "10.5.2.0/24", "via", str(h2.underlay_ip))
    h2.node.ip("route", "add", "10.5.1.0/24", "via", str(h1.underlay_ip))
    matrix = lab.ping_matrix()
    assert matrix.all_ok, matrix.format()
    assert "✓" in matrix.format() and "✗" not in matrix.format()

    # Bounded load helpers.
    flood = lab.flood_ping(c1, c3, seconds=1)
    assert flood.sent > 100 and flood.loss < 0.05, flood
    srv = lab.iperf3_server(c3)
    report = lab.iperf3(c1, c3, seconds=1)
    assert report["end"]["sum_received"]["bits_per_second"] > 1e8
    pid = srv.proc.pid
    srv.stop()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# ------------------------------------------------------------------ agents (a stand-in CLI)

FAKE_CLI = textwrap.dedent(
    """\
    #!/bin/sh
    # Stands in for flannel-ebpf: records where it ran, writes a subnet file, answers health.
    cmd=$1; shift; echo "$cmd $*" >> "$FAKE_LOG"
    while [ $# -gt 0 ]; do
      case $1 in --subnet-file) sf=$2; shift;; --state-dir) sd=$2; shift;; --bpf-pin-dir) pd=$2; shift;; esac
      shift
    done
    case $cmd in
    up)
      ls /sys/class/net > "$sd/netdevs"; stat -f -c %T /sys/fs/bpf > "$sd/bpffs"; mkdir -p "$pd"
      sleep 0.5
      printf 'FLANNEL_NETWORK=10.5.0.0/16\\nFLANNEL_SUBNET=10.5.7.1/24\\n' > "$sf"
      printf 'FLANNEL_MTU=1500\\nFLANNEL_IPMASQ=false\\n' >> "$sf"
      touch "$sd/ready"
      trap 'echo term >> "$sd/signals"; rm -f "$sd/ready"; exit 0' TERM
      while :; do sleep 0.1; done;;
    health)
      [ -f "$sd/ready" ] || { echo "not-ready starting"; exit 1; }
      echo "ready eth0 subnet:10.5.7.0/24 mtu:1500";;
    down)
      rm -f "$sf"; rmdir "$pd" 2>/dev/null; echo down >> "$sd/signals";;
    esac
    """
)


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake-flannel-ebpf"
    script.write_text(FAKE_CLI)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(agent_mod, "cli_command", lambda: [str(script)])
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    return tmp_path / "calls.log"


def test_agent_processes_start_stop_kill_ready_down(fake_cli, lab_factory):
    # fake_cli first: it must outlive the lab, whose close() runs `down` through it.
    lab = lab_factory(2, with_etcd=False)
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    lab.start_agent(h1, ["--ip-masq"])
    assert lab.wait_ready(h1, timeout=10) == "ready eth0 subnet:10.5.7.0/24 mtu:1500"
    # The agent sees its namespace's devices AND the machine's bpffs (where its pins must survive it).
    assert "eth0" in (h1.dir / "netdevs").read_text().split()
    assert (h1.dir / "bpffs").read_text().strip() == "bpf_fs"
    assert lab.pin_dir(h1).is_dir() and lab.pin_dir(h1).name == f"flannel-ebpf-{lab.prefix}-h1"
    up_line = next(line for line in fake_cli.read_text().splitlines() if line.startswith("up "))
    assert f"up --etcd-endpoints http://192.168.50.2:2379 --subnet-file {h1.subnet_file}" in up_line
    assert up_line.endswith("--iface eth0 --ip-masq")

    c = lab.add_container(h1)  # from the subnet file the "agent" wrote
    assert str(c.ip) == "10.5.7.2"

    assert lab.stop_agent(h1) == 0  # SIGTERM reached the agent itself, not a wrapper
    assert (h1.dir / "signals").read_text() == "term\n"
    assert lab.agent_down(h1).ok
    assert not h1.subnet_file.exists() and not lab.pin_dir(h1).exists()

    proc = lab.start_agent(h2).proc
    lab.wait_ready(h2, timeout=10)
    assert lab.kill_agent(h2) == -9
    assert not Path(f"/proc/{proc.pid}").exists() or proc.returncode is not None
    with pytest.raises(RuntimeError, match="already runs"):
        lab.start_agent(h1)
        lab.start_agent(h1)
    agent_pid = lab.agent(h1).proc.pid
    lab.close()  # SIGTERMs the running agent, then `down` for every host that ever ran one
    assert not lab.agent_running(h1) and not Path(f"/proc/{agent_pid}/cmdline").exists()
    assert [line.split()[0] for line in fake_cli.read_text().splitlines()].count("down") == 3


def test_wait_ready_reports_an_agent_that_exits(tmp_path, monkeypatch, lab_factory):
    script = tmp_path / "dying"
    script.write_text("#!/bin/sh\necho 'config: Network is required' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(agent_mod, "cli_command", lambda: [str(script)])
    lab = lab_factory(1, with_etcd=False)
    lab.start_agent("h1")
    with pytest.raises(RuntimeError, match="Network is required"):
        lab.wait_ready("h1", timeout=10)


# ------------------------------------------------------------------ teardown


def test_close_leaves_no_namespace_pin_or_process(lab_factory):
    lab = lab_factory(2, topology="routed", network_config={"Network": "10.5.0.0/16"})
    lab.write_subnet_env("h1", "10.5.0.0/16", "10.5.1.1/24")
    lab.add_container("h1")
    # Something pinned by an "agent" through the shared bpffs, and long-running processes.
    lab.hosts["h1"].exec(["mkdir", "-p", f"{lab.pin_dir('h1')}/maps"], share_bpffs=True)
    assert lab.pin_dir("h1").is_dir()
    srv = lab.iperf3_server("h2")
    pids = [srv.proc.pid, lab.etcd.proc.pid]
    stray = lab.node("h1c1").popen(["sleep", "600"])  # a process the lab does not track
    lab.close()
    stray.wait(5)
    names = list_netns()
    assert not [n for n in names if n.startswith(f"{lab.prefix}-")], names
    assert not list(BPFFS.glob(f"flannel-ebpf-{lab.prefix}-*"))
    assert not lab.dir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    lab.close()  # idempotent


def test_cleanup_removes_an_abandoned_lab_and_spares_a_live_one(lab_factory):
    live = lab_factory(1, with_etcd=False)
    crashed = lab_factory(1, network_config={"Network": "10.5.0.0/16"})
    crashed.hosts["h1"].exec(["mkdir", "-p", str(crashed.pin_dir("h1"))], share_bpffs=True)
    crashed.detach()  # as if its process had died: no owner, everything still there
    etcd_pid = crashed.etcd.proc.pid
    left = find_leftovers()
    assert left[live.prefix].owner_alive() == os.getpid()
    assert left[crashed.prefix].owner_alive() is None and len(left[crashed.prefix].namespaces) == 3

    assert cleanup(crashed.prefix) == [crashed.prefix]
    assert crashed.prefix not in find_leftovers()
    crashed.etcd.proc.wait(5)  # etcd inside the lab's namespace was ended
    assert not Path(f"/proc/{etcd_pid}").exists()
    assert f"{live.prefix}-h1" in list_netns()

    # The command line entry point.
    r = subprocess.run(
        [os.sys.executable, "-m", "flannel_ebpf.lab", "cleanup", "--list"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and f"{live.prefix}:" in r.stdout and "owner pid" in r.stdout
