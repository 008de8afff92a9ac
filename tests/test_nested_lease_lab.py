"""Issue 25, item 7, with the real agent, a real etcd and the real kernel: a lease nested inside another
host's subnet (a /25 inside its /24, pointing at a third host) never takes that host's traffic, on the
udp eBPF, vxlan and host-gw backends. The "attacker" h3 runs no agent: it is a plain host on the underlay
whose raw PREROUTING counts every packet that reaches it from h1 or h1's container."""

from __future__ import annotations

import json

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIGS = {
    "udp": {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}},
    "vxlan": {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}},
    "host-gw": {"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}},
}


def attacker_value(backend: str, public_ip: str) -> str:
    """A lease value that this backend would program: the attacker's PublicIP, well-formed data."""
    if backend == "vxlan":
        return json.dumps({"PublicIP": public_ip, "BackendType": "vxlan",
                           "BackendData": {"VNI": 1, "VtepMAC": "02:66:66:66:66:66"}})  # fmt: skip
    if backend == "host-gw":
        return json.dumps({"PublicIP": public_ip, "BackendType": "host-gw"})
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None})  # udp, as flanneld writes it


def packets_at(lab, host, sources: list[str]) -> int:
    """Packets the raw PREROUTING counters of `host` saw from any of `sources` (rules put by count_at)."""
    out = lab.exec(host, ["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"]).stdout
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0].isdigit() and any(src in fields for src in sources):
            total += int(fields[0])
    return total


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_nested_lease_never_takes_the_victims_traffic(lab_factory, backend):
    lab = lab_factory(3, network_config=CONFIGS[backend])
    sender, victim, attacker = "h1", "h2", "h3"
    lab.start_agents(["--lease-check-interval", "1"], hosts=[sender, victim])
    lab.wait_all_ready(60, hosts=[sender, victim])
    src, dst = lab.add_container(sender), lab.add_container(victim)
    if backend == "udp":
        for host in (sender, victim):
            wait_for(lambda host=host: any(line in lab.agent_log(host, last_run=True)
                                           for line in ("hand-off attached", "no bridge hand-off needed")),
                     what=f"the container bridge of {host} hooked")  # fmt: skip
    assert lab.ping(src, dst).received == 3

    victim_subnet = lab.subnet_env(victim).subnet.network
    nested = next(s for s in victim_subnet.subnets(new_prefix=25) if dst.ip in s)
    attacker_ip = str(lab.host(attacker).underlay_ip)
    sources = [str(lab.host(sender).underlay_ip), str(src.ip)]
    for source in sources:
        lab.exec(attacker, ["iptables", "-t", "raw", "-A", "PREROUTING", "-s", source])
    key = f"{PREFIX}/subnets/{nested.network_address}-{nested.prefixlen}"
    lab.etcd_put(key, attacker_value(backend, attacker_ip))

    def refused() -> bool:
        return lab.agent_status(sender).get("peers_refused", {}).get("prefix-length") == 1

    wait_for(refused, 20, "the sender's agent counting the nested lease as refused")
    status = lab.agent_status(sender)
    assert {"subnet": str(nested), "public_ip": attacker_ip, "reason": "prefix-length"} in status["refused_peers"]
    assert str(nested) not in {peer["subnet"] for peer in status["peers"]}
    before = packets_at(lab, attacker, sources)
    result = lab.ping(src, dst, count=10, interval=0.1)
    assert result.received == 10, f"{result.received}/10 pings answered by the victim"
    assert packets_at(lab, attacker, sources) == before, "packets of the ping went to the attacker"
    # The sender's kernel has nothing for the nested subnet: its route lookup is the victim's /24's.
    routes = lab.exec(sender, ["ip", "-j", "route", "show", "table", "all"]).stdout
    assert all(r.get("dst") != str(nested) for r in json.loads(routes or "[]"))
    assert "a /25 lease, the network 10.5.0.0/16 leases /24 only" in lab.agent_log(sender)
