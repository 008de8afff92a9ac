"""The agent: supervises the networks of this host in one asyncio loop.

Classic mode (flanneld v0.20.2) runs one Network with flanneld's files. Multi-network mode
(`--networks=blue,green`, flanneld v0.5's) runs one Network per name, each with its own config, leases,
backend, env file and state; a network whose config is missing or invalid does not hold up the others.
The agent owns what is one per process: signals, the event-loop stall probe and the /healthz endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from flannel_ebpf import metrics, sd_notify
from flannel_ebpf.http_limits import PLAIN_TEXT, Answer, ConnectionLimits, Route, ThreadedHttpServer
from flannel_ebpf.network import HostClaims, Network
from flannel_ebpf.options import AgentOptions, RegistryFactory
from flannel_ebpf.subnet.store import LeaseSource

__all__ = ["Agent", "NamedRegistryFactory", "run_agent"]

#: the event loop's health: how late a timer of this period fires is how long the loop was blocked
LOOP_PROBE_SECONDS = 0.05
LOOP_STALL_SECONDS = 0.1  # a lateness above this counts as a stall
GIL_SWITCH_SECONDS = 0.001
#: probes (kubelet, a load balancer, `curl`) need a few connections; 256 leave most of the 1024 descriptors of
#: systemd's default soft limit to the agent. Short keep-alive: probes poll
HEALTHZ_LIMITS = ConnectionLimits(max_connections=256, request_seconds=5.0, keepalive_seconds=5.0)

#: makes a network's lease source from its name ("" in classic mode): SubnetRegistry, or client/server
#: mode's RemoteRegistry
NamedRegistryFactory = Callable[[str], LeaseSource]


class Agent:
    """Runs the networks of `options` (one in classic mode). `registry_factory(name)` makes a network's
    lease source (None: etcd, from the options); client/server mode plugs a remote one in here."""

    def __init__(self, options: AgentOptions, registry_factory: NamedRegistryFactory | None = None) -> None:
        self.options = options
        self._stopping = asyncio.Event()
        #: /metrics: flannel_ebpf_event_loop_lateness_seconds (the probe's every reading)
        self.loop_lateness = metrics.DurationHistogram(buckets=metrics.LATENESS_BUCKETS)
        claims = HostClaims()
        if options.networks:
            claims.seed_from_state([(name, options.for_network(name).state_dir) for name in options.networks])
            self.networks = [
                Network(
                    net_options,
                    name=name,
                    registries=self._registries(registry_factory, name, net_options),
                    stopping=self._stopping,
                    claims=claims,
                )
                for name in options.networks
                for net_options in [options.for_network(name)]
            ]
        else:
            registries = self._registries(registry_factory, "", options)
            self.networks = [Network(options, registries=registries, stopping=self._stopping, claims=claims)]

    @staticmethod
    def _registries(factory: NamedRegistryFactory | None, name: str, options: AgentOptions) -> RegistryFactory:
        if factory is None:
            return options.registry
        return lambda: factory(name)

    @property
    def multi(self) -> bool:
        return bool(self.options.networks)

    # Classic mode's one network, reached through the agent (tests use these).
    @property
    def state(self) -> Any:
        return self.networks[0].state

    async def wait_for_config(self, registry: LeaseSource) -> Any:
        return await self.networks[0].wait_for_config(registry)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested)
        monitor = asyncio.ensure_future(self._watch_loop())
        # As flanneld: /healthz answers from the start (while waiting for etcd and the config too)
        healthz = asyncio.ensure_future(self._healthz()) if self.options.healthz_port else None
        try:
            if not self.multi:
                return await self.networks[0].run()
            logger.info("multi-network mode: networks {}", ", ".join(self.options.networks))
            runs: list[asyncio.Future[int]] = [asyncio.ensure_future(self._run_network(net)) for net in self.networks]
            notifier = asyncio.ensure_future(self._ready_once_every_network_is_up(runs))
            try:
                codes = await asyncio.gather(*runs)
            finally:
                notifier.cancel()
            # Failed networks were said one by one; the agent fails only if it served none at all.
            return 1 if all(codes) else 0
        finally:
            monitor.cancel()
            if healthz is not None:
                healthz.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await healthz

    async def _run_network(self, network: Network) -> int:
        # Every log line of this network (its tasks and worker threads inherit the context) names it.
        with logger.contextualize(network=network.name):
            return await network.run()

    async def _ready_once_every_network_is_up(self, runs: list[asyncio.Future[int]]) -> None:
        """systemd (Type=notify): READY=1 once every network is ready or has ended (failed: said in the
        log; the others serve), if at least one serves. flanneld v0.5 sent nothing in multi-network mode,
        which under a Type=notify unit ends in the start timeout: a deliberate difference."""

        async def up_or_ended(network: Network, run: asyncio.Future[int]) -> None:
            up: asyncio.Future[Any] = asyncio.ensure_future(network.up.wait())
            try:
                await asyncio.wait({up, run}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()

        await asyncio.gather(*(up_or_ended(net, run) for net, run in zip(self.networks, runs, strict=True)))
        serving = [net.name for net in self.networks if net.up.is_set()]
        if serving and not self._stopping.is_set():
            sd_notify.ready(f"ready: networks {', '.join(serving)}")

    def _stop_requested(self) -> None:
        if not self._stopping.is_set():  # systemd: this stop is ordered, not a crash
            sd_notify.stopping("stopping; the data path stays up")
        self._stopping.set()

    async def _watch_loop(self) -> None:
        """Measure how long the event loop is ever blocked (status: loop_stall_max_ms, loop_stalls): a
        timer that should fire every LOOP_PROBE_SECONDS fires late by exactly the time the loop was busy.
        The loop is shared, so every network's state shows the same figures."""
        stall_max_ms, stalls = 0.0, 0
        while True:
            began = time.monotonic()
            await asyncio.sleep(LOOP_PROBE_SECONDS)
            late = max(0.0, time.monotonic() - began - LOOP_PROBE_SECONDS)
            self.loop_lateness.observe(late)
            if late * 1000 > stall_max_ms:
                stall_max_ms = round(late * 1000, 1)
            if late > LOOP_STALL_SECONDS:
                stalls += 1
                logger.debug("event loop blocked for {:.0f} ms", late * 1000)
            for network in self.networks:
                network.state.loop_stall_max_ms, network.state.loop_stalls = stall_max_ms, stalls

    def readiness(self) -> tuple[bool, str]:
        """Ready (and the line saying so) as `flannel-ebpf health` judges it from inside the agent; in
        multi-network mode ready when every network is, one `<name>: <line>` part per network."""
        if not self.multi:
            return self.networks[0].readiness()
        answers = [(net.name, *net.readiness()) for net in self.networks]
        ready = all(ok for _, ok, _ in answers)
        return ready, "; ".join(f"{name}: {line}" for name, _, line in answers)

    async def _healthz(self) -> None:
        """The HTTP health endpoint on --healthz-ip:--healthz-port, in a thread with an event loop of its
        own: it answers even while the agent's loop is busy (it only reads the agent's state), and its
        connection limits (HEALTHZ_LIMITS) keep a flood of slow connections from taking the descriptors
        and threads the agent needs for etcd, its state file and netlink.

        `/healthz` is flanneld v0.20.2's: liveness, 200 "flanneld is running" whenever the process runs
        (probes written for flanneld keep working). `/readyz` is readiness: 200 `ready <iface>
        subnet:<subnet> mtu:<mtu>` once the data path holds every peer and the agent keeps its heartbeat,
        else 503 `not-ready <phase>: <reason>` (the same words as `flannel-ebpf health`). Anything else:
        404, as flanneld's mux answers."""

        def readyz(_accept: str | None) -> Answer:
            ready, line = self.readiness()
            return (200 if ready else 503), line + "\n", PLAIN_TEXT

        def metrics_page(accept: str | None) -> Answer:  # Prometheus, read at scrape time
            return 200, *metrics.render(accept, self)

        routes: dict[str, Route] = {
            "/healthz": lambda _accept: (200, "flanneld is running", PLAIN_TEXT),
            "/readyz": readyz,
            "/metrics": metrics_page,
        }
        host, port = self.options.healthz_ip, self.options.healthz_port
        try:
            server = ThreadedHttpServer(host, port, routes, HEALTHZ_LIMITS, "healthz")
        except OSError as e:
            logger.error("cannot serve /healthz on {}:{}: {}", host, port, e)
            return
        server.start()
        logger.info("serving /healthz and /readyz on {}:{}", host, port)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await asyncio.to_thread(server.stop)


def _name_the_network(record: Any) -> None:
    """loguru patcher: in multi-network mode each line says which network it is about."""
    name = record["extra"].get("network")
    if name:
        record["message"] = f"[{name}] {record['message']}"


def run_agent(options: AgentOptions, registry_factory: NamedRegistryFactory | None = None) -> int:
    os.makedirs(options.state_dir, mode=0o755, exist_ok=True)  # readable: status/health run as any user
    for name in options.networks:
        os.makedirs(options.for_network(name).state_dir, mode=0o755, exist_ok=True)
    if options.networks:
        logger.configure(patcher=_name_the_network)
    started = time.monotonic()
    # Worker threads (full syncs of thousands of peers, the state writer) run Python too: hand the GIL
    # back to the event loop after 1 ms instead of CPython's 5 ms, so that they never stall it for long.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    code = asyncio.run(Agent(options, registry_factory).run())
    logger.debug("agent ran {:.1f}s", time.monotonic() - started)
    return code
