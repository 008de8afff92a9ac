"""The seeds' etcd-era tutorial, replayed the way its reader would type it, with flannel-ebpf in place of
flanneld (issue 18): the network config written with etcd's v2 API (`etcdctl set`), agents started with
flanneld's one-dash flags and no subcommand, vxlan with VNI 100 on port 8472, the charm's `lxcbr0` bridge
made from the lease, `health` in the charm's form, and containers on that bridge answering across hosts.

Two hosts and a real etcd started with `--enable-v2` (etcd 3.4/3.5 serve the v2 API only when asked).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": 100, "Port": 8472}}


def test_the_etcd_era_tutorial_end_to_end(lab_factory) -> None:
    lab = lab_factory(2)
    lab.enable_etcd_v2()
    endpoint = lab.etcd_endpoint
    # "etcdctl set /coreos.com/network/config '{...}'": the v2 API, as the tutorials of the time wrote it
    lab.exec("h1", ["env", "ETCDCTL_API=2", "etcdctl", f"--endpoints={endpoint}", "set", f"{PREFIX}/config",
                    json.dumps(CONFIG)])  # fmt: skip

    # "flanneld -etcd-endpoints=http://...:2379 -iface=eth0", as in flanneld's unit files
    for host in lab.hosts:
        lab.start_agent(host, go_style=True)
    assert lab.agents["h1"].argv[1].startswith("-etcd-endpoints=http://"), lab.agents["h1"].argv
    assert "up" not in lab.agents["h1"].argv

    # The agent says where the config is and how to move it; done exactly as it says, both get ready.
    wait_for(lambda: "etcd's v2 store" in lab.agent_log("h1"), timeout=20, what="the v2 hint")
    hint = next(line for line in lab.agent_log("h1").splitlines() if "etcd's v2 store" in line)
    lab.exec("h1", ["sh", "-c", re.search(r"copy it with: (.*)$", hint).group(1)])
    lab.wait_all_ready(timeout=40)

    # vxlan as configured: VNI 100, UDP port 8472, on flannel.100
    for host in lab.hosts:
        link = json.loads(lab.node(host).ip("-j", "-d", "link", "show", "flannel.100").stdout)[0]
        vxlan = link["linkinfo"]["info_data"]
        assert (vxlan["id"], vxlan["port"]) == (100, 8472), vxlan

    # The charm's bridge: lxcbr0 from the lease; health in the charm's form
    for host in lab.hosts:
        env = lab.subnet_env(host)
        assert env is not None
        lab.agents[host].cli("bridge", "lxcbr0", "--subnet-file", str(lab.hosts[host].subnet_file),
                             "--state-dir", str(lab.hosts[host].state_dir), check=True)  # fmt: skip
        health = lab.agents[host].health()
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.strip() == f"ready lxcbr:{env.subnet.ip} subnet:{env.subnet} mtu:{env.mtu}"
        assert env.mtu == 1450  # vxlan's 50 bytes under the lab's 1500

    # Containers on lxcbr0 answer each other across the hosts
    for host in lab.hosts:
        lab.add_container(host, bridge="lxcbr0")
    matrix = lab.ping_matrix()
    assert matrix.all_ok, matrix.format()
