"""The forwarding loop of the userspace udp path: flannel's classic TUN proxy, as a process of its own.

The agent (`udp_tun.UdpTunBackend`) opens the TUN device and the UDP socket, then starts this module as
`python -m flannel_ebpf.backends.udp.tun_proxy` with both descriptors and one end of a SOCK_SEQPACKET
socketpair (the control channel). A separate process, not a thread, because the agent is an asyncio
program and every packet here is Python bytecode: sharing one GIL with the agent would slow both.

Per packet, as flannel's proxy does:
  TUN -> UDP  read one inner IPv4 packet; find the peer whose subnet holds its destination; no peer ->
              ICMP net-unreachable written back into the TUN; TTL <= 1 -> drop; else decrement the TTL
              (incremental checksum) and send the packet, unchanged otherwise, as the payload of one
              UDP datagram to <peer PublicIP>:<port>.
  UDP -> TUN  the payload is the inner packet; TTL <= 1 -> drop; else decrement it and write it to the TUN.
Beyond flannel: a decapsulated packet whose destination is outside this host's subnet, or whose source
claims flannel0's own address, is dropped (flannel injects anything a datagram carries), and a TTL of 0 is
dropped (flannel's decrement wraps it to 255).

Control messages (one JSON object per SEQPACKET message; only `stats` is answered):
  {"op": "set",   "peers": [[net, prefixlen, ip, port], ...]}   add or replace peers
  {"op": "del",   "peers": [[net, prefixlen], ...]}
  {"op": "stage", "peers": [...]} ... {"op": "commit"}          replace the whole table at once (sync)
  {"op": "stats", "id": n}  ->  {"id": n, "peers": count, "counters": {...}}
  {"op": "stop"}
`net` is the subnet's network address as a 32-bit integer. End of file on the control channel (the agent
died) ends the process too: like flannel, the path does not forward without its agent.

Speed: preallocated buffers (readinto/recv_into, memoryview slices), no per-packet logging, peers in
dicts keyed by the masked destination, level-triggered epoll, and up to BATCH packets per direction per
round so that one poll serves many packets.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from loguru import logger

from flannel_ebpf.logs import configure_logging

# Enough for any IPv4 packet: the TUN MTU bounds what we read from it, but a peer with a larger
# underlay MTU may send bigger datagrams and a short buffer would silently truncate them.
BUFFER_SIZE = 65536
# Packets moved per direction before the loop polls again (and looks at the control channel).
BATCH = 64
IPV4_HEADER_MIN = 20
ICMP_PROTO = 1
# ICMP error types (RFC 1122 3.2.2: never send an ICMP error about one of these).
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_ERROR_TTL = 64
# UDP GSO (<linux/udp.h>): one sendmsg carries up to 64 equal-size datagrams, at most 64 KiB in all.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507 - 8  # what one UDP datagram can carry, less a margin for the kernel's checks
# Large socket buffers absorb bursts while the single Python thread serves the other direction.
SOCKET_BUFFER = 4 * 1024 * 1024

COUNTER_NAMES = (
    "tx_packets",  # TUN -> UDP, sent
    "tx_bytes",
    "rx_packets",  # UDP -> TUN, written
    "rx_bytes",
    "drop_no_route",  # TUN -> UDP: no peer holds the destination (ICMP net-unreachable answered)
    "icmp_unreachable_sent",
    "drop_ttl_tx",
    "drop_ttl_rx",
    "drop_malformed_tx",  # shorter than an IPv4 header or not IPv4 (e.g. IPv6 the kernel sent)
    "drop_malformed_rx",
    "drop_not_local",  # UDP -> TUN: inner destination outside this host's subnet
    "drop_spoofed",  # UDP -> TUN: inner source is this host's flannel0 address
    "drop_send_error",  # sendto failed
    "drop_tun_write_error",
)

_U32 = struct.Struct("!I")
_2U32 = struct.Struct("!II")
_U16 = struct.Struct("=H")  # UDP_SEGMENT's value is a host-order u16


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum (only for the rare ICMP path; the hot path updates checksums incrementally)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def decrement_ttl(packet: bytearray) -> bool:
    """Decrement the IPv4 TTL in place and patch the header checksum (RFC 1624). False: drop it.

    The hot loop inlines this same arithmetic; this copy exists for tests and readability.
    """
    ttl = packet[8]
    if ttl <= 1:
        return False
    packet[8] = ttl - 1
    # TTL is the high byte of its 16-bit word: one less TTL is 0x0100 less in the sum, so the
    # ones'-complement checksum grows by 0x0100 (with the end-around carry).
    check = ((packet[10] << 8) | packet[11]) + 0x100
    check = (check & 0xFFFF) + (check >> 16)
    packet[10] = check >> 8
    packet[11] = check & 0xFF
    return True


def build_net_unreachable(offender: bytes | bytearray | memoryview, source: bytes) -> bytes | None:
    """ICMP destination-unreachable (net) answering `offender`, from `source` (4 bytes), or None.

    None, like flannel's proxy and RFC 1122: malformed header, not the first fragment, an ICMP error
    about an ICMP error (an echo request does get an answer, unlike flannel, which skips all ICMP), or a
    source that cannot be answered (0.0.0.0, multicast, broadcast).
    """
    length = len(offender)
    if length < IPV4_HEADER_MIN or offender[0] >> 4 != 4:
        return None
    header_len = (offender[0] & 0x0F) * 4
    if header_len < IPV4_HEADER_MIN or length < header_len:
        return None
    if ((offender[6] << 8) | offender[7]) & 0x1FFF:  # fragment offset: only the first fragment
        return None
    if offender[9] == ICMP_PROTO and (length <= header_len or offender[header_len] in ICMP_ERROR_TYPES):
        return None
    dest = bytes(offender[12:16])
    if dest == b"\x00\x00\x00\x00" or dest[0] >= 224:
        return None
    # The original IP header and the first 8 bytes of its payload (RFC 792).
    quoted = bytes(offender[: min(length, header_len + 8)])
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, ICMP_ERROR_TTL, ICMP_PROTO, 0, source, dest)
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header + icmp)


def prefix_mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF if prefixlen else 0


@dataclass
class PeerTable:
    """Peer subnets -> (PublicIP, port), one dict per prefix length, longest prefix first.

    All of a network's leases share SubnetLen, so `lookups` nearly always holds one (mask, dict) pair and
    a destination costs one mask and one dict lookup. `lookups` is updated in place: the forwarding loop
    holds a reference to that very list.
    """

    by_len: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict)
    lookups: list[tuple[int, dict[int, tuple[str, int]]]] = field(default_factory=list)

    def set(self, net: int, prefixlen: int, ip: str, port: int) -> None:
        mask = prefix_mask(prefixlen)
        self.by_len.setdefault(prefixlen, {})[net & mask] = (ip, port)
        self._rebuild()

    def delete(self, net: int, prefixlen: int) -> None:
        table = self.by_len.get(prefixlen)
        if table is not None:
            table.pop(net & prefix_mask(prefixlen), None)
            if not table:
                del self.by_len[prefixlen]
        self._rebuild()

    def replace(self, entries: list[list[Any]]) -> None:
        self.by_len.clear()
        for net, prefixlen, ip, port in entries:
            self.by_len.setdefault(prefixlen, {})[net & prefix_mask(prefixlen)] = (ip, port)
        self._rebuild()

    def lookup(self, dest: int) -> tuple[str, int] | None:
        for mask, table in self.lookups:
            peer = table.get(dest & mask)
            if peer is not None:
                return peer
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self.by_len.values())

    def _rebuild(self) -> None:
        self.lookups[:] = [(prefix_mask(n), self.by_len[n]) for n in sorted(self.by_len, reverse=True)]


class Proxy:
    """One forwarding loop over a TUN descriptor, a bound UDP socket and a control socket."""

    def __init__(self, tun_fd: int, udp_fd: int, ctl_fd: int, tun_addr: IPv4Address, local: IPv4Network):
        os.set_blocking(tun_fd, False)
        # FileIO.readinto returns None instead of raising when a non-blocking TUN is empty.
        self.tun = open(tun_fd, "r+b", buffering=0)  # noqa: SIM115 - lives as long as the process
        self.udp = socket.socket(fileno=udp_fd)
        self.udp.setblocking(False)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # 33/32: SO_*BUFFORCE
            try:
                self.udp.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                self.udp.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.ctl = socket.socket(fileno=ctl_fd)
        self.ctl.setblocking(False)
        self.tun_addr = tun_addr.packed
        self.local_net = int(local.network_address)
        self.local_mask = int(local.netmask)
        self.peers = PeerTable()
        self.staged: list[list[Any]] = []
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.running = True
        # One datagram per packet, as flanneld sends. UDP GSO batching ("1") saves CPU, but on a virtual
        # underlay (veth) a batch reaches the peer as one unsegmented super-frame, which a receiver that
        # decapsulates before its UDP stack (an eBPF/XDP path) cannot take apart: opt-in for experiments.
        self.gso = os.environ.get("FLANNEL_EBPF_TUN_GSO", "0") == "1"

    # -- control channel (rare: plain code) --

    def handle_control(self) -> None:
        while True:
            try:
                raw = self.ctl.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as e:
                logger.warning("udp-tun proxy: control channel failed ({}), exiting", e)
                self.running = False
                return
            if not raw:  # the agent is gone
                logger.info("udp-tun proxy: control channel closed, exiting")
                self.running = False
                return
            try:
                msg = json.loads(raw)
                self._apply(msg)
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("udp-tun proxy: bad control message ignored: {}", e)

    def _apply(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "set":
            for net, prefixlen, ip, port in msg["peers"]:
                self.peers.set(net, prefixlen, ip, port)
        elif op == "del":
            for net, prefixlen in msg["peers"]:
                self.peers.delete(net, prefixlen)
        elif op == "stage":
            self.staged.extend(msg["peers"])
        elif op == "commit":
            self.peers.replace(self.staged)
            self.staged = []
        elif op == "stats":
            reply = {"id": msg.get("id"), "peers": len(self.peers), "gso": self.gso, "counters": self.counters}
            try:
                self.ctl.send(json.dumps(reply).encode())
            except OSError as e:
                logger.warning("udp-tun proxy: cannot answer stats: {}", e)
        elif op == "stop":
            self.running = False
        else:
            raise KeyError(f"unknown op {op!r}")

    # -- the loop --

    def run(self) -> None:
        # One function on purpose: locals are the fast path in CPython.
        epoll = select.epoll()
        tun_fd, udp_fd, ctl_fd = self.tun.fileno(), self.udp.fileno(), self.ctl.fileno()
        for fd in (tun_fd, udp_fd, ctl_fd):
            epoll.register(fd, select.EPOLLIN)

        # tx_buf holds a GSO batch of up to GSO_MAX_BYTES plus room for one more full-size read.
        tx_buf, rx_buf = bytearray(GSO_MAX_BYTES + BUFFER_SIZE), bytearray(BUFFER_SIZE)
        tx_view, rx_view = memoryview(tx_buf), memoryview(rx_buf)
        tun_read, tun_write = self.tun.readinto, self.tun.write
        udp_recv_into, udp_sendto, udp_sendmsg = self.udp.recv_into, self.udp.sendto, self.udp.sendmsg
        unpack_u32, unpack_2u32 = _U32.unpack_from, _2U32.unpack_from
        lookups = self.peers.lookups  # updated in place by the control channel
        local_net, local_mask, tun_addr = self.local_net, self.local_mask, self.tun_addr
        tun_addr_int = int.from_bytes(tun_addr, "big")
        counters = self.counters
        batch = range(BATCH)
        # Hot counters live in locals and are folded into `counters` before each control message.
        tx_packets = tx_bytes = rx_packets = rx_bytes = 0
        busy = False
        gso = [self.gso]

        def send_batch(length: int, seg_size: int, nseg: int, peer: tuple[str, int]) -> int:
            """Send tx_buf[:length] (nseg packets of seg_size, the last maybe shorter); packets sent."""
            try:
                if nseg == 1:
                    udp_sendto(tx_view[:length], peer)
                elif gso[0]:
                    udp_sendmsg([tx_view[:length]], [(SOL_UDP, UDP_SEGMENT, _U16.pack(seg_size))], 0, peer)
                else:
                    for start in range(0, length, seg_size):
                        udp_sendto(tx_view[start : min(start + seg_size, length)], peer)
                return nseg
            except OSError as e:
                if nseg > 1 and gso[0] and e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    # No UDP GSO on this kernel or device: from now on, one sendto per packet.
                    logger.warning("udp-tun proxy: UDP GSO unavailable ({}), sending packet by packet", e)
                    gso[0] = False
                    self.gso = False
                    return send_batch(length, seg_size, nseg, peer)
                counters["drop_send_error"] += nseg  # EAGAIN (buffer full), ENOBUFS, no underlay route...
                return 0

        while self.running:
            try:
                events = epoll.poll(0 if busy else -1)
            except InterruptedError:
                continue
            busy = False
            tun_ready = udp_ready = False
            for fd, mask in events:
                if fd == tun_fd:
                    tun_ready = True
                elif fd == udp_fd:
                    udp_ready = True
                elif mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    counters["tx_packets"] += tx_packets
                    counters["tx_bytes"] += tx_bytes
                    counters["rx_packets"] += rx_packets
                    counters["rx_bytes"] += rx_bytes
                    tx_packets = tx_bytes = rx_packets = rx_bytes = 0
                    self.handle_control()

            if tun_ready:  # TUN -> UDP (encapsulate)
                # Packets of one burst to the same peer are read back to back into tx_buf and leave in
                # one sendmsg with UDP_SEGMENT (GSO): the kernel cuts it into one datagram per packet,
                # each the same size but the last, exactly as separate sendto calls would.
                off = seg_size = nseg = 0
                batch_peer: tuple[str, int] = ("", 0)  # meaningful only while nseg > 0
                for _ in batch:
                    n = tun_read(tx_view[off:])
                    if n is None:  # drained
                        break
                    busy = True
                    if n < IPV4_HEADER_MIN or tx_buf[off] >> 4 != 4:
                        counters["drop_malformed_tx"] += 1
                        continue
                    dest = unpack_u32(tx_buf, off + 16)[0]
                    peer = None
                    for mask, table in lookups:
                        peer = table.get(dest & mask)
                        if peer is not None:
                            break
                    if peer is None:
                        counters["drop_no_route"] += 1
                        reply = build_net_unreachable(tx_view[off : off + n], tun_addr)
                        if reply is not None:
                            try:
                                tun_write(reply)
                                counters["icmp_unreachable_sent"] += 1
                            except OSError:
                                counters["drop_tun_write_error"] += 1
                        continue
                    ttl = tx_buf[off + 8]
                    if ttl <= 1:
                        counters["drop_ttl_tx"] += 1
                        continue
                    tx_buf[off + 8] = ttl - 1
                    check = ((tx_buf[off + 10] << 8) | tx_buf[off + 11]) + 0x100
                    check = (check & 0xFFFF) + (check >> 16)
                    tx_buf[off + 10] = check >> 8
                    tx_buf[off + 11] = check & 0xFF
                    if nseg and (peer != batch_peer or n > seg_size or off + n > GSO_MAX_BYTES):
                        # This packet cannot join the batch: send the batch, start a new one with it.
                        sent = send_batch(off, seg_size, nseg, batch_peer)
                        tx_packets += sent
                        tx_bytes += off if sent else 0
                        tx_buf[0:n] = tx_view[off : off + n]
                        off = nseg = 0
                    if not nseg:
                        batch_peer, seg_size = peer, n
                    off += n
                    nseg += 1
                    if n < seg_size or nseg >= GSO_MAX_SEGMENTS:  # a short segment can only be the last
                        sent = send_batch(off, seg_size, nseg, batch_peer)
                        tx_packets += sent
                        tx_bytes += off if sent else 0
                        off = nseg = 0
                if nseg:
                    sent = send_batch(off, seg_size, nseg, batch_peer)
                    tx_packets += sent
                    tx_bytes += off if sent else 0

            if udp_ready:  # UDP -> TUN (decapsulate)
                for _ in batch:
                    try:
                        n = udp_recv_into(rx_buf)
                    except BlockingIOError:
                        break
                    except OSError:  # e.g. a queued ICMP error; the next read carries on
                        counters["drop_malformed_rx"] += 1
                        continue
                    busy = True
                    if n < IPV4_HEADER_MIN or rx_buf[0] >> 4 != 4:
                        counters["drop_malformed_rx"] += 1
                        continue
                    source, dest = unpack_2u32(rx_buf, 12)
                    if dest & local_mask != local_net:
                        counters["drop_not_local"] += 1
                        continue
                    if source == tun_addr_int:  # only our own ICMP answers may claim flannel0's address
                        counters["drop_spoofed"] += 1
                        continue
                    ttl = rx_buf[8]
                    if ttl <= 1:
                        counters["drop_ttl_rx"] += 1
                        continue
                    rx_buf[8] = ttl - 1
                    check = ((rx_buf[10] << 8) | rx_buf[11]) + 0x100
                    check = (check & 0xFFFF) + (check >> 16)
                    rx_buf[10] = check >> 8
                    rx_buf[11] = check & 0xFF
                    try:
                        tun_write(rx_view[:n])
                    except OSError:
                        counters["drop_tun_write_error"] += 1
                        continue
                    rx_packets += 1
                    rx_bytes += n
        epoll.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="flannel-ebpf userspace udp (TUN) forwarding process")
    parser.add_argument("--tun-fd", type=int, required=True)
    parser.add_argument("--udp-fd", type=int, required=True)
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--tun-addr", type=IPv4Address, required=True, help="flannel0's address")
    parser.add_argument("--local-subnet", type=IPv4Network, required=True, help="this host's lease")
    args = parser.parse_args(argv)
    # The agent decides when we stop (control message, or its end closing the channel); a Ctrl-C
    # aimed at the agent's terminal must not kill the data path before the agent has said so.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(os.environ.get("FLANNEL_EBPF_PROXY_LOG", "INFO"))
    try:
        proxy = Proxy(args.tun_fd, args.udp_fd, args.ctl_fd, args.tun_addr, args.local_subnet)
    except OSError as e:
        logger.error("udp-tun proxy: cannot use the descriptors it was given: {}", e)
        return 1
    logger.info("udp-tun proxy {} forwarding for {}", os.getpid(), args.local_subnet)
    try:
        proxy.run()
    except OSError as e:
        if e.errno != errno.EBADF:
            logger.error("udp-tun proxy: forwarding failed: {}", e)
            return 1
    logger.info("udp-tun proxy {} stopped: {}", os.getpid(), proxy.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
