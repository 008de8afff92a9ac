"""The Lab: hosts on an underlay, etcd, agents, containers and traffic helpers, all in namespaces.

    with Lab(hosts=3, topology="flat") as lab:
        lab.set_network_config({"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}})
        for h in lab.hosts.values():
            lab.start_agent(h)
        for h in lab.hosts.values():
            lab.wait_ready(h)
            lab.add_container(h)
        assert lab.ping_matrix().all_ok

`close()` always runs (context manager, pytest finalizer, atexit) and removes everything the lab made:
processes, namespaces, bpffs pins, etcd data, and (unless asked to keep it) the lab directory.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger

from .agent import Agent
from .containers import BRIDGE, Container, SubnetEnv, make_container
from .etcd import EtcdCluster, EtcdServer
from .flanneld import DEFAULT_VERSION, Flanneld, unpack_flanneld
from .netns import BPFFS, ExecResult, Netns, check_prefix, create_netns, delete_netns, list_netns, new_prefix, run
from .topology import ETCD_INDEX, HOST_INDEX_BASE, Host, Topology, Underlay, split_segments
from .traffic import (
    Endpoint,
    IperfServer,
    PingMatrix,
    PingResult,
    flood_ping,
    iperf3_client,
    ping,
    ping_matrix,
)

DEFAULT_ETCD_PREFIX = "/coreos.com/network"
LAB_DIR_PREFIX = "flannel-ebpf-lab-"  # + <prefix>-<random>, under the temp dir
PIN_DIR_PREFIX = "flannel-ebpf-"  # + <prefix>-<host>, under /sys/fs/bpf
OWNER_FILE = "owner.pid"  # the PID of the process that owns a lab: `cleanup` spares live labs
_HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_RESERVED = {"sw", "rt", "etcd"}

Target = Host | Container | Netns | str


@dataclass(frozen=True)
class Takeover:
    """What `Lab.takeover` did: flanneld's exit code on SIGTERM and when it had exited (time.time())."""

    host: str
    flanneld_exit: int | None
    flanneld_stopped_at: float


class Lab:
    """A lab of network namespaces. Build with `up()` (or `with Lab(...) as lab`), end with `close()`."""

    def __init__(
        self,
        hosts: int | Sequence[str] = 3,
        *,
        topology: Topology = "flat",
        segments: Sequence[str] | None = None,
        prefix: str | None = None,
        base_dir: str | Path | None = None,
        with_etcd: bool = True,
        network_config: Mapping[str, Any] | str | None = None,
        etcd_prefix: str = DEFAULT_ETCD_PREFIX,
        etcd_members: int = 1,
        agent_command: Sequence[str] | None = None,
        etcd_api: str = "v3",
    ) -> None:
        names = [f"h{i + 1}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        for n in names:
            if not _HOST_NAME_RE.match(n) or n in _RESERVED:
                raise ValueError(f"host name {n!r}: 1-8 of [a-z0-9], starting with a letter, not {_RESERVED}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names: {names}")
        self.topology: Topology = topology
        self.segment_of = list(segments) if segments is not None else split_segments(len(names), topology)
        if len(self.segment_of) != len(names):
            raise ValueError("segments must name one segment per host")
        allowed = {"a"} if topology == "flat" else {"a", "b"}
        if not set(self.segment_of) <= allowed:
            raise ValueError(f"segments for a {topology} lab must be among {sorted(allowed)}")
        self.host_names = names
        self.prefix = check_prefix(prefix) if prefix else new_prefix()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{LAB_DIR_PREFIX}{self.prefix}-", dir=base_dir))
        self.with_etcd = with_etcd
        self.etcd_members = etcd_members  # > 1: a cluster, each member in a namespace of its own
        self.network_config = network_config
        self.etcd_prefix = etcd_prefix.rstrip("/")
        #: "v2": etcd serves its v2 API (--enable-v2), the config and leases live there (flanneld v0.5's
        #: store), agents run with --etcd-api v2, and etcd_put/get/delete/leases use the v2 API
        if etcd_api not in ("v3", "v2") or (etcd_api == "v2" and etcd_members > 1):
            raise ValueError(f"etcd_api {etcd_api!r}: v3, or v2 with one etcd member")
        self.etcd_api = etcd_api
        #: the `flannel-ebpf` command the agents run (None: this checkout's; e.g. a wheel installed in a venv)
        self.agent_command = list(agent_command) if agent_command is not None else None
        self.underlay = Underlay(self.prefix, self.dir, topology)
        self.hosts: dict[str, Host] = {}
        self.agents: dict[str, Agent] = {}
        #: flannel's own flanneld, on the hosts that run it instead of an agent (`start_flanneld`)
        self.flanneld: dict[str, Flanneld] = {}
        self.containers: list[Container] = []
        self.etcd: EtcdServer | EtcdCluster | None = None
        self.etcd_ns: Netns | None = None  # the (first) etcd member's namespace
        self._iperf: list[IperfServer] = []
        self._closed = False
        self._atexit_registered = False

    # ---------------------------------------------------------------- life cycle

    def up(self) -> Lab:
        if os.geteuid() != 0:
            raise PermissionError("the lab needs root (network namespaces)")
        (self.dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        atexit.register(self._atexit)
        self._atexit_registered = True
        logger.info("lab {} ({}, {} hosts) in {}", self.prefix, self.topology, len(self.host_names), self.dir)
        try:
            _ensure_bpffs()
            self.underlay.build()
            for i, (name, seg) in enumerate(zip(self.host_names, self.segment_of, strict=True), start=1):
                self._add_host(name, seg, HOST_INDEX_BASE + i)
            if self.with_etcd:
                self._start_etcd()
                if self.network_config is not None:
                    self.set_network_config(self.network_config)
        except BaseException:
            self.close(remove_dir=False)
            raise
        return self

    def _add_host(self, name: str, segment: str, index: int) -> Host:
        ns = create_netns(f"{self.prefix}-{name}", self.dir)
        addr = self.underlay.attach(ns, name, segment, index)
        # A flannel host routes between its containers and the overlay.
        ns.sysctl("net.ipv4.ip_forward", "1")
        host_dir = self.dir / name
        host_dir.mkdir(parents=True, exist_ok=True)
        host = Host(name, ns, self.underlay.segments[segment], addr, host_dir)
        self.hosts[name] = host
        self.agents[name] = Agent(
            host, self.etcd_endpoint, self.pin_dir(name), command=self.agent_command, etcd_api=self.etcd_api
        )
        return host

    def add_host(self, name: str, segment: str = "a") -> Host:
        """A host joining the running lab (no agent yet: `start_agent` it)."""
        if not _HOST_NAME_RE.match(name) or name in _RESERVED or name in self.hosts:
            raise ValueError(f"host name {name!r}: 1-8 of [a-z0-9], starting with a letter, new, not {_RESERVED}")
        host = self._add_host(name, segment, HOST_INDEX_BASE + len(self.host_names) + 1)
        self.host_names.append(name)
        self.segment_of.append(segment)
        return host

    def _start_etcd(self) -> None:
        if self.etcd_members > 1:
            # Members at .2, .3, ... of segment a (hosts start at .11), each in a namespace of its own.
            members = []
            for i in range(1, self.etcd_members + 1):
                ns = create_netns(f"{self.prefix}-etcd{i}", self.dir)
                addr = self.underlay.attach(ns, f"etcd{i}", "a", ETCD_INDEX + i - 1)
                members.append((f"{self.prefix}-etcd{i}", str(addr.ip), ns.name))
                self.etcd_ns = self.etcd_ns or ns
            self.etcd = EtcdCluster.create(members, str(self.dir / "etcd"), token=f"{self.prefix}-etcd")
            self.etcd.start()
            for agent in self.agents.values():  # made before etcd: they named the single etcd's address
                agent.etcd_endpoint = self.etcd.endpoint
            return
        self.etcd_ns = create_netns(f"{self.prefix}-etcd", self.dir)
        addr = self.underlay.attach(self.etcd_ns, "etcd", "a", ETCD_INDEX)
        self.etcd = EtcdServer(
            host=str(addr.ip), netns=self.etcd_ns.name, data_dir=str(self.dir / "etcd"), name=f"{self.prefix}-etcd",
            extra_args=["--enable-v2"] if self.etcd_api == "v2" else [],
        )  # fmt: skip
        self.etcd.start()

    def close(self, remove_dir: bool = True) -> None:
        """Tear everything down; never raises (each step is attempted, failures are logged)."""
        if self._closed:
            return
        self._closed = True
        if self._atexit_registered:
            atexit.unregister(self._atexit)
        logger.info("closing lab {}", self.prefix)

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                logger.warning("lab {}: {} failed: {}", self.prefix, what, e)

        for agent in self.agents.values():
            attempt(f"stopping agent on {agent.host.name}", agent.stop)
        for fd in self.flanneld.values():
            attempt(f"stopping flanneld on {fd.host.name}", fd.stop)
        for agent in self.agents.values():
            if agent.ever_started:
                attempt(f"`down` on {agent.host.name}", self._down_quietly, agent)
        for srv in self._iperf:
            attempt("stopping iperf3", srv.stop)
        if self.etcd is not None:
            attempt("stopping etcd", self.etcd.stop)
            attempt("removing etcd's data", self.etcd.remove_data)
        attempt("deleting namespaces", delete_lab_namespaces, self.prefix)
        attempt("removing bpffs pins", remove_lab_pins, self.prefix)
        if remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.dir / OWNER_FILE).unlink(missing_ok=True)
            logger.info("lab {}: logs kept in {}", self.prefix, self.dir)

    def detach(self) -> None:
        """Leave the lab up after this process exits (`demo --keep`): no close at exit, no owner, so
        `python -m flannel_ebpf.lab cleanup` removes it later. Agents and etcd run in sessions of their
        own and outlive us."""
        self._closed = True
        if self._atexit_registered:
            atexit.unregister(self._atexit)
        (self.dir / OWNER_FILE).unlink(missing_ok=True)

    def _down_quietly(self, agent: Agent) -> None:
        r = agent.down()
        if not r.ok:
            logger.warning("`flannel-ebpf down` on {} exited {}: {}", agent.host.name, r.returncode, r.stderr[-500:])

    def _atexit(self) -> None:
        self.close()

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- lookup

    def host(self, h: Host | str) -> Host:
        return h if isinstance(h, Host) else self.hosts[h]

    def node(self, target: Target) -> Netns:
        """The namespace of a host, a container, a namespace, or any of them by name."""
        if isinstance(target, Netns):
            return target
        if isinstance(target, Host):
            assert isinstance(target.node, Netns)
            return target.node
        if isinstance(target, Container):
            return target.ns
        if target in self.hosts:
            return self.node(self.hosts[target])
        for c in self.containers:
            if target == c.name:
                return c.ns
        if target == "etcd" and self.etcd_ns is not None:
            return self.etcd_ns
        if target.startswith(f"{self.prefix}-") and target in list_netns():
            return Netns(target, self.dir)
        raise KeyError(f"no host, container or namespace {target!r} in lab {self.prefix}")

    def pin_dir(self, host: Host | str) -> Path:
        name = host.name if isinstance(host, Host) else host
        return BPFFS / f"{PIN_DIR_PREFIX}{self.prefix}-{name}"

    def namespaces(self) -> list[str]:
        return [n for n in list_netns() if n.startswith(f"{self.prefix}-")]

    # ---------------------------------------------------------------- etcd

    @property
    def etcd_endpoint(self) -> str:
        seg_a = self.underlay.segments.get("a")
        if self.etcd is not None:
            return self.etcd.endpoint
        if seg_a is not None:
            return f"http://{seg_a.address(ETCD_INDEX).ip}:2379"
        return ""

    def _etcd(self) -> EtcdServer | EtcdCluster:
        if self.etcd is None:
            raise RuntimeError("this lab has no etcd")
        return self.etcd

    def set_network_config(self, config: Mapping[str, Any] | str) -> None:
        """Write `<prefix>/config` (a dict is dumped as JSON; a string is written as it is)."""
        value = config if isinstance(config, str) else json.dumps(config)
        self.etcd_put(f"{self.etcd_prefix}/config", value)

    def _v2(self, method: str, key: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        etcd = self._etcd()
        assert isinstance(etcd, EtcdServer)
        return etcd.v2(method, key, params)

    def etcd_put(self, key: str, value: str, ttl: int = 0) -> None:
        """Write `key` (in a v2 lab: in the v2 store, with `ttl` seconds when given)."""
        if self.etcd_api == "v2":
            answer = self._v2("PUT", key, {"value": value, **({"ttl": str(ttl)} if ttl else {})})
            if "errorCode" in answer:
                raise RuntimeError(f"etcd v2 PUT {key}: {answer}")
            return
        assert not ttl, "a TTL only in a v2 lab"
        self._etcd().ctl("put", key, input=value)  # via stdin: any value, even `-garbage`

    def etcd_get(self, key: str) -> str | None:
        kv = self.etcd_get_prefix(key, prefix=False)
        return kv.get(key)

    def etcd_get_prefix(self, key: str, prefix: bool = True) -> dict[str, str]:
        if self.etcd_api == "v2":
            answer = self._v2("GET", key.rstrip("/") if prefix else key, {"recursive": "true"} if prefix else None)
            found: dict[str, str] = {}
            stack = [answer.get("node") or {}]
            while stack:
                node = stack.pop()
                if node.get("dir"):
                    stack.extend(node.get("nodes") or [])
                elif isinstance(node.get("value"), str) and node.get("key", "").startswith(key):
                    found[node["key"]] = node["value"]
            return found
        args = ["get", key, "-w", "json"] + (["--prefix"] if prefix else [])
        out = json.loads(self._etcd().ctl(*args))
        return {
            base64.b64decode(kv["key"]).decode(errors="replace"): base64.b64decode(kv.get("value", "")).decode(
                errors="replace"
            )
            for kv in out.get("kvs", [])
        }

    def etcd_delete(self, key: str, prefix: bool = False) -> int:
        if self.etcd_api == "v2":
            answer = self._v2("DELETE", key.rstrip("/") if prefix else key, {"recursive": "true"} if prefix else None)
            return 0 if "errorCode" in answer else 1
        out = self._etcd().ctl("del", key, *(["--prefix"] if prefix else []))
        return int(out.strip() or 0)

    def leases(self) -> dict[str, Any]:
        """`<prefix>/subnets/*` as {"10.5.34.0-24": parsed JSON value (or the raw text if not JSON)}."""
        base = f"{self.etcd_prefix}/subnets/"
        result: dict[str, Any] = {}
        for k, v in self.etcd_get_prefix(base).items():
            try:
                result[k[len(base) :]] = json.loads(v)
            except json.JSONDecodeError:
                result[k[len(base) :]] = v
        return result

    def stop_etcd(self) -> None:
        self._etcd().stop()

    def start_etcd(self, timeout: float = 20.0) -> None:
        self._etcd().start(timeout)

    def restart_etcd(self) -> None:
        self.stop_etcd()
        self.start_etcd()

    def enable_etcd_v2(self) -> None:
        """Restart etcd serving its v2 API too (etcd 3.4/3.5 do only when asked; 3.6 has none), for the
        etcd-era tutorials' `etcdctl set`."""
        etcd = self._etcd()
        assert isinstance(etcd, EtcdServer), "one member only"
        if "--enable-v2" not in etcd.extra_args:
            etcd.extra_args.append("--enable-v2")
        self.restart_etcd()

    def wipe_etcd(self) -> None:
        """An empty etcd (stops, forgets all data, starts again); the network config is gone too."""
        self.stop_etcd()
        self._etcd().wipe()
        self.start_etcd()

    # ---------------------------------------------------------------- agents

    def agent(self, host: Host | str) -> Agent:
        return self.agents[self.host(host).name]

    def start_agent(
        self,
        host: Host | str,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        go_style: bool = False,
    ) -> Agent:
        a = self.agent(host)
        fd = self.flanneld.get(a.host.name)
        if fd is not None and fd.running:
            raise RuntimeError(f"{a.host.name} runs flanneld: stop it before starting an agent there")
        a.start(extra_args, env, go_style)
        return a

    def start_flanneld(
        self,
        host: Host | str,
        version: str = DEFAULT_VERSION,
        extra_args: Sequence[str] = (),
        public_ip: str | None = None,
        forward_rules: bool | None = None,
    ) -> Flanneld:
        """flannel's own flanneld `version` on `host` instead of an agent (unpacked from the shared
        binaries into the lab directory; a missing binary raises FlanneldMissing). It writes the host's
        subnet file, so `wait_ready` and `add_container` work as on an agent's host."""
        h = self.host(host)
        if self.agent(h).running:
            raise RuntimeError(f"{h.name} runs a flannel-ebpf agent: stop it before starting flanneld there")
        fd = self.flanneld.get(h.name)
        if fd is None or fd.version != version:
            binary = unpack_flanneld(version, self.dir / "bin")
            fd = Flanneld(h, binary, self.etcd_endpoint, version, self.etcd_prefix)
            self.flanneld[h.name] = fd
        fd.start(extra_args, public_ip, forward_rules)
        return fd

    def start_flanneld_server(
        self, host: Host | str, listen: str, version: str = DEFAULT_VERSION, extra_args: Sequence[str] = ()
    ) -> Flanneld:
        """flannel's own flanneld `version` as a lease server (`-listen=<listen>`) on `host`: the only one
        there that talks to etcd; it does no host networking, so an agent or a flanneld client may run
        beside it. Its log is `<host dir>/flanneld-server/flanneld.log`; it is stopped with the lab.
        Returns once it answers HTTP on `listen`."""
        h = self.host(host)
        key = f"{h.name}/server"
        fd = self.flanneld.get(key)
        if fd is None or fd.version != version:
            binary = unpack_flanneld(version, self.dir / "bin")
            server_host = dataclasses.replace(h, dir=h.dir / "flanneld-server")
            fd = Flanneld(server_host, binary, self.etcd_endpoint, version, self.etcd_prefix)
            self.flanneld[key] = fd
        fd.start([f"-listen={listen}", *extra_args])
        fd.wait_serving(listen)
        return fd

    def takeover(
        self, host: Host | str, extra_args: Sequence[str] = (), overlap: bool = False, timeout: float = 60.0
    ) -> Takeover:
        """flannel-ebpf takes a flanneld host over, as a systemd unit swap does: flanneld gets SIGTERM
        (and is waited for), then the agent starts with flanneld's very flags (plus `extra_args`). The
        subnet file, etcd prefix and --iface are flanneld's, so the agent finds its lease and subnet.
        `overlap` (the udp way, docs/MIGRATING.md): the agent starts first, beside flanneld, and once it
        is ready (its eBPF path attached to flanneld's flannel0) flanneld gets SIGTERM."""
        h = self.host(host)
        fd = self.flanneld_of(h)
        if fd is None or not fd.running:
            raise RuntimeError(f"{h.name} runs no flanneld to take over")
        flags = fd.argv[1:]
        agent = self.agent(h)
        if overlap:
            agent.start(extra_args, flanneld_flags=flags)
            agent.wait_ready(timeout)
        code = fd.stop()
        stopped_at = time.time()
        if not overlap:
            agent.start(extra_args, flanneld_flags=flags)
        return Takeover(h.name, code, stopped_at)

    def hand_back(
        self,
        host: Host | str,
        down_args: Sequence[str] = ("--keep-datapath",),
        version: str = DEFAULT_VERSION,
        overlap: bool = False,
        timeout: float = 60.0,
    ) -> tuple[ExecResult, Flanneld]:
        """The way back: the agent gets SIGTERM (its data path stays and carries the traffic meanwhile),
        `flannel-ebpf down <down_args>` (the lease is kept unless --release-lease), then flanneld starts
        again with its last flags. `overlap` (the udp way, docs/MIGRATING.md): flanneld starts before
        `down`, which runs once flanneld is ready and moves the route onto flanneld's TUN."""
        h = self.host(host)
        fd = self.flanneld_of(h)
        if fd is None:
            raise RuntimeError(f"{h.name} never ran flanneld: nothing to hand back to")
        agent = self.agent(h)
        agent.stop()
        extra = [a for a in fd.argv[1:] if a not in fd.flags()]
        if overlap:
            fd = self.start_flanneld(h, version, extra)
            fd.wait_ready(timeout)
            return agent.down(list(down_args)), fd
        down = agent.down(list(down_args))
        return down, self.start_flanneld(h, version, extra)

    def flanneld_of(self, host: Host | str) -> Flanneld | None:
        """The host's flanneld runner (None: it never ran one)."""
        return self.flanneld.get(self.host(host).name)

    def runs_flanneld(self, host: Host | str) -> bool:
        fd = self.flanneld_of(host)
        return fd is not None and fd.running

    def start_agents(self, extra_args: Sequence[str] = (), hosts: Sequence[Host | str] | None = None) -> None:
        for h in hosts if hosts is not None else list(self.hosts):
            self.start_agent(h, extra_args)

    def stop_agent(self, host: Host | str, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; returns the exit code (None if it was not running)."""
        return self.agent(host).stop(timeout)

    def kill_agent(self, host: Host | str) -> int | None:
        return self.agent(host).kill()

    def agent_running(self, host: Host | str) -> bool:
        return self.agent(host).running

    def wait_ready(self, host: Host | str, timeout: float = 30.0) -> str:
        """Until the host's agent, or the flanneld running there, is ready."""
        fd = self.flanneld_of(host)
        if fd is not None and fd.running:
            return fd.wait_ready(timeout)
        return self.agent(host).wait_ready(timeout)

    def wait_all_ready(self, timeout: float = 30.0, hosts: Sequence[Host | str] | None = None) -> dict[str, str]:
        return {self.host(h).name: self.wait_ready(h, timeout) for h in (hosts or list(self.hosts))}

    def agent_down(self, host: Host | str, extra_args: Sequence[str] = (), check: bool = False) -> ExecResult:
        """`flannel-ebpf down` with the host's dirs (e.g. extra_args=["--release-lease"])."""
        return self.agent(host).down(extra_args, check=check)

    def agent_cli(self, host: Host | str, *args: str, timeout: float = 30.0) -> ExecResult:
        """Any CLI subcommand in the host's namespace, e.g. `agent_cli("h1", "status", "--json", ...)`."""
        return self.agent(host).cli(*args, timeout=timeout)

    def agent_status(self, host: Host | str) -> dict[str, Any]:
        a = self.agent(host)
        r = a.cli("status", "--json", "--state-dir", str(a.host.state_dir), check=True)
        status: dict[str, Any] = json.loads(r.stdout)
        return status

    def agent_log(self, host: Host | str, last_run: bool = False) -> str:
        """The host's agent log: every run (each begins with a `==== <time> start:` line), or the last."""
        return self.agent(host).log_text(last_run)

    def subnet_env(self, host: Host | str) -> SubnetEnv | None:
        path = self.host(host).subnet_file
        return SubnetEnv.read(path) if path.exists() else None

    def write_subnet_env(self, host: Host | str, network: str, subnet: str, mtu: int = 1500) -> SubnetEnv:
        """A hand-written subnet file, for tests that run without an agent."""
        path = self.host(host).subnet_file
        path.write_text(SubnetEnv.render(network, subnet, mtu))
        return SubnetEnv.read(path)

    def pin_subnet(self, host: Host | str, network: str, avoid: Iterable[str]) -> str:
        """The /24 the host's next agent takes, named in its subnet file (it reuses that one when free):
        the last of `network` not in `avoid`. An agent's own pick, at random among the first 100 free
        subnets, could be one just released."""
        avoided = set(avoid)
        subnet = next(s for s in reversed(list(IPv4Network(network).subnets(new_prefix=24))) if str(s) not in avoided)
        self.write_subnet_env(host, network, f"{subnet.network_address + 1}/24")
        return str(subnet)

    # ---------------------------------------------------------------- containers

    def add_container(
        self, host: Host | str, name: str | None = None, bridge: str = BRIDGE, subnet_file: Path | None = None
    ) -> Container:
        """A container on `host`, addressed from its subnet file (written by the agent beforehand), on
        `bridge` (docker0; e.g. lxcbr0 as `flannel-ebpf bridge lxcbr0` made it). `subnet_file`: another
        env file than the host's, e.g. one network's `<subnet-dir>/<network>.env` in multi-network mode
        (give each network a bridge of its own)."""
        h = self.host(host)
        path = subnet_file if subnet_file is not None else h.subnet_file
        env = SubnetEnv.read(path) if path.exists() else None
        if env is None:
            raise RuntimeError(f"{h.name}: no {path} yet (start the agent and wait_ready first)")
        mine = self.containers_of(h)
        name = name or f"{h.name}c{len(mine) + 1}"
        if len(name) > 10 or any(c.name == name for c in self.containers):
            raise ValueError(f"container name {name!r}: too long or already used")
        used = {c.ip for c in mine if c.ip in env.subnet.network}
        c = make_container(h, name, env, used, bridge)
        self.containers.append(c)
        return c

    def containers_of(self, host: Host | str) -> list[Container]:
        h = self.host(host)
        return [c for c in self.containers if c.host.name == h.name]

    # ---------------------------------------------------------------- traffic

    def exec(self, target: Target, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> ExecResult:
        return self.node(target).exec(argv, timeout=timeout, check=check)

    @staticmethod
    def _ip(dst: Host | Container | IPv4Address | str) -> str:
        if isinstance(dst, Host):
            return str(dst.underlay_ip)
        if isinstance(dst, Container):
            return str(dst.ip)
        return str(dst)

    def ping(
        self,
        src: Target,
        dst: Host | Container | IPv4Address | str,
        count: int = 3,
        interval: float = 0.2,
        timeout: float = 2.0,
        size: int | None = None,
    ) -> PingResult:
        """Ping from `src` to `dst` (an address, a container's address or a host's underlay address)."""
        return ping(self.node(src), self._ip(dst), count, interval, timeout, size)

    def ping_matrix(
        self, count: int = 3, interval: float = 0.2, timeout: float = 2.0, containers: Sequence[Container] | None = None
    ) -> PingMatrix:
        """Every container pings every other container."""
        cs = list(containers) if containers is not None else self.containers
        return ping_matrix([Endpoint(c.name, c.ns, str(c.ip)) for c in cs], count, interval, timeout)

    def underlay_ping_matrix(self, count: int = 2, interval: float = 0.2, timeout: float = 2.0) -> PingMatrix:
        """Every host pings every other host's underlay address."""
        eps = [Endpoint(h.name, self.node(h), str(h.underlay_ip)) for h in self.hosts.values()]
        return ping_matrix(eps, count, interval, timeout)

    def flood_ping(
        self, src: Target, dst: Host | Container | IPv4Address | str, seconds: float = 3.0, size: int = 56
    ) -> PingResult:
        return flood_ping(self.node(src), self._ip(dst), seconds, size)

    def iperf3_server(self, target: Target, port: int = 5201) -> IperfServer:
        """Start an iperf3 server (stopped by its PID on `stop()` or at the latest on `close()`)."""
        node = self.node(target)
        srv = IperfServer(node, port, self.dir / f"iperf3-{node.name}-{port}.log").start()
        self._iperf.append(srv)
        return srv

    def iperf3(
        self, src: Target, dst: Host | Container | IPv4Address | str, seconds: float = 5.0, **kw: Any
    ) -> dict[str, Any]:
        """An iperf3 client run (see traffic.iperf3_client for options); returns the JSON report."""
        return iperf3_client(self.node(src), self._ip(dst), seconds, **kw)


# -------------------------------------------------------------------- cleanup shared with `cleanup`


def _ensure_bpffs() -> None:
    """The agents pin under /sys/fs/bpf; mount bpffs there if the machine has not (a mount, not a
    network change)."""
    r = run(["stat", "-f", "-c", "%T", str(BPFFS)], check=False, timeout=5)
    if r.stdout.strip() not in ("bpf_fs", "bpf"):
        logger.info("mounting bpffs on {}", BPFFS)
        run(["mount", "-t", "bpf", "bpf", str(BPFFS)], timeout=10)


def delete_lab_namespaces(prefix: str) -> list[str]:
    """Delete every namespace of lab `prefix`; containers first, the switch last."""
    check_prefix(prefix)
    names = [n for n in list_netns() if n.startswith(f"{prefix}-")]
    order = {f"{prefix}-sw": 2, f"{prefix}-rt": 1}
    names.sort(key=lambda n: order.get(n, 0))
    for n in names:
        delete_netns(n)
    return names


def remove_lab_pins(prefix: str) -> list[Path]:
    """Remove `/sys/fs/bpf/flannel-ebpf-<prefix>-*` (what the agents pinned and `down` left)."""
    check_prefix(prefix)
    removed = []
    for p in BPFFS.glob(f"{PIN_DIR_PREFIX}{prefix}-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
