"""`flannel-ebpf bridge` in a network namespace of the test's own, run as a user runs it (the CLI inside
the namespace): create, run again (nothing changes), a new lease (the old address replaced, a foreign one
kept), a name held by another kind of device; and `health`'s bridge form."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel_ebpf import state as state_file
from flannel_ebpf.lab.agent import cli_command, cli_env
from flannel_ebpf.lab.netns import Netns, create_netns, delete_netns, new_prefix

pytestmark = pytest.mark.lab


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    n = create_netns(f"{new_prefix()}-br", tmp_path)
    try:
        yield n
    finally:
        delete_netns(n.name)


def cli(ns: Netns, *args: str):
    return ns.exec([*cli_command(), *args], env=cli_env(), check=False, timeout=30)


def write_env(path: Path, subnet: str, mtu: int = 1472, network: str = "10.10.0.0/16") -> None:
    path.write_text(f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n")


def link(ns: Netns, name: str) -> dict:
    info = json.loads(ns.ip("-j", "-d", "addr", "show", "dev", name).stdout)[0]
    info["inet"] = sorted(f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["family"] == "inet")
    return info


def agent_state(state_dir: Path, subnet: str, mtu: int = 1472) -> None:
    """The state a ready agent (this very process, so health sees it alive) would write."""
    st = state_file.AgentState(
        pid=os.getpid(), phase="ready", network="10.10.0.0/16", subnet=subnet, mtu=mtu, backend_type="alloc"
    )
    st.iface = {"name": "eth0", "index": 2, "address": "192.168.50.11", "public_ip": "192.168.50.11", "mtu": 1500}
    state_file.save(str(state_dir), st)


def test_bridge_create_rerun_new_lease_and_health(ns: Netns, tmp_path: Path) -> None:
    env_file, state_dir = tmp_path / "subnet.env", tmp_path / "state"
    write_env(env_file, "10.10.16.1/24")
    args = ("--subnet-file", str(env_file), "--state-dir", str(state_dir))

    # No bridge recorded yet: health keeps its interface form.
    agent_state(state_dir, "10.10.16.0/24")
    r = cli(ns, "health", "--state-dir", str(state_dir))
    assert (r.returncode, r.stdout.strip()) == (0, "ready eth0 subnet:10.10.16.0/24 mtu:1472"), r

    r = cli(ns, "bridge", "lxcbr0", *args)
    assert r.ok, r
    assert r.stdout.strip().startswith("bridge lxcbr0: 10.10.16.1/24 mtu 1472 up (created; added 10.10.16.1/24")
    first = link(ns, "lxcbr0")
    assert first["linkinfo"]["info_kind"] == "bridge"
    assert first["inet"] == ["10.10.16.1/24"] and first["mtu"] == 1472 and "UP" in first["flags"]
    record = json.loads((state_dir / "bridge.json").read_text())
    assert (record["name"], record["address"], record["mtu"]) == ("lxcbr0", "10.10.16.1/24", 1472)

    # The charm form: label (the name without its number), gateway, FLANNEL_SUBNET, MTU.
    r = cli(ns, "health", "--state-dir", str(state_dir))
    assert (r.returncode, r.stdout.strip()) == (0, "ready lxcbr:10.10.16.1 subnet:10.10.16.1/24 mtu:1472"), r

    # Again: nothing changes (same device, same address, no flap).
    r = cli(ns, "bridge", "lxcbr0", *args)
    assert r.ok and r.stdout.strip().endswith("(unchanged)"), r
    again = link(ns, "lxcbr0")
    assert (again["ifindex"], again["inet"], again["mtu"]) == (first["ifindex"], first["inet"], 1472)

    # The agent moved to another lease: health says the bridge is stale until it is reconfigured.
    ns.ip("addr", "add", "10.0.3.1/24", "dev", "lxcbr0")  # someone else's address (lxc-net's)
    agent_state(state_dir, "10.10.17.0/24", mtu=1450)
    r = cli(ns, "health", "--state-dir", str(state_dir))
    assert r.returncode == 1 and "holds 10.10.16.1/24 but the lease is 10.10.17.0/24" in r.stdout, r
    write_env(env_file, "10.10.17.1/24", mtu=1450)
    r = cli(ns, "bridge", "lxcbr0", *args)
    assert r.ok, r
    assert "added 10.10.17.1/24; removed 10.10.16.1/24; mtu 1472 -> 1450" in r.stdout
    assert "10.0.3.1/24" in r.stderr  # warned about, kept
    after = link(ns, "lxcbr0")
    assert after["ifindex"] == first["ifindex"]
    assert after["inet"] == ["10.0.3.1/24", "10.10.17.1/24"] and after["mtu"] == 1450
    r = cli(ns, "health", "--state-dir", str(state_dir))
    assert (r.returncode, r.stdout.strip()) == (0, "ready lxcbr:10.10.17.1 subnet:10.10.17.1/24 mtu:1450"), r

    # Taken down or stripped behind our back: not-ready, and a rerun repairs it.
    ns.ip("link", "set", "lxcbr0", "down")
    assert "is down" in cli(ns, "health", "--state-dir", str(state_dir)).stdout
    assert cli(ns, "bridge", "lxcbr0", *args).stdout.strip().endswith("(set up)")
    ns.ip("link", "del", "lxcbr0")
    assert "lxcbr0 is gone" in cli(ns, "health", "--state-dir", str(state_dir)).stdout

    # A name held by a device that is not a bridge is refused, not reconfigured.
    ns.ip("link", "add", "docker0", "type", "veth", "peer", "name", "dpeer")
    r = cli(ns, "bridge", *args)  # the default name: docker0
    assert r.returncode == 1 and "docker0 exists and is not a bridge (kind veth)" in r.stderr, r
    assert link(ns, "docker0")["inet"] == []
