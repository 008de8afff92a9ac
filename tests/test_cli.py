"""Flags and FLANNELD_* variables, subnet.env, the state file: pure code."""

import os
import stat
from ipaddress import IPv4Network

from flannel_ebpf import subnet_file
from flannel_ebpf.cli import agent_options, build_parser


def parse(argv, env=None):
    return build_parser(env or {}).parse_args(argv)


def test_flanneld_defaults():
    opts = agent_options(parse(["up"]))
    assert opts.etcd_endpoints == ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    assert opts.etcd_prefix == "/coreos.com/network"
    assert opts.subnet_file == "/run/flannel/subnet.env"
    assert opts.lease.ttl == 86400 and opts.lease.renew_margin == 3600
    assert opts.ip_masq is False and opts.backend.udp_datapath == "ebpf"


def test_environment_sets_every_flag_and_the_command_line_wins():
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.1:2379",
        "FLANNELD_ETCD_PREFIX": "/x/network",
        "FLANNELD_IFACE": "eth1,10.0.0.5",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
        "FLANNELD_UDP_DECAP": "tc",
    }
    opts = agent_options(parse(["up"], env))
    assert opts.etcd_endpoints == ["http://10.0.0.1:2379"]
    assert opts.etcd_prefix == "/x/network"
    assert opts.ifaces == ["eth1", "10.0.0.5"]
    assert opts.ip_masq is True
    assert opts.lease.renew_margin == 30 * 60
    assert opts.backend.udp_decap == "tc"
    opts = agent_options(parse(["up", "--iface", "eth9", "--ip-masq=false", "--etcd-prefix", "/y"], env))
    assert opts.ifaces == ["eth9"] and opts.ip_masq is False and opts.etcd_prefix == "/y"


def test_bad_environment_value_is_a_clear_exit():
    import pytest

    with pytest.raises(SystemExit, match="FLANNELD_IP_MASQ"):
        build_parser({"FLANNELD_IP_MASQ": "maybe"})


def test_subnet_env_is_flanneld_s_and_atomic(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    subnet_file.write(str(path), IPv4Network("10.5.0.0/16"), IPv4Network("10.5.34.0/24"), 1472, False)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert subnet_file.previous_subnet(str(path)) == IPv4Network("10.5.34.0/24")
    assert os.listdir(path.parent) == ["subnet.env"]  # no temporary file left behind
    assert subnet_file.previous_subnet(str(tmp_path / "missing")) is None


def test_bad_flags_are_one_clear_line():
    import pytest

    with pytest.raises(SystemExit, match="--public-ip 'junk' is not an IPv4 address"):
        agent_options(parse(["up", "--public-ip", "junk"]))
    with pytest.raises(SystemExit, match=r"--iface-regex .* is not a valid regex"):
        agent_options(parse(["up", "--iface-regex", "eth[0"]))
    with pytest.raises(SystemExit, match="cannot read etcd TLS file /nonexistent"):
        agent_options(parse(["up", "--etcd-cafile", "/nonexistent"]))
