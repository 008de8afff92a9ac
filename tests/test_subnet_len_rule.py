"""The default SubnetLen of each flanneld era, the flags that pick the era and the store, and the one line
said when a peer's lease has the other era's length. Pure code."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.cli import agent_options, build_parser
from flannel_ebpf.config import default_subnet_len, parse_config
from flannel_ebpf.subnet.etcd_v2_store import EtcdV2Registry
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from flannel_ebpf.subnet.manager import REFUSED_LENGTH, LeaseManager
from flannel_ebpf.subnet.registry import SubnetRegistry


@pytest.mark.parametrize(
    ("network", "v05", "v020"),
    [
        ("10.0.0.0/8", 24, 24),
        ("10.5.0.0/16", 24, 24),
        ("10.5.0.0/22", 24, 24),
        ("10.5.0.0/23", 24, 25),
        ("10.5.0.0/24", 25, 26),
        ("10.5.0.0/26", 27, 28),
        ("10.5.0.0/28", 29, 30),
    ],
)
def test_default_subnet_len_of_each_era(network, v05, v020):
    """v0.5.5 (subnet/config.go): /24 below a /24 Network, else one bit longer; v0.10+ two bits longer
    above a /22."""
    assert default_subnet_len(IPv4Network(network), "v0.5") == v05
    assert default_subnet_len(IPv4Network(network), "v0.20") == v020
    config = parse_config(f'{{"Network": "{network}"}}', "v0.5")
    assert config.subnet_len == v05 and not config.subnet_len_given
    assert parse_config(f'{{"Network": "{network}"}}').subnet_len == v020


def test_an_explicit_subnet_len_is_the_same_in_every_era():
    raw = '{"Network": "10.5.0.0/24", "SubnetLen": 27}'
    assert parse_config(raw, "v0.5").subnet_len == parse_config(raw, "v0.20").subnet_len == 27
    assert parse_config(raw, "v0.5").other_rule_subnet_len() is None


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match=r"v0\.5"):
        parse_config('{"Network": "10.5.0.0/16"}', "v0.7")


def parse(argv, env=None):
    return agent_options(build_parser(env or {}).parse_args(argv))


def test_etcd_api_flag_and_environment_pick_the_store_and_the_era():
    assert parse(["up"]).etcd_api == "v3"
    assert parse(["up"]).effective_subnet_len_rule == "v0.20"
    assert isinstance(parse(["up"]).registry(), SubnetRegistry)
    v2 = parse(["up", "--etcd-api", "v2"])
    assert v2.etcd_api == "v2" and v2.effective_subnet_len_rule == "v0.5"
    assert isinstance(v2.registry(), EtcdV2Registry)
    assert parse(["up"], {"FLANNELD_ETCD_API": "v2"}).etcd_api == "v2"
    assert parse(["up", "--etcd-api", "v2", "--subnet-len-rule", "v0.20"]).effective_subnet_len_rule == "v0.20"
    assert parse(["up", "--subnet-len-rule", "v0.5"]).effective_subnet_len_rule == "v0.5"
    with pytest.raises(SystemExit):
        parse(["up", "--etcd-api", "v4"])


def test_a_peer_of_the_other_eras_length_is_refused_and_the_mismatch_said_once(logs):
    """A /24 Network: v0.5.5 hosts lease /25, v0.20.2 hosts (and flannel-ebpf on v3) /26. The refusal
    stays (a nested lease would take traffic), and one line says why and what to do."""
    config = parse_config('{"Network": "10.5.0.0/24", "Backend": {"Type": "host-gw"}}', "v0.20")
    m = LeaseManager(config, LeaseAttrs(IPv4Address("192.168.50.1"), "host-gw"), None, None)  # type: ignore[arg-type]
    for i, subnet in enumerate(("10.5.0.128/25", "10.5.0.0/25")):
        peer = Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(f"192.168.50.{i + 2}"), "host-gw"))
        assert not m._accept_peer(peer)
        assert m.refused[peer.subnet][1] == REFUSED_LENGTH
    hints = [line for line in logs if "SUBNETLEN MISMATCH" in line]
    assert len(hints) == 1, logs
    assert '"SubnetLen": 26' in hints[0] and "/25" in hints[0] and "v0.5" in hints[0]


def test_no_mismatch_line_when_subnet_len_is_explicit(logs):
    config = parse_config('{"Network": "10.5.0.0/24", "SubnetLen": 26}', "v0.20")
    m = LeaseManager(config, LeaseAttrs(IPv4Address("192.168.50.1")), None, None)  # type: ignore[arg-type]
    assert not m._accept_peer(Lease(IPv4Network("10.5.0.128/25"), LeaseAttrs(IPv4Address("192.168.50.2"))))
    assert not [line for line in logs if "SUBNETLEN MISMATCH" in line]
    assert any("ignoring lease 10.5.0.128/25" in line for line in logs)
