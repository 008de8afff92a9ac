"""Issue 14, pure parts: hostile lease keys and values, hostile network configs, per-peer isolation in the
backends' lease evaluation. No etcd, no kernel (see test_hostile_etcd.py for those)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.backends.base import BackendError
from flannel_ebpf.bounded_json import json_too_deep
from flannel_ebpf.config import ConfigError, parse_config
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import (
    MAX_VALUE_BYTES,
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    parse_subnet_key,
    subnet_key,
)

# --- 1. deep nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "[" * 5000 + "]" * 5000,  # ~10 KB of [[[[...]]]]
        '{"PublicIP":"192.168.1.1","BackendData":' + "[" * 5000 + "]" * 5000 + "}",
        '{"PublicIP":"192.168.1.1","BackendData":{"VNI":' + '{"a":' * 3000 + "1" + "}" * 3000 + "}}",
        "[" * 60_000,  # unterminated, and beyond any recursion limit
    ],
)
def test_deeply_nested_lease_value_is_garbage_not_recursion_error(value):
    with pytest.raises(LeaseFormatError, match="deeper than"):
        LeaseAttrs.from_json(value)


def test_depth_limit_ignores_brackets_inside_strings():
    value = json.dumps({"PublicIP": "192.168.1.1", "BackendData": {"note": "[" * 500 + '\\"{' * 100}})
    assert not json_too_deep(value)
    assert LeaseAttrs.from_json(value).backend_data == {"note": "[" * 500 + '\\"{' * 100}
    assert json_too_deep("[" * 17 + "]" * 17) and not json_too_deep("[" * 16 + "]" * 16)


def test_oversized_lease_value_is_garbage():
    value = json.dumps({"PublicIP": "192.168.1.1", "pad": "x" * MAX_VALUE_BYTES})
    with pytest.raises(LeaseFormatError, match=r"bytes, more than the 65536 accepted"):
        LeaseAttrs.from_json(value)


def test_deeply_nested_config_is_one_config_error():
    raw = '{"Network":"10.5.0.0/16","Backend":' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ConfigError, match="deeper than"):
        parse_config(raw)


# --- 4. only the canonical key form is a lease ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "10.5.34.0-24\n",
        "10.5.34.0-024",
        "010.5.34.0-24",
        "x10.5.34.0-24",
        " 10.5.34.0-24",
        "10.5.34.0-24 ",
        "10.5.34.0-24/x",
        "10.5.34.1-24",  # host bits
        "10.5.34.0-33",
        "10.5.34.0-+24",
        "１0.5.34.0-24",  # a full-width digit  # noqa: RUF001
        "10.5.34.0-2٤",  # an Arabic-Indic digit
        "10.5.34.0-24&fc00:0::-64",  # IPv6 half not in its canonical spelling
        "10.5.34.0-24&junk",
    ],
)
def test_non_canonical_subnet_keys_are_garbage(name):
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(name)


@pytest.mark.parametrize("name", ["10.5.34.0-24", "0.0.0.0-0", "10.5.34.128-25", "10.5.34.0-24&fc00::-64"])
def test_canonical_subnet_keys_parse(name):
    subnet = parse_subnet_key(name)
    assert subnet_key(subnet) == name.partition("&")[0]


# --- 10. a PublicIP that is never a peer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    ["255.255.255.255", "224.0.0.1", "239.1.2.3", "0.0.0.0", "0.1.2.3", "127.0.0.1", "127.9.9.9", "240.0.0.1",
     "169.254.169.254"],
)  # fmt: skip
def test_unusable_public_ip_is_garbage(ip):
    with pytest.raises(LeaseFormatError, match="never a peer"):
        LeaseAttrs.from_json(json.dumps({"PublicIP": ip, "BackendType": "vxlan"}))


@pytest.mark.parametrize("ip", ["192.168.1.1", "10.0.0.1", "100.64.0.1", "223.255.255.254", "1.1.1.1"])
def test_usable_public_ip_parses(ip):
    assert LeaseAttrs.from_json(json.dumps({"PublicIP": ip})).public_ip == IPv4Address(ip)


def test_wrong_types_in_a_lease_are_garbage():
    for value in ('{"PublicIP":["192.168.1.1"]}', '{"PublicIP":"192.168.1.1","BackendType":["vxlan"]}',
                  '{"PublicIP":"192.168.1.1","BackendType":"' + "v" * 200 + '"}',
                  '{"PublicIP":"192.168.1.1","BackendData":[1]}', '"192.168.1.1"', "null"):  # fmt: skip
        with pytest.raises(LeaseFormatError):
            LeaseAttrs.from_json(value)


# --- 8. Network values that can never work ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "what"),
    [
        ("128.0.0.0/1", "link-local"),  # used to crash: SubnetMax overflowed 255.255.255.255
        ("0.0.0.0/1", "this network"),
        ("0.0.0.0/0", "whole IPv4 space"),
        ("127.0.0.0/8", "loopback"),
        ("127.5.0.0/16", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("230.1.0.0/16", "multicast"),
        ("240.0.0.0/4", "class E"),
        ("255.255.255.0/24", "class E"),
        ("0.5.0.0/16", "this network"),
    ],
)
def test_network_that_can_never_work_is_refused_in_one_line(network, what):
    with pytest.raises(ConfigError, match=what) as info:
        parse_config(json.dumps({"Network": network}))
    assert "\n" not in str(info.value) and network in str(info.value)


@pytest.mark.parametrize("network", ["10.5.0.0/16", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "1.0.0.0/8"])
def test_ordinary_networks_are_accepted(network):
    assert parse_config(json.dumps({"Network": network})).network == IPv4Network(network)


def test_subnet_max_at_the_top_of_usable_space_does_not_overflow():
    c = parse_config('{"Network": "223.255.0.0/16"}')
    assert c.subnet_max == IPv4Address("223.255.255.0")


# --- 9. a udp Port that belongs to the host's own services -----------------------------------------------


@pytest.mark.parametrize("port", [53, 67, 123, 161, 514, 1, 1023])
def test_udp_port_below_1024_is_refused(port):
    with pytest.raises(ConfigError, match="well-known port"):
        parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": port}}))


def test_udp_port_of_another_tunnel_is_a_warning():
    c = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 4789}}')
    assert len(c.warnings) == 1 and "VXLAN" in c.warnings[0]
    assert parse_config('{"Network": "10.5.0.0/16", "Backend": {"Port": 8285}}').warnings == ()
    # vxlan's Port is the kernel's socket, not a decap that swallows: not this rule
    assert parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "Port": 999}}').warnings == ()


def test_udp_tun_backend_refuses_a_well_known_port_too():
    from flannel_ebpf.backends.udp_tun import UdpTunBackend

    with pytest.raises(BackendError, match="well-known port"):
        UdpTunBackend({"Type": "udp", "Port": 53}, BackendOptions(udp_datapath="tun"))


# --- 2. one bad peer costs exactly that peer, logged once ----------------------------------------------

EXT = ExternalInterface("eth0", 2, IPv4Address("192.168.10.1"), IPv4Address("192.168.10.1"), 1500)


def vxlan_lease(subnet: str, ip: str, data: object) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "vxlan", data))  # type: ignore[arg-type]


@pytest.mark.parametrize("vni", [[1], {"a": 1}, "1", 1.5, True, -1, 1 << 24])
def test_vxlan_peer_with_a_wrong_vni_type_is_skipped_not_raised(vni, logs):
    from flannel_ebpf.backends.vxlan import VxlanBackend

    be = VxlanBackend({"Type": "vxlan"}, BackendOptions())
    be.ext, be.ifindex = EXT, 7  # as after prepare(); _evaluate needs no netlink without DirectRouting
    bad = vxlan_lease("10.5.9.0/24", "192.168.10.9", {"VNI": vni, "VtepMAC": "02:00:00:00:00:09"})
    good = vxlan_lease("10.5.8.0/24", "192.168.10.8", {"VNI": 1, "VtepMAC": "02:00:00:00:00:08"})
    for _ in range(3):  # as the periodic resync would
        assert be._evaluate(bad, {}.get) is None
    assert be._evaluate(good, {}.get) is not None
    assert "VNI" in be.book.skipped[IPv4Network("10.5.9.0/24")]
    assert len([line for line in logs if "10.5.9.0/24" in line]) == 1  # logged once, not every resync


def test_udp_tun_skipped_lease_is_logged_once_not_every_resync(logs):
    from flannel_ebpf.backends.udp_tun import UdpTunBackend

    be = UdpTunBackend({"Type": "udp"}, BackendOptions(udp_datapath="tun"))
    be.local = LocalNetwork(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), EXT, 1472)
    bad = Lease(IPv4Network("10.5.9.0/24"), LeaseAttrs(IPv4Address("192.168.10.9"), "vxlan", {"VNI": [1]}))
    good = Lease(IPv4Network("10.5.8.0/24"), LeaseAttrs(IPv4Address("192.168.10.8")))
    for _ in range(3):
        be.sync([bad, good])  # not started: nothing to push, the peer table is computed
    assert set(be.peers) == {IPv4Network("10.5.8.0/24")}
    assert len([line for line in logs if "ignoring lease 10.5.9.0/24" in line]) == 1
    # a peer that changes into something unusable loses its entry
    be.add_peer(Lease(good.subnet, LeaseAttrs(IPv4Address("192.168.10.8"), "host-gw")))
    assert be.peers == {}


def test_udp_ebpf_skipped_lease_is_logged_once_not_every_resync(logs):
    from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend

    be = UdpEbpfBackend({"Type": "udp"}, BackendOptions())
    be._local = LocalNetwork(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), EXT, 1472)
    be._ext = EXT
    bad = Lease(IPv4Network("10.5.9.0/24"), LeaseAttrs(IPv4Address("192.168.10.9"), "vxlan", {"VNI": [1]}))
    outside = Lease(IPv4Network("10.9.9.0/24"), LeaseAttrs(IPv4Address("192.168.10.7")))
    good = Lease(IPv4Network("10.5.8.0/24"), LeaseAttrs(IPv4Address("192.168.10.8")))
    for _ in range(3):  # what sync() asks of every lease, on every resync
        assert not be._accept(bad) and not be._accept(outside)
        assert be._accept(good)
    assert len([line for line in logs if "ignoring lease 10.5.9.0/24" in line]) == 1
    assert len([line for line in logs if "ignoring lease 10.9.9.0/24" in line and "outside" in line]) == 1
    with pytest.raises(BackendError, match="well-known port"):
        UdpEbpfBackend({"Type": "udp", "Port": 53}, BackendOptions())


# --- 3. tens of thousands of leases ---------------------------------------------------------------------


def test_allocation_among_35000_leases_is_fast_and_right():
    import time

    from flannel_ebpf.subnet.allocation import free_subnets

    config = parse_config('{"Network": "10.0.0.0/8"}')
    taken = [IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(1, 35_001)]
    taken.append(IPv4Network("10.136.184.0/22"))  # a lease of another length (an older config's)
    started = time.monotonic()
    free = free_subnets(config, taken)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"{elapsed:.1f}s"  # comparing every candidate with every lease took minutes
    assert len(free) == 100 and free[0] == IPv4Network("10.136.188.0/24")
    assert not any(f.overlaps(t) for f in free for t in taken[-50:])


@pytest.mark.parametrize("name", ["vx\x1b[2Jlan", "udp\n", "", " vxlan", "vxlan;rm", "é", "v" * 33])
def test_a_backend_type_that_is_no_backend_name_is_garbage(name):
    if name == "":  # flanneld leaves it out for udp: an empty one is udp
        assert LeaseAttrs.from_json(json.dumps({"PublicIP": "192.168.1.1", "BackendType": name})).backend_type == "udp"
        return
    with pytest.raises(LeaseFormatError, match="BackendType is not a backend name"):
        LeaseAttrs.from_json(json.dumps({"PublicIP": "192.168.1.1", "BackendType": name}))


@pytest.mark.parametrize("name", ["udp", "vxlan", "host-gw", "aws-vpc", "tencent-vpc", "ipsec", "v1.2_x", "v" * 32])
def test_backend_names_as_flanneld_writes_them_parse(name):
    assert LeaseAttrs.from_json(json.dumps({"PublicIP": "192.168.1.1", "BackendType": name})).backend_type == name


def test_status_long_escapes_what_lease_writers_wrote(tmp_path, capsys):
    from flannel_ebpf import cli, state

    st = state.AgentState(pid=1, phase="ready")
    st.peers = [{"subnet": "10.5.1.0/24", "public_ip": "192.168.1.1", "backend_type": "vx\x1b]0;owned\x07lan"}]
    st.peers_refused = {"outside-network": 1}
    st.refused_peers = [{"subnet": "10.5.2.0/24\x1b[2J", "public_ip": "192.168.1.2", "reason": "bad\nFORGED"}]
    state.save(str(tmp_path), st)
    assert cli._status(str(tmp_path), as_json=False) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\nFORGED" not in out, out
    assert "vx\\x1b]0;owned\\x07lan" in out and "bad\\nFORGED" in out
