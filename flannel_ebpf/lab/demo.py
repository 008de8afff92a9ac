"""`python -m flannel_ebpf.lab demo`: three hosts, their agents, a container each, a ping matrix.

Exits 0 when every container reaches every other one, 1 when a pair fails, 2 when the lab or an agent
could not come up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import NoReturn

from loguru import logger

from .lab import Lab
from .topology import Topology


def _sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through `finally`, so the lab is closed


def run_demo(args: argparse.Namespace) -> int:
    topology: Topology = "routed" if args.routed else "flat"
    config = {"Network": args.network, "Backend": {"Type": args.backend}}
    print(f"== flannel-ebpf demo: {args.hosts} hosts, {topology} underlay, backend {args.backend}")
    if args.routed and args.backend == "host-gw":
        print("   (host-gw needs peers on one L2 segment: across the router it is expected to be refused)")
    lab = Lab(args.hosts, topology=topology, network_config=config)
    keep = False
    try:
        lab.up()
        print(f"   lab {lab.prefix}, files in {lab.dir}")
        for h in lab.hosts.values():
            print(f"   {h.name}: netns {h.netns}, {h.iface} {h.underlay} (segment {h.segment.name})")
        print(f"   etcd: {lab.etcd_endpoint}, {lab.etcd_prefix}/config = {json.dumps(config)}")
        lab.start_agents(args.agent_arg)
        try:
            for h in lab.hosts.values():
                state = lab.wait_ready(h, args.timeout)
                print(f"   {h.name}: {state}")
        except (RuntimeError, TimeoutError) as e:
            print(f"!! an agent did not come up: {e}", file=sys.stderr)
            return 2

        print("\n== leases")
        leases = lab.leases()
        for h in lab.hosts.values():
            env = lab.subnet_env(h)
            print(f"-- {h.name} ({h.underlay_ip})")
            print("   " + h.subnet_file.read_text().strip().replace("\n", "\n   "))
            mine = {k: v for k, v in leases.items() if isinstance(v, dict) and v.get("PublicIP") == str(h.underlay_ip)}
            for key, value in mine.items():
                print(f"   {lab.etcd_prefix}/subnets/{key} = {json.dumps(value)}")
            if not mine:
                print("   (no lease in etcd with this PublicIP!)")
            if env is not None:
                lab.add_container(h)

        print("\n== containers")
        for c in lab.containers:
            print(f"   {c.name} on {c.host.name}: {c.ip} via {c.gateway}, mtu {c.mtu}")
        print("\n== ping matrix (container -> container)")
        matrix = lab.ping_matrix(count=args.count)
        print(matrix.format())
        failures = matrix.failures()
        if failures:
            print(f"\n!! {len(failures)} of {len(matrix.results)} pairs failed", file=sys.stderr)
        else:
            print(f"\n== all {len(matrix.results)} pairs reachable")
        if args.keep:
            keep = True
            lab.detach()
            print(f"\n== lab {lab.prefix} left running. Try:")
            first = lab.containers[0] if lab.containers else None
            if first is not None and len(lab.containers) > 1:
                print(f"   ip netns exec {first.netns} ping {lab.containers[1].ip}")
            first_host = next(iter(lab.hosts.values()))
            print(f"   ip netns exec {first_host.netns} ip route")
            print(f"   tear down: {sys.executable} -m flannel_ebpf.lab cleanup --prefix {lab.prefix}")
        return 1 if failures else 0
    finally:
        if not keep:
            lab.close(remove_dir=not args.keep_logs)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["host-gw", "udp", "vxlan", "alloc"], default="udp")
    p.add_argument("--routed", action="store_true", help="two L2 segments joined by a router")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--network", default="10.5.0.0/16")
    p.add_argument("--count", type=int, default=3, help="pings per pair")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for each agent to become ready")
    p.add_argument("--keep", action="store_true", help="leave the lab up and print how to tear it down")
    p.add_argument("--keep-logs", action="store_true", help="keep the lab directory (agent logs)")
    p.add_argument(
        "--agent-arg", action="append", default=[], help="extra argument for every `flannel-ebpf up` (repeatable)"
    )


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    if not args.verbose:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    return run_demo(args)
