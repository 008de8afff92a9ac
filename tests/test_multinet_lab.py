"""Multi-network mode (`--networks`, flanneld v0.5's) in a namespace lab with a real etcd.

Three hosts, three networks: blue (vxlan VNI 1), green (vxlan VNI 2) and red (udp, eBPF). h1 serves all
three, h2 blue and red, h3 green and red, so every network spans hosts and every pair of networks has a
host that is in one but not the other. Containers of one network answer each other across hosts;
containers of different networks on different hosts do not (a host routes only into the networks it
serves, and the eBPF udp path takes an inner source only from the sending host's own lease). Beside them
h2 also serves grey (no config yet: waited for) and h3 black (an invalid config): neither holds up the
others. h1 gets pink, a second udp network, once red runs: refused, one host runs one udp network.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network

import pytest

from flannel_ebpf.lab.containers import SubnetEnv
from tests.helpers import wait_for

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIGS = {
    "blue": {"Network": "10.21.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}},
    "green": {"Network": "10.22.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}},
    "red": {"Network": "10.23.0.0/16", "Backend": {"Type": "udp"}},
    "black": {"Network": "not-a-cidr"},
}
MEMBERS = {"h1": ["blue", "green", "red", "pink"], "h2": ["blue", "red", "grey"], "h3": ["green", "red", "black"]}
SERVED = {"h1": ["blue", "green", "red"], "h2": ["blue", "red"], "h3": ["green", "red"]}  # what must get ready
MTU = {"blue": 1450, "green": 1450, "red": 1472}


def subnet_dir(lab, host):
    return lab.host(host).dir / "flannel-networks"


def health(lab, host) -> dict[str, str]:
    """`flannel-ebpf health` of a multi-network agent: {network: its line}."""
    out = lab.agent_cli(host, "health", "--state-dir", str(lab.host(host).state_dir)).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def start(lab, host):
    lab.start_agent(
        host,
        ["--networks", ",".join(MEMBERS[host]), "--subnet-dir", str(subnet_dir(lab, host)), "--resync-interval", "1"],
    )


def wait_served_ready(lab, host, timeout=30.0):
    def ready():
        lines = health(lab, host)
        return all(lines.get(n, "").startswith("ready") for n in SERVED[host]) and lines

    return wait_for(ready, timeout=timeout, what=f"{host}: networks {SERVED[host]} ready")


def pings(lab, pairs, count=2, timeout=1.0):
    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(lambda p: (p, lab.ping(p[0], p[1], count=count, timeout=timeout)), pairs))


def lost_pings(lab, pairs, count=5) -> list[str]:
    """The pairs that lost any of `count` pings (0.2 s apart), as `a->b: received/sent`."""
    return [f"{a}->{b}: {r.received}/{r.sent}" for (a, b), r in pings(lab, pairs, count) if r.received < count]


def test_three_networks_side_by_side(lab_factory):
    lab = lab_factory(3)
    for name in ("blue", "green", "red", "black"):
        lab.etcd_put(f"{PREFIX}/{name}/config", json.dumps(CONFIGS[name]))
    for host in MEMBERS:
        start(lab, host)
    for host in MEMBERS:
        wait_served_ready(lab, host)

    # Each network's env file; leases under <prefix>/<network>/subnets/; nothing at the classic places.
    for host, nets in SERVED.items():
        assert not lab.host(host).subnet_file.exists()
        for net in nets:
            env = SubnetEnv.read(subnet_dir(lab, host) / f"{net}.env")
            assert env.network == IPv4Network(CONFIGS[net]["Network"]) and env.mtu == MTU[net]
            assert env.subnet.network.subnet_of(env.network) and env.subnet.network.prefixlen == 24
    for net in ("blue", "green", "red"):
        leases = lab.etcd_get_prefix(f"{PREFIX}/{net}/subnets/")
        assert len(leases) == sum(net in nets for nets in SERVED.values()), leases
    assert not lab.etcd_get_prefix(f"{PREFIX}/subnets/")

    # The networks that cannot run say why, per network, and hold nobody up.
    assert health(lab, "h2")["grey"].startswith("not-ready waiting-config: no network config at")
    assert "invalid network config" in health(lab, "h3")["black"]
    assert lab.agent_cli("h2", "health", "--state-dir", str(lab.host("h2").state_dir)).returncode == 1
    # pink: a second udp network on h1, configured once red runs there
    lab.etcd_put(f"{PREFIX}/pink/config", json.dumps({"Network": "10.24.0.0/16", "Backend": {"Type": "udp"}}))
    wait_for(lambda: "already runs the udp backend" in health(lab, "h1").get("pink", ""), what="pink refused")
    # grey's config arrives: it comes up beside the others
    lab.etcd_put(f"{PREFIX}/grey/config", json.dumps({"Network": "10.25.0.0/16", "Backend": {"Type": "host-gw"}}))
    wait_for(lambda: health(lab, "h2").get("grey", "").startswith("ready"), what="grey ready on h2")

    # Devices and iptables chains of each network side by side on h1
    links = lab.exec("h1", ["ip", "-o", "link", "show"]).stdout
    assert "flannel.1:" in links and "flannel.2:" in links and "flannel0:" in links
    chains = lab.exec("h1", ["iptables", "-S"]).stdout
    assert all(f"-N FLANNEL-FWD-{n.upper()}" in chains for n in ("BLUE", "GREEN", "RED")), chains

    # Containers: one per network a host serves, each on a bridge of that network.
    containers = {}
    for host, nets in SERVED.items():
        for net in nets:
            env_file = subnet_dir(lab, host) / f"{net}.env"
            containers[(host, net)] = lab.add_container(host, f"{host}{net[0]}", f"br-{net}", env_file)
    time.sleep(2.5)  # a few resyncs (--resync-interval 1): no network's reconcile may drop another's routes
    same = [(a, b) for (ha, na), a in containers.items() for (hb, nb), b in containers.items() if na == nb and ha != hb]
    cross = [
        (a, b) for (ha, na), a in containers.items() for (hb, nb), b in containers.items() if na != nb and ha != hb
    ]
    results = pings(lab, same + cross)
    same_failed = [f"{a}->{b}" for (a, b), r in results[: len(same)] if r.received == 0]
    cross_answered = [f"{a}->{b}" for (a, b), r in results[len(same) :] if r.received]
    assert not same_failed, f"same network, no answer: {same_failed}"
    assert not cross_answered, f"different networks answered: {cross_answered}"

    # status per network
    doc = json.loads(lab.agent_cli("h1", "status", "--json", "--state-dir", str(lab.host("h1").state_dir)).stdout)
    nets = doc["networks"]
    assert set(nets) == set(MEMBERS["h1"])
    assert nets["blue"]["phase"] == "ready" and nets["blue"]["backend_type"] == "vxlan"
    assert nets["red"]["live"]["maps"]["pin_dir"].endswith("/red")
    assert {p["subnet"] for p in nets["blue"]["peers"]} == {
        str(SubnetEnv.read(subnet_dir(lab, "h2") / "blue.env").subnet.network)
    }
    assert nets["pink"]["phase"] == "failed"

    # A restart (SIGKILL) keeps traffic flowing and adopts: same subnets, every network ready again.
    before = {n: (subnet_dir(lab, "h1") / f"{n}.env").read_text() for n in SERVED["h1"]}
    lab.kill_agent("h1")
    down_pairs = [
        (containers[("h1", n)], containers[(h, n)]) for n in SERVED["h1"] for h in ("h2", "h3") if (h, n) in containers
    ]
    assert not lost_pings(lab, down_pairs), "traffic stopped with the agent"  # the agent is gone: kill waited
    start(lab, "h1")
    wait_served_ready(lab, "h1")
    assert before == {n: (subnet_dir(lab, "h1") / f"{n}.env").read_text() for n in SERVED["h1"]}
    # Through the restarted agent's first resyncs (--resync-interval 1: one a second), none drops a route.
    for _ in range(3):
        assert not lost_pings(lab, down_pairs), "traffic stopped after the restart"

    # `down` removes every network's devices, routes, chains, pins, env files and state.
    assert lab.stop_agent("h1") == 0
    r = lab.agent_down("h1")
    assert r.ok, r.stderr[-2000:]
    links = lab.exec("h1", ["ip", "-o", "link", "show"]).stdout
    assert "flannel.1" not in links and "flannel.2" not in links and "flannel0" not in links, links
    assert not lab.exec("h1", ["ip", "route", "show", "proto", "102"]).stdout.strip()
    assert "FLANNEL" not in lab.exec("h1", ["iptables", "-S"]).stdout
    assert not list(subnet_dir(lab, "h1").glob("*.env"))
    assert not list((lab.host("h1").state_dir / "networks").glob("*/state.json"))
    red_pins = lab.pin_dir("h1") / "red"
    assert not red_pins.exists() or not any(red_pins.iterdir())
    # the other hosts lose h1 from every network (its leases stay, as with flanneld: down keeps them)
    assert health(lab, "h2")["blue"].startswith("ready")


def test_multi_network_mode_notifies_ready_once_every_network_is_up(lab_factory, tmp_path):
    """flanneld v0.5 sent no READY=1 in multi-network mode: under a Type=notify unit that is systemd's
    start timeout. flannel-ebpf sends one, once every network is ready (and STOPPING=1 on stop)."""
    lab = lab_factory(1)
    lab.etcd_put(f"{PREFIX}/blue/config", json.dumps({"Network": "10.26.0.0/16", "Backend": {"Type": "alloc"}}))
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.5)
        agent = lab.start_agent(
            "h1", ["--networks", "blue,red", "--subnet-dir", str(subnet_dir(lab, "h1"))],
            env={"NOTIFY_SOCKET": str(path)},
        )  # fmt: skip
        assert agent.proc is not None
        wait_for(lambda: health(lab, "h1").get("blue", "").startswith("ready"), what="blue ready")
        time.sleep(1.0)
        with pytest.raises(TimeoutError):  # red has no config yet: not every network is up
            print("unexpected notification:", sock.recv(4096))
        lab.etcd_put(f"{PREFIX}/red/config", json.dumps({"Network": "10.27.0.0/16", "Backend": {"Type": "alloc"}}))
        sock.settimeout(30)
        message = sock.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1" and "networks blue, red" in message, message
        assert all(health(lab, "h1")[name].startswith("ready") for name in ("blue", "red"))
        assert lab.stop_agent("h1") == 0
        assert sock.recv(4096).decode().startswith("STOPPING=1")
    assert SubnetEnv.read(subnet_dir(lab, "h1") / "blue.env").network == IPv4Network("10.26.0.0/16")
