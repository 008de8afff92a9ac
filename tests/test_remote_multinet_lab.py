"""Client/server and multi-network mode together (issue 17): as flanneld v0.5 has it, `--networks` is given
to the clients only. The `--listen` server on h1 serves every network under the etcd prefix; the clients on
h2 and h3 have no path to etcd (a DROP rule in their namespaces) and each runs two networks through it,
blue (vxlan VNI 1) and red (udp eBPF). Same-network containers answer across the clients; each network's
leases are under `<prefix>/<name>/subnets/` in etcd, written by the server.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network

import pytest

from flannel_ebpf.lab.containers import SubnetEnv
from tests.helpers import wait_for
from tests.test_remote_lab import PORT, Server, cut_from_etcd

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIGS = {
    "blue": {"Network": "10.31.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}},
    "red": {"Network": "10.32.0.0/16", "Backend": {"Type": "udp"}},
}
CLIENTS = ("h2", "h3")


def subnet_dir(lab, host):
    return lab.host(host).dir / "flannel-networks"


def health(lab, host) -> dict[str, str]:
    out = lab.agent_cli(host, "health", "--state-dir", str(lab.host(host).state_dir)).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_multi_network_clients_of_one_server(lab_factory):
    lab = lab_factory(3)
    for name, config in CONFIGS.items():
        lab.etcd_put(f"{PREFIX}/{name}/config", json.dumps(config))
    server = Server(lab, "h1", ["--listen", f":{PORT}"])
    server.start()
    remote = f"{lab.host('h1').underlay_ip}:{PORT}"
    for host in CLIENTS:
        cut_from_etcd(lab, host)
        lab.start_agent(
            host, ["--remote", remote, "--networks", "blue,red", "--subnet-dir", str(subnet_dir(lab, host))]
        )
    for host in CLIENTS:
        wait_for(lambda h=host: all(health(lab, h).get(n, "").startswith("ready") for n in CONFIGS), timeout=40,
                 what=f"{host}: blue and red ready through the server")  # fmt: skip

    for name, config in CONFIGS.items():
        leases = lab.etcd_get_prefix(f"{PREFIX}/{name}/subnets/")
        assert len(leases) == len(CLIENTS), leases
        assert {json.loads(v)["PublicIP"] for v in leases.values()} == {str(lab.host(h).underlay_ip) for h in CLIENTS}
        for host in CLIENTS:
            env = SubnetEnv.read(subnet_dir(lab, host) / f"{name}.env")
            assert env.network == IPv4Network(config["Network"])
    assert not lab.etcd_get_prefix(f"{PREFIX}/subnets/"), "nothing in the default network"

    containers = {
        (host, name): lab.add_container(host, f"{host}{name[0]}", f"br-{name}", subnet_dir(lab, host) / f"{name}.env")
        for host in CLIENTS
        for name in CONFIGS
    }
    for name in CONFIGS:
        a, b = containers[("h2", name)], containers[("h3", name)]
        for src, dst in ((a, b), (b, a)):
            result = lab.ping(src, dst, count=3)
            assert result.received == 3, f"{name}: {src} -> {dst}: {result}"
    server.stop()
