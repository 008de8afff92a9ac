"""The userspace udp path: flannel's classic TUN backend, the baseline the eBPF udp path is measured against.

Selected with `--udp-datapath tun` for a network whose Backend.Type is `udp`. On the wire it is exactly
flannel's udp backend (UDP port 8285 by default, payload = the raw inner IPv4 packet), so it interoperates
with flanneld and with the eBPF path.

Kernel state, as flanneld makes it: TUN device `flannel0` (IFF_TUN | IFF_NO_PI) holding the lease's network
address as /32, MTU = underlay MTU - 28, route `<Network> dev flannel0`. Unlike flanneld the device is made
persistent (TUNSETPERSIST): while the forwarding process is down (agent restart), the route keeps pointing
into flannel0, so overlay traffic is dropped there instead of leaking out of the default route; a restarted
agent re-attaches to the same device. `teardown` deletes it.

Packets are moved by `udp.tun_proxy`, a process of its own that the agent starts in `start()` and ends in
`stop()`; peers reach it over a SOCK_SEQPACKET socketpair (see that module for the protocol).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loguru import logger

from flannel_ebpf.backends.base import Backend, BackendError, PeerBook
from flannel_ebpf.config import udp_port_problem
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.netlink.routes import ROUTE_PROTOCOL
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs, unusable_address_reason

DEVICE_NAME = "flannel0"
DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28  # outer IPv4 header (20) + UDP header (8)
PROXY_MODULE = "flannel_ebpf.backends.udp.tun_proxy"
#: its module path in earlier releases: an agent upgraded while that proxy runs still finds and ends it
EARLIER_PROXY_MODULE = "flannel_ebpf.backends.udp_tun_proxy"
PID_FILE = "udp-tun-proxy.pid"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

STOP_TIMEOUT = 2.0
STATS_TIMEOUT = 1.0
# Peers per control message when a sync is staged in pieces (a SEQPACKET message must fit the
# socket buffer; ~40 bytes a peer).
STAGE_CHUNK = 1000


def open_tun(name: str) -> int:
    """Create (or attach to, if it persists) the TUN device `name`; return its descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class UdpPeer:
    subnet: IPv4Network
    public_ip: IPv4Address


class UdpTunBackend(Backend):
    """flannel's `udp` backend with its userspace TUN proxy (flannel-ebpf's `--udp-datapath tun`)."""

    type_name = "udp"

    def __init__(self, backend_config: dict[str, Any], options: BackendOptions) -> None:
        super().__init__(backend_config, options)
        port = backend_config.get("Port", DEFAULT_PORT) if backend_config else DEFAULT_PORT
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise BackendError(f"udp backend: Port must be an integer in 1..65535, not {port!r}")
        problem = udp_port_problem(port)
        if problem:
            raise BackendError(f"udp backend: {problem}")
        self.port: int = port
        self.book = PeerBook("udp (tun)")  # only its skipped leases are kept
        self.ext: ExternalInterface | None = None
        self.local: LocalNetwork | None = None
        self.peers: dict[IPv4Network, UdpPeer] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._request_ids = itertools.count(1)
        self._started = False  # between start() and stop(): a dead forwarding process is restarted

    # -- Backend interface --

    def overhead(self) -> int:
        return ENCAP_OVERHEAD

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        self.ext = ext
        # flanneld's udp lease carries neither BackendType nor BackendData.
        return LeaseAttrs(public_ip=ext.public_ip, backend_type="udp", backend_data=None)

    def start(self, local: LocalNetwork) -> None:
        self.local = local
        self.ext = local.ext
        self._stop_recorded_proxy()  # a proxy an earlier agent left behind holds the UDP port
        self._configure_device(local)
        self._spawn_proxy()
        self._started = True
        self._push_all()
        logger.info(
            "udp (tun): {} {}/32 mtu {}, route {} dev {}, UDP {}:{}, proxy pid {}",
            DEVICE_NAME,
            local.subnet.network_address,
            self._mtu(),
            local.network,
            DEVICE_NAME,
            local.ext.address,
            self.port,
            self._proc.pid if self._proc else None,
        )

    def sync(self, peers: list[Lease]) -> None:
        wanted: dict[IPv4Network, UdpPeer] = {}
        for lease in peers:
            try:
                peer = self._validate(lease)
            except Exception as e:  # one bad peer costs exactly that peer, never the whole sync
                self.book.skip(lease, f"cannot evaluate its lease: {type(e).__name__}: {e}")
                continue
            if peer is not None:
                wanted[peer.subnet] = peer
        self.book.prune({lease.subnet for lease in peers})
        for gone in set(self.peers) - set(wanted):
            logger.info("udp (tun): peer {} removed", gone)
        for subnet, peer in wanted.items():
            if self.peers.get(subnet) != peer:
                logger.info("udp (tun): peer {} via {}:{}", subnet, peer.public_ip, self.port)
        self.peers = wanted
        if self._ensure_proxy():
            self._push_all()

    def add_peer(self, lease: Lease) -> None:
        try:
            peer = self._validate(lease)
        except Exception as e:  # never raised to the agent: that peer only is skipped
            self.book.skip(lease, f"cannot evaluate its lease: {type(e).__name__}: {e}")
            peer = None
        if peer is None:
            if lease.subnet in self.peers:  # it changed into something unusable: its old entry goes
                self._drop_peer(lease.subnet)
            return
        if self.peers.get(peer.subnet) == peer:
            return
        self.peers[peer.subnet] = peer
        logger.info("udp (tun): peer {} via {}:{}", peer.subnet, peer.public_ip, self.port)
        if self._ensure_proxy():
            self._send({"op": "set", "peers": [self._entry(peer)]})

    def remove_peer(self, lease: Lease) -> None:
        self.book.forget(lease.subnet)
        self._drop_peer(lease.subnet)

    def _drop_peer(self, subnet: IPv4Network) -> None:
        if self.peers.pop(subnet, None) is None:
            return
        logger.info("udp (tun): peer {} removed", subnet)
        if self._ensure_proxy():
            self._send({"op": "del", "peers": [[int(subnet.network_address), subnet.prefixlen]]})

    def stop(self) -> None:
        """End the forwarding process. flannel0 and its route stay; nothing forwards until `start`."""
        self._started = False
        self._end_proxy()

    def _end_proxy(self) -> None:
        proc, ctl = self._proc, self._ctl
        self._proc, self._ctl = None, None
        if proc is not None:
            if ctl is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    ctl.send(b'{"op":"stop"}')
            _end_process(proc, STOP_TIMEOUT)
            logger.info("udp (tun): forwarding process {} ended (exit {})", proc.pid, proc.returncode)
        if ctl is not None:
            ctl.close()
        self._remove_pid_file()

    def teardown(self, local: LocalNetwork | None) -> None:
        self.stop()
        self._stop_recorded_proxy()
        from pyroute2 import IPRoute  # slow import: only where netlink is needed
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=DEVICE_NAME)
            if indexes:
                # The Network route goes with the device.
                ipr.link("del", index=indexes[0])
                logger.info("udp (tun): deleted {}", DEVICE_NAME)
            if local is not None:
                # A route we added that somehow outlived the device (never expected; cheap to check).
                net = local.network
                for route in ipr.get_routes(family=socket.AF_INET, proto=ROUTE_PROTOCOL):
                    if route.get_attr("RTA_DST") == str(net.network_address) and route["dst_len"] == net.prefixlen:
                        with contextlib.suppress(NetlinkError):
                            ipr.route("del", dst=str(net), proto=ROUTE_PROTOCOL)

    def status(self) -> dict[str, Any]:
        proc = self._proc
        running = proc is not None and proc.poll() is None
        result: dict[str, Any] = {
            "type": self.type_name,
            "datapath": "tun",
            "device": DEVICE_NAME,
            "port": self.port,
            "mtu": self._mtu() if self.ext else None,
            "proxy": {"pid": proc.pid if proc else None, "running": running},
            "peers": [
                {"subnet": str(p.subnet), "public_ip": str(p.public_ip)}
                for p in sorted(self.peers.values(), key=lambda p: p.subnet)
            ],
            "counters": None,
        }
        if running:
            stats = self._query_stats()
            if stats is not None:
                result["counters"] = stats.get("counters")
                result["proxy"]["peers"] = stats.get("peers")
        return result

    def _validate(self, lease: Lease) -> UdpPeer | None:
        """The peer a lease describes, or None (logged) when it is ours or unusable here."""
        local = self.local
        if local is not None and lease.subnet == local.subnet:
            return None  # our own lease
        if local is not None and not lease.subnet.subnet_of(local.network):
            return self._skip(lease, f"outside the Network {local.network}")
        if lease.attrs.backend_type != "udp":
            # flanneld's udp backend would send to it anyway; that host runs no udp receiver.
            return self._skip(lease, f"its BackendType is {lease.attrs.backend_type!r}, not udp")
        ip = lease.public_ip
        why = unusable_address_reason(ip)
        if why:
            return self._skip(lease, f"unusable PublicIP: {why}")
        self.book.usable(lease)
        return UdpPeer(subnet=lease.subnet, public_ip=ip)

    def _skip(self, lease: Lease, why: str) -> UdpPeer | None:
        self.book.skip(lease, why)
        return None

    # -- kernel state --

    def _mtu(self) -> int:
        assert self.ext is not None
        return self.ext.mtu - ENCAP_OVERHEAD

    def _configure_device(self, local: LocalNetwork) -> None:
        """flannel0 with the lease's network address /32, the MTU, up, and the route for the Network."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            fd = open_tun(DEVICE_NAME)
        except OSError as e:
            raise BackendError(
                f"cannot create or attach TUN device {DEVICE_NAME}: {e}. If {DEVICE_NAME} exists and is "
                "not a TUN device (another backend made it), run `flannel-ebpf down` first"
            ) from e
        # Kept only while configuring: the forwarding process gets its own descriptor (see _spawn_proxy).
        os.close(fd)
        # The ICMP net-unreachable the proxy writes into flannel0 comes from flannel0's own address, and
        # the kernel drops packets that arrive with a local source ("martian") unless the device accepts
        # them. (flanneld misses this: its answers never reach the sender.) The proxy drops decapsulated
        # packets that claim that source, so peers cannot use this to spoof it.
        _set_device_sysctl(DEVICE_NAME, "accept_local", "1")
        address = str(local.subnet.network_address)
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=DEVICE_NAME)[0]
                ipr.link("set", index=index, mtu=self._mtu())
                have = {a.get_attr("IFA_ADDRESS"): a["prefixlen"] for a in ipr.get_addr(index=index, family=2)}
                for other, prefixlen in have.items():
                    if other != address or prefixlen != 32:  # a previous lease's address
                        ipr.addr("del", index=index, address=other, prefixlen=prefixlen)
                if have.get(address) != 32:
                    ipr.addr("add", index=index, address=address, prefixlen=32)
                ipr.link("set", index=index, state="up")
                # Like flanneld, add the route explicitly: the /32 address makes none, and a route Docker
                # installed for part of the Network must not hide the rest.
                ipr.route(
                    "replace",
                    dst=str(local.network),
                    oif=index,
                    proto=ROUTE_PROTOCOL,
                    scope=0,  # universe
                )
                for route in ipr.get_routes(family=socket.AF_INET, oif=index, proto=ROUTE_PROTOCOL):
                    dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                    if dst != str(local.network):  # a previous configuration's Network
                        ipr.route("del", dst=dst, oif=index, proto=ROUTE_PROTOCOL)
        except (NetlinkError, IndexError) as e:
            raise BackendError(f"cannot configure {DEVICE_NAME}: {e}") from e

    # -- the forwarding process --

    def _spawn_proxy(self) -> None:
        assert self.local is not None
        local = self.local
        tun_fd = open_tun(DEVICE_NAME)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # flanneld binds to the interface's address, so datagrams leave from it whatever the routes.
            udp.bind((str(local.ext.address), self.port))
        except OSError as e:
            os.close(tun_fd)
            udp.close()
            raise BackendError(f"cannot bind UDP {local.ext.address}:{self.port}: {e}") from e
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [
            sys.executable,
            "-m",
            PROXY_MODULE,
            f"--tun-fd={tun_fd}",
            f"--udp-fd={udp.fileno()}",
            f"--ctl-fd={theirs.fileno()}",
            f"--tun-addr={local.subnet.network_address}",
            f"--local-subnet={local.subnet}",
        ]
        try:
            # Its own session: a Ctrl-C at the agent's terminal reaches the agent, which then stops it.
            # The descriptors are the child's alone once we close ours, so when it ends, the TUN has no
            # reader and the UDP port is free again.
            self._proc = subprocess.Popen(cmd, pass_fds=(tun_fd, udp.fileno(), theirs.fileno()), start_new_session=True)
        finally:
            os.close(tun_fd)
            udp.close()
            theirs.close()
        ours.settimeout(STATS_TIMEOUT)
        self._ctl = ours
        self._write_pid_file(self._proc.pid)

    def _ensure_proxy(self) -> bool:
        """True when a forwarding process runs (restarting one that died); False before `start`."""
        if not self._started:
            return False
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._proc is not None:
            logger.error(
                "udp (tun): forwarding process {} died (exit {}); restarting it", self._proc.pid, self._proc.returncode
            )
            self._end_proxy()
        self._spawn_proxy()
        self._push_all()
        return True

    def _entry(self, peer: UdpPeer) -> list[Any]:
        return [int(peer.subnet.network_address), peer.subnet.prefixlen, str(peer.public_ip), self.port]

    def _push_all(self) -> None:
        """Replace the forwarding process's table with `self.peers` in one atomic commit."""
        entries = [self._entry(p) for p in self.peers.values()]
        for i in range(0, len(entries), STAGE_CHUNK):
            self._send({"op": "stage", "peers": entries[i : i + STAGE_CHUNK]})
        self._send({"op": "commit"})

    def _send(self, msg: dict[str, Any]) -> None:
        if self._ctl is None:
            return
        try:
            self._ctl.send(json.dumps(msg, separators=(",", ":")).encode())
        except OSError as e:
            # The process died; the next add/remove/sync restarts it with the full table.
            logger.error("udp (tun): cannot reach the forwarding process: {}", e)

    def _query_stats(self) -> dict[str, Any] | None:
        if self._ctl is None:
            return None
        request_id = next(self._request_ids)
        self._send({"op": "stats", "id": request_id})
        deadline = time.monotonic() + STATS_TIMEOUT
        while time.monotonic() < deadline:
            try:
                reply: dict[str, Any] = json.loads(self._ctl.recv(1 << 20))
            except (OSError, ValueError):
                return None
            if reply.get("id") == request_id:  # skip a late answer to an earlier, timed-out request
                return reply
        return None

    # -- the pid file: lets `down` (a fresh process) and a restarted agent find a proxy left running --

    def _pid_path(self) -> Path:
        return Path(self.options.state_dir) / PID_FILE

    def _write_pid_file(self, pid: int) -> None:
        try:
            path = self._pid_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{pid}\n")
        except OSError as e:
            logger.warning("udp (tun): cannot record the forwarding process's pid: {}", e)

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(OSError):
            self._pid_path().unlink()

    def _stop_recorded_proxy(self) -> None:
        """End a forwarding process recorded in the state dir, if it still runs and is ours."""
        try:
            pid = int(self._pid_path().read_text().strip())
        except (OSError, ValueError):
            return
        if not _is_our_proxy(pid):
            self._remove_pid_file()
            return
        logger.info("udp (tun): ending forwarding process {} left by an earlier agent", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _is_our_proxy(pid):
            time.sleep(0.05)
        if _is_our_proxy(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._remove_pid_file()


def _set_device_sysctl(device: str, name: str, value: str) -> None:
    """Set net.ipv4.conf.<device>.<name> in the current network namespace (our device only)."""
    path = Path("/proc/sys/net/ipv4/conf") / device / name
    try:
        path.write_text(value)
    except OSError as e:
        logger.warning("udp (tun): cannot set {}: {}", path, e)


def _is_our_proxy(pid: int) -> bool:
    """The pid runs the TUN proxy (and is not a zombie): guards against a recycled pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return any(m.encode() in cmdline for m in (PROXY_MODULE, EARLIER_PROXY_MODULE)) and state != "Z"


def _end_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
