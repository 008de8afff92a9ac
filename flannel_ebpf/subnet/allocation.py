"""Which subnet to ask for: flannel's allocation arithmetic. Pure code."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network

from flannel_ebpf.config import NetworkConfig

# flanneld picks at random among the first 100 free subnets: random enough to make races between hosts
# that start together rare, bounded so that allocation stays cheap in a /8 of /24s.
CANDIDATE_LIMIT = 100


class OutOfSubnets(RuntimeError):
    pass


def all_subnets(config: NetworkConfig) -> Iterator[IPv4Network]:
    """Every leasable subnet, from SubnetMin to SubnetMax inclusive."""
    size = 1 << (32 - config.subnet_len)
    address = int(config.subnet_min)
    while address <= int(config.subnet_max):
        yield IPv4Network((IPv4Address(address), config.subnet_len))
        address += size


def free_subnets(
    config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = CANDIDATE_LIMIT
) -> list[IPv4Network]:
    """The first `limit` subnets that overlap no taken subnet (leases may have another length).

    Linear in the number of leases: a same-length lease is a set lookup, and only leases of another
    length (an older config's, rare) are compared one by one. Comparing every candidate with every
    lease took minutes with tens of thousands of leases."""
    same: set[IPv4Network] = set()
    other: list[IPv4Network] = []
    for t in taken:
        if t.prefixlen == config.subnet_len:
            same.add(t)
        else:
            other.append(t)
    free: list[IPv4Network] = []
    for candidate in all_subnets(config):
        if candidate not in same and not any(candidate.overlaps(t) for t in other):
            free.append(candidate)
            if len(free) >= limit:
                break
    return free


def pick_subnet(config: NetworkConfig, taken: Iterable[IPv4Network], rng: random.Random | None = None) -> IPv4Network:
    candidates = free_subnets(config, taken)
    if not candidates:
        raise OutOfSubnets(
            f"no free /{config.subnet_len} left in {config.network} between {config.subnet_min} and {config.subnet_max}"
        )
    return (rng or random).choice(candidates)


def gateway_address(subnet: IPv4Network) -> IPv4Address:
    """The address a host's bridge takes in its subnet (FLANNEL_SUBNET's address): the first host."""
    return subnet.network_address + 1
