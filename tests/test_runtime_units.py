"""docker-opts, cni-config and sd_notify where they are pure logic or a plain socket (no namespaces).

The docker-opts expectations were checked once against flannel v0.20.2's mk-docker-opts.sh run by dash
on the same subnet files (every combination below gave byte-identical files and exit codes); the script
itself is not part of this repository.
"""

from __future__ import annotations

import json
import os
import socket
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from flannel_ebpf import sd_notify
from flannel_ebpf.cli import main
from flannel_ebpf.runtimes import cni, docker_opts
from flannel_ebpf.runtimes.bridge import BridgeError, BridgeSpec, health_label
from flannel_ebpf.runtimes.docker_opts import DockerOptsError, DockerOptsOptions, Route

ENV = {
    "FLANNEL_NETWORK": "10.5.0.0/16",
    "FLANNEL_SUBNET": "10.5.34.1/24",
    "FLANNEL_MTU": "1472",
    "FLANNEL_IPMASQ": "false",
}
BIP, MTU = '"--bip=10.5.34.1/24"', '"--mtu=1472"'


def render(env=ENV, environ=None, **opts) -> str:
    return docker_opts.render(env, DockerOptsOptions(**opts), environ or {})


def test_docker_opts_default_is_individual_and_combined() -> None:
    assert render() == (
        f"DOCKER_OPT_BIP={BIP}\n"
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        f"DOCKER_OPT_MTU={MTU}\n"
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472"\n'
    )
    # -i and -c together are the same as neither
    assert render(individual=True, combined=True) == render()


def test_docker_opts_each_option() -> None:
    masq = {**ENV, "FLANNEL_IPMASQ": "true"}  # flannel masquerades, so Docker must not
    assert render(masq, individual=True) == (
        f'DOCKER_OPT_BIP={BIP}\nDOCKER_OPT_IPMASQ="--ip-masq=false"\nDOCKER_OPT_MTU={MTU}\n'
    )
    assert render(combined=True) == 'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472"\n'
    assert render(combined=True, ip_masq=False) == 'DOCKER_OPTS=" --bip=10.5.34.1/24 --mtu=1472"\n'  # -m
    assert render(individual=True, ip_masq=False) == f"DOCKER_OPT_BIP={BIP}\nDOCKER_OPT_MTU={MTU}\n"
    # -k: Fedora's unit writes DOCKER_NETWORK_OPTIONS
    assert render(combined=True, key="DOCKER_NETWORK_OPTIONS") == (
        'DOCKER_NETWORK_OPTIONS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472"\n'
    )


def test_docker_opts_environment_and_missing_values() -> None:
    # The combined variable keeps what the environment had; DOCKER_OPT_* variables come along, sorted.
    environ = {"DOCKER_OPTS": "--foo", "DOCKER_OPT_ZZ": "x", "PATH": "/bin"}
    assert render(environ=environ) == (
        f'DOCKER_OPT_BIP={BIP}\nDOCKER_OPT_IPMASQ="--ip-masq=true"\nDOCKER_OPT_MTU={MTU}\nDOCKER_OPT_ZZ="x"\n'
        'DOCKER_OPTS="--foo  --bip=10.5.34.1/24 --ip-masq=true --mtu=1472 x"\n'
    )
    # A variable that is not set gives no option; an empty file gives an empty combined variable.
    assert render({"FLANNEL_SUBNET": "10.5.34.1/24"}) == f'DOCKER_OPT_BIP={BIP}\nDOCKER_OPTS=" --bip=10.5.34.1/24"\n'
    assert render({}) == 'DOCKER_OPTS=""\n'
    with pytest.raises(DockerOptsError, match="Invalid value of FLANNEL_IPMASQ: yes"):
        render({**ENV, "FLANNEL_IPMASQ": "yes"})
    assert "IPMASQ" not in render({**ENV, "FLANNEL_IPMASQ": "yes"}, ip_masq=False)  # -m: not even looked at


def test_docker_opts_subnet_file_parsing_and_route_clash() -> None:
    parsed = docker_opts.parse_subnet_env('# x\nexport FLANNEL_SUBNET="10.5.34.1/24"\nFLANNEL_MTU=1472\nnonsense\n')
    assert parsed == {"FLANNEL_SUBNET": "10.5.34.1/24", "FLANNEL_MTU": "1472"}
    own = docker_opts.own_subnet(ENV)
    assert own == IPv4Network("10.5.34.0/24")
    routes = [
        Route(IPv4Network("10.5.34.0/24"), None, "docker0"),  # the bridge's own route: fine
        Route(IPv4Network("10.5.0.0/16"), None, "flannel0"),
        Route(IPv4Network("10.5.35.0/24"), IPv4Address("192.168.0.12"), "eth0"),
    ]
    assert docker_opts.conflicting_routes(own, routes) == []
    clash = Route(IPv4Network("10.5.34.0/24"), IPv4Address("192.168.0.13"), "eth0")  # a stale host-gw route
    assert docker_opts.conflicting_routes(own, [*routes, clash]) == [clash]


def test_docker_opts_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subnet_env = tmp_path / "subnet.env"
    # A subnet no route of this machine points at through a gateway (the check reads the routing table).
    subnet_env.write_text("FLANNEL_NETWORK=10.251.0.0/16\nFLANNEL_SUBNET=10.251.7.1/24\nFLANNEL_MTU=1450\n"
                          "FLANNEL_IPMASQ=true\n")  # fmt: skip
    out = tmp_path / "run" / "docker_opts.env"
    assert main(["docker-opts", "-f", str(subnet_env), "-d", str(out), "-ci", "-kDOCKER_NETWORK_OPTIONS"]) == 0
    assert out.read_text() == (
        'DOCKER_OPT_BIP="--bip=10.251.7.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\nDOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_NETWORK_OPTIONS=" --bip=10.251.7.1/24 --ip-masq=false --mtu=1450"\n'
    )
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert main(["docker-opts", "--subnet-file", str(tmp_path / "missing.env"), "-d", str(out)]) == 1
    assert "cannot read the subnet file" in capsys.readouterr().err


# --- cni-config -------------------------------------------------------------------------------------


def test_cni_conflist_as_flannels_plugin_makes_it() -> None:
    conf = cni.conflist(ENV)
    assert conf == {
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "isDefaultGateway": True,
                "hairpinMode": True,
                "ipMasq": True,  # flannel does not masquerade (FLANNEL_IPMASQ=false): the bridge plugin does
                "mtu": 1472,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.5.34.0/24"}]],
                    "routes": [{"dst": "10.5.0.0/16"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    masq = cni.conflist({**ENV, "FLANNEL_IPMASQ": "true"}, cni.CniOptions("flannel", "lxcbr0", "1.0.0", False))
    assert masq["name"] == "flannel" and masq["cniVersion"] == "1.0.0" and len(masq["plugins"]) == 1
    assert masq["plugins"][0]["ipMasq"] is False and masq["plugins"][0]["bridge"] == "lxcbr0"
    several = cni.conflist({**ENV, "FLANNEL_NETWORK": "10.5.0.0/16,10.6.0.0/16,10.5.0.0/16"})
    assert several["plugins"][0]["ipam"]["routes"] == [{"dst": "10.5.0.0/16"}, {"dst": "10.6.0.0/16"}]
    for key in ENV:
        with pytest.raises(cni.CniConfigError, match=key):
            cni.conflist({k: v for k, v in ENV.items() if k != key})
    with pytest.raises(cni.CniConfigError):
        cni.conflist({**ENV, "FLANNEL_SUBNET": "10.5.34.300/24"})


def test_cni_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    out = tmp_path / "net.d" / "10-flannel.conflist"
    argv = ["cni-config", "--subnet-file", str(subnet_env), "-o", str(out), "--network-name", "n1", "--bridge", "br9"]
    assert main(argv) == 0
    conf = json.loads(out.read_text())
    assert conf["name"] == "n1" and conf["plugins"][0]["bridge"] == "br9"
    capsys.readouterr()
    assert main(["cni-config", "--subnet-file", str(subnet_env), "-o", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == cni.conflist(ENV)


# --- bridge: the pure parts (the netlink parts: test_runtime_bridge_netns.py) ------------------------


def test_bridge_spec_and_label() -> None:
    spec = BridgeSpec.from_subnet_env("lxcbr0", ENV)
    assert (str(spec.address), spec.mtu, str(spec.network)) == ("10.5.34.1/24", 1472, "10.5.0.0/16")
    assert [health_label(n) for n in ("lxcbr0", "docker0", "cni0", "br-flannel", "42")] == [
        "lxcbr", "docker", "cni", "br-flannel", "42"
    ]  # fmt: skip
    for bad_name in ("", "a-name-longer-than-15", "a/b"):
        with pytest.raises(BridgeError):
            BridgeSpec.from_subnet_env(bad_name, ENV)
    with pytest.raises(BridgeError, match="FLANNEL_MTU"):
        BridgeSpec.from_subnet_env("br0", {"FLANNEL_SUBNET": "10.5.34.1/24"})
    with pytest.raises(BridgeError):  # the network address cannot be a gateway
        BridgeSpec.from_subnet_env("br0", {**ENV, "FLANNEL_SUBNET": "10.5.34.0/24"})


# --- sd_notify against real unix datagram sockets ------------------------------------------------------


def test_sd_notify_path_and_abstract_sockets(tmp_path: Path) -> None:
    assert sd_notify.notify("READY=1", environ={}) is False  # not under systemd: nothing to do
    assert sd_notify.socket_address("relative") is None
    path = str(tmp_path / "notify")
    abstract = f"flannel-ebpf-test-{os.getpid()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name,
    ):
        by_path.bind(path)
        by_name.bind("\0" + abstract)
        by_path.settimeout(2)
        by_name.settimeout(2)
        assert sd_notify.notify("READY=1", "STATUS=two\nlines", environ={"NOTIFY_SOCKET": path})
        assert by_path.recv(4096) == b"READY=1\nSTATUS=two lines"
        assert sd_notify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + abstract})
        assert by_name.recv(4096) == b"STOPPING=1"
    # Nobody listening any more: logged, not raised.
    assert sd_notify.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is False
