"""Containers made by the real CNI plugins (Debian's containernetworking-plugins: bridge, host-local,
loopback, portmap) from the conflist `flannel-ebpf cni-config` writes, invoked as a runtime invokes them
(flannel_ebpf/lab/cni.py). Three hosts; every container pair answers across hosts on udp eBPF (flannel
not masquerading: the bridge plugin does) and on vxlan (--ip-masq: flannel does, the bridge plugin not);
DEL leaves no veth, no bridge port, no address allocation and no iptables chain behind. The bridge stays,
as the bridge plugin leaves it. One lab: the backend is switched between the two parts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from flannel_ebpf.lab.cni import CniRuntime, add_container, allocations, find_plugin_dir, remove_data_dir
from flannel_ebpf.lab.containers import Container
from flannel_ebpf.lab.netns import delete_netns
from tests.helpers import wait_for

pytestmark = pytest.mark.lab

NETWORK = "10.11.0.0/16"
BRIDGE = "cni0"


@pytest.fixture(scope="module")
def cni_lab(request: pytest.FixtureRequest) -> Iterator[tuple]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    plugin_dir = find_plugin_dir()
    if plugin_dir is None:
        pytest.skip("no CNI plugins (bridge, host-local, loopback, portmap): `make setup` installs them")
    from flannel_ebpf.lab.lab import Lab

    failed_before = request.session.testsfailed
    lab = Lab(3, network_config={"Network": NETWORK, "Backend": {"Type": "udp"}}).up()
    data_dir = lab.dir / "cni-networks"
    try:
        yield lab, plugin_dir, data_dir
    finally:
        failed = request.session.testsfailed > failed_before
        if failed:
            for name, agent in lab.agents.items():
                if agent.ever_started:
                    print(f"\n---- {lab.prefix} agent log of {name} (tail) ----\n{agent.log_tail()}")
        remove_data_dir(data_dir)
        lab.close(remove_dir=not failed)


def nat_rules(lab, host: str) -> str:
    return lab.exec(host, ["iptables", "-w", "5", "-t", "nat", "-S"]).stdout


def bring_up(lab, plugin_dir: Path, data_dir: Path, agent_args: list[str]) -> tuple[dict, list[Container]]:
    """Agents up, a conflist per host from its subnet.env, a container per host (two on h1) by CNI ADD."""
    lab.start_agents(agent_args)
    lab.wait_all_ready(60)
    runtimes: dict[str, CniRuntime] = {}
    for name, host in lab.hosts.items():
        out = host.dir / "10-flannel.conflist"
        r = lab.agent_cli(name, "cni-config", "--subnet-file", str(host.subnet_file), "-o", str(out))
        assert r.ok, r
        runtimes[name] = CniRuntime(host, json.loads(out.read_text()), plugin_dir, data_dir / name)
    containers = []
    for name in ["h1", "h1", "h2", "h3"]:
        c = add_container(runtimes[name], f"{name}k{sum(x.host.name == name for x in containers) + 1}")
        containers.append(c)
        lab.containers.append(c)  # the lab's ping matrix and cleanup know it
    for c in containers:
        env = lab.subnet_env(c.host)
        assert c.gateway == env.subnet.ip and c.ip in env.subnet.network, (c, env)
        eth0 = json.loads(lab.exec(c, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]
        assert eth0["mtu"] == env.mtu
        routes = lab.exec(c, ["ip", "-4", "route"]).stdout
        assert f"default via {env.subnet.ip}" in routes and f"{NETWORK} via {env.subnet.ip}" in routes, routes
        bridge = json.loads(lab.exec(c.host, ["ip", "-j", "addr", "show", BRIDGE]).stdout)[0]
        assert str(env.subnet) in [f"{a['local']}/{a['prefixlen']}" for a in bridge["addr_info"]]
    return runtimes, containers


def tear_down(lab, runtimes: dict[str, CniRuntime], containers: list[Container], network: str) -> None:
    """CNI DEL for every container, then check nothing but the bridge is left; agents stopped and down."""
    for c in containers:
        runtimes[c.host.name].delete(c.name, c.ns)
    for name, host in lab.hosts.items():
        links = lab.exec(host, ["ip", "-o", "link", "show"]).stdout
        for c in (c for c in containers if c.host.name == name):
            assert f" {c.host_veth}@" not in links, f"{c.host_veth} left on {name}"
        assert lab.exec(host, ["ip", "-o", "link", "show", "master", BRIDGE]).stdout.strip() == ""
        assert allocations(runtimes[name].data_dir, network) == []
        assert "CNI-" not in nat_rules(lab, name)
        # The bridge plugin leaves the bridge (and its gateway address) for the next container.
        gateway = lab.subnet_env(name).subnet
        assert str(gateway) in lab.exec(host, ["ip", "-o", "-4", "addr", "show", BRIDGE]).stdout
    for c in containers:
        delete_netns(c.netns)
        lab.containers.remove(c)
    for name in lab.hosts:
        assert lab.stop_agent(name) == 0
        assert lab.agent_down(name).ok


def test_cni_containers_udp_ebpf_then_vxlan(cni_lab) -> None:
    lab, plugin_dir, data_dir = cni_lab

    # udp eBPF, port delivery (the default): flannel does not masquerade, so the bridge plugin does.
    runtimes, containers = bring_up(lab, plugin_dir, data_dir, [])
    conf = runtimes["h1"].conflist
    assert conf["plugins"][0]["ipMasq"] is True and [p["type"] for p in conf["plugins"]] == ["bridge", "portmap"]
    assert allocations(data_dir / "h1", conf["name"]) == sorted(str(c.ip) for c in containers[:2])
    assert "CNI-" in nat_rules(lab, "h1")
    matrix = lab.ping_matrix(containers=containers)
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()
    for name in lab.hosts:  # the delivery hook found the CNI bridge by its gateway address
        wait_for(
            lambda n=name: (
                (lab.agent_status(n)["backend_status"].get("container_bridge") or {}).get("bridge") == BRIDGE
            ),
            what=f"{name}'s udp delivery finds {BRIDGE}",
        )
    tear_down(lab, runtimes, containers, conf["name"])

    # vxlan with --ip-masq: flannel masquerades, the bridge plugin must not.
    lab.set_network_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    runtimes, containers = bring_up(lab, plugin_dir, data_dir, ["--ip-masq"])
    conf = runtimes["h1"].conflist
    assert conf["plugins"][0]["ipMasq"] is False and conf["plugins"][0]["mtu"] == 1450
    assert "CNI-" not in nat_rules(lab, "h1")
    matrix = lab.ping_matrix(containers=containers)
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()
    h1_subnet = IPv4Interface(conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]).network
    assert all(c.ip in h1_subnet for c in containers[:2])
    tear_down(lab, runtimes, containers, conf["name"])
