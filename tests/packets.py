"""Hand-made packets with valid checksums, for tests that put bytes on the wire or into programs."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    frag: int = 0,
    options: bytes = b"",
    bad_csum: bool = False,
) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            ihl * 4 + len(payload),
            0x1234,
            frag,
            ttl,
            proto,
            0,
            IPv4Address(src).packed,
            IPv4Address(dst).packed,
        )
        + options
    )
    check = csum(hdr) ^ (0x5555 if bad_csum else 0)
    return hdr[:10] + struct.pack("!H", check) + hdr[12:] + payload


def icmp(kind: int = 8, code: int = 0, body: bytes = b"0123456789abcdef") -> bytes:
    msg = struct.pack("!BBHHH", kind, code, 0, 7, 1) + body
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def udp(dport: int, payload: bytes, sport: int = 40000) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(payload: bytes, proto: int = 0x0800) -> bytes:
    return bytes.fromhex("020000000002") + bytes.fromhex("020000000001") + struct.pack("!H", proto) + payload


def inner_echo(dst: str = "10.60.2.2", src: str = "10.60.1.2", ttl: int = 64, size: int = 0, df: bool = False) -> bytes:
    body = b"x" * max(16, size - 28)
    return ipv4(src, dst, 1, icmp(body=body), ttl=ttl, frag=0x4000 if df else 0)


def with_ttl(packet: bytes, ttl: int) -> bytes:
    """The IPv4 packet with another TTL and a recomputed header checksum."""
    ihl = (packet[0] & 0xF) * 4
    hdr = bytearray(packet[:ihl])
    hdr[8] = ttl
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return bytes(hdr) + packet[ihl:]
