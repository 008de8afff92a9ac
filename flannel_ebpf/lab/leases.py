"""Many flanneld-format leases written straight into etcd, as a cluster of real flanneld hosts would
leave them: one key per subnet under `<prefix>/subnets/`, each bound to its own etcd lease (flanneld's
24 h TTL), with the JSON value flanneld v0.20.2 writes. For the scale bench and its test.

Runs where etcd is reachable, i.e. inside a lab namespace:
    ip netns exec <etcd-ns> python -m flannel_ebpf.lab.leases seed ENDPOINT PREFIX NETWORK BACKEND START COUNT
prints one JSON line: {"written": N, "seconds": S}. `list` times one listing through the agent's own
registry code. The peers' public IPs are 172.16.0.0/16 addresses (no such hosts exist: nothing is ever
sent to them; the scale lab routes that range on-link inside its own namespace so that host-gw accepts
them as directly reachable).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import aetcd

#: the fake hosts' public addresses: peer i is PEER_IP_BASE + 1 + i
PEER_IP_BASE = IPv4Address("172.16.0.0")
PEER_IP_RANGE = IPv4Network("172.16.0.0/16")
FLANNEL_TTL = 24 * 3600


def peer_ip(index: int) -> IPv4Address:
    return PEER_IP_BASE + 1 + index


def peer_subnet(network: IPv4Network, subnet_len: int, index: int) -> IPv4Network:
    """The index-th subnet counted from the END of the network, so that the agent's own allocation (from
    the start, as flannel's) never meets a seeded one."""
    size = 1 << (32 - subnet_len)
    top = int(network.broadcast_address) + 1
    return IPv4Network((top - (index + 1) * size, subnet_len))


def lease_value(index: int, backend: str) -> str:
    """The JSON flanneld v0.20.2 writes for a lease of this backend."""
    value: dict[str, object] = {"PublicIP": str(peer_ip(index)), "PublicIPv6": None}
    if backend != "udp":  # flanneld's udp backend sets neither BackendType nor BackendData
        value["BackendType"] = backend
    if backend == "vxlan":
        mac = ":".join(f"{b:02x}" for b in (0x02, 0xFE, 0, index >> 16 & 0xFF, index >> 8 & 0xFF, index & 0xFF))
        value["BackendData"] = {"VNI": 1, "VtepMAC": mac}
    return json.dumps(value, separators=(",", ":"))


def subnet_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix.rstrip('/')}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def _client(endpoint: str) -> aetcd.Client:
    host, _, port = endpoint.removeprefix("http://").partition(":")
    return aetcd.Client(host=host, port=int(port or 2379))


async def seed(
    endpoint: str, prefix: str, network: IPv4Network, subnet_len: int, backend: str, start: int, count: int,
    concurrency: int = 64,
) -> float:  # fmt: skip
    """Write leases start..start+count-1 (each: grant an etcd lease, put the key with it). Seconds taken."""
    async with _client(endpoint) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with gate:
                grant = await client.lease(FLANNEL_TTL)
                key = subnet_key(prefix, peer_subnet(network, subnet_len, index))
                await client.put(key.encode(), lease_value(index, backend).encode(), lease=grant.id)

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(start, start + count)))
        return time.monotonic() - began


async def remove(endpoint: str, prefix: str, network: IPv4Network, subnet_len: int, start: int, count: int) -> float:
    async with _client(endpoint) as client:
        began = time.monotonic()
        for index in range(start, start + count):
            await client.delete(subnet_key(prefix, peer_subnet(network, subnet_len, index)).encode())
        return time.monotonic() - began


async def time_listing(endpoint: str, prefix: str) -> dict[str, float]:
    """One listing of all leases through the agent's registry (pages, parsing, no TTL lookups)."""
    from flannel_ebpf.subnet.registry import SubnetRegistry

    registry = SubnetRegistry([endpoint], prefix)
    try:
        await registry.list_leases()  # connect, warm up
        began = time.monotonic()
        listing = await registry.list_leases()
        return {"leases": len(listing.leases), "seconds": time.monotonic() - began}
    finally:
        await registry.close()


def main(argv: list[str]) -> int:
    command, endpoint, prefix, *rest = argv
    if command == "list":
        print(json.dumps(asyncio.run(time_listing(endpoint, prefix))))
        return 0
    network, subnet_len = IPv4Network(rest[0]), int(rest[1])
    if command == "seed":
        backend, start, count = rest[2], int(rest[3]), int(rest[4])
        seconds = asyncio.run(seed(endpoint, prefix, network, subnet_len, backend, start, count))
    elif command == "remove":
        start, count = int(rest[2]), int(rest[3])
        seconds = asyncio.run(remove(endpoint, prefix, network, subnet_len, start, count))
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps({"written": count, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
