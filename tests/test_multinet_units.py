"""Multi-network mode's pieces without a lab: names, per-network options, chain names, route scopes."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from flannel_ebpf import ipmasq
from flannel_ebpf.backends.routes import in_scope
from flannel_ebpf.cli import agent_options, parse_argv
from flannel_ebpf.network import HostClaims


def options(argv, env=None):
    return agent_options(parse_argv(argv, env or {}))


def test_networks_flag_and_env_give_each_network_flanneld_v05_places():
    opts = options(["-networks=blue,green", "-subnet-dir=/tmp/nets", "--state-dir=/s", "--bpf-pin-dir=/p"])
    assert opts.networks == ["blue", "green"]
    blue = opts.for_network("blue")
    assert blue.etcd_prefix == "/coreos.com/network/blue"
    assert blue.subnet_file == "/tmp/nets/blue.env"
    assert blue.state_dir == "/s/networks/blue" and blue.backend.state_dir == "/s/networks/blue"
    assert blue.backend.bpf_pin_dir == "/p/blue" and blue.backend.network_name == "blue"
    assert options([], {"FLANNELD_NETWORKS": "red"}).networks == ["red"]
    assert options([]).networks == []


@pytest.mark.parametrize("value", ["blue,blue", "../x", "a b", "x/y"])
def test_bad_network_names_are_refused(value):
    with pytest.raises(SystemExit):
        options([f"--networks={value}"])


def test_net_config_path_and_networks_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        options(["--networks=blue", f"--net-config-path={tmp_path}/c.json"])


def test_chain_names_per_network_fit_iptables():
    assert ipmasq.chain_name(ipmasq.FORWARD_CHAIN) == "FLANNEL-FWD"
    assert ipmasq.chain_name(ipmasq.FORWARD_CHAIN, "blue") == "FLANNEL-FWD-BLUE"
    long_a = ipmasq.chain_name(ipmasq.MASQ_CHAIN, "a-very-long-network-name-1")
    long_b = ipmasq.chain_name(ipmasq.MASQ_CHAIN, "a-very-long-network-name-2")
    assert len(long_a) <= ipmasq.CHAIN_NAME_MAX and long_a != long_b


def test_route_scope_and_host_claims():
    blue = IPv4Network("10.21.0.0/16")
    assert in_scope(IPv4Network("10.21.5.0/24"), blue) and not in_scope(IPv4Network("10.22.5.0/24"), blue)
    assert in_scope(IPv4Network("10.22.5.0/24"), None)
    claims = HostClaims()
    assert claims.claim("udp", "red") is None and claims.claim("udp", "red") is None
    assert claims.claim("udp", "pink") == "red"
    assert claims.add_network("blue", blue) is None
    assert claims.add_network("navy", IPv4Network("10.21.128.0/17")) == "blue"
