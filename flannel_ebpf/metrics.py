"""Prometheus metrics: `/metrics` on the agent's health port (the lease server's: remote/api_metrics.py).

Everything is read at scrape time from what the agent already keeps in process (its networks' state, lease
managers, data planes and the backend status of the last heartbeat); only the eBPF counters are read live
from their pinned map (48 lookups). Nothing here walks the peer list per scrape except the peers-by-backend
count, which is cached until the peers change. Labels are bounded: a network's name, a reason, a route
pattern; never a subnet or an address. The metric names are listed in docs/OPERATIONS.md (Metrics and status).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from loguru import logger
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from flannel_ebpf.remote.api_metrics import PREFIX
from flannel_ebpf.subnet.manager import REFUSED_LENGTH, REFUSED_OUR_IP, REFUSED_OUTSIDE

#: every phase a network can be in (flannel_ebpf.state.AgentState.phase): one series each, 1 for the current
PHASES = ("starting", "waiting-config", "acquiring", "ready", "backend", "conflict", "server-lost", "stopped", "failed")

#: sync durations (seconds): a full sync of 10,000 peers takes about a second
SYNC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class DurationHistogram:
    """A histogram the data plane fills (one observe() per sync) and a scrape reads: plain counts, so that
    the owner needs no registry; the collector turns it into a Prometheus histogram family."""

    buckets: tuple[float, ...] = SYNC_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*map(str, self.buckets), "+Inf"), list(self.counts), strict=True):
            running += n
            out.append((bound, running))
        return out


#: how late the event loop's probe timer fires (seconds): the agent's loop stalls, small and large
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: the backends flanneld and flannel-ebpf name: the `backend` label of `peers` (any other is `other`)
PEER_BACKENDS = frozenset({"udp", "vxlan", "host-gw", "alloc", "aws-vpc", "gce", "ipip", "ipsec", "wireguard",
                           "extension", "tencent-vpc", "ali-vpc"})  # fmt: skip


# --- peer refusal reasons: the backends' and the lease manager's free text, as a bounded label --------------

#: (words in the reason, label); first match wins
_REFUSAL_KINDS = (
    ("not a subnet inside", "outside_network"),
    ("duplicate", "duplicate_public_ip"),
    ("backendtype", "backend_type"),
    ("its backend is", "backend_type"),
    ("overlaps", "overlaps_own_subnet"),
    ("our own", "own_public_ip"),
    ("own address", "own_public_ip"),
    ("fl_peers is full", "map_full"),
    ("kernel refused", "kernel_refused"),
    ("programming failed", "kernel_refused"),
    ("reach", "not_directly_reachable"),
    ("on-link", "not_directly_reachable"),
    ("gateway", "not_directly_reachable"),
    ("cannot evaluate", "invalid_lease"),
    ("invalid", "invalid_lease"),
)


MANAGER_REFUSAL_KINDS = {
    REFUSED_OUTSIDE: "outside_network",
    REFUSED_LENGTH: "prefix_length",
    REFUSED_OUR_IP: "duplicate_public_ip",
}


def refusal_kind(reason: str) -> str:
    """The label for why a peer was refused (`other` for a reason not listed here)."""
    text = reason.lower()
    for words, kind in _REFUSAL_KINDS:
        if words in text:
            return kind
    return "other"


# --- the agent's collector --------------------------------------------------------------------------------


def _ok(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Families:
    """The metric families of one scrape, made as their first sample comes: `gauge(name, doc, labels, v)`."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def _family(self, kind: type, name: str, doc: str, labels: dict[str, str]) -> Any:
        if name not in self.made:
            self.made[name] = kind(f"{PREFIX}_{name}", doc, labels=list(labels))
        return self.made[name]

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(GaugeMetricFamily, name, doc, labels).add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(CounterMetricFamily, name, doc, labels).add_metric(list(labels.values()), value)

    def histogram(self, name: str, doc: str, labels: dict[str, str], h: DurationHistogram) -> None:
        family = self._family(HistogramMetricFamily, name, doc, labels)
        family.add_metric(list(labels.values()), h.cumulative(), sum_value=h.total)


class AgentCollector:
    """Reads one agent (flannel_ebpf.agent.Agent) at scrape time. Runs in the health server's thread:
    it only reads attributes the event loop replaces whole, and copies a dict before walking it."""

    def __init__(self, agent: Any) -> None:
        self._agent = weakref.ref(agent)
        self._peer_counts: dict[int, tuple[int, dict[str, int]]] = {}  # id(network) -> (peers_version, counts)

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the backend: not described up front (auto_describe is off)

    def collect(self) -> Iterator[Metric]:
        agent = self._agent()
        if agent is None:
            return
        f = _Families()
        networks = list(agent.networks)
        if networks:
            st = networks[0].state  # the loop probe writes the same figures into every network's state
            f.gauge("event_loop_stall_max_seconds", "The longest the agent's event loop was ever blocked", {},
                    st.loop_stall_max_ms / 1000)  # fmt: skip
            f.counter("event_loop_stalls", "Times the event loop was blocked for over 100 ms", {}, st.loop_stalls)
        lateness = getattr(agent, "loop_lateness", None)
        if isinstance(lateness, DurationHistogram):
            f.histogram("event_loop_lateness_seconds", "How late the event loop's probe timer fired (every 50 ms)",
                        {}, lateness)  # fmt: skip
        errors = 0
        for network in networks:
            try:
                self._network(network, f)
            except Exception as e:  # a scrape must never fail on one network's odd state
                logger.opt(exception=True).debug("metrics of network {!r}: {}", network.name, e)
                errors += 1
        f.gauge("scrape_errors", "Networks whose metrics could not all be read in this scrape", {}, errors)
        yield from f.made.values()

    def _network(self, network: Any, f: _Families) -> None:
        net = {"network": network.name}
        st = network.state
        ready, _ = network.readiness()
        f.gauge("ready", "1 when the network is ready (as /readyz and `health` say)", net, 1 if ready else 0)
        for p in PHASES:
            f.gauge("phase", "1 for the network's current phase", {**net, "phase": p}, 1 if st.phase == p else 0)
        status = st.backend_status or {}
        if st.backend_type:
            info = {
                **net,
                "backend": st.backend_type,
                "datapath": str(status.get("datapath") or "kernel"),
                "decap": str(status.get("decap") or ""),
                "delivery": str(status.get("delivery") or ""),
                "loader": str(status.get("loader") or ""),
            }
            f.gauge("backend_info", "The network's backend and data path (always 1)", info, 1)
        self._lease(network, net, f)
        self._peers(network, net, status, f)
        dataplane = network.dataplane
        if dataplane is not None:
            f.counter("backend_errors", "Backend calls (sync, add or remove a peer) that failed", net, dataplane.errors)
            f.histogram("sync_duration_seconds", "How long a full sync of the data path took", net,
                        dataplane.sync_seconds)  # fmt: skip
        self._datapath(network, net, status, f)

    def _lease(self, network: Any, net: dict[str, str], f: _Families) -> None:
        m = network.manager
        if m is None:
            return
        lease = m.lease
        if lease is not None and lease.expiration is not None:
            f.gauge("lease_expiry_timestamp_seconds", "When this host's lease expires (Unix time)", net,
                    lease.expiration)  # fmt: skip
            f.gauge("lease_ttl_seconds", "Seconds until this host's lease expires", net,
                    max(0.0, lease.expiration - time.time()))  # fmt: skip
        f.counter("lease_renewals", "Renewals of this host's lease", net, m.renewals)
        for op in ("acquire", "maintain", "watch"):
            f.counter("etcd_errors", "Failed etcd (or lease server) calls, by operation", {**net, "operation": op},
                      m.etcd_errors.get(op, 0))  # fmt: skip
        f.counter("etcd_reconnects", "Reconnects to etcd (or the lease server)", net, m.reconnects)
        for kind in ("added", "removed"):
            f.counter("watch_events", "Lease events the watch delivered, by kind", {**net, "kind": kind},
                      m.watch_events.get(kind, 0))  # fmt: skip
        f.counter("relists", "Full listings of the leases", net, m.relists)
        f.counter("relist_corrections", "Peer changes a periodic relist found the watch had missed", net,
                  m.relist_corrections)  # fmt: skip
        f.gauge("last_listing_seconds", "How long the last listing of all leases took", net, m.listing_seconds)
        f.gauge("lease_conflict", "1 while another host holds or overwrote this host's subnet", net,
                1 if m.problem else 0)  # fmt: skip

    def _peers(self, network: Any, net: dict[str, str], status: dict[str, Any], f: _Families) -> None:
        m = network.manager
        if m is None:
            return
        version = m.peers_version
        cached = self._peer_counts.get(id(network))
        if cached is None or cached[0] != version:
            # a copy (the loop mutates it); a lease writer picks its BackendType: unknown ones are one series
            types = [lease.attrs.backend_type for lease in list(m.peers.values())]
            counts = Counter(t if t in PEER_BACKENDS else "other" for t in types)
            cached = self._peer_counts[id(network)] = (version, dict(counts))
        for backend, n in sorted(cached[1].items()):
            f.gauge("peers", "Peer leases this host follows, by their backend", {**net, "backend": backend}, n)
        # the lease manager's refusals carry a fixed reason code (subnet.manager.REFUSED_*)
        reasons: Counter[str] = Counter({MANAGER_REFUSAL_KINDS.get(r, "other"): n for r, n in m.peers_refused.items()})
        for table in ("refused", "skipped"):  # routed backends and the eBPF udp path, as of the last heartbeat
            entries = status.get(table)
            if isinstance(entries, dict):
                for entry in list(entries.values()):
                    reasons[refusal_kind(str(entry.get("reason", "")) if isinstance(entry, dict) else str(entry))] += 1
        if _ok(status.get("peers_refused_map_full")) and status["peers_refused_map_full"]:
            reasons["map_full"] += status["peers_refused_map_full"]
        for kind in MANAGER_REFUSAL_KINDS.values():
            reasons.setdefault(kind, 0)
        for kind, n in sorted(reasons.items()):
            f.gauge("peers_refused", "Peer leases refused, by reason", {**net, "reason": kind}, n)

    def _datapath(self, network: Any, net: dict[str, str], status: dict[str, Any], f: _Families) -> None:
        if status.get("datapath") != "ebpf":
            return
        from flannel_ebpf.datapath import layout  # bpf only where the eBPF path runs

        pin_dir = getattr(network.backend, "pin_dir", None)
        counters = _read_counters(str(pin_dir)) if pin_dir else None
        for reason, (packets, nbytes) in (counters or {}).items():
            labels = {**net, "reason": reason.label, "verdict": "pass" if reason in layout.PASS_REASONS else "drop"}
            f.counter("datapath_packets", "Packets the eBPF programs handled, by reason", labels, packets)
            f.counter("datapath_bytes", "Bytes the eBPF programs handled, by reason", labels, nbytes)
        maps = status.get("maps")
        if isinstance(maps, dict):
            for key, spec in (("peers", layout.PEERS_MAP), ("members", layout.MEMBERS_MAP),
                              ("endpoints", layout.ENDPOINTS_MAP)):  # fmt: skip
                held = maps.get(key)
                labels = {**net, "map": spec.name}
                f.gauge("map_entries", "Entries in an eBPF map", labels, len(held) if isinstance(held, dict) else 0)
                f.gauge("map_capacity", "Entries an eBPF map can hold", labels, spec.max_entries)
        bridge = status.get("container_bridge")
        if isinstance(bridge, dict):
            endpoints = bridge.get("endpoints")
            f.gauge("udp_delivery_hooked", "1 while the udp delivery hook sits on the container bridge", net,
                    1 if bridge.get("hook") else 0)  # fmt: skip
            f.gauge("udp_delivery_endpoints", "Local container endpoints the delivery hook knows", net,
                    endpoints if _ok(endpoints) else len(endpoints or ()))  # fmt: skip
            f.gauge("udp_delivery_failing_attempts", "Failed reconciles of the delivery hook in a row", net,
                    bridge.get("failures") or 0)  # fmt: skip


def _read_counters(pin_dir: str) -> dict[Any, tuple[int, int]] | None:
    """The eBPF counters per reason, summed over CPUs, from the pinned fl_counters map (None if absent)."""
    from flannel_ebpf.datapath import bpfsys, layout

    path = layout.pin_path(pin_dir, layout.COUNTERS_MAP)
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return None
    try:
        ncpus = bpfsys.possible_cpus()
        slot = (layout.COUNTERS_MAP.value_size + 7) // 8 * 8
        result: dict[Any, tuple[int, int]] = {}
        for reason in layout.Reason:
            raw = bpfsys.map_lookup(fd, layout.pack_u32(int(reason)), slot * ncpus) or b""
            packets = nbytes = 0
            for cpu in range(ncpus if raw else 0):
                p, b = layout.unpack_counter(raw[cpu * slot : (cpu + 1) * slot])
                packets, nbytes = packets + p, nbytes + b
            result[reason] = (packets, nbytes)
        return result
    except OSError:
        return None
    finally:
        os.close(fd)


_registries: weakref.WeakKeyDictionary[Any, CollectorRegistry] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def registry_for(agent: Any) -> CollectorRegistry:
    """The agent's registry (made on the first scrape): its collector and the process' own metrics."""
    with _registries_lock:
        registry = _registries.get(agent)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(AgentCollector(agent))
            registry.register(ProcessCollector(namespace=PREFIX, registry=None))
            _registries[agent] = registry
        return registry


def render(accept_header: str | None, agent: Any) -> tuple[bytes, str]:
    """One scrape of `agent`: the body and its Content-Type, in the format the Accept header asks for
    (Prometheus' text format, or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry_for(agent)), content_type
