"""flannel's iptables chains (ip-masq and forward rules) in a namespace of their own.

iptables only ever runs inside the test's namespace (`ip netns exec`): the root namespace's firewall is
never read or written. Each step runs flannel_ebpf.ipmasq in a short Python subprocess in that namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="needs root, iproute2 and iptables",
)

NETWORK, SUBNET = "10.5.0.0/16", "10.5.34.0/24"

# What flanneld v0.20.2 installs (network/iptables.go), as iptables-save prints it.
MASQ = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
    "-j MASQUERADE --random-fully",
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" '
    "-j MASQUERADE --random-fully",
]
FORWARD = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]

_STEP = """
import json, sys
from ipaddress import IPv4Network
from loguru import logger
logger.remove()
from flannel_ebpf import ipmasq
m = ipmasq.make_manager(IPv4Network(sys.argv[1]), IPv4Network(sys.argv[2]), ip_masq=True, forward_rules=True)
op = sys.argv[3]
if op == "setup":
    m.setup(); out = None
elif op == "problems":
    out = m.problems()
elif op == "ensure":
    out = m.ensure()
elif op == "teardown":
    m.teardown(); out = None
elif op == "teardown-any":
    ipmasq.teardown_chains(ipmasq.all_flannel_chains()); out = None
print(json.dumps(out))
"""


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"fkb{secrets.token_hex(2)}-ipt"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def step(ns: str, op: str) -> Any:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _STEP, NETWORK, SUBNET, op],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ipt(ns: str, *args: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "5", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rules(ns: str) -> list[str]:
    """Every rule (nat and filter) as iptables-save prints it, in order."""
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("-A ")]


def chains(ns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True, check=True)
    return {line.split()[0][1:] for line in out.stdout.splitlines() if line.startswith(":")}


def test_setup_is_flanneld_rules_and_idempotent(ns: str) -> None:
    assert step(ns, "problems") == ["nat/FLANNEL-POSTRTG is missing", "filter/FLANNEL-FWD is missing"]
    # a rule someone else put first in POSTROUTING: ours must still come first
    ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE")
    step(ns, "setup")
    got = rules(ns)
    assert [r for r in got if "flanneld" in r] == FORWARD + MASQ
    assert got.index(MASQ[0]) < got.index("-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE")
    assert step(ns, "problems") == []
    # idempotent: a second setup (an agent restart) leaves exactly the same rules, no duplicates
    step(ns, "setup")
    assert rules(ns) == got
    assert step(ns, "ensure") is False


def test_resync_repairs_drift(ns: str) -> None:
    step(ns, "setup")
    want = rules(ns)
    # a rule deleted, a foreign rule inside our chain, a jump lost
    ipt(ns, "-t", "nat", "-D", "FLANNEL-POSTRTG", "2")
    ipt(ns, "-t", "filter", "-A", "FLANNEL-FWD", "-j", "DROP")
    ipt(ns, "-t", "filter", "-D", "FORWARD", "1")
    problems = step(ns, "problems")
    assert any("FLANNEL-POSTRTG lacks" in p for p in problems)
    assert any("FLANNEL-FWD has 3 rules" in p for p in problems)
    assert any("0 jumps to FLANNEL-FWD" in p for p in problems)
    assert step(ns, "ensure") is True
    assert rules(ns) == want
    # a duplicated jump is drift too
    ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG")
    assert step(ns, "ensure") is True
    assert rules(ns) == want
    # chains deleted outright
    step(ns, "teardown")
    assert step(ns, "ensure") is True
    assert rules(ns) == want


def test_teardown_removes_jumps_and_chains(ns: str) -> None:
    ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE")
    step(ns, "setup")
    step(ns, "teardown")
    assert rules(ns) == ["-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE"]
    assert "FLANNEL-POSTRTG" not in chains(ns) and "FLANNEL-FWD" not in chains(ns)
    step(ns, "teardown")  # nothing left: still fine
    # `down` without the network: found by chain name
    step(ns, "setup")
    step(ns, "teardown-any")
    assert rules(ns) == ["-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE"]
    assert "FLANNEL-POSTRTG" not in chains(ns) and "FLANNEL-FWD" not in chains(ns)


def test_masq_rules_without_random_fully() -> None:
    from ipaddress import IPv4Network

    from flannel_ebpf.ipmasq import masq_chain

    chain = masq_chain(IPv4Network(NETWORK), IPv4Network(SUBNET), random_fully=False)
    assert [r[-1] for r in chain.rules] == ["RETURN", "RETURN", "MASQUERADE", "RETURN", "MASQUERADE"]
    assert not any("--random-fully" in r for r in chain.rules)
