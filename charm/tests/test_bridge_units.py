"""The charm's pure parts: the lease, dnsmasq's and LXC's configuration, the relation data, the settings."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import bridge
import pytest
import settings
from conftest import SUBNET_ENV


def test_lease_from_subnet_env() -> None:
    lease = bridge.Lease.from_subnet_env(SUBNET_ENV)
    assert (str(lease.network), str(lease.subnet), lease.mtu, lease.gateway) == (
        "10.10.0.0/16", "10.10.16.1/24", 1472, IPv4Address("10.10.16.1"))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_MTU=1472\n", "has no FLANNEL_SUBNET"),
        ("FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET=10.10.16.0/24\nFLANNEL_MTU=1472\n", "not a gateway"),
        ("FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET=10.10.16.1/24\nFLANNEL_MTU=100\n", "MTU 100"),
        ("FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET=10.99.16.1/24\nFLANNEL_MTU=1472\n", "not inside"),
        ("FLANNEL_NETWORK=10.10.0.0/16\nFLANNEL_SUBNET=10.10.16.1/24\nFLANNEL_MTU=x\n", "not flannel's"),
    ],
)
def test_lease_refuses_what_cannot_address_containers(text: str, why: str) -> None:
    with pytest.raises(bridge.LeaseError, match=why):
        bridge.Lease.from_subnet_env(text)


def test_dhcp_ranges_skip_the_gateway() -> None:
    a = IPv4Address
    assert bridge.dhcp_ranges(IPv4Interface("10.10.16.1/24")) == [(a("10.10.16.2"), a("10.10.16.254"))]
    assert bridge.dhcp_ranges(IPv4Interface("10.10.16.77/24")) == [
        (a("10.10.16.1"), a("10.10.16.76")), (a("10.10.16.77") + 1, a("10.10.16.254"))]  # fmt: skip
    assert bridge.dhcp_ranges(IPv4Interface("10.10.16.6/29")) == [(a("10.10.16.1"), a("10.10.16.5"))]


def test_dnsmasq_conf_serves_the_subnet_with_the_mtu_on_the_bridge_alone() -> None:
    lease = bridge.Lease.from_subnet_env(SUBNET_ENV)
    conf = bridge.dnsmasq_conf("lxcbr0", lease, lease_file="/var/lib/misc/x.leases", pid_file="/run/x.pid", dns=False)
    lines = conf.splitlines()
    for want in (
        "interface=lxcbr0",
        "bind-interfaces",
        "port=0",
        "dhcp-range=10.10.16.2,10.10.16.254,255.255.255.0,1h",
        "dhcp-option=option:router,10.10.16.1",
        "dhcp-option=26,1472",
        "dhcp-leasefile=/var/lib/misc/x.leases",
        "pid-file=/run/x.pid",
    ):
        assert want in lines
    with_dns = bridge.dnsmasq_conf("lxcbr0", lease, lease_file="/l").splitlines()
    assert "port=53" in with_dns and "dhcp-option=option:dns-server,10.10.16.1" in with_dns


def test_lxc_defaults_point_new_containers_at_the_bridge_with_the_mtu() -> None:
    conf = bridge.lxc_default_conf("lxcbr0", 1472)
    assert "lxc.net.0.link = lxcbr0\n" in conf and "lxc.net.0.mtu = 1472\n" in conf
    assert 'USE_LXC_BRIDGE="false"' in bridge.lxc_net_defaults()


def test_network_relation_data_round_trips_to_dockerd_options() -> None:
    lease = bridge.Lease.from_subnet_env(SUBNET_ENV)
    data = bridge.network_relation_data(lease)
    again = bridge.Lease.from_network_relation(data)
    assert (again.subnet, again.mtu, again.network) == (lease.subnet, lease.mtu, lease.network)
    assert bridge.docker_options(again) == ["--bip=10.10.16.1/24", "--mtu=1472"]
    with pytest.raises(bridge.LeaseError, match="has no mtu"):
        bridge.Lease.from_network_relation({"subnet": "10.10.16.1/24", "cidr": "10.10.0.0/16"})


def test_etcd_data_from_both_etcd_charms() -> None:
    ck8s = settings.EtcdData.from_relation({"connection_string": "https://a:2379,https://b:2379", "client_ca": "X"})
    assert ck8s is not None and ck8s.endpoints == ("https://a:2379", "https://b:2379") and ck8s.tls
    seed = settings.EtcdData.from_relation({"hostname": "10.0.0.5", "port": "4001"})
    assert seed is not None and seed.endpoints == ("http://10.0.0.5:4001",) and not seed.tls
    assert settings.EtcdData.from_relation({"version": "3.4"}) is None
    with pytest.raises(settings.ConfigError, match="not a URL"):
        settings.EtcdData.from_relation({"connection_string": "10.0.0.1:2379"})


def test_dropin_refuses_values_systemd_would_expand() -> None:
    with pytest.raises(settings.ConfigError, match="cannot go into a systemd unit"):
        settings.render_dropin({"FLANNELD_IFACE": 'eth0"\nExecStartPre=/bin/evil'})
    with pytest.raises(settings.ConfigError, match="one interface name"):
        settings.CharmConfig.parse({"iface": "eth0 -evil"})
