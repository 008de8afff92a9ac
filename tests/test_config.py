"""flanneld's config rules (subnet/config.go), plus the checks flanneld lacks."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.config import ConfigError, parse_config


def test_defaults_for_a_16():
    c = parse_config('{"Network": "10.5.0.0/16"}')
    assert c.network == IPv4Network("10.5.0.0/16")
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Address("10.5.1.0")  # the first subnet is never leased
    assert c.subnet_max == IPv4Address("10.5.255.0")
    assert c.backend_type == "udp"  # no Backend: udp, as flanneld


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0"),  # /22 or shorter: /24s
        ("10.0.0.0/23", 25, "10.0.0.128", "10.0.1.128"),  # else prefix + 2
        ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),
    ],
)
def test_default_subnet_len(network, subnet_len, smin, smax):
    c = parse_config(f'{{"Network": "{network}"}}')
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (subnet_len, smin, smax)


def test_explicit_values_and_backend():
    c = parse_config(
        '{"Network":"10.5.0.0/16","SubnetLen":26,"SubnetMin":"10.5.4.0","SubnetMax":"10.5.8.192",'
        '"Backend":{"Type":"vxlan","VNI":7,"Port":4789}}'
    )
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (26, "10.5.4.0", "10.5.8.192")
    assert c.backend_type == "vxlan" and c.backend["VNI"] == 7
    assert c.contains_subnet(IPv4Network("10.5.4.64/26"))
    assert not c.contains_subnet(IPv4Network("10.5.4.0/24"))  # wrong length
    assert not c.contains_subnet(IPv4Network("10.5.9.0/26"))  # above SubnetMax


def test_backend_without_type_is_udp():
    assert parse_config('{"Network":"10.5.0.0/16","Backend":{"Port":9000}}').backend_type == "udp"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ("{}", "Network"),
        ('{"Network": "10.5.0.0/33"}', "not an IPv4 CIDR"),
        ('{"Network": 5}', "CIDR string"),
        ('{"Network": "10.5.0.0/29"}', "too small"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "/30 or shorter"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": 17}', "at least /18"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "positive integer"),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"}', "not inside Network"),
        ('{"Network": "10.5.0.0/16", "SubnetMax": "10.5.3.7"}', "boundary"),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.3.0"}', "above SubnetMax"),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "bogus"}', "not an IPv4 address"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Type": "ipsec"}}', "unknown backend type"),
        ('{"Network": "10.5.0.0/16", "Backend": "udp"}', "Backend must be a JSON object"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}', "Port"),
        ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "IPv6"),
    ],
)
def test_bad_configs_are_one_clear_line(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- flanneld's quirks: what it accepts, we accept -----------------------------------------------------


@pytest.mark.parametrize(("raw", "canonical"), [("VXLAN", "vxlan"), ("Host-GW", "host-gw"), ("UDP", "udp")])
def test_backend_type_is_case_insensitive_as_flanneld_lowercases_it(raw, canonical):
    c = parse_config(f'{{"Network": "10.5.0.0/16", "Backend": {{"Type": "{raw}"}}}}')
    assert c.backend_type == canonical and c.backend["Type"] == canonical


def test_backend_type_must_be_a_known_string():
    with pytest.raises(ConfigError, match="unknown backend type 'Wireguard'"):
        parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "Wireguard"}}')
    with pytest.raises(ConfigError, match=r"Backend\.Type must be a string"):
        parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": 3}}')


def test_zero_subnet_min_and_max_mean_unset():
    c = parse_config('{"Network": "10.5.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "0.0.0.0"}')
    assert (str(c.subnet_min), str(c.subnet_max)) == ("10.5.1.0", "10.5.255.0")
    c = parse_config('{"Network": "10.5.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "10.5.9.0"}')
    assert (str(c.subnet_min), str(c.subnet_max)) == ("10.5.1.0", "10.5.9.0")


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_port_zero_means_the_default_port(backend):
    # flanneld's vxlan passes Port 0 to the kernel, which then uses 8472; the backends never see a 0.
    c = parse_config(f'{{"Network": "10.5.0.0/16", "Backend": {{"Type": "{backend}", "Port": 0}}}}')
    assert c.backend == {"Type": backend}


def test_port_zero_gives_vxlan_the_kernel_default():
    from flannel_ebpf.backends.vxlan import LINUX_DEFAULT_PORT, VxlanConfig

    c = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "Port": 0}}')
    assert VxlanConfig.from_backend_config(c.backend).effective_port == LINUX_DEFAULT_PORT == 8472
