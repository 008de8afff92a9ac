"""One network: config -> interface -> backend -> lease -> subnet.env -> watch, renew, resync.

A Network owns everything of one flannel network on this host: its config, its lease (LeaseManager), its
backend and DataPlane, its subnet file and its state file. The Agent (flannel_ebpf.agent) runs one
(classic flanneld) or several (`--networks`, flanneld v0.5's multi-network mode) in one asyncio loop.
Leases come from a registry factory: etcd today, a remote lease server in client/server mode.

The control plane (LeaseManager) hands peers to a DataPlane, which serialises every
backend call in one worker thread, so that netlink and bpf(2) never run concurrently and never block the
lease renewal. A backend error on one peer is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from typing import Any

import aetcd.exceptions
import grpc
from loguru import logger

from flannel_ebpf import sd_notify, subnet_file
from flannel_ebpf import state as state_file
from flannel_ebpf.backends import make_backend
from flannel_ebpf.backends.base import Backend, BackendError, BackendNotReady
from flannel_ebpf.config import MAX_CONFIG_BYTES, ConfigError, NetworkConfig, parse_config
from flannel_ebpf.host.files import atomic_write
from flannel_ebpf.host.iface import InterfaceError, choose_interface
from flannel_ebpf.host.types import LocalNetwork
from flannel_ebpf.metrics import DurationHistogram
from flannel_ebpf.options import AgentOptions, RegistryFactory
from flannel_ebpf.subnet.allocation import OutOfSubnets
from flannel_ebpf.subnet.lease import Lease, unusable_address_reason
from flannel_ebpf.subnet.manager import Backoff, LeaseManager, PeerSink
from flannel_ebpf.subnet.registry import (
    ETCD_UNAVAILABLE,
    describe_etcd_error,
    describe_tls_error,
    grpc_code,
    tls_error_kind,
)
from flannel_ebpf.subnet.store import LeaseSource

CONFIG_POLL_SECONDS = 1.0
#: while the v3 config is missing, how often etcd's v2 store is asked whether the config is there instead
V2_PROBE_SECONDS = 30.0
HEARTBEAT_SECONDS = 5.0
#: lease and peer changes reach the state file at most this often: a burst of 1,000 watch events must
#: not write (and serialise 10,000 peers into) the file 1,000 times. Phase changes are written at once.
STATE_WRITE_INTERVAL = 0.5


@dataclass
class HostClaims:
    """Resources of which a host has only one, claimed by the first network that needs them: the eBPF
    udp path owns the device flannel0 and the underlay's decap hook (flanneld v0.5 ran one TUN flannelN
    per udp network, on distinct ports; flannel-ebpf runs one udp network per host)."""

    held: dict[str, str] = field(default_factory=dict)  # resource -> the network holding it
    networks: dict[str, IPv4Network] = field(default_factory=dict)  # name -> its Network, once configured

    def add_network(self, name: str, network: IPv4Network) -> str | None:
        """Record `name`'s overlay Network; None, or the network whose Network it overlaps (each network
        owns the proto-102 routes inside its Network: two overlapping ones would fight over them)."""
        for other, theirs in self.networks.items():
            if other != name and theirs.overlaps(network):
                return other
        self.networks[name] = network
        return None

    def seed_from_state(self, networks: list[tuple[str, str]]) -> None:
        """Give each resource first to the network that held it in the previous run (its state dir shows
        a backend past this claim), so that a restart never hands flannel0 to another udp network
        because its config happened to be read first. `networks`: (name, state dir) in --networks order."""
        for name, state_dir in networks:
            previous = state_file.load(state_dir)
            if previous is not None and previous.backend_type == "udp":
                self.held.setdefault("udp", name)

    def claim(self, resource: str, network: str) -> str | None:
        """None if `network` now holds `resource`, else the network that already does."""
        holder = self.held.setdefault(resource, network)
        return None if holder == network else holder


class FatalError(RuntimeError):
    """Stops the agent with a non-zero exit; the message is the one line the operator sees."""


class DataPlane(PeerSink):
    """Drives the backend from the control plane's events, one call at a time, off the event loop."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()
        self.errors = 0
        #: the last sync's BackendNotReady message ("" when the last sync worked): the network is not-ready
        self.problem = ""
        self.on_problem: Any = None  # called when `problem` changes
        self.sync_seconds = DurationHistogram()  # /metrics: flannel_ebpf_sync_duration_seconds
        self._last_error: Exception | None = None

    async def _run_locked(self, fn: Any, *args: Any) -> Any:
        """Run `fn` in a worker thread holding the lock until the thread is done, even if the caller is
        cancelled meanwhile (a relist cancels the watch mid-event): a cancelled await would otherwise free
        the lock while the thread still uses the backend's netlink socket or map fds."""
        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait({work})
                raise

    async def call(self, what: str, fn: Any, *args: Any) -> bool:
        """One backend call; False (logged) if it failed: one bad peer must never stop the agent."""
        try:
            await self._run_locked(fn, *args)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors += 1
            self._last_error = e
            logger.opt(exception=not isinstance(e, BackendError)).error("{} failed: {}", what, e)
            return False

    async def sync_peers(self, peers: list[Lease]) -> None:
        # Ready only once the data path holds the peers; a failed sync is retried by the periodic resync.
        began = time.monotonic()
        ok = await self.call("syncing the data path", self.backend.sync, peers)
        problem = "" if ok or not isinstance(self._last_error, BackendNotReady) else str(self._last_error)
        if problem != self.problem:
            self.problem = problem
            if self.on_problem is not None:
                self.on_problem()
        if ok:
            took = time.monotonic() - began
            self.sync_seconds.observe(took)
            if not self.synced.is_set() or took > 1.0:
                logger.info("synced {} peer(s) into the data path in {:.2f} s", len(peers), took)
            self.synced.set()

    async def add_peer(self, lease: Lease) -> None:
        await self.call(f"adding peer {lease.subnet}", self.backend.add_peer, lease)

    async def remove_peer(self, lease: Lease) -> None:
        await self.call(f"removing peer {lease.subnet}", self.backend.remove_peer, lease)

    async def status(self) -> dict[str, Any]:
        """The backend's status, taken like any other backend call: never concurrently with one."""
        try:
            status: dict[str, Any] = await self._run_locked(self.backend.status)
            return status
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return {"error": f"status failed: {e}"}


class Network:
    """One flannel network on this host. `name` is "" for the classic single network (flanneld's files,
    systemd readiness); in multi-network mode its name, and `options` are its own (for_network)."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        name: str = "",
        registries: RegistryFactory | None = None,
        stopping: asyncio.Event | None = None,
        claims: HostClaims | None = None,
    ) -> None:
        self.options = options
        self.name = name
        self.registries: RegistryFactory = registries or options.registry
        self.claims = claims or HostClaims()
        self.state = state_file.AgentState(
            pid=os.getpid(),
            etcd_endpoints=options.etcd_endpoints,
            etcd_prefix=options.etcd_prefix,
            subnet_file=options.subnet_file,
            ip_masq=options.ip_masq,
            backend_options=asdict(options.backend),
            network_name=name,
            remote=options.remote,
        )
        self.backend: Backend | None = None
        self.manager: LeaseManager | None = None
        self.dataplane: DataPlane | None = None
        self.local: LocalNetwork | None = None
        self._stopping = stopping if stopping is not None else asyncio.Event()
        self.up = asyncio.Event()  # set once the network was ready (multi-network mode's READY=1 waits)
        self._state_write: asyncio.TimerHandle | None = None
        self._peers_written = -1  # the manager's peers_version that the state file shows
        self._peers_listed: list[dict[str, str]] = []  # its peer list (made by the writer thread)
        self._state_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")

    # --- state -----------------------------------------------------------------------------------

    def save_state(self, wait: bool = False) -> None:
        """Write the state file. The JSON (megabytes with 10,000 peers) is made and written by one writer
        thread, in order, so that the event loop never stalls on it; `wait`: until it is on disk (a phase
        change, which `health` must see at once)."""
        st = self.state
        peers: tuple[Lease, ...] | None = None  # the peers, when they changed since the last write
        if self.manager is not None:
            m = self.manager
            if m.lease is not None:
                st.lease = {
                    "subnet": str(m.lease.subnet),
                    "expiration": m.lease.expiration,
                    "lease_id": m.lease.lease_id,
                    "mod_revision": m.lease.mod_revision,
                }
            st.last_revision = m.last_revision
            st.relists = m.relists
            st.last_listing_seconds = round(m.listing_seconds, 3)
            st.peers_refused = m.peers_refused
            st.refused_peers = [
                {"subnet": str(lease.subnet), "public_ip": str(lease.public_ip), "reason": reason}
                for lease, reason in itertools.islice(m.refused.values(), state_file.REFUSED_SHOWN)
            ]
            if m.peers_version != self._peers_written:  # 10,000 peers: described anew only when they changed
                self._peers_written = m.peers_version
                peers = tuple(m.peers.values())
            backend_problem = self.dataplane.problem if self.dataplane is not None else ""
            if st.phase in ("ready", "conflict", "server-lost", "backend"):
                st.phase, st.reason = (
                    ("conflict", m.problem) if m.problem else ("backend", backend_problem) if backend_problem
                    else ("ready", "")
                )  # fmt: skip
                # --remote: a client that cannot reach its server keeps its data path but is not ready
                lost = m.watcher.lost_reason or m.leases.lost_reason
                if lost and st.phase == "ready":
                    st.phase, st.reason = "server-lost", lost
            elif st.phase == "acquiring":
                if backend_problem:  # e.g. a full cloud route table: not-ready, said as the backend says it
                    st.phase, st.reason = "backend", backend_problem
                else:
                    st.reason = m.problem or m.acquire_error or "acquiring a subnet lease"
        # In the caller's context (a copy): in multi-network mode it names the network on the writer's log
        # lines (logger.contextualize), which a pool's thread does not inherit as asyncio.to_thread's do.
        written = self._state_writer.submit(
            contextvars.copy_context().run, self._write_state, state_file.snapshot(st), peers
        )
        if wait:
            written.result()

    def _write_state(self, snap: dict[str, Any], peers: tuple[Lease, ...] | None) -> None:
        """In the writer thread: the peers as the state file lists them (sorted, as text) are made here
        too, off the event loop, and kept for the writes that follow until the peers change."""
        if peers is not None:
            self._peers_listed = [
                {"subnet": str(p.subnet), "public_ip": str(p.public_ip), "backend_type": p.attrs.backend_type}
                for p in sorted(peers, key=lambda p: p.subnet)
            ]
        snap["peers"] = self._peers_listed
        try:
            state_file.write_snapshot(self.options.state_dir, snap)
        except OSError as e:
            logger.warning("cannot write state file in {}: {}", self.options.state_dir, e)

    def _state_changed(self) -> None:
        """The lease manager changed something: write the state file soon, once for a whole burst."""
        if self._state_write is None:
            self._state_write = asyncio.get_running_loop().call_later(STATE_WRITE_INTERVAL, self._write_pending)

    def _write_pending(self) -> None:
        self._state_write = None
        self.save_state()

    def set_phase(self, phase: str, reason: str = "") -> None:
        self.state.phase, self.state.reason = phase, reason
        self.save_state(wait=True)

    # --- start-up ------------------------------------------------------------------------------------

    async def wait_for_config(self, registry: LeaseSource) -> NetworkConfig:
        """Read and parse the network config, waiting for etcd and for the key (or, with
        --net-config-path, read it from that file once: a missing or invalid file is fatal).

        Every etcd error is one line (logged once while it lasts, and the not-ready reason) and retried
        with back-off: an outage ends, a missing permission can be granted. Only a refused password is
        fatal: retrying the same credentials cannot succeed. So is a TLS setup that fails on every endpoint
        (an untrusted server certificate, a refused or missing client certificate, an https endpoint that
        does not speak TLS): one line naming the cause, never a fall-back to plaintext. While the key is
        missing, etcd's v2 store is asked now and then whether the config was written there (the old
        tutorials' `etcdctl set`): if so, that is said, with the command that copies it to v3."""
        if self.options.net_config_path:
            return self._config_from_file(self.options.net_config_path)
        backoff = Backoff("reading the network config", self.options.lease.retry_interval, self.options.lease.retry_max)
        said_waiting = False
        tls_failures: dict[str, str] = {}  # endpoint -> what its TLS setup got wrong
        next_v2_probe, v2_hint = 0.0, ""
        while True:
            try:
                raw = await registry.get_config()
                backoff.succeeded()
            except (*ETCD_UNAVAILABLE, aetcd.exceptions.ClientError) as e:
                reason = describe_etcd_error(e)
                if grpc_code(e) == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in str(e).lower():
                    raise FatalError(f"reading {registry.config_key} from {registry.endpoint}: {reason}") from None
                kind = tls_error_kind(e) if registry.tls_for(registry.endpoint) is not None else ""
                if kind:
                    tls_failures[registry.endpoint] = describe_tls_error(
                        kind, registry.endpoint, registry.tls_for(registry.endpoint)
                    )
                    if set(tls_failures) >= set(registry.endpoints):
                        raise FatalError("; ".join(dict.fromkeys(tls_failures.values()))) from None
                else:
                    tls_failures.pop(registry.endpoint, None)
                self.set_phase("waiting-config", f"{reason} at {registry.endpoint}")
                await registry.reconnect()
                await backoff.failed(e)
                continue
            if raw is not None:
                try:
                    return parse_config(raw, self.options.effective_subnet_len_rule)
                except ConfigError as e:
                    raise FatalError(f"invalid network config at {registry.config_key}: {e}") from None
            if not said_waiting:
                how = "ETCDCTL_API=2 etcdctl set" if self.options.etcd_api == "v2" else "etcdctl put"
                logger.info("waiting for the network config at {} (write it with {})", registry.config_key, how)
                said_waiting = True
            if time.monotonic() >= next_v2_probe:
                next_v2_probe = time.monotonic() + V2_PROBE_SECONDS
                v2_hint = await self._v2_config_hint(registry, v2_hint)
            reason = v2_hint or f"no network config at {registry.config_key}"
            if (self.state.phase, self.state.reason) != ("waiting-config", reason):  # e.g. after an etcd error
                self.set_phase("waiting-config", reason)
            await asyncio.sleep(CONFIG_POLL_SECONDS)

    def _config_from_file(self, path: str) -> NetworkConfig:
        """--net-config-path: the config from a file (flanneld reads it so with its Kubernetes subnet
        manager); one line for a file that cannot be read or is not a valid config."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)  # parse_config refuses more than that
        except OSError as e:
            raise FatalError(f"cannot read the network config file {path}: {e.strerror or e}") from None
        try:
            config = parse_config(raw, self.options.effective_subnet_len_rule)
        except ConfigError as e:
            raise FatalError(f"invalid network config in {path}: {e}") from None
        logger.info("network config from {} (--net-config-path); leases in etcd", path)
        return config

    async def _v2_config_hint(self, registry: LeaseSource, said: str) -> str:
        """Ask the lease source whether the config was written where flannel-ebpf does not read it (etcd's
        v2 store); log the hint when it is new. Returns the hint in force ("" for none), which the caller
        makes the not-ready reason."""
        try:
            text = await registry.v2_config_hint()
        except Exception as e:  # a hint only: never a reason to stop waiting
            logger.debug("probing etcd's v2 store failed: {}", e)
            return said
        if text and text != said:
            logger.warning("{}", text)
        return text

    async def run(self) -> int:
        """Run this network until stopped (0) or until it fails (1: the reason is logged and in its state,
        as `failed`). In multi-network mode one network failing leaves the others running."""
        try:
            return await self._run()
        except FatalError as e:
            logger.error("{}", e)  # multi-network mode: the log line names the network (agent's patcher)
            self.set_phase("failed", str(e))
            return 1
        finally:
            if self._state_write is not None:
                self._state_write.cancel()
            self._state_writer.shutdown(wait=True)  # the last state (stopped, failed) is on disk

    async def _run(self) -> int:
        opts = self.options
        config_registry = self.registries()
        try:
            config = await self._until_stopped(self.wait_for_config(config_registry))
        finally:
            await config_registry.close()
        if config is None:
            return 0
        logger.info(
            "network {} subnets /{}{} from {} to {}, backend {}",
            config.network, config.subnet_len,
            "" if config.subnet_len_given else f" (flanneld {config.subnet_len_rule}'s default SubnetLen)",
            config.subnet_min, config.subnet_max, config.backend_type,
        )  # fmt: skip
        for warning in config.warnings:
            logger.warning("network config: {}", warning)
        overlapped = self.claims.add_network(self.name, config.network) if self.name else None
        if overlapped is not None:
            raise FatalError(
                f"Network {config.network} overlaps network {overlapped}'s "
                f"{self.claims.networks[overlapped]}: the networks of one host must not overlap"
            )
        if config.backend_type == "udp" and self.name:
            holder = self.claims.claim("udp", self.name)
            if holder is not None:
                raise FatalError(
                    f"backend udp: network {holder} already runs the udp backend on this host, and a host "
                    "runs one udp network (it owns the device flannel0 and the underlay's decap hook); "
                    "use vxlan or host-gw for this network"
                )
        try:
            # In a thread: pyroute2's synchronous IPRoute refuses to run inside a running event loop (0.8+).
            ext = await asyncio.to_thread(
                choose_interface, opts.ifaces, opts.iface_regexes, opts.public_ip, opts.iface_can_reach
            )
            why = unusable_address_reason(ext.public_ip)
            if why:
                # Every other host would refuse a lease with this PublicIP as garbage.
                raise FatalError(f"the public IP cannot be used to reach this host: {why} (set --public-ip)")
            self.backend = make_backend(config.backend_type, config.backend, opts.backend)
            attrs = await asyncio.to_thread(self.backend.prepare, ext)
        except (InterfaceError, BackendError) as e:
            raise FatalError(str(e)) from None
        except Exception as e:  # netlink or OS errors: one clear line, not a traceback
            raise FatalError(f"backend {config.backend_type}: preparing failed: {e}") from None
        logger.info("using interface {} ({}), public IP {}", ext.name, ext.address, ext.public_ip)
        self.state.iface = state_file.ext_to_dict(ext)
        self.state.backend_type = config.backend_type
        self.state.backend_config = config.backend
        self.set_phase("acquiring", "acquiring a subnet lease")

        lease_options = dataclasses.replace(opts.lease, identity=agent_identity(opts.state_dir))
        if not getattr(config_registry, "periodic_relists", True):
            # a flanneld v0.5 lease server: no listing beyond what its own client asks (see remote/client.py)
            lease_options = dataclasses.replace(lease_options, relist_interval=0.0)
        self.manager = LeaseManager(
            config, attrs, self.registries(), self.registries(), lease_options, on_change=self._state_changed
        )
        try:
            previous = subnet_file.previous_subnet(opts.subnet_file)
            try:
                lease = await self._until_stopped(self.manager.acquire(previous))
            except OutOfSubnets as e:
                raise FatalError(str(e)) from None
            if lease is None:
                return 0
            return await self._serve(config, ext, lease)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.manager.release_presence(), 3)
            await self.manager.leases.close()
            await self.manager.watcher.close()

    async def _serve(self, config: NetworkConfig, ext: Any, lease: Lease) -> int:
        assert self.backend is not None and self.manager is not None
        opts = self.options
        await asyncio.to_thread(warn_route_overlaps, config.network, lease.subnet)  # netlink: off the loop
        mtu = ext.mtu - self.backend.overhead()
        self.local = LocalNetwork(config.network, lease.subnet, ext, mtu)
        self.state.network, self.state.subnet, self.state.mtu = str(config.network), str(lease.subnet), mtu
        try:
            await asyncio.to_thread(self.backend.start, self.local)
        except Exception as e:  # BackendError, or netlink/OS errors: one clear line, not a traceback
            raise FatalError(f"backend {config.backend_type}: {e}") from None
        masq = None
        if opts.ip_masq or opts.iptables_forward_rules:
            from flannel_ebpf import ipmasq

            if ipmasq.iptables_available():
                masq = ipmasq.make_manager(
                    config.network,
                    lease.subnet,
                    ip_masq=opts.ip_masq,
                    forward_rules=opts.iptables_forward_rules,
                    network_name=self.name,
                )
                try:
                    await asyncio.to_thread(masq.setup)
                except Exception as e:
                    raise FatalError(f"setting up iptables rules failed: {e}") from None
            elif opts.ip_masq:
                raise FatalError("--ip-masq needs iptables, which is not installed")
            else:
                logger.warning("iptables is not installed: no FLANNEL-FWD forward rules")
        subnet_file.write(opts.subnet_file, config.network, lease.subnet, mtu, opts.ip_masq)
        logger.info("wrote {}: subnet {} mtu {}", opts.subnet_file, lease.subnet, mtu)

        self.dataplane = DataPlane(self.backend)
        self.dataplane.on_problem = lambda: self.save_state(wait=True)
        tasks = [
            asyncio.ensure_future(self.manager.run_watch(self.dataplane)),
            asyncio.ensure_future(self.manager.run_maintenance()),
            asyncio.ensure_future(self._resync_loop()),
            asyncio.ensure_future(self._heartbeat()),
        ]
        if masq is not None:
            tasks.append(asyncio.ensure_future(self._every(opts.iptables_resync, masq.ensure)))
        try:
            await self._until_stopped(self.dataplane.synced.wait())
            if not self._stopping.is_set():
                self.state.phase = "ready"
                self.save_state(wait=True)
                logger.info("ready: subnet {} on {}, {} peer(s)", lease.subnet, ext.name, len(self.manager.peers))
                self.up.set()
                if not self.name:
                    # systemd (Type=notify): the data path holds every peer now; units ordered After= us
                    # start. Multi-network mode: the agent says it once every network is up (agent.py).
                    sd_notify.ready(f"ready: subnet {lease.subnet} on {ext.name}, {len(self.manager.peers)} peer(s)")
            await self._until_stopped(asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # Leave the data path (and the lease) in place: traffic keeps flowing until `down`.
            await self.dataplane.call("stopping the backend", self.backend.stop)  # waits for a call in flight
            self.set_phase("stopped", "agent stopped")
            logger.info("stopped; the data path stays up (flannel-ebpf down removes it)")
        return 0

    async def _until_stopped(self, awaitable: Any) -> Any:
        """Await something unless SIGTERM/SIGINT arrives first (then None)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None

    async def _resync_loop(self) -> None:
        assert self.manager is not None and self.dataplane is not None
        while True:
            await asyncio.sleep(self.options.resync_interval)
            if self.manager.relists:  # peers are known (the first listing is done)
                await self.dataplane.sync_peers(list(self.manager.peers.values()))

    async def _every(self, seconds: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.to_thread(fn)
            except Exception as e:
                logger.error("periodic {} failed: {}", getattr(fn, "__qualname__", fn), e)

    async def _heartbeat(self) -> None:
        assert self.dataplane is not None
        while True:
            self.state.backend_status = await self.dataplane.status()
            self.save_state()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def readiness(self) -> tuple[bool, str]:
        """Ready (and the line saying so) as `flannel-ebpf health` judges it from inside the agent."""
        st = self.state
        if st.phase != "ready":
            return False, f"not-ready {st.phase}: {st.reason}"
        age, limit = time.time() - st.updated, state_file.heartbeat_limit(self.options.resync_interval)
        if age > limit:
            return False, f"not-ready no heartbeat for {age:.0f}s (limit {limit:.0f}s): stuck?"
        return True, f"ready {st.iface.get('name', '?')} subnet:{st.subnet} mtu:{st.mtu}"


def warn_route_overlaps(network: Any, own_subnet: Any) -> list[str]:
    """Warn (once, at start) about routes of this host that the overlay Network overlaps: its addresses
    would be routed into the overlay, or the overlay's into them. Returns the warnings."""
    from flannel_ebpf.netlink.routes import overlapping_routes  # netlink: only where needed

    try:
        found = overlapping_routes(network, exclude=own_subnet)
    except Exception as e:  # a check only: never a reason not to start
        logger.debug("cannot read the routing table: {}", e)
        return []
    warnings = [
        f"the overlay Network {network} overlaps the host's route {route}: traffic for the overlapping "
        "addresses goes to whichever route is more specific; pick a Network that overlaps no route of the hosts"
        for route in found
    ]
    for warning in warnings:
        logger.warning("{}", warning)
    return warnings


def agent_identity(state_dir: str) -> str:
    """Who this agent is, kept across restarts in the state dir: `<hostname>:<random>`."""
    path = os.path.join(state_dir, "agent-id")
    try:
        with open(path) as f:
            identity = f.read().strip()
        if identity:
            return identity
    except FileNotFoundError:
        pass
    identity = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
    atomic_write(path, identity + "\n")
    return identity
