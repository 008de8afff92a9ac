"""Subnet arithmetic, lease keys and JSON: pure code, flanneld's forms byte for byte."""

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.config import parse_config
from flannel_ebpf.subnet.allocation import OutOfSubnets, all_subnets, free_subnets, gateway_address, pick_subnet
from flannel_ebpf.subnet.lease import LeaseAttrs, LeaseFormatError, parse_subnet_key, subnet_key


def test_all_subnets_span_min_to_max():
    c = parse_config('{"Network": "10.0.0.0/28"}')
    assert [str(s) for s in all_subnets(c)] == ["10.0.0.4/30", "10.0.0.8/30", "10.0.0.12/30"]


def test_free_subnets_skip_overlaps_and_stop_at_limit():
    c = parse_config('{"Network": "10.5.0.0/16"}')
    taken = [IPv4Network("10.5.1.0/24"), IPv4Network("10.5.2.0/23")]  # a lease of another length too
    free = free_subnets(c, taken)
    assert len(free) == 100
    assert free[0] == IPv4Network("10.5.4.0/24")
    assert all(not f.overlaps(t) for f in free for t in taken)


def test_pick_is_random_among_the_free_and_fails_when_full():
    c = parse_config('{"Network": "10.0.0.0/28"}')
    picks = {pick_subnet(c, [], random.Random(seed)) for seed in range(40)}
    assert picks == set(all_subnets(c))
    with pytest.raises(OutOfSubnets, match="no free /30"):
        pick_subnet(c, list(all_subnets(c)))


def test_keys_round_trip_and_reject_garbage():
    net = IPv4Network("10.5.34.0/24")
    assert subnet_key(net) == "10.5.34.0-24"
    assert parse_subnet_key("10.5.34.0-24") == net
    assert parse_subnet_key("10.5.34.0-24&fc00::-64") == net  # flannel's dual-stack form
    for bad in ("10.5.34.0_24", "garbage", "10.5.34.0-24x", "10.5.34.1-24", "300.1.1.1-24"):
        with pytest.raises(LeaseFormatError):
            parse_subnet_key(bad)


def test_lease_json_is_flanneld_v0_20_2s():
    ip = IPv4Address("192.168.0.100")
    assert json.loads(LeaseAttrs(ip).to_json()) == {"PublicIP": "192.168.0.100", "PublicIPv6": None}
    assert LeaseAttrs(ip).to_json() == '{"PublicIP":"192.168.0.100","PublicIPv6":null}'
    vx = LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    assert json.loads(vx.to_json()) == {
        "PublicIP": "192.168.0.100",
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"},
    }
    assert json.loads(LeaseAttrs(ip, "host-gw").to_json())["BackendType"] == "host-gw"


def test_lease_json_reads_older_forms_and_ignores_unknown_keys():
    old = LeaseAttrs.from_json('{"PublicIP":"10.0.0.1","BackendType":"udp","BackendData":null,"X":1}')
    assert old == LeaseAttrs(IPv4Address("10.0.0.1"), "udp", None)
    bad_values = (
        "{",
        "[]",
        '{"PublicIP": "nope"}',
        '{"PublicIP": 7}',
        '{"PublicIP": "0.0.0.0"}',
        '{"PublicIP": "224.0.0.1"}',
        '{"PublicIP":"10.0.0.1","BackendData":[1]}',
        "\xff",
    )
    for bad in bad_values:
        with pytest.raises(LeaseFormatError):
            LeaseAttrs.from_json(bad)


def test_gateway_is_first_host():
    assert gateway_address(IPv4Network("10.5.34.0/24")) == IPv4Address("10.5.34.1")
