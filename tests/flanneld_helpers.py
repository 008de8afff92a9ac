"""The mixed clusters the flanneld interop tests bring up (flannel's own flanneld beside flannel-ebpf agents),
and how they read which peers a host has taken in."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from tests.helpers import wait_delivery_settled

NETWORK = "10.5.0.0/16"
FLANNELD_HOSTS = ("h1", "h2")
EBPF_HOSTS = ("h3", "h4")
AGENT_ARGS = {"udp": ["--udp-datapath", "ebpf"], "vxlan": [], "host-gw": []}
_ADDED = re.compile(r"Subnet added: (\S+)")
_REMOVED = re.compile(r"Subnet removed: (\S+)")


def subnet_of(lab: Any, host: str) -> str:
    env = lab.subnet_env(host)
    assert env is not None, f"{host}: no subnet file"
    return str(env.subnet.network)


def start_mixed(
    lab_factory: Callable[..., Any], backend: str, version: str, hosts: int = 4, etcd_api: str = "v3"
) -> tuple[Any, dict[str, str]]:
    """A lab of `hosts` hosts on `backend`: flanneld `version` on FLANNELD_HOSTS and flannel-ebpf on
    EBPF_HOSTS, all started together (nobody waits for anybody before all run), each holding a subnet of
    its own and a container. Returns the lab and {host: subnet}."""
    lab = lab_factory(hosts, network_config={"Network": NETWORK, "Backend": {"Type": backend}}, etcd_api=etcd_api)
    for h in FLANNELD_HOSTS:
        lab.start_flanneld(h, version)
    for h in EBPF_HOSTS:
        lab.start_agent(h, AGENT_ARGS[backend])
    lab.wait_all_ready(90, hosts=[*FLANNELD_HOSTS, *EBPF_HOSTS])  # the eBPF udp path compiles at start
    subnets = {h: subnet_of(lab, h) for h in (*FLANNELD_HOSTS, *EBPF_HOSTS)}
    assert len(set(subnets.values())) == len(subnets), f"two hosts hold one subnet: {subnets}"
    for h in subnets:
        lab.add_container(h)
    if backend == "udp":
        wait_delivery_settled(lab, EBPF_HOSTS)
    return lab, subnets


def flanneld_logged_peers(fd: Any) -> set[str]:
    """The peer subnets a running flanneld's last run logged as added and not removed since (its peers
    live in its memory; the log is where they show)."""
    known: set[str] = set()
    for line in fd.log_text(last_run=True).splitlines():
        if m := _ADDED.search(line):
            known.add(m.group(1))
        elif m := _REMOVED.search(line):
            known.discard(m.group(1))
    return known


def routed_peers(lab: Any, host: str, lease_subnets: set[str]) -> set[str]:
    """The lease subnets `host` has a route to (vxlan and host-gw add one per peer)."""
    routes = json.loads(lab.exec(host, ["ip", "-j", "-4", "route", "show"]).stdout)
    return {r["dst"] for r in routes if r.get("dst") in lease_subnets}


def ebpf_peers(lab: Any, host: str, lease_subnets: set[str]) -> set[str]:
    """The lease subnets in a flannel-ebpf udp agent's eBPF peer map."""
    peers = lab.agent_status(host)["backend_status"]["maps"]["peers"]
    return {str(IPv4Network(s)) for s in peers} & lease_subnets
