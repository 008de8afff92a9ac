"""The real agent (`flannel-ebpf up` as a subprocess) in a namespace lab with a real etcd: host-gw and
alloc end to end, config errors, garbage leases, clean shutdown and `down`."""

from __future__ import annotations

import json

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.lab

HOSTGW = {"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}


def routes(lab, host: str) -> list[dict]:
    """The host's routes that flannel-ebpf made (proto 102)."""
    out = lab.exec(host, ["ip", "-j", "route", "show", "proto", "102"]).stdout
    return json.loads(out or "[]")


def test_hostgw_full_mesh_then_a_host_leaves(lab_factory):
    lab = lab_factory(3, network_config=HOSTGW)
    lab.start_agents()
    ready = lab.wait_all_ready(30)
    for host, line in ready.items():
        env = lab.subnet_env(host)
        assert line == f"ready eth0 subnet:{env.subnet.network} mtu:1500"
    for host in lab.host_names:
        lab.add_container(host)
    matrix = lab.ping_matrix()
    print(matrix.format())
    assert matrix.all_ok, matrix.failures()

    # The leases in etcd are flanneld's keys and JSON.
    leases = lab.etcd_get_prefix("/coreos.com/network/subnets/")
    assert len(leases) == 3
    for key, value in leases.items():
        assert key.startswith("/coreos.com/network/subnets/10.5.") and key.endswith("-24")
        doc = json.loads(value)
        assert set(doc) == {"PublicIP", "PublicIPv6", "BackendType"} and doc["BackendType"] == "host-gw"

    status = lab.agent_status("h1")
    assert status["running"] and status["phase"] == "ready"
    assert len(status["peers"]) == 2 and status["last_revision"] > 0

    # h3 stops for good: its agent exits cleanly, `down --release-lease` deletes its lease, and every other
    # host drops the route to its subnet.
    h3_subnet = str(lab.subnet_env("h3").subnet.network)
    assert any(r["dst"] == h3_subnet for r in routes(lab, "h1"))
    assert lab.stop_agent("h3") == 0
    down = lab.agent_down("h3", ["--release-lease"])
    assert down.ok, down.stderr
    for host in ("h1", "h2"):
        wait_for(lambda h=host: all(r["dst"] != h3_subnet for r in routes(lab, h)), what=f"{host} drops h3")
    assert routes(lab, "h3") == []
    assert "FLANNEL-FWD" not in lab.exec("h3", ["iptables", "-S"]).stdout
    assert not lab.subnet_env("h3")
    assert len(lab.etcd_get_prefix("/coreos.com/network/subnets/")) == 2
    h1c, h2c, h3c = lab.containers
    assert lab.ping(h1c, h2c).received > 0
    assert lab.ping(h1c, h3c, count=2, timeout=1).received == 0


def test_hostgw_refuses_a_peer_behind_a_router(lab_factory):
    lab = lab_factory(3, topology="routed", segments=["a", "a", "b"], network_config=HOSTGW)
    lab.start_agents()
    lab.wait_all_ready(30)
    for host in lab.host_names:
        lab.add_container(host)
    h1c, h2c, h3c = lab.containers
    assert lab.ping(h1c, h2c).received > 0  # same segment: works
    h3_subnet = str(lab.subnet_env("h3").subnet.network)
    h3_ip = str(lab.host("h3").underlay_ip)
    assert all(r["dst"] != h3_subnet for r in routes(lab, "h1")), "no broken route towards the far segment"
    log = lab.agent_log("h1")
    refusal = [line for line in log.splitlines() if h3_subnet in line and h3_ip in line and "ERROR" in line]
    assert refusal, log
    assert "directly connected" in refusal[0] or "not on" in refusal[0]
    assert lab.ping(h1c, h3c, count=2, timeout=1).received == 0


def test_alloc_only_leases(lab_factory):
    lab = lab_factory(2, network_config={"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}})
    lab.start_agents()
    lab.wait_all_ready(30)
    assert all(routes(lab, h) == [] for h in lab.host_names)
    values = [json.loads(v) for v in lab.etcd_get_prefix("/coreos.com/network/subnets/").values()]
    # flanneld's alloc backend publishes no BackendType (its leases read like udp ones); so do we.
    assert len(values) == 2 and all(set(v) == {"PublicIP", "PublicIPv6"} for v in values)


def test_missing_config_is_waited_for_and_invalid_config_exits_1(lab_factory):
    lab = lab_factory(1)
    agent = lab.start_agent("h1")
    wait_for(lambda: "not-ready waiting-config" in agent.health().stdout, what="waiting for config")
    assert agent.running
    lab.set_network_config({"Network": "10.7.0.0/16", "Backend": {"Type": "host-gw"}})
    lab.wait_ready("h1", 30)
    assert lab.stop_agent("h1") == 0
    assert lab.agent_status("h1")["phase"] == "stopped"
    assert lab.agent_down("h1").ok

    lab.set_network_config('{"Network": "10.7.0.0/16", "SubnetLen": 31}')
    agent = lab.start_agent("h1")
    wait_for(lambda: not agent.running, what="agent exit on a bad config")
    assert agent.proc.returncode == 1
    errors = [line for line in lab.agent_log("h1").splitlines() if "ERROR" in line]
    assert errors[-1].endswith(
        "invalid network config at /coreos.com/network/config: SubnetLen must be /30 or shorter, got /31"
    )
    assert "Traceback" not in lab.agent_log("h1")


def test_garbage_in_etcd_is_skipped_never_a_crash(lab_factory):
    lab = lab_factory(2, network_config=HOSTGW)
    lab.etcd_put("/coreos.com/network/subnets/10.5.200.0-24", "{not json")
    lab.etcd_put("/coreos.com/network/subnets/not-a-subnet", '{"PublicIP":"192.168.50.99"}')
    lab.start_agents()
    lab.wait_all_ready(30)
    lab.etcd_put("/coreos.com/network/subnets/10.5.201.0-24", '{"PublicIP": 7}')
    lab.etcd_put("/coreos.com/network/subnets/10.5.202.0-24", '{"PublicIP":"192.168.50.77","BackendType":"host-gw"}')
    wait_for(lambda: any(r["dst"] == "10.5.202.0/24" for r in routes(lab, "h1")), what="valid lease after garbage")
    log = lab.agent_log("h1")
    assert "ignoring invalid lease" in log and "10.5.200.0-24" in log and "10.5.201.0-24" in log
    assert "Traceback" not in log
    assert lab.agent("h1").health().stdout.startswith("ready")


def test_ip_masq_and_healthz(lab_factory):
    lab = lab_factory(1, network_config={"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}})
    lab.start_agent("h1", ["--ip-masq", "--healthz-port", "8471", "--healthz-ip", "127.0.0.1"])
    lab.wait_ready("h1", 30)
    env = lab.subnet_env("h1")
    assert env.ipmasq is True
    nat = lab.exec("h1", ["iptables", "-t", "nat", "-S"]).stdout
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in nat
    assert "-A FLANNEL-POSTRTG -s 10.6.0.0/16 -d 10.6.0.0/16" in nat
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8471/healthz').read().decode())"
    assert "flanneld is running" in lab.exec("h1", ["/usr/bin/python3", "-c", fetch]).stdout
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1").ok
    assert "FLANNEL" not in lab.exec("h1", ["iptables-save"]).stdout
