"""Choosing the underlay interface as flanneld v0.20.2 does, on real interfaces in a namespace of our own:
--iface, unanchored --iface-regex (addresses before names), --iface-can-reach (the kernel's route lookup),
their precedence, and --public-ip.

choose_interface reads the namespace it runs in, so every case runs in one Python process started
inside the namespace (`ip netns exec`), and each test checks its case's answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel_ebpf.lab.netns import create_netns, delete_netns, new_prefix

REPO = Path(__file__).resolve().parents[1]

# Interfaces, in index order (each a veth whose peer `x?` stays without addresses):
#   lan1  172.20.0.1/24 and 172.21.0.1/24
#   wan0  10.99.0.5/24, the default route via 10.99.0.1
#   eth7  10.77.0.2/24, route 203.0.113.0/24 via 10.77.0.1
#   192.168.5.10/24 on wan0 too (an address that only an IP regex finds)
CASES: dict[str, dict] = {
    "default route": {},
    "regex on a name, unanchored": {"regexes": ["eth"]},
    "regex on an address, anchored by the user": {"regexes": [r"^192\.168\."]},
    "addresses before names": {"regexes": [r"lan|10\.99\."]},  # lan1 comes first but only by name
    "second regex when the first misses": {"regexes": ["nomatch", "eth"]},
    "regex matching only address-less interfaces misses": {"regexes": ["^x"]},
    "iface by name": {"ifaces": ["eth7"]},
    "iface by address": {"ifaces": ["172.21.0.1"]},
    "iface before regex": {"ifaces": ["lan1"], "regexes": ["eth"]},
    "missing iface, then regex": {"ifaces": ["nosuch0"], "regexes": ["eth"]},
    "can-reach via a gateway": {"can_reach": "203.0.113.5"},
    "can-reach picks the source address": {"can_reach": "172.21.0.9"},
    "regex before can-reach": {"regexes": ["lan"], "can_reach": "203.0.113.5"},
    "missing iface, then can-reach": {"ifaces": ["nosuch0"], "can_reach": "203.0.113.5"},
    "can-reach with no route": {"can_reach": "198.51.100.1", "drop_default": True},
    "public-ip held by an interface": {"public_ip": "172.20.0.1"},
    "public-ip held by none (NAT)": {"public_ip": "198.18.0.1"},
}

PROBE = """
import json, sys
from flannel_ebpf.host.iface import InterfaceError, choose_interface
out = {}
for name, case in json.loads(sys.argv[1]).items():
    kwargs = {k: v for k, v in case.items() if k != "drop_default"}
    try:
        e = choose_interface(**kwargs)
        out[name] = [e.name, str(e.address), str(e.public_ip)]
    except InterfaceError as err:
        out[name] = ["error", str(err)]
print(json.dumps(out))
"""


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


def _probe(ns: str, cases: dict[str, dict]) -> dict[str, list[str]]:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def answers() -> Iterator[dict[str, list[str]]]:
    ns = f"{new_prefix()}-iface"
    create_netns(ns)
    try:
        for name, peer in (("lan1", "xa"), ("wan0", "xb"), ("eth7", "xc")):
            _ip(ns, "link", "add", name, "type", "veth", "peer", "name", peer)
            _ip(ns, "link", "set", name, "up")
            _ip(ns, "link", "set", peer, "up")
        _ip(ns, "addr", "add", "172.20.0.1/24", "dev", "lan1")
        _ip(ns, "addr", "add", "172.21.0.1/24", "dev", "lan1")
        _ip(ns, "addr", "add", "10.99.0.5/24", "dev", "wan0")
        _ip(ns, "addr", "add", "192.168.5.10/24", "dev", "wan0")
        _ip(ns, "addr", "add", "10.77.0.2/24", "dev", "eth7")
        _ip(ns, "route", "add", "default", "via", "10.99.0.1", "dev", "wan0")
        _ip(ns, "route", "add", "203.0.113.0/24", "via", "10.77.0.1", "dev", "eth7")
        found = _probe(ns, {k: v for k, v in CASES.items() if not v.get("drop_default")})
        _ip(ns, "route", "del", "default")
        found.update(_probe(ns, {k: v for k, v in CASES.items() if v.get("drop_default")}))
        yield found
    finally:
        delete_netns(ns)


EXPECTED = {
    "default route": ["wan0", "10.99.0.5", "10.99.0.5"],
    "regex on a name, unanchored": ["eth7", "10.77.0.2", "10.77.0.2"],
    "regex on an address, anchored by the user": ["wan0", "192.168.5.10", "192.168.5.10"],
    "addresses before names": ["wan0", "10.99.0.5", "10.99.0.5"],
    "second regex when the first misses": ["eth7", "10.77.0.2", "10.77.0.2"],
    "iface by name": ["eth7", "10.77.0.2", "10.77.0.2"],
    "iface by address": ["lan1", "172.21.0.1", "172.21.0.1"],
    "iface before regex": ["lan1", "172.20.0.1", "172.20.0.1"],
    "missing iface, then regex": ["eth7", "10.77.0.2", "10.77.0.2"],
    "can-reach via a gateway": ["eth7", "10.77.0.2", "10.77.0.2"],
    "can-reach picks the source address": ["lan1", "172.21.0.1", "172.21.0.1"],
    "regex before can-reach": ["lan1", "172.20.0.1", "172.20.0.1"],
    "missing iface, then can-reach": ["eth7", "10.77.0.2", "10.77.0.2"],
    "public-ip held by an interface": ["lan1", "172.20.0.1", "172.20.0.1"],
    "public-ip held by none (NAT)": ["wan0", "10.99.0.5", "198.18.0.1"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_interface_choice(answers, case):
    assert answers[case] == EXPECTED[case], CASES[case]


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("regex matching only address-less interfaces misses", "--iface-regex ^x"),
        ("can-reach with no route", "--iface-can-reach 198.51.100.1"),
    ],
)
def test_no_match_is_one_error_naming_what_was_tried(answers, case, says):
    kind, message = answers[case]
    assert kind == "error" and says in message and "interfaces: " in message and "\n" not in message
