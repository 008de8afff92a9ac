"""Multi-network mode's pieces without a lab: names, per-network options, chain names, route scopes, the
network's name on the log lines of a backend's own thread and of the state writer's."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Network

import pytest
from loguru import logger

from flannel_ebpf import ipmasq
from flannel_ebpf.backends.udp.delivery import EndpointSync
from flannel_ebpf.cli import agent_options, parse_argv
from flannel_ebpf.netlink.routes import in_scope
from flannel_ebpf.network import HostClaims, Network
from flannel_ebpf.options import AgentOptions


def options(argv, env=None):
    return agent_options(parse_argv(argv, env or {}))


def test_networks_flag_and_env_give_each_network_flanneld_v05_places():
    opts = options(["-networks=blue,green", "-subnet-dir=/tmp/nets", "--state-dir=/s", "--bpf-pin-dir=/p"])
    assert opts.networks == ["blue", "green"]
    blue = opts.for_network("blue")
    assert blue.etcd_prefix == "/coreos.com/network/blue"
    assert blue.subnet_file == "/tmp/nets/blue.env"
    assert blue.state_dir == "/s/networks/blue" and blue.backend.state_dir == "/s/networks/blue"
    assert blue.backend.bpf_pin_dir == "/p/blue" and blue.backend.network_name == "blue"
    assert options([], {"FLANNELD_NETWORKS": "red"}).networks == ["red"]
    assert options([]).networks == []


@pytest.mark.parametrize("value", ["blue,blue", "../x", "a b", "x/y"])
def test_bad_network_names_are_refused(value):
    with pytest.raises(SystemExit):
        options([f"--networks={value}"])


def test_net_config_path_and_networks_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        options(["--networks=blue", f"--net-config-path={tmp_path}/c.json"])


def test_chain_names_per_network_fit_iptables():
    assert ipmasq.chain_name(ipmasq.FORWARD_CHAIN) == "FLANNEL-FWD"
    assert ipmasq.chain_name(ipmasq.FORWARD_CHAIN, "blue") == "FLANNEL-FWD-BLUE"
    long_a = ipmasq.chain_name(ipmasq.MASQ_CHAIN, "a-very-long-network-name-1")
    long_b = ipmasq.chain_name(ipmasq.MASQ_CHAIN, "a-very-long-network-name-2")
    assert len(long_a) <= ipmasq.CHAIN_NAME_MAX and long_a != long_b


@pytest.mark.parametrize("names", ["blue,Blue", "blue,BLUE", "a-b,a.b", "a_b,a-b", "x,a.b,y,A_B"])
def test_network_names_sharing_iptables_chains_are_refused_in_one_line(names):
    with pytest.raises(SystemExit) as refused:
        options([f"--networks={names}"])
    line = str(refused.value.code)
    assert "\n" not in line and "would share the iptables chain FLANNEL-" in line


def test_long_network_names_whose_shortened_chains_collide_are_refused():
    # Two names alike in their first 6 characters whose 4-hex digests are equal (found by search).
    names = ["long-" + str(i) + "-name" for i in range(100_000)]
    by_chain: dict[str, str] = {}
    pair = None
    for name in names:
        chain = ipmasq.chain_name(ipmasq.MASQ_CHAIN, name)
        if chain in by_chain:
            pair = [by_chain[chain], name]
            break
        by_chain[chain] = name
    assert pair is not None
    assert "would share the iptables chain" in ipmasq.chain_name_collision(pair)


def test_distinct_network_names_keep_their_chain_names():
    names = ["blue", "green", "net-a", "a-very-long-network-name-1", "a-very-long-network-name-2"]
    assert ipmasq.chain_name_collision(names) == ""
    assert options([f"--networks={','.join(names)}"]).networks == names
    assert ipmasq.chain_name(ipmasq.MASQ_CHAIN, "blue") == "FLANNEL-POSTRTG-BLUE"
    assert ipmasq.chain_name(ipmasq.FORWARD_CHAIN, "net-a") == "FLANNEL-FWD-NET_A"


def test_route_scope_and_host_claims():
    blue = IPv4Network("10.21.0.0/16")
    assert in_scope(IPv4Network("10.21.5.0/24"), blue) and not in_scope(IPv4Network("10.22.5.0/24"), blue)
    assert in_scope(IPv4Network("10.22.5.0/24"), None)
    claims = HostClaims()
    assert claims.claim("udp", "red") is None and claims.claim("udp", "red") is None
    assert claims.claim("udp", "pink") == "red"
    assert claims.add_network("blue", blue) is None
    assert claims.add_network("navy", IPv4Network("10.21.128.0/17")) == "blue"


def test_the_endpoint_sync_thread_logs_under_its_network_name(tmp_path):
    """The agent tags a network's log lines with logger.contextualize (a context variable): asyncio's
    worker threads inherit it, a thread a backend starts must be given it. The udp backend's
    endpoint-sync thread is made and started as the backend's start() does, in a worker thread of the
    network's context. (Its reconcile is replaced by a log line: no pinned maps or container bridge.)"""
    lines: list[tuple[str, str]] = []  # (thread, network) of each line
    sink = logger.add(lambda m: lines.append((m.record["thread"].name, m.record["extra"].get("network", ""))))
    syncs: list[EndpointSync] = []

    def start() -> None:  # as UdpEbpfBackend._start_delivery
        sync = EndpointSync(tmp_path, IPv4Network("10.254.253.0/24"), attach_hook=False, resync=0.05)
        syncs.append(sync)

        def reconcile() -> None:
            sync.last_reconcile = time.time()
            logger.info("reconciled")

        sync._reconcile = reconcile  # type: ignore[method-assign]
        sync.start()

    async def start_as_the_agent_does() -> None:
        with logger.contextualize(network="blue"):
            await asyncio.to_thread(start)

    try:
        asyncio.run(start_as_the_agent_does())
        deadline = time.monotonic() + 5
        while not any(thread == "endpoint-sync" for thread, _ in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for sync in syncs:
            sync.stop()
        logger.remove(sink)
    from_thread = [network for thread, network in lines if thread == "endpoint-sync"]
    assert from_thread and set(from_thread) == {"blue"}, lines


def test_the_state_writer_logs_under_its_network_name(tmp_path):
    """The state file is written by the network's writer thread (a thread pool's): a write that fails is
    logged there, and in multi-network mode that line must name the network like its others. The
    network saves its state as the agent runs it, in the network's context; the state dir is under a
    file, so the write fails."""
    (tmp_path / "file").write_text("")
    lines: list[tuple[str, str, str]] = []  # (thread, network, message) of each warning
    sink = logger.add(
        lambda m: lines.append((m.record["thread"].name, m.record["extra"].get("network", ""), m.record["message"])),
        level="WARNING",
    )
    network = Network(AgentOptions(etcd_endpoints=[], state_dir=str(tmp_path / "file" / "blue")), name="blue")

    async def save_as_the_agent_does() -> None:
        with logger.contextualize(network="blue"):
            network.save_state(wait=True)

    try:
        asyncio.run(save_as_the_agent_does())
    finally:
        network._state_writer.shutdown(wait=True)
        logger.remove(sink)
    from_writer = [(name, message) for thread, name, message in lines if thread.startswith("state-writer")]
    assert from_writer and all(name == "blue" for name, _ in from_writer), lines
    assert "cannot write state file" in from_writer[0][1]
