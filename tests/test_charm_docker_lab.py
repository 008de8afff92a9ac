"""The flannel-docker seed's path, for real: docker0 set from the `network` relation's data.

The charm runs on two lab hosts related to a docker charm (`network`, container scope) and hands it the
host's flannel subnet and MTU once the agent holds a lease. The docker side is played by the charm's
own code path for it, run inside each host's namespace: `bridge.py docker --relation-data ...` makes
docker0 what `dockerd --bip=<subnet> --mtu=<mtu>` would (and says those flags). A container on that
docker0 (a namespace with a veth, as Docker makes it) on each host then pings the other across hosts
over the eBPF udp path.
"""

from __future__ import annotations

import json
import sys
from ipaddress import IPv4Interface
from typing import Any

import pytest
from ops import testing

from flannel_ebpf.lab.agent import cli_command, cli_env
from flannel_ebpf.lab.netns import Netns

from .charm_lab import CHARM_DIR, charm_workload, etcd_relation, installed, run_charm

pytestmark = pytest.mark.lab

NETWORK_CONFIG = {"Network": "10.10.0.0/16", "Backend": {"Type": "udp"}}
JUJU_KEYS = ("egress-subnets", "ingress-address", "private-address")


def test_docker0_from_the_network_relation_carries_containers_across_hosts(
    lab_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = lab_factory(hosts=2, network_config=NETWORK_CONFIG)
    hosts = ["h1", "h2"]
    lab.start_agents()
    lab.wait_all_ready(timeout=60)
    deployed = {"network": "10.10.0.0/16", "etcd-prefix": "/coreos.com/network"}
    for h in hosts:
        workload = charm_workload(lab, h)
        docker = testing.SubordinateRelation("network", "sdn-plugin", remote_app_name="docker")
        state = testing.State(relations=[etcd_relation(lab), docker], stored_states=[installed(deployed)])
        out, _ = run_charm(workload, "update_status", state, monkeypatch)
        env = lab.subnet_env(h)
        assert env is not None
        assert out.unit_status == testing.ActiveStatus(f"ready eth0 subnet:{env.subnet.network} mtu:1472")
        data = {k: v for k, v in out.get_relation(docker.id).local_unit_data.items() if k not in JUJU_KEYS}
        assert data == {"subnet": str(env.subnet), "mtu": "1472", "cidr": "10.10.0.0/16",
                        "flannel-subnet": str(env.subnet), "flannel-mtu": "1472"}  # fmt: skip
        # A docker host gets no lxcbr0 (docker owns the bridge here).
        assert not workload.paths.lxc_default_conf.exists()

        # The docker side, from the relation data alone, in the host's namespace.
        node = lab.host(h).node
        assert isinstance(node, Netns)
        r = node.exec(
            [sys.executable, CHARM_DIR / "src" / "bridge.py", "--flannel-ebpf", " ".join(cli_command()),
             "--state-dir", lab.dir / f"docker-{h}", "docker", "--relation-data", json.dumps(data)],
            env=cli_env(),
        )  # fmt: skip
        result = json.loads(r.stdout)
        assert result["dockerd"] == [f"--bip={env.subnet}", "--mtu=1472"]
        addr = node.ip("-o", "-4", "addr", "show", "dev", "docker0").stdout.split()
        assert IPv4Interface(addr[addr.index("inet") + 1]) == env.subnet
        link = node.ip("-o", "link", "show", "dev", "docker0").stdout.split()
        assert link[link.index("mtu") + 1] == "1472"
        lab.add_container(h)  # a container on docker0, addressed from the subnet (lab.containers)

    c1, c2 = lab.containers
    assert c1.ip in lab.subnet_env("h1").subnet.network and c2.ip in lab.subnet_env("h2").subnet.network
    for src, dst in ((c1, c2), (c2, c1)):
        p = lab.ping(src, dst, count=3)
        assert p.received == p.sent == 3, p.output
    for h in hosts:
        summary = lab.agent_status(h)["summary"]
        assert (summary["backend"], summary["datapath"].get("datapath")) == ("udp", "ebpf"), summary
        assert summary["throughput"]["encap_ok"]["packets"] >= 3, summary["throughput"]
        assert summary["throughput"]["decap_ok"]["packets"] >= 3, summary["throughput"]
