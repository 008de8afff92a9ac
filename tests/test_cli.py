"""Flags and FLANNELD_* variables, subnet.env, the state file: pure code."""

import os
import stat
from ipaddress import IPv4Network

import pytest

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


# --- Go's flag spellings, as flanneld reads them ----------------------------------------------------------


def go(argv, env=None):
    from flannel_ebpf.cli import parse_argv

    return parse_argv(argv, env or {})


def test_go_style_flags_all_mean_the_same():
    for argv in (
        ["-etcd-endpoints=http://10.0.0.1:2379", "-iface=eth0"],
        ["-etcd-endpoints", "http://10.0.0.1:2379", "-iface", "eth0"],
        ["--etcd-endpoints=http://10.0.0.1:2379", "--iface=eth0"],
        ["--etcd-endpoints", "http://10.0.0.1:2379", "--iface", "eth0"],
        ["up", "-etcd-endpoints=http://10.0.0.1:2379", "--iface", "eth0"],
    ):
        args = go(argv)
        assert args.command == "up", argv
        opts = agent_options(args)
        assert opts.etcd_endpoints == ["http://10.0.0.1:2379"] and opts.ifaces == ["eth0"], argv


def test_go_style_booleans_take_only_an_equals_value():
    assert go(["-ip-masq"]).ip_masq is True
    assert go(["--ip-masq"]).ip_masq is True
    assert go(["-ip-masq=false"]).ip_masq is False
    assert go(["-ip-masq=true", "-iptables-forward-rules=false"]).iptables_forward_rules is False
    assert go(["-ip-masq", "-iface", "eth1"]).iface == ["eth1"]  # the bool did not eat `-iface`
    # Go's `-ip-masq false` is ip-masq=true and a stray argument: an error, never ip-masq=false
    with pytest.raises(SystemExit):
        go(["-ip-masq", "false"])


def test_verbosity_as_flanneld_s_klog_v():
    assert go(["-v=2"]).verbose == 2
    assert go(["--v=2"]).verbose == 2
    assert go(["-v", "3"]).verbose == 3
    assert go(["up", "-v"]).verbose == 1
    assert go([], {"FLANNELD_V": "4"}).verbose == 4


def test_a_value_that_looks_like_a_flag_is_a_value():
    args = go(["-etcd-password", "-secret-", "-etcd-username=-u"])
    assert (args.etcd_password, args.etcd_username) == ("-secret-", "-u")


def test_subcommands_and_their_own_flags_keep_working():
    assert go(["status", "-json"]).json is True
    assert go(["down", "--release-lease", "-state-dir=/tmp/x"]).release_lease is True
    assert go(["health", "-state-dir", "/tmp/x"]).state_dir == "/tmp/x"
    assert go(["--etcd-endpoints=http://e:2379"]).command == "up"


@pytest.mark.parametrize("argv", [["-version"], ["--version"], ["-iface=eth0", "-version"], ["up", "-version"]])
def test_version_in_go_spelling(argv, capsys):
    from flannel_ebpf import package_version

    with pytest.raises(SystemExit) as e:
        go(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"flannel-ebpf {package_version()}"


def test_iface_can_reach_and_net_config_path():
    opts = agent_options(go(["-iface-can-reach=10.0.0.9", "-net-config-path", "/etc/flannel/net.json"]))
    assert (opts.iface_can_reach, opts.net_config_path) == ("10.0.0.9", "/etc/flannel/net.json")
    opts = agent_options(go([], {"FLANNELD_IFACE_CAN_REACH": "10.0.0.8", "FLANNELD_NET_CONFIG_PATH": "/n.json"}))
    assert (opts.iface_can_reach, opts.net_config_path) == ("10.0.0.8", "/n.json")
    with pytest.raises(SystemExit, match="--iface-can-reach 'gw' is not an IPv4 address"):
        agent_options(go(["-iface-can-reach=gw"]))


def test_client_server_flags_and_variables(tmp_path):
    opts = agent_options(go(["-remote=10.0.0.3:8888", "-remote-cafile", "/dev/null"]))
    assert (opts.remote, opts.listen, opts.remote_tls.cafile) == ("10.0.0.3:8888", "", "/dev/null")
    env = {"FLANNELD_LISTEN": ":8888", "FLANNELD_REMOTE_CERTFILE": "/dev/null", "FLANNELD_REMOTE_KEYFILE": "/dev/null"}
    opts = agent_options(go([], env))
    assert (opts.listen, opts.remote_tls.certfile, opts.remote_tls.keyfile) == (":8888", "/dev/null", "/dev/null")
    assert agent_options(go(["--listen=fd://"])).listen == "fd://"
    assert not opts.listen_trust_any_client  # writes only for the client's own address unless opted in
    assert agent_options(go(["-listen=:8888", "-listen-trust-any-client"])).listen_trust_any_client
    assert agent_options(go([], {"FLANNELD_LISTEN_TRUST_ANY_CLIENT": "true"})).listen_trust_any_client
    with pytest.raises(SystemExit, match="mutually exclusive"):
        agent_options(go(["-listen=:8888", "-remote=10.0.0.3:8888"]))
    with pytest.raises(SystemExit, match="needs --remote-certfile and --remote-keyfile"):
        agent_options(go(["-listen=:8888", "-remote-cafile=/dev/null"]))
    with pytest.raises(SystemExit, match="cannot read TLS file"):
        agent_options(go(["-remote=h:1", f"-remote-certfile={tmp_path}/missing.pem"]))


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["-kube-subnet-mgr"], {}, "flag --kube-subnet-mgr"),
        (["--kube-subnet-mgr=true"], {}, "flag --kube-subnet-mgr"),
        (["-kubeconfig-file", "/root/.kube/config"], {}, "flag --kubeconfig-file"),
        (["up", "--kube-api-url=https://k:6443"], {}, "flag --kube-api-url"),
        (["-public-ipv6=fd00::1"], {}, "flag --public-ipv6"),
        (["-vmodule=main=2"], {}, "flag --vmodule"),
        ([], {"FLANNELD_KUBE_SUBNET_MGR": "true"}, "FLANNELD_KUBE_SUBNET_MGR (flag --kube-subnet-mgr)"),
        ([], {"FLANNELD_KUBECONFIG_FILE": "/k"}, "FLANNELD_KUBECONFIG_FILE (flag --kubeconfig-file)"),
    ],
)
def test_unsupported_flanneld_flags_are_one_line_and_exit_2(argv, env, named, capsys):
    with pytest.raises(SystemExit) as e:
        go(argv, env)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flannel-ebpf: {named} of flanneld is not supported by flannel-ebpf (")
    assert len(err.splitlines()) == 1 and "usage:" not in err


def test_unsupported_flags_that_change_nothing_in_flanneld_are_accepted():
    # flanneld's own defaults: a unit file that spells them out still starts
    env = {"FLANNELD_KUBE_SUBNET_MGR": "false", "FLANNELD_KUBE_ANNOTATION_PREFIX": "flannel.alpha.coreos.com"}
    assert go(["-kube-subnet-mgr=false", "-set-node-network-unavailable=true"], env).command == "up"


def test_down_of_one_network_of_a_client_asks_the_server_for_that_network():
    """`down --release-lease --networks=blue,red` in client mode: each network's registry names it (it
    asked for `_`, found no lease there and said "already gone" while the lease stayed)."""
    from flannel_ebpf.cli import network_args

    args = parse(["down", "--remote", "10.0.0.1:8888", "--networks", "blue,red", "--release-lease"])
    registry = agent_options(network_args(args, "red")).registry()
    assert registry.base == "http://10.0.0.1:8888/v1/red"
    assert agent_options(args).registry().base == "http://10.0.0.1:8888/v1/_"
